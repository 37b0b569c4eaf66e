"""`evaluation.cold_items_share`: a seeded share of the items held out of training entirely.

Leave-one-out data has no items that are new at test time; to measure how a model ranks items
nobody has interacted with (issue 29: models that know items by their attributes), a seeded share of
the catalogue is held out. Training reads the data without their events (`without_items`: as if
they never happened; a time gap spanning a removed event is measured from the event before it),
the training loss has no class for them and their training count is 0. Evaluation is unchanged:
every user keeps their leave-one-out targets and full histories (customers did interact with
these items), the held-out items are candidates like any other, and a target that is one is a
cold target (`<split>/cold_targets`, `per_user.parquet`'s `cold_target`, `slices.csv`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from recsys.data.features import time_gap_buckets
from recsys.data.sequences import SequenceData
from recsys.errors import UserInputError


@dataclass
class TrainingPart:
    """What training reads: the data without the held-out items' events, where each user's training
    part ends in it, its target flags and time gaps (attributes a `Split` has for training)."""

    data: SequenceData
    train_end: np.ndarray
    is_target: np.ndarray | None
    gaps: np.ndarray | None


def check_share(share: float | None, protocol: str) -> float | None:
    if share is None:
        return None
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share < 1:
        raise UserInputError(f"evaluation.cold_items_share: must be a share in (0, 1) or null, got {share!r}")
    if protocol != "leave_one_out":
        raise UserInputError(
            "evaluation.cold_items_share: a time split has its own cold items (first seen after the "
            "validation cut); rank them with evaluation.cold_items=rank"
        )
    return float(share)


def held_out_items(num_items: int, share: float, seed: int) -> np.ndarray:
    """(num_items + 1,) bool: a seeded sample of round(share x num_items) items (at least one)."""
    rng = np.random.default_rng([seed, 3])
    count = max(1, round(share * num_items))
    mask = np.zeros(num_items + 1, dtype=bool)
    mask[1 + rng.choice(num_items, count, replace=False)] = True
    return mask


def without_items(
    data: SequenceData, train_end: np.ndarray, is_target: np.ndarray | None, held_out: np.ndarray
) -> TrainingPart:
    """The data without the events of `held_out` items, and `train_end` / `is_target` moved onto it."""
    keep = ~held_out[data.items]
    kept_before = np.concatenate([[0], np.cumsum(keep)])  # kept events before each position
    offsets = kept_before[data.offsets]
    timestamps = None if data.timestamps is None else np.asarray(data.timestamps)[keep]
    events = None if data.events is None else np.asarray(data.events)[keep]
    part = SequenceData(
        offsets=offsets,
        items=np.asarray(data.items)[keep],
        user_ids=data.user_ids,
        item_ids=data.item_ids,
        fingerprint=data.fingerprint,
        stats=data.stats,
        events=events,
        event_names=data.event_names,
        timestamps=timestamps,
        has_time=data.has_time,
        time_unit=data.time_unit,
    )
    gaps = time_gap_buckets(offsets, timestamps) if data.has_events else None
    return TrainingPart(part, kept_before[train_end], None if is_target is None else is_target[keep], gaps)
