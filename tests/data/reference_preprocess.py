"""The plain in-memory preprocessing that the engine's (recsys/data/preprocess.py) replaced, kept
as the reference it is held to (tests/data/test_preprocess.py): numpy over a pandas table, every
step in memory. Returns the same SequenceData; raises the same errors for the same inputs."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from recsys.data.preprocess import PreprocessSettings
from recsys.data.sequences import SequenceData
from recsys.errors import UserInputError

log = logging.getLogger(__name__)


def reference_preprocess(
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
