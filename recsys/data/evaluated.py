"""Which users an evaluation split ranks, and what metrics.json says about the others.

From a split's targets (recsys/data/split.py), in this order: users whose history is nothing but
the target item are left out under data.hide_target_item; a target that is a seen item is
counted, and its user left out under evaluation.seen_items=exclude; under a time split a target
item without a training event is counted, and left out or kept as a miss by
evaluation.cold_items; then evaluation.max_users may take a seeded sample. The data module asks
once per split (`EvaluatedUsers`) and serves these users, their repeat flags, misses and counts.

With evaluation.targets=window (time splits), `evaluated_windows` chooses the users and, for each,
every distinct item of the window as a target (`WindowTargets`), by the same rules per target.
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
from recsys.errors import UserInputError

log = logging.getLogger(__name__)

# Users whose histories are gathered at a time when checking window targets against them.
_CHUNK_USERS = 4096


@dataclass
class WindowTargets:
    """evaluation.targets=window: every evaluated user's targets, the distinct items of their
    window (in the order first met), as CSR arrays aligned with `EvaluatedUsers.users`; the
    history ends where the window begins."""

    history_end: np.ndarray  # (users,) position where each user's window begins
    offsets: np.ndarray  # (users + 1,) the user's targets are items[offsets[i]:offsets[i + 1]]
    items: np.ndarray  # (targets,) item indices
    miss: np.ndarray  # (targets,) bool: counted as a miss (a cold item under cold_items=keep)

    def of(self, chosen: np.ndarray) -> WindowTargets:
        """The targets of the users at indices `chosen` (ascending)."""
        counts = np.diff(self.offsets)[chosen]
        flat = _ranges(self.offsets[chosen], counts)
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return WindowTargets(self.history_end[chosen], offsets, self.items[flat], self.miss[flat])


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
    windows: WindowTargets | None = None


def check_window_keys(targets: str, protocol: str, seen_items: str, hide_target_item: bool) -> str:
    """evaluation.targets=window needs a time split and cannot be combined with the options that
    single out one target item; returns `targets`."""
    if targets != "window":
        return targets
    if protocol != "time":
        raise UserInputError(
            "evaluation.targets: 'window' needs data.split=time (under leave-one-out each user has one target)"
        )
    if seen_items == "exclude_but_target":
        raise UserInputError(
            "evaluation.seen_items: 'exclude_but_target' keeps one seen target; with evaluation.targets=window use exclude or keep"
        )
    if hide_target_item:
        raise UserInputError(
            "data.hide_target_item: hides one target item's events; not with evaluation.targets=window"
        )
    return targets


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


def _ranges(begins: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The positions begins[i] .. begins[i] + counts[i] - 1 of every i, concatenated."""
    counts = np.maximum(counts, 0)
    first = np.repeat(begins - (np.cumsum(counts) - counts), counts)
    return first + np.arange(int(counts.sum()), dtype=np.int64)


def _seen_before_window(
    data: SequenceData,
    owners: np.ndarray,
    items: np.ndarray,
    window_begin: np.ndarray,
    exclude_codes: list[int] | None,
) -> np.ndarray:
    """(len(items),) bool: `items[i]` occurs among user `owners[i]`'s events before their window
    (of the `exclude_codes` types, when given). Users taken _CHUNK_USERS at a time (owners
    ascending), so memory stays bounded by their histories."""
    seen = np.zeros(len(items), dtype=bool)
    users, first = np.unique(owners, return_index=True)
    bounds = np.append(first, len(owners))
    width = data.num_items + 1
    for begin in range(0, len(users), _CHUNK_USERS):
        chunk = users[begin : begin + _CHUNK_USERS]
        starts = data.offsets[:-1][chunk]
        history = _ranges(starts, window_begin[chunk] - starts)
        if exclude_codes is not None:
            history = history[np.isin(data.events[history], exclude_codes)]
        row_of = np.searchsorted(data.offsets[1:], history, side="right")
        history_keys = row_of.astype(np.int64) * width + data.items[history]
        rows = slice(bounds[begin], bounds[min(begin + _CHUNK_USERS, len(users))])
        keys = owners[rows].astype(np.int64) * width + items[rows]
        seen[rows] = np.isin(keys, history_keys)
    return seen


