"""BERT4Rec (Sun et al., CIKM 2019): a bidirectional transformer trained by cloze masking.

Training hides a random subset of each sequence's items behind a [MASK] token (id num_items + 1)
and predicts them from both sides; at inference a [MASK] is appended after the history and the
model predicts what stands there. Attention is bidirectional, so padding keys are masked out
(`key_padding_mask`): unlike SASRec this cannot use SDPA's flash kernel. Scores are dot products
with the tied item embeddings, [MASK] and padding excluded from the catalogue the loss sees.

Klenitskiy & Vasilev (RecSys 2023) found BERT4Rec's reputation rests on long training with full
cross-entropy: the default here is the shared full-softmax loss at the masked positions.

On event-typed data (`model.event_embedding`, `model.time_gaps`; recsys/models/events.py) a hidden
position keeps its event type (the model is asked "which item was *bought* here?") but loses its
time gap, which at inference, for the appended [MASK], is unknown; the appended [MASK] carries the
type of the event being predicted. With `data.target_events`, only positions whose event is of a
target type are hidden (never a window's first item, which no model predicts).

With item attributes in the data (`data.item_features`), item vectors add the mean of the item's
attribute embeddings, or with `model.item_id=false` are that mean alone
(recsys/models/item_attributes.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from recsys.errors import UserInputError
from recsys.models.events import BehaviourEmbedding
from recsys.models.item_attributes import item_attributes, item_table
from recsys.models.network import DataInfo, SequenceNetwork, keep_last_positions, position_ids
from recsys.models.transformer import TransformerBlock, init_weights


class BERT4Rec(SequenceNetwork):
    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> None:
        mask_prob = options.get("mask_prob", 0.2)
        if not 0.0 < mask_prob < 1.0:
            raise UserInputError(
                f"model.mask_prob: the masking probability must lie in (0, 1), got {mask_prob}"
            )
        last_only_prob = options.get("last_only_prob", 0.0)
        if not 0.0 <= last_only_prob <= 1.0:
            raise UserInputError(
                f"model.last_only_prob: the share of last-item-only windows must lie in [0, 1], "
                f"got {last_only_prob}"
            )

    def __init__(
        self,
        data: DataInfo,
        max_len: int = 50,
        dim: int = 64,
        num_blocks: int = 2,
        num_heads: int = 2,
        ffn_dim: int | None = None,
        dropout: float = 0.2,
        attention_dropout: float = 0.0,
        pre_norm: bool = True,
        init_std: float = 0.02,
        mask_prob: float = 0.2,
        mask_last: bool = False,
        last_only_prob: float = 0.0,
        scale_embeddings: bool = True,
        positions_from_end: bool = False,
        head_transform: bool = False,
        item_bias: bool = False,
        event_embedding: bool = False,
        time_gaps: bool = False,
        item_id: bool = True,
        item_features: bool = True,
        id_dropout: float = 0.0,
    ):
        super().__init__(data, max_len)
        self.check_options({"mask_prob": mask_prob, "last_only_prob": last_only_prob})
        num_items = data.num_items
        self.mask_prob = mask_prob
        self.mask_last = mask_last
        self.last_only_prob = last_only_prob
        self.mask_id = num_items + 1
        self.positions_from_end = positions_from_end
        # As in SASRec: item embeddings times sqrt(dim), so that with init std 0.02 item identity
        # outweighs the position signal in the sum.
        self.embedding_scale = dim**0.5 if scale_embeddings else 1.0
        self.item_embedding = nn.Embedding(num_items + 2, dim, padding_idx=0) if item_id else None
        # max_len history items plus the [MASK] appended at inference.
        self.position_embedding = nn.Embedding(max_len + 1, dim)
        self.embedding_norm = nn.LayerNorm(dim)
        self.embedding_dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            TransformerBlock(dim, num_heads, ffn_dim or 4 * dim, dropout, pre_norm, attention_dropout)
            for _ in range(num_blocks)
        )
        self.final_norm = nn.LayerNorm(dim) if pre_norm else nn.Identity()
        # Last, so that with both switches off nothing about the model changes.
        self.behaviour = BehaviourEmbedding(dim, data.num_event_types, event_embedding, time_gaps)
        init_weights(self, init_std)
        # BERT's masked-LM output head, which the original BERT4Rec kept: a dense layer, GELU and a
        # LayerNorm between the last block and the item dot products, and a learned score offset
        # per item (a popularity prior the dot products need not encode). Built and initialised
        # after the rest, so that the rest starts from the same weights with the head or without.
        self.head_transform = nn.Identity()
        if head_transform:
            self.head_transform = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.LayerNorm(dim))
            init_weights(self.head_transform, init_std)
        self.item_bias = nn.Parameter(torch.zeros(num_items + 1)) if item_bias else None
        # Last, so that without attributes nothing above changes. Without ids, [MASK] (row
        # num_items + 1, which has no attributes) gets a vector of its own.
        self.item_attributes = item_attributes(
            data, dim, num_items + 2, init_std, item_features, item_id, "BERT4Rec", id_dropout
        )
        self.mask_vector = None
        if not item_id:
            self.mask_vector = nn.Parameter(torch.randn(dim) * init_std)

    def _item_table(self) -> torch.Tensor:
        """(num_items + 2, dim): padding, the items and [MASK]."""
        table = item_table(self.item_embedding, self.item_attributes)
        if self.mask_vector is None:
            return table
        return torch.cat([table[: self.mask_id], self.mask_vector[None].to(table.dtype)])

    @property
    def reads_events(self) -> bool:
        return self.behaviour.active

    @property
    def catalogue_embeddings(self) -> torch.Tensor:
        """Rows 0..num_items of the embedding table: padding and the items, not [MASK]; with
        `item_bias`, each row ends in its item's offset (the queries of `query_head` end in a 1), so that
        every loss and the chunked ranking score `h.e + b` as the plain dot product they compute."""
        weights = self._item_table()[: self.num_items + 1]
        if self.item_bias is None:
            return weights
        return torch.cat([weights, self.item_bias[:, None].to(weights.dtype)], dim=1)

    def query_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Query vectors (N, d or d + 1) from the last block's hidden states (N, d)."""
        hidden = self.head_transform(hidden)
        if self.item_bias is None:
            return hidden
        return torch.cat([hidden, hidden.new_ones(hidden.size(0), 1)], dim=1)

    def forward(
        self,
        input_ids: torch.Tensor,
        events: torch.Tensor | None = None,
        gaps: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states (B, L, dim) for right-padded ids (B, L) that may contain [MASK], L <= max_len + 1,
        and, for a model that reads them, the positions' event types and time-gap buckets (B, L)."""
        # From the end, position 0 is each row's last real (or [MASK]) position: the [MASK] appended
        # at inference and the last item of a training window, which mask_last always hides, then
        # share one position embedding, whatever the history's length.
        positions = position_ids(input_ids, self.positions_from_end)
        if self.item_attributes is None:
            items = self.item_embedding(input_ids)
        else:
            items = F.embedding(input_ids, self._item_table())
        x = items * self.embedding_scale + self.position_embedding(positions)
        x = self.embedding_dropout(self.embedding_norm(x + self.behaviour(events, gaps)))
        real = input_ids != 0
        for block in self.blocks:
            x = block(x, is_causal=False, key_padding_mask=real)
        return self.final_norm(x)

    def cloze_mask(self, sequences: torch.Tensor, maskable: torch.Tensor | None = None) -> torch.Tensor:
        """Which positions of right-padded `sequences` (B, L) to hide: each real item (of those
        `maskable`, if given) with probability mask_prob, the last one always if mask_last, and at
        least one per row; in a share last_only_prob of the rows, only the last one."""
        real = sequences != 0
        if maskable is not None:
            real = real & maskable
        masked = (torch.rand(sequences.shape, device=sequences.device) < self.mask_prob) & real
        # The last hideable position of each row (argmax finds the first of the flipped row).
        last = real.size(1) - 1 - real.flip(1).int().argmax(dim=1)
        rows = torch.arange(sequences.size(0), device=sequences.device)
        if self.mask_last:
            masked[rows, last] = True
        else:
            # A row with nothing hidden teaches nothing: hide its last item.
            # (Indexing with booleans would wait on the device for their count; `|=` does not.)
            masked[rows, last] |= ~masked.any(dim=1)
        if self.last_only_prob > 0:
            # The exact task of inference: the next item after a context with nothing hidden.
            # Cloze rows hide a share mask_prob of the context too, which the appended [MASK]
            # never faces; on short histories that is a large part of what it conditions on.
            only = torch.rand(sequences.size(0), device=sequences.device) < self.last_only_prob
            last_hidden = torch.where(only, real[rows, last], masked[rows, last])
            masked &= ~only[:, None]
            masked[rows, last] = last_hidden
        # An empty row (data.static_shapes pads batches with them) has no last item to hide.
        return masked & real

    def training_outputs(
        self, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # The datamodule's window is input_ids[0] followed by target_ids: up to max_len + 1 items,
        # the length a history plus the appended [MASK] has at inference.
        sequences = torch.cat([batch["input_ids"][:, :1], batch["target_ids"]], dim=1)
        maskable = None
        if "target_mask" in batch:  # only events of the target types are predicted
            first = batch["target_mask"].new_zeros(sequences.size(0), 1)
            maskable = torch.cat([first, batch["target_mask"]], dim=1)
        masked = self.cloze_mask(sequences, maskable)
        events = gaps = None
        if "input_events" in batch:
            events = torch.cat([batch["input_events"][:, :1], batch["target_events"]], dim=1)
            # A hidden position's time gap is unknown, as it is for the [MASK] at inference.
            gaps = torch.cat([batch["input_gaps"][:, :1], batch["target_gaps"]], dim=1).masked_fill(masked, 0)
        hidden = self(sequences.masked_fill(masked, self.mask_id), events, gaps)
        return hidden, sequences, masked

    def item_vectors(self) -> torch.Tensor:
        return self.catalogue_embeddings

    def user_vectors(
        self,
        history: torch.Tensor,
        events: torch.Tensor | None = None,
        gaps: torch.Tensor | None = None,
        target_event: torch.Tensor | None = None,
    ) -> torch.Tensor:
        history, events, gaps = keep_last_positions(history, self.max_len, events, gaps)
        lengths = (history != 0).sum(dim=1)
        rows = torch.arange(history.size(0), device=history.device)

        def append(values: torch.Tensor | None, last) -> torch.Tensor | None:
            if values is None:
                return None
            out = torch.cat([values, values.new_zeros(values.size(0), 1)], dim=1)
            out[rows, lengths] = last
            return out

        inputs = append(history, self.mask_id)
        # The [MASK] asks for an event of the target's type; its time gap is unknown (bucket 0).
        events = append(events, target_event if target_event is not None else 0)
        gaps = append(gaps, 0)
        return self.query_head(self(inputs, events, gaps)[rows, lengths])
