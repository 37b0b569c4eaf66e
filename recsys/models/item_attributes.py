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

With ids and attributes, an item no training event touched (new in a time split's window, held out
by evaluation.cold_items_share) has an id embedding that is only its random initialisation: its
vector is its attributes' part alone, as a new item's is in serving (recsys/serving/new_items.py).
`model.id_dropout=p` trains for that: at each use of the item table in training, each item's id
part is left out with probability p, so that the attribute part learns to stand for an item alone
(as DropoutNet does for cold-start, Volkovs et al., NeurIPS 2017).
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

    def __init__(
        self,
        features,
        dim: int,
        rows: int,
        init_std: float,
        id_dropout: float = 0.0,
        trained: np.ndarray | None = None,
    ):
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
        self.id_dropout = id_dropout
        # Rows whose id embedding a training event reached (rows past the catalogue, a model's
        # special tokens, always); recomputed from the data, so not part of the state dict.
        kept = np.ones(rows, dtype=bool)
        if trained is not None:
            kept[:catalogue] = np.asarray(trained, dtype=bool)[:catalogue]
        self.every_id_trained = bool(kept[1:].all())
        self.register_buffer("trained_ids", torch.from_numpy(kept), persistent=False)

    def with_ids(self, id_table: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """The item table: pooled attributes plus the id embeddings of the trained items (in
        training, each left out with probability id_dropout)."""
        dropping = self.training and self.id_dropout > 0
        if self.every_id_trained and not dropping:
            return id_table + pooled
        keep = self.trained_ids
        if dropping:
            keep = keep & (torch.rand(keep.shape, device=keep.device) >= self.id_dropout)
        return pooled + id_table * keep[:, None].to(id_table.dtype)

    def forward(self) -> torch.Tensor:
        pooled = self.embedding(self.values, self.offsets)
        if self.rows > pooled.size(0):
            pooled = torch.cat([pooled, pooled.new_zeros(self.rows - pooled.size(0), pooled.size(1))])
        return pooled


def item_attributes(
    data,
    dim: int,
    rows: int,
    init_std: float,
    use_features: bool,
    use_id: bool,
    model: str,
    id_dropout: float = 0.0,
) -> ItemAttributes | None:
    """The attribute part of a model's item vectors, or None (no features in the data, or
    model.item_features=false); a model without ids needs the attributes."""
    if isinstance(id_dropout, bool) or not isinstance(id_dropout, (int, float)) or not 0 <= id_dropout < 1:
        raise UserInputError(f"model.id_dropout: must lie in [0, 1), got {id_dropout!r}")
    features = getattr(data, "item_features", None) if use_features else None
    if not use_id and features is None:
        raise UserInputError(
            f"model.item_id: {model} without item ids needs item attributes "
            "(data.item_features, and model.item_features=true)"
        )
    if id_dropout and (features is None or not use_id):
        raise UserInputError(
            f"model.id_dropout: leaves out item ids in favour of attributes; {model} needs both "
            "(data.item_features, model.item_features=true, model.item_id=true)"
        )
    if features is None:
        return None
    trained = getattr(data, "trained_items", None)
    counts = getattr(data, "train_item_counts", None)
    if trained is None and counts is not None:
        trained = np.asarray(counts) > 0
    return ItemAttributes(features, dim, rows, init_std, float(id_dropout), trained)


def item_table(ids: nn.Embedding | None, attributes: ItemAttributes | None) -> torch.Tensor:
    """(rows, dim): every row's id embedding plus its pooled attributes (either may be absent)."""
    if attributes is None:
        return ids.weight
    pooled = attributes()
    return pooled if ids is None else attributes.with_ids(ids.weight, pooled)


def embed_items(
    item_ids: torch.Tensor, ids: nn.Embedding | None, attributes: ItemAttributes | None
) -> torch.Tensor:
    """The vectors of `item_ids` (any shape): the id embedding's lookup alone when there are no
    attributes (the id-only model, unchanged), else rows of `item_table`."""
    if attributes is None:
        return ids(item_ids)
    return F.embedding(item_ids, item_table(ids, attributes))
