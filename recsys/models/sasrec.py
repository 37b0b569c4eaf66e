"""SASRec (Kang & McAuley, ICDM 2018): a causal transformer over the user's item sequence.

Sequences are right-padded (padding id 0 at the end). With causal attention a real position only
attends to positions at or before it, which are all real, so no padding mask is needed and
`is_causal=True` alone is exact: SDPA can run its flash kernel. Outputs at padding positions are
computed but never used. Scores are dot products with the (tied) item embeddings.

On event-typed data (browse vs buy) the input of each position can also carry its event type and
time gap (`model.event_embedding`, `model.time_gaps`; recsys/models/events.py), and the loss counts
only the positions the data module marks as targets (`target_mask`, from `data.target_events`).

With item attributes in the data (`data.item_features`), an item's vector adds the mean of its
attribute embeddings to its id embedding, or with `model.item_id=false` is that mean alone
(recsys/models/item_attributes.py).

`model.block=ligr` swaps the transformer blocks for LiGR layers (gated residuals, a SwiGLU
feed-forward layer; recsys/models/transformer.py), eSASRec's architecture.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from recsys.errors import UserInputError
from recsys.models.events import BehaviourEmbedding
from recsys.models.item_attributes import embed_items, item_attributes
from recsys.models.network import (
    CausalItemNetwork,
    DataInfo,
    position_ids,
)
from recsys.models.transformer import BLOCKS, LiGRBlock, TransformerBlock, init_weights


class SASRec(CausalItemNetwork):
    def __init__(
        self,
        data: DataInfo,
        max_len: int = 50,
        dim: int = 64,
        num_blocks: int = 2,
        num_heads: int = 1,
        ffn_dim: int | None = None,
        dropout: float = 0.2,
        attention_dropout: float = 0.0,
        pre_norm: bool = True,
        init_std: float = 0.02,
        positions_from_end: bool = False,
        scale_embeddings: bool = True,
        event_embedding: bool = False,
        time_gaps: bool = False,
        item_id: bool = True,
        item_features: bool = True,
        id_dropout: float = 0.0,
        block: str = "transformer",
    ):
        super().__init__(data, max_len)
        self.check_options({"block": block})
        self.positions_from_end = positions_from_end
        self.embedding_scale = dim**0.5 if scale_embeddings else 1.0
        self.item_embedding = nn.Embedding(data.num_items + 1, dim, padding_idx=0) if item_id else None
        self.position_embedding = nn.Embedding(max_len, dim)
        self.embedding_dropout = nn.Dropout(dropout)
        if block == "ligr":  # pre-norm by construction
            self.blocks = nn.ModuleList(
                LiGRBlock(dim, num_heads, ffn_dim or 4 * dim, dropout, attention_dropout)
                for _ in range(num_blocks)
            )
        else:
            self.blocks = nn.ModuleList(
                TransformerBlock(dim, num_heads, ffn_dim or 4 * dim, dropout, pre_norm, attention_dropout)
                for _ in range(num_blocks)
            )
        # Pre-norm blocks leave the residual stream un-normalised: normalise once at the end.
        self.final_norm = nn.LayerNorm(dim) if pre_norm or block == "ligr" else nn.Identity()
        # Last, so that with both switches off nothing about the model changes.
        self.behaviour = BehaviourEmbedding(dim, data.num_event_types, event_embedding, time_gaps)
        init_weights(self, init_std)
        # After every other weight's initialisation: without attributes nothing above changes.
        self.item_attributes = item_attributes(
            data, dim, data.num_items + 1, init_std, item_features, item_id, "SASRec", id_dropout
        )

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> None:
        block = options.get("block", "transformer")
        if block not in BLOCKS:
            raise UserInputError(f"model.block: {block!r} is not one of {list(BLOCKS)}")

    def forward(
        self,
        input_ids: torch.Tensor,
        events: torch.Tensor | None = None,
        gaps: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states (B, L, dim) for right-padded item ids (B, L), L <= max_len, and, for a
        model that reads them, the positions' event types and time-gap buckets (B, L)."""
        # From the end, position 0 is the most recent item, as in the original left-padded SASRec:
        # the item the next one is predicted from always has the same position embedding.
        positions = position_ids(input_ids, self.positions_from_end)
        items = embed_items(input_ids, self.item_embedding, self.item_attributes)
        x = items * self.embedding_scale + self.position_embedding(positions)
        x = self.embedding_dropout(x + self.behaviour(events, gaps))
        for block in self.blocks:
            x = block(x, is_causal=True)
        return self.final_norm(x)
