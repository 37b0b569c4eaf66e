"""Content-only nearest neighbours: items ranked by how much their attributes overlap the history's.

The baseline an attribute-aware model must beat on items nobody has interacted with yet
(`data.item_features`; issue 29's cold targets): it knows nothing but the attributes. An item is
its attributes as a unit vector (multi-hot over the attribute vocabulary, divided by the square root
of its attribute count); a history is the sum of its last `max_len` items' vectors; the score is the
dot product, the cosine similarity between the item and the history's attribute profile up to the
profile's norm, which is the same for every item of a user. An item without attributes scores 0.
Nothing is learned; like `popular` it takes no loss and trains for one empty epoch.
"""

from __future__ import annotations

import numpy as np
import torch

from recsys.errors import UserInputError
from recsys.models.network import DataInfo, SequenceNetwork, keep_last_positions


class AttributeKNN(SequenceNetwork):
    trainable = False

    def __init__(self, data: DataInfo, max_len: int = 50):
        super().__init__(data, max_len)
        features = data.item_features
        if features is None:
            raise UserInputError(
                "model: attribute_knn ranks items by their attributes; set data.item_features"
            )
        rows = data.num_items + 1
        offsets = np.asarray(features.offsets[: rows + 1], dtype=np.int64)
        counts = np.diff(offsets)
        table = torch.zeros(rows, features.num_attributes() + 1)
        owners = torch.from_numpy(np.repeat(np.arange(rows), counts))
        values = torch.from_numpy(np.asarray(features.values[: offsets[-1]], dtype=np.int64))
        weights = torch.from_numpy(1.0 / np.sqrt(np.maximum(counts, 1))).float()
        table[owners, values] = weights[owners]
        self.register_buffer("attribute_table", table)

    def user_vectors(self, history: torch.Tensor) -> torch.Tensor:
        (history,) = keep_last_positions(history, self.max_len)
        return self.attribute_table[history].sum(dim=1)  # padding's row is all zeros

    def item_vectors(self) -> torch.Tensor:
        return self.attribute_table
