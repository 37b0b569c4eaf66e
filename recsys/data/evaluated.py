"""Which users an evaluation split ranks, and what metrics.json says about the others.

From a split's targets (recsys/data/split.py), in this order: users whose history is nothing but
the target item are left out under data.hide_target_item; a target that is a seen item is
counted, and its user left out under evaluation.seen_items=exclude; under a time split a target
item without a training event is counted, and left out or kept as a miss by
evaluation.cold_items; then evaluation.max_users may take a seeded sample. The data module asks
once per split (`EvaluatedUsers`) and serves these users, their repeat flags, misses and counts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from recsys.data.datasets import history_besides_target, repeat_targets
from recsys.data.sequences import SequenceData
from recsys.data.split import (
    Split,
    TimeSplit,
    leave_out_cold_targets,
    leave_out_seen_targets,
    sample_users,
)

log = logging.getLogger(__name__)


@dataclass
class EvaluatedUsers:
    """The users one split ranks (ascending) and their target positions; per user of the data,
    whether the target is a seen item (`repeat`) and whether it counts as a miss (`misses`, time
    splits only); the counts for metrics.json."""

    users: np.ndarray
    positions: np.ndarray
    repeat: np.ndarray
    misses: np.ndarray | None
    counts: dict[str, float]


def seen_targets(
    data: SequenceData,
    users: np.ndarray,
    positions: np.ndarray,
    exclude_codes: list[int] | None,
    hide_target_item: bool,
) -> np.ndarray:
    """(len(users),) bool: the target item at `positions` occurs among the user's earlier events
    (of the `exclude_codes` types, when given): a repeat. Never with hide_target_item, which hides
    the target item's earlier events."""
    if hide_target_item:
        return np.zeros(len(users), dtype=bool)
    return repeat_targets(data, users, positions, exclude_codes)


def evaluated_users(
    data: SequenceData,
    split: Split,
    split_name: str,
    name: str,
    seen_items: str,
    exclude_codes: list[int] | None,
    hide_target_item: bool,
    cold_items: str,
    max_users: int | None,
    seed: int,
) -> EvaluatedUsers:
    """The users `split_name` of data set `name` ranks (see the module docstring)."""
    users, positions = split.targets(split_name)
    if hide_target_item:
        # Without the target item's own events a history may be empty: nothing to rank from.
        keep = history_besides_target(data, users, positions)
        if not keep.all():
            log.info(
                "data %s: %d %s targets left out: the user did nothing before them but with the target item",
                name,
                int((~keep).sum()),
                split_name,
            )
        users, positions = users[keep], positions[keep]
    repeat = seen_targets(data, users, positions, exclude_codes, hide_target_item)
    repeat_of_user = np.zeros(data.num_users, dtype=bool)
    repeat_of_user[users] = repeat
    users, positions, counts = leave_out_seen_targets(users, positions, repeat, seen_items, split_name, name)
    misses = None
    if isinstance(split, TimeSplit):
        is_cold = split.cold_items(data)[data.items[positions]]
        users, positions, miss = leave_out_cold_targets(
            users, positions, is_cold, cold_items, split_name, counts
        )
        counts[f"{split_name}/cold_users"] = split.cold_users(split_name)
        misses = np.zeros(data.num_users, dtype=bool)
        misses[users] = miss
    if max_users is not None and len(users) > max_users:
        users, positions = sample_users(users, positions, max_users, seed, split_name, counts)
        log.info("data %s: %s ranked on %s", name, counts[f"{split_name}/users_sample"], split_name)
    return EvaluatedUsers(users, positions, repeat_of_user, misses, counts)
