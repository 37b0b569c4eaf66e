"""Training losses as plain modules, chosen by the `loss` config group (`loss=ce|sampled_softmax|bce|gbce`).

Every loss takes the hidden states at the positions that have a target, the targets, and the item
embedding table (row 0 is padding), and returns a scalar:

    loss(hidden (T, d), targets (T,) in 1..num_items, item_embeddings (num_items + 1, d)) -> ()

or, under `data.static_shapes` (recsys/training/module.py), the hidden states of every position of
a padded batch and `mask=` (T,) bool, True where a position has a target (the others' targets may be
0): the loss is then the mean over the masked positions, with the same value and gradients as over
those positions alone, computed without a shape or a host sync that depends on the data.

Losses that draw negatives own a seeded `NegativeSampler`, so the negatives of a run depend only on
the loss's seed, not on how many random numbers the model's dropout used before them. A loss class
that declares `uses_item_counts = True` is given the training set's item counts as `item_counts`
(popularity sampling and logQ correction need them).
"""

from __future__ import annotations

from torch import nn

from recsys.errors import UserInputError
from recsys.losses.cross_entropy import LOGITS_BUDGET_BYTES, FullCrossEntropy, float32_logits
from recsys.losses.sampled import (
    STATIC_REDRAWS,
    BinaryCrossEntropy,
    GeneralisedBinaryCrossEntropy,
    NegativeSampler,
    SampledSoftmax,
    masked_mean,
    uniform_negatives,
)

__all__ = [
    "LOGITS_BUDGET_BYTES",
    "STATIC_REDRAWS",
    "BinaryCrossEntropy",
    "FullCrossEntropy",
    "GeneralisedBinaryCrossEntropy",
    "NegativeSampler",
    "SampledSoftmax",
    "check_catalogue",
    "float32_logits",
    "masked_mean",
    "uniform_negatives",
]


def check_catalogue(loss: nn.Module | None, num_items: int) -> None:
    """A loss that draws N distinct-from-the-positive negatives needs N < num_items; a loss with
    options of its own that depend on the catalogue checks them in its `check_catalogue(num_items)`."""
    if hasattr(loss, "check_catalogue"):
        loss.check_catalogue(num_items)
    wanted = getattr(loss, "num_negatives", None)
    if wanted is not None and not getattr(loss, "in_batch", False) and wanted > num_items - 1:
        raise UserInputError(
            f"loss.num_negatives: {wanted} negatives asked for, but the catalogue has only "
            f"{num_items} items ({num_items - 1} besides the positive)"
        )
