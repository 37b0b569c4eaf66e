"""GRU4Rec (Hidasi et al., ICLR 2016) as a baseline: a GRU over the item sequence.

Same data, losses and evaluation as SASRec, with the transformer replaced by a recurrent network.
Sequences are right-padded, so the GRU's state at a real position has only seen real items
before it, exactly like causal attention; no packing is needed. The last layer's output is
projected to the embedding size and scored against the tied item embeddings.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from recsys.losses import FullCrossEntropy
from recsys.metrics import DEFAULT_KS
from recsys.models.base import (
    SequentialRecommender,
    flat_positions,
    keep_last_items,
    last_real_position,
    target_positions,
)


class GRU4Rec(SequentialRecommender):
    def __init__(
        self,
        num_items: int,
        max_len: int = 50,
        dim: int = 64,
        hidden_dim: int | None = None,
        num_layers: int = 1,
        dropout: float = 0.2,
        init_std: float = 0.02,
        loss: nn.Module | None = None,
        optimizer: Callable | None = None,
        scheduler: Callable | None = None,
        scheduler_interval: str = "epoch",
        data_fingerprint: str = "",
        ks: Sequence[int] = DEFAULT_KS,
        weight_batches_by_targets: bool = True,
    ):
        super().__init__(
            num_items,
            optimizer,
            scheduler,
            scheduler_interval,
            data_fingerprint,
            ks,
            weight_batches_by_targets,
        )
        self.save_hyperparameters(ignore=["loss", "optimizer", "scheduler"])
        self.max_len = max_len
        hidden_dim = hidden_dim or dim
        self.item_embedding = nn.Embedding(num_items + 1, dim, padding_idx=0)
        self.input_dropout = nn.Dropout(dropout)
        self.gru = nn.GRU(
            dim, hidden_dim, num_layers, batch_first=True, dropout=dropout if num_layers > 1 else 0.0
        )
        self.output_dropout = nn.Dropout(dropout)
        self.project = nn.Linear(hidden_dim, dim) if hidden_dim != dim else nn.Identity()
        self._set_loss(loss if loss is not None else FullCrossEntropy())
        # Small embeddings, as for SASRec: tied N(0, 1) embeddings stall learning. The GRU keeps
        # PyTorch's own initialisation.
        nn.init.normal_(self.item_embedding.weight, std=init_std)
        with torch.no_grad():
            self.item_embedding.weight[0].zero_()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Outputs (B, L, dim) for right-padded item ids (B, L)."""
        states, _ = self.gru(self.input_dropout(self.item_embedding(input_ids)))
        return self.project(self.output_dropout(states))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        hidden = self(batch["input_ids"])
        index = flat_positions(target_positions(batch))
        targets = batch["target_ids"].flatten()[index]
        loss = self.loss(hidden.flatten(0, 1)[index], targets, self.item_embedding.weight)
        return self._training_loss(loss, len(index))

    def user_vectors(self, history: torch.Tensor) -> torch.Tensor:
        history = keep_last_items(history, self.max_len)
        return last_real_position(self(history), history)

    def item_vectors(self) -> torch.Tensor:
        return self.item_embedding.weight
