"""GRU4Rec (Hidasi et al., ICLR 2016) as a baseline: a GRU over the item sequence.

Same data, losses and evaluation as SASRec, with the transformer replaced by a recurrent network.
Sequences are right-padded, so the GRU's state at a real position has only seen real items
before it, exactly like causal attention; no packing is needed. The last layer's output is
projected to the embedding size and scored against the tied item embeddings.
"""

from __future__ import annotations

import torch
from torch import nn

from recsys.models.item_attributes import embed_items, item_attributes, item_table
from recsys.models.network import (
    DataInfo,
    SequenceNetwork,
    keep_last_positions,
    last_real_position,
    target_positions,
)


class GRU4Rec(SequenceNetwork):
    def __init__(
        self,
        data: DataInfo,
        max_len: int = 50,
        dim: int = 64,
        hidden_dim: int | None = None,
        num_layers: int = 1,
        dropout: float = 0.2,
        init_std: float = 0.02,
        item_id: bool = True,
        item_features: bool = True,
        id_dropout: float = 0.0,
    ):
        super().__init__(data, max_len)
        hidden_dim = hidden_dim or dim
        self.item_embedding = nn.Embedding(data.num_items + 1, dim, padding_idx=0) if item_id else None
        self.input_dropout = nn.Dropout(dropout)
        self.gru = nn.GRU(
            dim, hidden_dim, num_layers, batch_first=True, dropout=dropout if num_layers > 1 else 0.0
        )
        self.output_dropout = nn.Dropout(dropout)
        self.project = nn.Linear(hidden_dim, dim) if hidden_dim != dim else nn.Identity()
        # Small embeddings, as for SASRec: tied N(0, 1) embeddings stall learning. The GRU keeps
        # PyTorch's own initialisation.
        if item_id:
            nn.init.normal_(self.item_embedding.weight, std=init_std)
            with torch.no_grad():
                self.item_embedding.weight[0].zero_()
        # Last: without attributes nothing above changes (recsys/models/item_attributes.py).
        self.item_attributes = item_attributes(
            data, dim, data.num_items + 1, init_std, item_features, item_id, "GRU4Rec", id_dropout
        )

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Outputs (B, L, dim) for right-padded item ids (B, L)."""
        items = embed_items(input_ids, self.item_embedding, self.item_attributes)
        states, _ = self.gru(self.input_dropout(items))
        return self.project(self.output_dropout(states))

    def training_outputs(
        self, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self(batch["input_ids"]), batch["target_ids"], target_positions(batch)

    def user_vectors(self, history: torch.Tensor) -> torch.Tensor:
        (history,) = keep_last_positions(history, self.max_len)
        return last_real_position(self(history), history)

    def item_vectors(self) -> torch.Tensor:
        return item_table(self.item_embedding, self.item_attributes)
