"""BERT4Rec (Sun et al., CIKM 2019): a bidirectional transformer trained by cloze masking.

Training hides a random subset of each sequence's items behind a [MASK] token (id num_items + 1)
and predicts them from both sides; at inference a [MASK] is appended after the history and the
model predicts what stands there. Attention is bidirectional, so padding keys are masked out
(`key_padding_mask`): unlike SASRec this cannot use SDPA's flash kernel. Scores are dot products
with the tied item embeddings, [MASK] and padding excluded from the catalogue the loss sees.

Klenitskiy & Vasilev (RecSys 2023) found BERT4Rec's reputation rests on long training with full
cross-entropy: the default here is the shared full-softmax loss at the masked positions.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from recsys.errors import UserInputError
from recsys.losses import FullCrossEntropy
from recsys.metrics import DEFAULT_KS
from recsys.models.base import SequentialRecommender, keep_last_items
from recsys.models.transformer import TransformerBlock, init_weights


class BERT4Rec(SequentialRecommender):
    @classmethod
    def check_options(cls, options: Mapping[str, Any], loss: nn.Module | None) -> None:
        super().check_options(options, loss)
        mask_prob = options.get("mask_prob", 0.2)
        if not 0.0 < mask_prob < 1.0:
            raise UserInputError(
                f"model.mask_prob: the masking probability must lie in (0, 1), got {mask_prob}"
            )

    def __init__(
        self,
        num_items: int,
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
        scale_embeddings: bool = True,
        loss: nn.Module | None = None,
        optimizer: Callable | None = None,
        scheduler: Callable | None = None,
        scheduler_interval: str = "epoch",
        data_fingerprint: str = "",
        ks: Sequence[int] = DEFAULT_KS,
    ):
        super().__init__(num_items, optimizer, scheduler, scheduler_interval, data_fingerprint, ks)
        self.check_options({"mask_prob": mask_prob}, loss if loss is not None else FullCrossEntropy())
        self.save_hyperparameters(ignore=["loss", "optimizer", "scheduler"])
        self.max_len = max_len
        self.mask_prob = mask_prob
        self.mask_last = mask_last
        self.mask_id = num_items + 1
        # As in SASRec: item embeddings times sqrt(dim), so that with init std 0.02 item identity
        # outweighs the position signal in the sum.
        self.embedding_scale = dim**0.5 if scale_embeddings else 1.0
        self.item_embedding = nn.Embedding(num_items + 2, dim, padding_idx=0)
        # max_len history items plus the [MASK] appended at inference.
        self.position_embedding = nn.Embedding(max_len + 1, dim)
        self.embedding_norm = nn.LayerNorm(dim)
        self.embedding_dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            TransformerBlock(dim, num_heads, ffn_dim or 4 * dim, dropout, pre_norm, attention_dropout)
            for _ in range(num_blocks)
        )
        self.final_norm = nn.LayerNorm(dim) if pre_norm else nn.Identity()
        self._set_loss(loss if loss is not None else FullCrossEntropy())
        init_weights(self, init_std)

    @property
    def catalogue_embeddings(self) -> torch.Tensor:
        """Rows 0..num_items of the embedding table: padding and the items, not [MASK]."""
        return self.item_embedding.weight[: self.num_items + 1]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Hidden states (B, L, dim) for right-padded ids (B, L) that may contain [MASK], L <= max_len + 1."""
        positions = torch.arange(input_ids.size(1), device=input_ids.device)
        x = self.item_embedding(input_ids) * self.embedding_scale + self.position_embedding(positions)
        x = self.embedding_dropout(self.embedding_norm(x))
        real = input_ids != 0
        for block in self.blocks:
            x = block(x, is_causal=False, key_padding_mask=real)
        return self.final_norm(x)

    def cloze_mask(self, sequences: torch.Tensor) -> torch.Tensor:
        """Which positions of right-padded `sequences` (B, L) to hide: each real item with
        probability mask_prob, the last one always if mask_last, and at least one per row."""
        real = sequences != 0
        masked = (torch.rand(sequences.shape, device=sequences.device) < self.mask_prob) & real
        last = real.sum(dim=1) - 1
        rows = torch.arange(sequences.size(0), device=sequences.device)
        if self.mask_last:
            masked[rows, last] = True
        else:
            # A row with nothing hidden teaches nothing: hide its last item.
            nothing = ~masked.any(dim=1)
            masked[rows[nothing], last[nothing]] = True
        return masked

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        # The datamodule's window is input_ids[0] followed by target_ids: up to max_len + 1 items,
        # the length a history plus the appended [MASK] has at inference.
        sequences = torch.cat([batch["input_ids"][:, :1], batch["target_ids"]], dim=1)
        masked = self.cloze_mask(sequences)
        hidden = self(sequences.masked_fill(masked, self.mask_id))
        loss = self.loss(hidden[masked], sequences[masked], self.catalogue_embeddings)
        self._log_train_loss(loss, int(masked.sum()))
        return loss

    def item_vectors(self) -> torch.Tensor:
        return self.catalogue_embeddings

    def user_vectors(self, history: torch.Tensor) -> torch.Tensor:
        history = keep_last_items(history, self.max_len)
        lengths = (history != 0).sum(dim=1)
        inputs = torch.cat([history, history.new_zeros(history.size(0), 1)], dim=1)
        rows = torch.arange(history.size(0), device=history.device)
        inputs[rows, lengths] = self.mask_id
        return self(inputs)[rows, lengths]
