"""The evaluation protocol: which event of each user is predicted on validation and test, and where
their training part ends.

Leave-one-out (`EventSplit`, the default, `data.split=leave_one_out`): a user's last event is the
test target, the one before it the validation target, and everything before that is training
history. With event types and `data.target_events` (browse vs buy) the split follows those types: a
user's test target is their last event of a target type and the validation target the one before
it; the history is the full mixed sequence before each, and training batches carry `target_mask`,
true where the next event is of a target type, so that only those positions enter the loss.

A time split (`TimeSplit`, `data.split=time`): two global cuts in time (`time_cuts`); a user's
validation target is their first event (of a target type) in [validation cut, test cut), the test
target their first at or after the test cut, and training uses only the events before the validation
cut. See docs/protocol.md.

A split is anything with the attributes of `Split` (positions index the data's CSR arrays). The data
module and the results read only these; `protocol_text` says in words which one was used (for
metrics.json).

Seen items (`evaluation.seen_items`, see recsys/evaluation/metrics.py): `exclude` removes them from the
ranking and leaves out of the split each user whose target is one of them (counted:
`evaluation_counts`); `keep` excludes nothing and evaluates every user; `exclude_but_target`
excludes them but keeps a seen target as a candidate (leaks the answer; for comparisons only).
`data.exclude_events` says which items count as seen: those of the history's events of these
types (default: every earlier item; for next-purchase, previously *bought* items only, since
customers buy what they viewed).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import pandas as pd

from recsys.data.sequences import SequenceData
from recsys.errors import UserInputError

log = logging.getLogger(__name__)

# Events counted at a time (bounds the temporaries of a large log).
_CHUNK_EVENTS = 1 << 24
# The evaluation splits a data module serves.
SPLITS = ("val", "test")


class Split(Protocol):
    """What a protocol decides for each user (positions index the data's CSR arrays; -1: none)."""

    # (num_events,) bool: the event is of a target type (None: every event is a target).
    is_target: np.ndarray | None
    val_pos: np.ndarray  # (num_users,) the validation target
    test_pos: np.ndarray  # (num_users,) the test target
    train_end: np.ndarray  # (num_users,) training uses the user's events before this position
    skipped_users: int  # users with nothing to predict

    def targets(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(users, target positions) of the users evaluable on `split`, users ascending."""
        ...


class EventSplit:
    """Where each user's validation and test targets are, and where their training part ends.

    Without target types (plain leave-one-out): the last event is the test target, the one before
    it the validation target. With target types: the user's last and second-to-last events of
    those types. Positions index the data's CSR arrays; -1 means none (a user with a single target
    event is tested but not validated; one with none is skipped). A target needs at least one
    event before it to be evaluated.
    """

    def __init__(self, data: SequenceData, target_codes: list[int] | None):
        starts, ends = data.offsets[:-1], data.offsets[1:]
        self.is_target = None if target_codes is None else np.isin(data.events, target_codes)
        if self.is_target is None:
            self.test_pos = ends - 1
            self.val_pos = ends - 2
        else:
            positions = np.flatnonzero(self.is_target)
            owner = np.searchsorted(ends, positions, side="right")  # user of each target event
            self.test_pos = np.full(data.num_users, -1, dtype=np.int64)
            np.maximum.at(self.test_pos, owner, positions)
            self.val_pos = np.full(data.num_users, -1, dtype=np.int64)
            earlier = positions < self.test_pos[owner]
            np.maximum.at(self.val_pos, owner[earlier], positions[earlier])
        self.skipped_users = int((self.test_pos < 0).sum())  # users with no target event
        # Training uses everything before the validation target (or the test target, for a user
        # without one): no target is ever trained on.
        train_end = np.where(self.val_pos >= 0, self.val_pos, self.test_pos)
        self.train_end = np.where(train_end >= 0, train_end, starts)
        self.starts = starts

    def targets(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(users, target positions) of the users evaluable on `split`, users ascending."""
        positions = self.val_pos if split == "val" else self.test_pos
        users = np.flatnonzero(positions > self.starts)  # -1 < start; a target needs a history
        return users, positions[users]


# data.split: the protocols.
PROTOCOLS = ("leave_one_out", "time")
# evaluation.cold_items (data.split=time): a target item without a training event is left out with
# its user (drop) or kept and counted as a miss (keep), both for id-only models, which cannot rank
# such an item; or ranked like any other, cold items being candidates too (rank: for models that
# know items by their attributes, data.item_features). Whichever, counted in metrics.json.
COLD_ITEMS = ("drop", "keep", "rank")
# Seconds per unit of data.time_unit (a numeric time column's unit; parsed date-times are ns).
TIME_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}


