"""One preprocessing path from the canonical interactions table to cached, split-ready sequences.

    interactions -> rating threshold -> event types named and checked -> time order checked
                 -> k-core -> drop users with < min_history events -> contiguous item ids
                 (0 = padding) -> keep only data.keep_events -> stable time sort
                 -> CSR arrays (offsets + items [+ events + timestamps])

The leave-one-out split is implicit in the CSR layout: for user u with events
items[offsets[u]:offsets[u+1]], the last is the test target, the one before the validation target,
and everything before that is training history. With event types and data.target_events the
targets are the user's last two events of those types instead (recsys/data/split.py).

Event types (browse vs buy): with data.event_types set, the source's event column becomes one small
integer per event (1..E in the order of event_types; 0 is padding), kept with the timestamps beside
the items. keep_events drops the other types *after* the item ids are assigned, so a model that sees
only purchases ranks the very same catalogue as one that sees every view.

The interactions table comes from the format's reader (recsys/data/formats.py); the result is
cached under a fingerprint of the source and of these settings (recsys/data/cache.py).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from recsys.errors import UserInputError
from recsys.runs.files import atomic_path

log = logging.getLogger(__name__)

# Bump when the preprocessing logic changes, so that old caches are not reused. (Event types did not
# change what data without them becomes: their settings enter the fingerprint only when set, so
# checkpoints trained before still match their data.)
PREPROCESS_VERSION = 1
# The protocol needs a training item, a validation target and a test target (data.min_history).
MIN_HISTORY = 3
TIME_ORDERS = ("sort", "error")


@dataclass
class SequenceData:
    """Time-ordered item sequences of all users in CSR form, with the raw ids they came from."""

    offsets: np.ndarray  # (num_users + 1,) int64: user u's events are items[offsets[u]:offsets[u+1]]
    items: np.ndarray  # (num_events,) int64 item indices in 1..num_items; 0 is padding
    user_ids: np.ndarray  # (num_users,) raw user ids
    item_ids: np.ndarray  # (num_items + 1,) raw item ids; entry 0 stands for padding
    fingerprint: str = ""
    stats: dict[str, Any] = field(default_factory=dict)
    # With data.event_types: (num_events,) int8 type ids 1..E aligned with `items`, their names
    # (entry 0 = "" for padding), and the (num_events,) timestamps in the source's unit.
    events: np.ndarray | None = None
    event_names: np.ndarray | None = None
    timestamps: np.ndarray | None = None

    @property
    def has_events(self) -> bool:
        return self.events is not None

    def event_ids(self, names, key: str) -> list[int]:
        """Type ids of event names; an unknown name is a config error naming `key`."""
        known = [str(n) for n in self.event_names[1:]] if self.has_events else []
        ids = []
        for name in names:
            if str(name) not in known:
                raise UserInputError(f"{key}: {name!r} is not one of the data's event types {known}")
            ids.append(known.index(str(name)) + 1)
        return ids

    @property
    def num_users(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_items(self) -> int:
        """Number of real items; valid item indices are 1..num_items."""
        return len(self.item_ids) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def history(self, user: int) -> np.ndarray:
        return self.items[self.offsets[user] : self.offsets[user + 1]]

    def save(self, path: Path) -> None:
        """Write atomically (recsys.runs.files.atomic_path): readers never see a part of the file."""
        extra = {}
        if self.has_events:
            extra = {"events": self.events, "event_names": self.event_names, "timestamps": self.timestamps}
        with atomic_path(path) as tmp, open(tmp, "wb") as handle:
            np.savez(
                handle,
                offsets=self.offsets,
                items=self.items,
                user_ids=self.user_ids,
                item_ids=self.item_ids,
                meta=np.asarray(json.dumps({"fingerprint": self.fingerprint, "stats": self.stats})),
                **extra,
            )

    @classmethod
    def load(cls, path: Path) -> SequenceData:
        with np.load(path, allow_pickle=False) as arrays:
            meta = json.loads(str(arrays["meta"]))
            return cls(
                offsets=arrays["offsets"],
                items=arrays["items"],
                user_ids=arrays["user_ids"],
                item_ids=arrays["item_ids"],
                fingerprint=meta["fingerprint"],
                stats=meta["stats"],
                events=arrays["events"] if "events" in arrays else None,
                event_names=arrays["event_names"] if "event_names" in arrays else None,
                timestamps=arrays["timestamps"] if "timestamps" in arrays else None,
            )


@dataclass(frozen=True)
class PreprocessSettings:
    min_rating: float | None = None  # keep ratings >= this (needs a rating column)
    min_user_interactions: int = 0  # k-core threshold for users (0 = off)
    min_item_interactions: int = 0  # k-core threshold for items (0 = off)
    kcore_iterative: bool = True  # repeat until stable; False = one pass (BERT4Rec's ML-1M)
    min_history: int = MIN_HISTORY  # users with fewer events (after filtering) are dropped, counted
    event_types: tuple[str, ...] | None = None  # known event names, in id order; None = no events
    event_map: tuple[tuple[str, str], ...] = ()  # source name -> event type, applied first
    keep_events: tuple[str, ...] | None = None  # event types kept as data (None = all)
    time_order: str = "sort"  # a user's rows out of time order in the file: sort them, or error

    def __post_init__(self) -> None:
        if self.time_order not in TIME_ORDERS:
            raise UserInputError(f"data.time_order: {self.time_order!r} is not one of {list(TIME_ORDERS)}")
        if self.min_history < 2:
            raise UserInputError(
                f"data.min_history: must be >= 2 (a target and an item before it), got {self.min_history}"
            )
        if self.event_types is None:
            for key, value in (("event_map", self.event_map), ("keep_events", self.keep_events)):
                if value:
                    raise UserInputError(
                        f"data.{key}: needs data.event_types (the event names the data holds)"
                    )
            return
        if len(self.event_types) == 0 or len(set(self.event_types)) != len(self.event_types):
            raise UserInputError(f"data.event_types: expected distinct names, got {list(self.event_types)}")
        if len(self.event_types) > 127:
            raise UserInputError(f"data.event_types: at most 127 types, got {len(self.event_types)}")
        for source, target in self.event_map:
            if target not in self.event_types:
                raise UserInputError(
                    f"data.event_map.{source}: {target!r} is not one of data.event_types {list(self.event_types)}"
                )
        for name in self.keep_events or ():
            if name not in self.event_types:
                raise UserInputError(
                    f"data.keep_events: {name!r} is not one of data.event_types {list(self.event_types)}"
                )

    def type_codes(self, names) -> list[int]:
        return [self.event_types.index(name) + 1 for name in names]

    def as_dict(self) -> dict[str, Any]:
        settings = {
            "min_rating": self.min_rating,
            "min_user_interactions": self.min_user_interactions,
            "min_item_interactions": self.min_item_interactions,
            "kcore_iterative": self.kcore_iterative,
        }
        if self.min_history != MIN_HISTORY:
            settings["min_history"] = self.min_history
        if self.time_order != "sort":
            settings["time_order"] = self.time_order
        if self.event_types is not None:
            settings.update(
                event_types=list(self.event_types),
                event_map=[list(pair) for pair in self.event_map],
                keep_events=None if self.keep_events is None else list(self.keep_events),
            )
        return settings


def preprocess(
    interactions: pd.DataFrame, settings: PreprocessSettings, source: str = "data"
) -> SequenceData:
    """Canonical interactions -> SequenceData (without fingerprint). `source` names it in messages."""
    frame = interactions
    where = _RowLocator.of(interactions, source)
    stats: dict[str, Any] = {"raw_interactions": int(len(frame))}
    if settings.min_rating is not None:
        if "rating" not in frame.columns:
            raise UserInputError(
                f"data.min_rating: {source} has no rating column, so it cannot be filtered by rating"
            )
        keep_rating = frame["rating"].to_numpy() >= settings.min_rating
        frame = frame[keep_rating]
        where = where.subset(keep_rating)
        stats["after_rating_filter"] = int(len(frame))

    users = _id_array(frame["user"])
    items = _id_array(frame["item"])
    timestamps = frame["timestamp"].to_numpy()
    events = _event_codes(frame, settings, where, stats) if settings.event_types is not None else None
    stats.update(_check_time_order(users, timestamps, settings.time_order, where))

    keep = np.ones(len(frame), dtype=bool)
    if settings.min_user_interactions > 0 or settings.min_item_interactions > 0:
        keep = _kcore_mask(
            users,
            items,
            settings.min_user_interactions,
            settings.min_item_interactions,
            settings.kcore_iterative,
        )
        stats["after_kcore"] = int(keep.sum())

    # Users too short for the protocol are dropped and counted, not an error.
    stats["dropped_short_users"] = _drop_short_users(users, keep, settings.min_history)
    if not keep.any():
        raise UserInputError(
            f"{source}: no interactions left after filtering (min_rating={settings.min_rating}, "
            f"min_user_interactions={settings.min_user_interactions}, "
            f"min_item_interactions={settings.min_item_interactions}, at least {settings.min_history} per user)"
        )
    # Item ids come from every event type, before keep_events: the same catalogue either way.
    item_ids, item_index = np.unique(items[keep], return_inverse=True)
    item_index_all = np.zeros(len(items), dtype=np.int64)
    item_index_all[keep] = item_index
    if settings.keep_events is not None:
        kept_types = np.isin(events, settings.type_codes(settings.keep_events))
        stats["dropped_other_events"] = int((keep & ~kept_types).sum())
        keep &= kept_types
        stats["dropped_short_users_after_keep_events"] = _drop_short_users(users, keep, settings.min_history)
        if not keep.any():
            raise UserInputError(
                f"data.keep_events: no user of {source} has {settings.min_history} events of types "
                f"{list(settings.keep_events)}"
            )

    users = users[keep]
    timestamps = timestamps[keep]
    user_ids, user_index = np.unique(users, return_inverse=True)
    # lexsort is stable and sorts by its last key first: by user, then time, ties in file order.
    order = np.lexsort((timestamps, user_index))
    sorted_users = user_index[order]
    counts = np.bincount(sorted_users, minlength=len(user_ids))
    offsets = np.zeros(len(user_ids) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])

    item_ids_with_padding = np.concatenate([_padding_id(item_ids), item_ids])
    data = SequenceData(
        offsets=offsets,
        items=(item_index_all[keep][order] + 1).astype(np.int64),
        user_ids=user_ids,
        item_ids=item_ids_with_padding,
    )
    if events is not None:
        data.events = events[keep][order].astype(np.int8)
        data.event_names = np.asarray(["", *settings.event_types], dtype=str)
        data.timestamps = timestamps[order]
        stats["events_by_type"] = {
            name: int((data.events == code).sum()) for code, name in enumerate(settings.event_types, start=1)
        }
    lengths = data.lengths
    stats.update(
        users=data.num_users,
        items=data.num_items,
        interactions=int(len(data.items)),
        median_length=float(np.median(lengths)),
        max_length=int(lengths.max()),
    )
    data.stats = stats
    return data


@dataclass(frozen=True)
class _RowLocator:
    """Names a row of the interactions table as the file line it came from ("path:line"), also
    after rows have been filtered out (`rows`: the file row of each remaining table row)."""

    path: str
    first_line: int | None  # the file line of row 0; None for parquet, whose rows are not lines
    rows: np.ndarray

    @classmethod
    def of(cls, frame: pd.DataFrame, source: str) -> _RowLocator:
        return cls(frame.attrs.get("path", source), frame.attrs.get("first_data_line"), np.arange(len(frame)))

    def subset(self, mask: np.ndarray) -> _RowLocator:
        return _RowLocator(self.path, self.first_line, self.rows[mask])

    def __call__(self, position: int) -> str:
        row = int(self.rows[position])
        if self.first_line is None:
            return f"{self.path} (row {row})"
        return f"{self.path}:{row + self.first_line}"


def _event_codes(
    frame: pd.DataFrame, settings: PreprocessSettings, where: _RowLocator, stats: dict
) -> np.ndarray:
    """Event type ids 1..E of every row; a name the config does not know is an error."""
    if "event" not in frame.columns:
        raise UserInputError(
            f"data.event_types: {where.path} has no event column (for an interactions file, map one "
            "with data.columns.event)"
        )
    # Rename and code each distinct name once, not each row.
    names, row_name = np.unique(frame["event"].astype(str).to_numpy(), return_inverse=True)
    renamed = dict(settings.event_map)
    names = [renamed.get(name, name) for name in names.tolist()]
    types = list(settings.event_types)
    name_codes = np.asarray([types.index(n) + 1 if n in types else 0 for n in names], dtype=np.int8)
    codes = name_codes[row_name]
    unknown = codes == 0
    if unknown.any():
        position = int(np.argmax(unknown))
        raise UserInputError(
            f"{where(position)}: event {names[row_name[position]]!r} is not one of data.event_types {types} "
            "(add it there, or rename it with data.event_map)"
        )
    stats["raw_events_by_type"] = {name: int((codes == c).sum()) for c, name in enumerate(types, start=1)}
    return codes


def _check_time_order(users: np.ndarray, timestamps: np.ndarray, mode: str, where: _RowLocator) -> dict:
    """Rows of a user that go back in time in file order: an error (time_order=error, for files
    that are meant to be in time order) or counted and logged, then sorted (time_order=sort)."""
    if len(users) == 0:
        return {}
    _, codes = np.unique(users, return_inverse=True)
    by_user = np.argsort(codes, kind="stable")  # each user's rows, in file order
    same_user = codes[by_user][1:] == codes[by_user][:-1]
    backwards = same_user & (timestamps[by_user][1:] < timestamps[by_user][:-1])
    if not backwards.any():
        return {"users_sorted_by_time": 0}
    if mode == "error":
        rows = by_user[1:][backwards]
        position = int(rows.min())  # the first such row in the file
        raise UserInputError(
            f"{where(position)}: timestamp {timestamps[position].item()!r} of user {users[position].item()!r} is earlier "
            "than that user's previous row (data.time_order: error; use sort to reorder)"
        )
    count = int(len(np.unique(codes[by_user][1:][backwards])))
    log.info("data: %d users had rows out of time order in the file; sorted by time (stable)", count)
    return {"users_sorted_by_time": count}


def _drop_short_users(users: np.ndarray, keep: np.ndarray, min_history: int) -> int:
    """Unset `keep` for every row of a user with fewer than min_history kept rows; their count."""
    if not keep.any():
        return 0
    _, user_codes, user_counts = np.unique(users[keep], return_inverse=True, return_counts=True)
    short_users = user_counts < min_history
    if short_users.any():
        log.info("dropped %d users with fewer than %d events after filtering", short_users.sum(), min_history)
        keep_idx = np.flatnonzero(keep)
        keep[keep_idx[short_users[user_codes]]] = False
    return int(short_users.sum())


def _id_array(column: pd.Series) -> np.ndarray:
    """Ids as int64 or fixed-width strings: never Python objects, so the cache needs no pickle."""
    values = column.to_numpy()
    return values.astype(str) if values.dtype == object else values


def _padding_id(ids: np.ndarray) -> np.ndarray:
    """A placeholder raw id for index 0 of the same dtype as the real ids."""
    if ids.dtype.kind in "US":
        return np.asarray([""], dtype=ids.dtype)
    return np.asarray([-1], dtype=ids.dtype)


def _kcore_mask(users, items, min_user: int, min_item: int, iterative: bool) -> np.ndarray:
    """Rows that survive dropping users with < min_user and items with < min_item interactions.

    Items are filtered before users in each pass (the BERT4Rec ML-1M recipe is one item pass).
    """
    _, user_codes = np.unique(users, return_inverse=True)
    _, item_codes = np.unique(items, return_inverse=True)
    keep = np.ones(len(users), dtype=bool)
    while True:
        before = int(keep.sum())
        if min_item > 0:
            item_counts = np.bincount(item_codes[keep], minlength=item_codes.max() + 1)
            keep &= item_counts[item_codes] >= min_item
        if min_user > 0:
            user_counts = np.bincount(user_codes[keep], minlength=user_codes.max() + 1)
            keep &= user_counts[user_codes] >= min_user
        if not iterative or int(keep.sum()) == before:
            return keep
