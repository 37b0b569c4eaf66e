"""Items a checkpoint never saw, ranked from their attributes (`predict.py item_features=FILE`).

A model trained with item attributes (`data.item_features`, recsys/models/item_attributes.py)
knows what an item is, not only which: a new product with a known brand and category gets a vector
without a single interaction, the mean of its attributes' embeddings. `new_item_vectors` reads a
feature file (any format of recsys/data/item_features.py), keeps the items the catalogue does not
hold, maps their attributes onto the checkpoint's vocabulary (attributes it never saw are skipped
and counted) and pools them as training did. An item with no known attribute cannot be ranked: it
is counted, not guessed. For a model with item ids, a new item has no id embedding: its vector is
its attributes' part alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from recsys.data.item_features import FeatureSource, ItemFeatures, read_item_features
from recsys.errors import UserInputError


@dataclass
class NewItems:
    """The ranked newcomers: their raw ids, their vectors (n, width of the item table) and counts."""

    item_ids: list[str]
    vectors: torch.Tensor
    known_items: int  # rows of the file that are catalogue items (kept as trained)
    unrankable_items: int  # new items none of whose attributes the checkpoint knows
    unknown_attributes: int  # attribute tokens of new items that the checkpoint never saw


def new_item_vectors(
    network: torch.nn.Module,
    vocabulary: list[str] | None,
    path: str | Path,
    is_catalogue_item: Callable[[str], bool],
    width: int,
) -> NewItems:
    """The vectors of the items of feature file `path` that `is_catalogue_item` rejects, pooled by
    `network`'s attribute embeddings; `width`: the item table's width (extra columns, such as
    BERT4Rec's score offset, are 0 for a new item)."""
    attributes = getattr(network, "item_attributes", None)
    if attributes is None or vocabulary is None:
        raise UserInputError(
            f"item_features: {path}: the checkpoint's model was trained without item attributes "
            "(data.item_features), so it cannot rank items from them"
        )
    index = {token: position for position, token in enumerate(vocabulary) if position}
    raw = read_item_features(FeatureSource(str(path)))
    ids, rows = [], []
    known = unrankable = unknown = 0
    for item, tokens in raw.items():
        if is_catalogue_item(item):
            known += 1
            continue
        found = sorted({index[t] for t in tokens if t in index})
        unknown += sum(t not in index for t in tokens)
        if not found:
            unrankable += 1
            continue
        ids.append(item)
        rows.append(found)
    offsets = torch.tensor(np.cumsum([0] + [len(r) for r in rows]), dtype=torch.long)
    values = torch.tensor([v for r in rows for v in r], dtype=torch.long)
    device = attributes.embedding.weight.device
    with torch.no_grad():
        pooled = attributes.embedding(values.to(device), offsets.to(device)).float()
    if pooled.size(1) < width:
        pooled = torch.cat([pooled, pooled.new_zeros(len(ids), width - pooled.size(1))], dim=1)
    return NewItems(ids, pooled, known, unrankable, unknown)


def checkpoint_item_features(checkpoint: dict) -> ItemFeatures | None:
    """The item attributes a checkpoint's network was built with (its state holds their lists and
    the checkpoint their names), or None for a model without attributes."""
    state = checkpoint["state_dict"]
    if "network.item_attributes.offsets" not in state:
        return None
    rows = state["network.item_attributes.embedding.weight"].shape[0]
    vocabulary = checkpoint.get("item_attribute_vocabulary") or [""] + [
        f"attribute {i}" for i in range(1, rows)
    ]
    return ItemFeatures(
        offsets=state["network.item_attributes.offsets"].numpy(),
        values=state["network.item_attributes.values"].numpy().astype(np.int32),
        vocabulary=np.asarray(vocabulary, dtype=str),
        extra_item_ids=np.array([], dtype=str),
        num_items=int(checkpoint["num_items"]),
    )