def evaluated_windows(
    data: SequenceData,
    split: TimeSplit,
    split_name: str,
    name: str,
    seen_items: str,
    exclude_codes: list[int] | None,
    cold_items: str,
    max_users: int | None,
    seed: int,
) -> EvaluatedUsers:
    """evaluation.targets=window: the users `split_name` ranks and their targets, every distinct
    item of their events (of the target types) in the window. Under evaluation.seen_items=exclude
    items seen before the window are no targets (RecTools' filter_already_seen), counted as
    `<split>/repeat_targets`; targets without a training event are counted (`cold_targets`) and
    dropped, kept as misses or ranked (evaluation.cold_items); a user with no event before the window is
    counted (`cold_users`) and not ranked, nor is one left with no target (`users_left_out`)."""
    begin, end = split.window(split_name)
    starts = data.offsets[:-1]
    positions = _ranges(begin, end - begin)
    if split.is_target is not None:
        positions = positions[split.is_target[positions]]
    owners = np.searchsorted(data.offsets[1:], positions, side="right")
    with_targets = np.unique(owners)
    has_history = begin > starts
    cold_users = int((~has_history[with_targets]).sum())
    keep = has_history[owners]
    positions, owners = positions[keep], owners[keep]
    items = data.items[positions].astype(np.int64)
    # Each item once per user, at its first event in the window (positions ascend within a user).
    order = np.lexsort((positions, items, owners))
    first = np.ones(len(order), dtype=bool)
    first[1:] = (owners[order][1:] != owners[order][:-1]) | (items[order][1:] != items[order][:-1])
    kept = np.sort(order[first])
    positions, owners, items = positions[kept], owners[kept], items[kept]
    candidates = np.unique(owners)
    pairs = len(items)
    repeat = np.zeros(pairs, dtype=bool)
    if seen_items == "exclude":
        repeat = _seen_before_window(data, owners, items, begin, exclude_codes)
    is_cold = split.cold_items(data)[items] & ~repeat
    drop = repeat | (is_cold if cold_items == "drop" else False)
    miss = is_cold if cold_items == "keep" else np.zeros(pairs, dtype=bool)  # rank: ranked
    positions, owners, items, miss = positions[~drop], owners[~drop], items[~drop], miss[~drop]
    users, first_index, per_user = np.unique(owners, return_index=True, return_counts=True)
    counts = {
        f"{split_name}/users": len(users),
        f"{split_name}/targets": len(items),
        f"{split_name}/repeat_targets": int(repeat.sum()),
        f"{split_name}/repeat_target_share": float(repeat.sum()) / max(pairs, 1),
        f"{split_name}/users_left_out": len(candidates) - len(users),
        f"{split_name}/cold_targets": int(is_cold.sum()),
        f"{split_name}/cold_users": cold_users,
    }
    offsets = np.concatenate([[0], np.cumsum(per_user)]).astype(np.int64)
    windows = WindowTargets(begin[users], offsets, items, miss)
    first_positions = positions[first_index]
    if max_users is not None and len(users) > max_users:
        chosen_users, _ = sample_users(users, first_positions, max_users, seed, split_name, counts)
        chosen = np.flatnonzero(np.isin(users, chosen_users))
        users, first_positions, windows = users[chosen], first_positions[chosen], windows.of(chosen)
        log.info("data %s: %s ranked on %s", name, counts[f"{split_name}/users_sample"], split_name)
    log.info(
        "data %s: %d %s users, %d window targets (%d seen before the window and left out, %d cold)",
        name,
        len(users),
        split_name,
        len(windows.items),
        int(repeat.sum()),
        int(is_cold.sum()),
    )
    return EvaluatedUsers(users, first_positions, np.zeros(data.num_users, dtype=bool), None, counts, windows)