@dataclass(frozen=True)
class TimeCuts:
    """Where a time split cuts, in the data's time unit: validation targets come from
    [val_cut, test_cut), test targets from [test_cut, end]; training uses what is before val_cut."""

    val_cut: float
    test_cut: float
    seconds_per_unit: float = 1.0  # the data's time unit, in seconds

    def describe(self) -> str:
        def day(cut: float) -> str:
            return pd.Timestamp(cut * self.seconds_per_unit, unit="s", tz="UTC").isoformat()

        return f"validation from {day(self.val_cut)}, test from {day(self.test_cut)}"


def time_cuts(
    timestamps: np.ndarray,
    seconds_per_unit: float,
    test_window: str | None,
    test_start: str | None,
    test_share: float | None,
    val_window: str | None,
) -> TimeCuts:
    """The cuts of data.split=time from its keys (exactly one of data.test_window, test_start,
    test_share; data.val_window defaults to the test window's length), checked against the data:
    each part must hold events."""
    given = [
        k
        for k, v in (("test_window", test_window), ("test_start", test_start), ("test_share", test_share))
        if v is not None
    ]
    if len(given) != 1:
        raise UserInputError(
            f"data.split: 'time' needs exactly one of data.test_window, data.test_start, data.test_share; got {given or 'none'}"
        )
    first, last = float(timestamps.min()), float(timestamps.max())
    if test_window is not None:
        test_cut = last - _duration(test_window, "data.test_window", seconds_per_unit)
    elif test_start is not None:
        test_cut = _instant(test_start, "data.test_start", seconds_per_unit)
    else:
        if isinstance(test_share, bool) or not 0 < float(test_share) < 1:
            raise UserInputError(f"data.test_share: must be a number between 0 and 1, got {test_share!r}")
        test_cut = float(np.quantile(timestamps, 1 - float(test_share), method="higher"))
    if val_window is not None:
        val_cut = test_cut - _duration(val_window, "data.val_window", seconds_per_unit)
    elif test_window is not None:  # a validation window as long as the test window
        val_cut = test_cut - (last - test_cut)
    elif test_share is not None:  # the same share of events before the test window
        val_cut = float(np.quantile(timestamps, 1 - 2 * float(test_share), method="higher"))
    else:
        raise UserInputError(
            "data.val_window: required with data.test_start (how long before it validation starts)"
        )
    key = given[0]
    if test_cut > last:
        raise UserInputError(
            f"data.{key}: the test window starts after the data's last event; no test events"
        )
    if val_cut <= first:
        raise UserInputError(
            f"data.{key}: the validation and test windows cover the whole data (from its first event); "
            "no training events (shorten the windows)"
        )
    if val_cut >= test_cut:
        raise UserInputError("data.val_window: must be longer than 0")
    return TimeCuts(val_cut, test_cut, seconds_per_unit)


def _duration(value: str, key: str, seconds_per_unit: float) -> float:
    try:
        seconds = pd.Timedelta(str(value)).total_seconds()
    except ValueError:
        raise UserInputError(f"{key}: {value!r} is not a duration such as '7D', '30D' or '12h'") from None
    if seconds <= 0:
        raise UserInputError(f"{key}: must be longer than 0, got {value!r}")
    return seconds / seconds_per_unit


