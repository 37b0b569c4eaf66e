"""Most-popular baseline: every user gets the items most often interacted with in training.

The counts are the training part's (all events but each user's last two), given by the data
module; seen items are excluded and ties ranked pessimistically by the shared metrics, like any
other model. Nothing is learned, so it takes no loss and no optimizer; a "training" epoch only
lets the trainer save the checkpoint that evaluate.py reads back.
"""

from __future__ import annotations

import torch

from recsys.errors import UserInputError
from recsys.models.network import DataInfo, SequenceNetwork


class MostPopular(SequenceNetwork):
    trainable = False

    def __init__(self, data: DataInfo, max_len: int = 50, window_days: float | None = None):
        super().__init__(data, max_len)
        num_items = data.num_items
        counts = data.train_item_counts
        if window_days is not None:
            # Recency popularity: only the last window_days of training, before a time split's cut.
            if isinstance(window_days, bool) or not window_days > 0:
                raise UserInputError(
                    f"model.window_days: must be a number of days > 0 or null, got {window_days!r}"
                )
            if data.recent_item_counts is None:
                raise UserInputError(
                    "model.window_days: counts the days before a time split's validation cut; "
                    "use data.split=time (or null: all-time popularity)"
                )
            counts = data.recent_item_counts(float(window_days))
        counts = torch.zeros(num_items + 1) if counts is None else torch.as_tensor(counts).float().clone()
        if counts.shape != (num_items + 1,):
            raise ValueError(f"item_counts: expected {num_items + 1} counts, got {tuple(counts.shape)}")
        counts[0] = -1.0  # padding is never recommended
        self.register_buffer("item_counts", counts)

    # Score = 1 x count: a dot product in one dimension, so ranking runs in chunks like any model's.
    def user_vectors(self, history: torch.Tensor) -> torch.Tensor:
        return self.item_counts.new_ones(history.size(0), 1)

    def item_vectors(self) -> torch.Tensor:
        return self.item_counts[:, None]
