"""What a model knows of an item: its id embedding, the mean of its attribute embeddings, or both.

With item features in the data (`data.item_features`, recsys/data/item_features.py), an item's vector
is its id embedding plus the mean of the embeddings of its attributes (brand, category, genre, ...):
items that share attributes share part of their vector, so a rare item borrows from its neighbours,
and with `model.item_id=false` (attributes only) an item is nothing but its attributes, so a new
item with known attributes gets a vector without a single interaction. The same vectors are the
models' inputs and, tied, their outputs: every loss and the chunked ranking score against them.

`model.item_features=false` leaves the data's features unused; without features in the data, or
with that switch off, the model is exactly the id-only model (same parameters, same initial
weights for a seed: the attribute table is built after everything else).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from recsys.errors import UserInputError


class ItemAttributes(nn.Module):
    """(rows, dim) pooled attribute vectors: row r is the mean of the embeddings of item r's
    attributes, zero for padding, for an item without attributes and for rows past the catalogue
    (a model's special tokens). The attribute lists travel in the state dict, so that a checkpoint
    holds what its item vectors are made of."""

    def __init__(self, features, dim: int, rows: int, init_std: float):
        super().__init__()
        catalogue = features.num_items + 1  # padding and the items: the rows with attributes
        if rows < catalogue:
            raise ValueError(f"{rows} rows cannot hold the {catalogue} of the catalogue")
        offsets = np.asarray(features.offsets[: catalogue + 1], dtype=np.int64)
        values = np.asarray(features.values[: offsets[-1]], dtype=np.int64)
        self.rows = rows
        self.register_buffer("offsets", torch.from_numpy(offsets.copy()))
        self.register_buffer("values", torch.from_numpy(values.copy()))
        # Index 0 is never among the values (no padding_idx: ONNX export refuses one).
        self.embedding = nn.EmbeddingBag(
            features.num_attributes() + 1, dim, mode="mean", include_last_offset=True
        )
        nn.init.normal_(self.embedding.weight, std=init_std)
        with torch.no_grad():
            self.embedding.weight[0].zero_()

    def forward(self) -> torch.Tensor:
        pooled = self.embedding(self.values, self.offsets)
        if self.rows > pooled.size(0):
            pooled = torch.cat([pooled, pooled.new_zeros(self.rows - pooled.size(0), pooled.size(1))])
        return pooled


def item_attributes(
    data, dim: int, rows: int, init_std: float, use_features: bool, use_id: bool, model: str
) -> ItemAttributes | None:
    """The attribute part of a model's item vectors, or None (no features in the data, or
    model.item_features=false); a model without ids needs the attributes."""
    features = getattr(data, "item_features", None) if use_features else None
    if not use_id and features is None:
        raise UserInputError(
            f"model.item_id: {model} without item ids needs item attributes "
            "(data.item_features, and model.item_features=true)"
        )
    return None if features is None else ItemAttributes(features, dim, rows, init_std)


def item_table(ids: nn.Embedding | None, attributes: ItemAttributes | None) -> torch.Tensor:
    """(rows, dim): every row's id embedding plus its pooled attributes (either may be absent)."""
    if attributes is None:
        return ids.weight
    pooled = attributes()
    return pooled if ids is None else ids.weight + pooled


def embed_items(
    item_ids: torch.Tensor, ids: nn.Embedding | None, attributes: ItemAttributes | None
) -> torch.Tensor:
    """The vectors of `item_ids` (any shape): the id embedding's lookup alone when there are no
    attributes (the id-only model, unchanged), else rows of `item_table`."""
    if attributes is None:
        return ids(item_ids)
    return F.embedding(item_ids, item_table(ids, attributes))
