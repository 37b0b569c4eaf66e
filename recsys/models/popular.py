"""Most-popular baseline: every user gets the items most often interacted with in training.

The counts are the training part's (all events but each user's last two), given by the data
module; seen items are excluded and ties ranked pessimistically by the shared metrics, like any
other model. Nothing is learned, so it takes no loss and no optimizer; a "training" epoch only
lets the trainer save the checkpoint that evaluate.py reads back.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from recsys.metrics import DEFAULT_KS
from recsys.models.base import SequentialRecommender


class MostPopular(SequentialRecommender):
    uses_loss = False

    def __init__(
        self,
        num_items: int,
        item_counts: torch.Tensor | None = None,
        data_fingerprint: str = "",
        ks: Sequence[int] = DEFAULT_KS,
    ):
        super().__init__(num_items, data_fingerprint=data_fingerprint, ks=ks)
        self.save_hyperparameters(ignore=["item_counts"])
        counts = torch.zeros(num_items + 1) if item_counts is None else item_counts.float()
        if counts.shape != (num_items + 1,):
            raise ValueError(f"item_counts: expected {num_items + 1} counts, got {tuple(counts.shape)}")
        counts[0] = -1.0  # padding is never recommended
        self.register_buffer("item_counts", counts)
        self._set_loss(None)

    def configure_optimizers(self):
        return None

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        return None  # the counts came from the data: nothing to fit

    # Score = 1 x count: a dot product in one dimension, so ranking runs in chunks like any model's.
    def user_vectors(self, history: torch.Tensor) -> torch.Tensor:
        return self.item_counts.new_ones(history.size(0), 1)

    def item_vectors(self) -> torch.Tensor:
        return self.item_counts[:, None]