def _instant(value: str, key: str, seconds_per_unit: float) -> float:
    try:
        moment = pd.Timestamp(str(value))
    except ValueError:
        raise UserInputError(f"{key}: {value!r} is not a date such as '2014-06-01'") from None
    moment = moment.tz_localize("UTC") if moment.tzinfo is None else moment.tz_convert("UTC")
    return moment.timestamp() / seconds_per_unit


def time_split(
    data: SequenceData, target_codes: list[int] | None, name: str, time_unit: str, **keys
) -> TimeSplit:
    """The time split of data set `name` by the data.split=time keys (`time_cuts`); numeric times
    are in `time_unit` (data.time_unit), parsed date-times in the unit the cache records."""
    if not data.has_time:
        raise UserInputError(
            f"data.split: 'time' needs the events' times, and data {name} has none (a sequence "
            "file's positions are not times; see data.times_path or data.columns.timestamp)"
        )
    cuts = time_cuts(data.timestamps, TIME_UNITS[data.time_unit or time_unit], **keys)
    return TimeSplit(data, target_codes, cuts)


class TimeSplit:
    """A global time split (data.split=time): every user's validation target is their first event
    (of a target type) in [val_cut, test_cut), the test target their first in [test_cut, end];
    training uses each user's events before val_cut, and nothing after it (ties at a cut go to
    the later window). A target needs an event before it (a user who did nothing before is cold:
    counted, not evaluated)."""

    def __init__(self, data: SequenceData, target_codes: list[int] | None, cuts: TimeCuts):
        self.cuts = cuts
        self._cold_items: np.ndarray | None = None
        starts, ends = data.offsets[:-1], data.offsets[1:]
        self.starts = starts
        self.is_target = None if target_codes is None else np.isin(data.events, target_codes)
        self.train_end = starts + count_before(data, cuts.val_cut)
        self.test_start = starts + count_before(data, cuts.test_cut)
        self.ends = ends
        self.val_pos = self._first_target(self.train_end, self.test_start)
        self.test_pos = self._first_target(self.test_start, ends)
        self.skipped_users = int((self.test_pos < 0).sum())

    def _first_target(self, begin: np.ndarray, end: np.ndarray) -> np.ndarray:
        """Each user's first position in [begin, end) of a target type; -1 where none."""
        if self.is_target is None:
            return np.where(begin < end, begin, -1)
        targets = np.flatnonzero(self.is_target)
        index = np.searchsorted(targets, begin)
        found = np.where(index < len(targets), targets[np.minimum(index, len(targets) - 1)], -1)
        return np.where((found >= 0) & (found < end), found, -1)

    def targets(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(users, target positions) of the users evaluable on `split`, users ascending."""
        positions = self.val_pos if split == "val" else self.test_pos
        users = np.flatnonzero(positions > self.starts)
        return users, positions[users]

    def window(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(num_users,) each user's first and past-the-last position in `split`'s window."""
        if split == "val":
            return self.train_end, self.test_start
        return self.test_start, self.ends

    def cold_items(self, data: SequenceData) -> np.ndarray:
        """(num_items + 1,) bool: the items with no event (of any type) before the validation cut,
        which an id-only model cannot recommend."""
        if self._cold_items is None:
            trained = training_item_counts(data, self.train_end) > 0
            trained[0] = True  # padding is not an item
            self._cold_items = ~trained
        return self._cold_items

    def recent_item_counts(self, data: SequenceData, days: float) -> np.ndarray:
        """Like the training item counts (of the target types), but only of the last `days` days
        before the validation cut."""
        cut = self.cuts.val_cut - days * 86400 / self.cuts.seconds_per_unit
        recent_start = self.starts + count_before(data, cut)
        return item_counts_between(data, recent_start, self.train_end, self.is_target)

    def cold_users(self, split: str) -> int:
        """Users with a `split` target but no event before it: nothing to rank from."""
        positions = self.val_pos if split == "val" else self.test_pos
        return int(((positions >= 0) & (positions == self.starts)).sum())


def count_before(data: SequenceData, cut: float, chunk: int = 1 << 24) -> np.ndarray:
    """(num_users,) how many of each user's events are before `cut` (times ascend within a user)."""
    before = np.zeros(data.num_users, dtype=np.int64)
    for begin in range(0, len(data.timestamps), chunk):
        early = np.flatnonzero(np.asarray(data.timestamps[begin : begin + chunk]) < cut) + begin
        owners = np.searchsorted(data.offsets[1:], early, side="right")
        before += np.bincount(owners, minlength=data.num_users)
    return before


def check_event_keys(event_types, keep_events, target_events, exclude_events) -> None:
    """The data keys that choose targets and seen items by event type, checked against the others
    (PreprocessSettings checks event_types, event_map and keep_events themselves)."""
    for key, value in (("target_events", target_events), ("exclude_events", exclude_events)):
        if value is not None and event_types is None:
            raise UserInputError(f"data.{key}: needs data.event_types (the event names the data holds)")
    if target_events is not None and len(target_events) == 0:
        raise UserInputError("data.target_events: an empty list predicts nothing; use null for every event")
    if target_events is not None and keep_events is not None:
        dropped = [name for name in target_events if name not in keep_events]
        if dropped:
            raise UserInputError(
                f"data.target_events: {dropped} would be dropped by data.keep_events {list(keep_events)}"
            )


def target_codes(data: SequenceData, target_events: list[str] | None, name: str) -> list[int] | None:
    """The type ids of data.target_events (None: every event is a target), each checked to occur in
    data set `name`."""
    if target_events is None:
        return None
    codes = data.event_ids(target_events, "data.target_events")
    present = set(np.unique(data.events).tolist())
    absent = [n for n, c in zip(target_events, codes) if c not in present]
    if absent:
        raise UserInputError(f"data.target_events: {absent} never occur in data {name}")
    return codes


def protocol_text(
    target_events: list[str] | None,
    exclude_events: list[str] | None,
    seen_items: str,
    time_split: str | None = None,
    targets: str = "next",
) -> str:
    """The evaluation protocol in words, for metrics.json (`time_split`: where a time split cuts
    and what it does with cold items; None: leave-one-out; `targets`: evaluation.targets)."""
    kind = "" if target_events is None else f"{'/'.join(target_events)} "
    if targets == "window":
        target = (
            f"time split ({time_split}), every distinct {kind}item of the window as a target "
            "from the full history before the window"
        )
    elif time_split is not None:
        target = (
            f"time split ({time_split}), the first {kind}event in the window from the full history before it"
        )
    elif target_events is None:
        target = "leave-one-out"
    else:
        target = f"next {kind}event from the full history before it"
    if exclude_events is None:
        seen = "seen items"
    elif not exclude_events:
        seen = "no items"  # nothing counts as seen: the same as keeping them
    else:
        seen = f"items of earlier {'/'.join(exclude_events)} events"
    left_out = (
        "targets among them left out" if targets == "window" else "users whose target is one of them left out"
    )
    rule = {
        "exclude": f"{seen} excluded, {left_out}",
        "keep": "seen items kept (repeats ranked)",
        "exclude_but_target": f"{seen} excluded but a seen target kept (leaks repeat targets)",
    }[seen_items]
    return f"{target}, full ranking, {rule}, pessimistic ties"


def training_item_counts(
    data: SequenceData, train_end: np.ndarray, is_target: np.ndarray | None = None
) -> np.ndarray:
    """(num_items + 1,) int64: how often each item occurs in the training part of the histories,
    each user's events before `train_end` (with `is_target`, only events of the target types);
    index = item id, 0 = padding.

    Counted as every event's item minus those of the held-out ends of the histories, in chunks of
    the event arrays: no per-event temporary the size of a large log."""
    size = data.num_items + 1
    counts = np.zeros(size, dtype=np.int64)
    for begin in range(0, len(data.items), _CHUNK_EVENTS):
        items = data.items[begin : begin + _CHUNK_EVENTS]
        if is_target is not None:
            items = items[is_target[begin : begin + _CHUNK_EVENTS]]
        counts += np.bincount(items, minlength=size)
    return counts - item_counts_between(data, train_end, data.offsets[1:], is_target)


def item_counts_between(
    data: SequenceData, begin: np.ndarray, end: np.ndarray, is_target: np.ndarray | None = None
) -> np.ndarray:
    """(num_items + 1,) int64: how often each item occurs at each user's positions [begin, end)
    (with `is_target`, only events of the target types). For short ranges: their positions are
    held at once."""
    lengths = np.maximum(end - begin, 0)
    first = np.repeat(begin - (np.cumsum(lengths) - lengths), lengths)
    positions = first + np.arange(int(lengths.sum()), dtype=np.int64)
    if is_target is not None:
        positions = positions[is_target[positions]]
    return np.bincount(data.items[positions], minlength=data.num_items + 1).astype(np.int64)


def leave_out_seen_targets(
    users: np.ndarray, positions: np.ndarray, repeat: np.ndarray, seen_items: str, split: str, name: str
) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """The users (and target positions) evaluated on `split` of data set `name` once, under
    evaluation.seen_items=exclude, those whose target is a seen item (`repeat`) are left out; and
    the counts for metrics.json (see SequenceDataModule.evaluation_counts)."""
    repeats = int(repeat.sum())
    left_out = repeats if seen_items == "exclude" else 0
    if left_out:
        log.info(
            "data %s: %d of %d %s users (%.1f%%) left out: their target is an item they had seen "
            "(evaluation.seen_items=exclude; keep ranks them)",
            name,
            left_out,
            len(users),
            split,
            100.0 * left_out / len(users),
        )
        users, positions = users[~repeat], positions[~repeat]
    counts = {
        f"{split}/users": len(users),
        f"{split}/repeat_targets": repeats,
        f"{split}/repeat_target_share": repeats / max(len(users) + left_out, 1),
        f"{split}/users_left_out": left_out,
    }
    return users, positions, counts


def leave_out_cold_targets(
    users: np.ndarray, positions: np.ndarray, is_cold: np.ndarray, cold_items: str, split: str, counts: dict
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Under a time split, the users whose target item has no training event (`is_cold`): left
    out under evaluation.cold_items=drop, kept as misses under keep, ranked under rank; counted in
    `counts` (`<split>/cold_targets`; `<split>/users` is what remains). Returns (users, positions,
    miss)."""
    counts[f"{split}/cold_targets"] = int(is_cold.sum())
    if cold_items == "drop":
        users, positions, is_cold = users[~is_cold], positions[~is_cold], is_cold[~is_cold]
        counts[f"{split}/users"] = len(users)
    return users, positions, is_cold if cold_items == "keep" else np.zeros(len(users), dtype=bool)


def sample_users(
    users: np.ndarray, positions: np.ndarray, max_users: int, seed: int, split: str, counts: dict
) -> tuple[np.ndarray, np.ndarray]:
    """evaluation.max_users: a seeded sample of the evaluated users, the same for every model
    evaluated with this seed (so that paired tests hold), said in `counts`."""
    rng = np.random.default_rng([seed, 2, SPLITS.index(split)])
    chosen = np.sort(rng.choice(len(users), max_users, replace=False))
    counts[f"{split}/users_ranked"] = max_users
    counts[f"{split}/users_sample"] = (
        f"seeded sample of {max_users} of {counts[f'{split}/users']} users (evaluation.max_users, seed {seed})"
    )
    return users[chosen], positions[chosen]
