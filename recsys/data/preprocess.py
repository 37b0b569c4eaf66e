"""One preprocessing path from the canonical interactions table to split-ready sequences on disk.

    interactions -> rating threshold -> event types named and checked -> time order checked
                 -> k-core -> drop users with < min_history events -> contiguous item ids
                 (0 = padding) -> keep only data.keep_events -> stable time sort
                 -> CSR arrays (offsets + items + timestamps [+ events])

Every step but the last runs in the engine (recsys/data/engine.py, DuckDB), out of core under
data.memory_limit; the sorted result streams out of it into plain arrays. User and item ids are
numbered in sorted order of their raw ids; a user's events are sorted by time, ties kept in file
order. (tests/data/test_preprocess.py holds this to the plain in-memory reference it replaced.)

The leave-one-out split is implicit in the CSR layout: for user u with events
items[offsets[u]:offsets[u+1]], the last is the test target, the one before the validation target,
and everything before that is training history. With event types and data.target_events the
targets are the user's last two events of those types instead (recsys/data/split.py).

Event types (browse vs buy): with data.event_types set, the source's event column becomes one small
integer per event (1..E in the order of event_types; 0 is padding), kept beside the items.
keep_events drops the other types *after* the item ids are assigned, so a model that sees only
purchases ranks the very same catalogue as one that sees every view.

The result is a `SequenceData` (recsys/data/sequences.py), written straight into the cache's
directory when there is one.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from recsys.data.engine import Engine, literal
from recsys.data.interactions import Interactions
from recsys.data.sequences import SequenceData
from recsys.errors import UserInputError
from recsys.runs.files import atomic_directory

log = logging.getLogger(__name__)

# Bump when the preprocessing logic changes, so that old caches are not reused. (Event types did not
# change what data without them becomes: their settings enter the fingerprint only when set, so
# checkpoints trained before still match their data. The engine did not change it either:
# tests/data/test_shipped_data.py.)
PREPROCESS_VERSION = 1
# The protocol needs a training item, a validation target and a test target (data.min_history).
MIN_HISTORY = 3
TIME_ORDERS = ("sort", "error")
# Rows fetched from the engine at a time when writing the sorted arrays.
_BATCH_ROWS = 1 << 20


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
    interactions: Interactions | pd.DataFrame,
    settings: PreprocessSettings,
    source: str = "data",
    destination: Path | None = None,
    fingerprint: str = "",
) -> SequenceData:
    """Canonical interactions -> SequenceData. `source` names the data in messages. With
    `destination` the arrays are written there (a directory, atomically) and come back mapped;
    without, they are built in memory. (A DataFrame is moved into the default engine first.)"""
    if isinstance(interactions, pd.DataFrame):
        interactions = Interactions.from_frame(interactions, path=source)
    engine, raw = interactions.engine, interactions.table
    stats: dict[str, Any] = {"raw_interactions": _count(engine, raw)}
    where = ""
    if settings.min_rating is not None:
        if "rating" not in interactions.columns:
            raise UserInputError(
                f"data.min_rating: {source} has no rating column, so it cannot be filtered by rating"
            )
        where = f"WHERE rating >= {float(settings.min_rating)!r}"
        stats["after_rating_filter"] = int(engine.scalar(f"SELECT count(*) FROM {raw} {where}"))
    code = "CAST(NULL AS TINYINT)"
    if settings.event_types is not None:
        code = _event_codes(interactions, where, settings, stats)
    work = engine.name("work")
    engine.execute(
        f"CREATE TABLE {work} AS SELECT row, user, item, timestamp, {code} AS code FROM {raw} {where}"
    )
    stats.update(_check_time_order(interactions, work, settings.time_order))

    if settings.min_user_interactions > 0 or settings.min_item_interactions > 0:
        _kcore(
            engine,
            work,
            settings.min_user_interactions,
            settings.min_item_interactions,
            settings.kcore_iterative,
        )
        stats["after_kcore"] = _count(engine, work)
    # Users too short for the protocol are dropped and counted, not an error.
    stats["dropped_short_users"] = _drop_short_users(engine, work, settings.min_history)
    if _count(engine, work) == 0:
        raise UserInputError(
            f"{source}: no interactions left after filtering (min_rating={settings.min_rating}, "
            f"min_user_interactions={settings.min_user_interactions}, "
            f"min_item_interactions={settings.min_item_interactions}, at least {settings.min_history} per user)"
        )
    # Item ids come from every event type, before keep_events: the same catalogue either way.
    item_index = _index(engine, work, "item")
    if settings.keep_events is not None:
        kept = ", ".join(str(c) for c in settings.type_codes(settings.keep_events))
        stats["dropped_other_events"] = int(
            engine.scalar(f"SELECT count(*) FROM {work} WHERE code NOT IN ({kept})")
        )
        engine.execute(f"DELETE FROM {work} WHERE code NOT IN ({kept})")
        stats["dropped_short_users_after_keep_events"] = _drop_short_users(engine, work, settings.min_history)
        if _count(engine, work) == 0:
            raise UserInputError(
                f"data.keep_events: no user of {source} has {settings.min_history} events of types "
                f"{list(settings.keep_events)}"
            )
    user_index = _index(engine, work, "user")

    item_ids = _ids(engine, item_index, "item")
    user_ids = _ids(engine, user_index, "user")
    counts = engine.execute(
        f"SELECT count(*) FROM {work} JOIN {user_index} USING (user) GROUP BY idx ORDER BY idx"
    ).fetchnumpy()["count_star()"]
    offsets = np.zeros(len(user_ids) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    if settings.event_types is not None:
        by_code = dict(engine.execute(f"SELECT code, count(*) FROM {work} GROUP BY code").fetchall())
        stats["events_by_type"] = {
            name: int(by_code.get(c, 0)) for c, name in enumerate(settings.event_types, start=1)
        }
    lengths = np.diff(offsets)
    stats.update(
        users=len(user_ids),
        items=len(item_ids),
        interactions=int(offsets[-1]),
        median_length=float(np.median(lengths)),
        max_length=int(lengths.max()),
    )
    time_type = np.float64 if _column_type(engine, work, "timestamp") in ("DOUBLE", "FLOAT") else np.int64
    data = SequenceData(
        offsets=offsets,
        items=np.empty(0, dtype=np.int32 if len(item_ids) < np.iinfo(np.int32).max else np.int64),
        user_ids=user_ids,
        item_ids=np.concatenate([_padding_id(item_ids), item_ids]),
        fingerprint=fingerprint,
        stats=stats,
        events=None if settings.event_types is None else np.empty(0, dtype=np.int8),
        event_names=None
        if settings.event_types is None
        else np.asarray(["", *settings.event_types], dtype=str),
        timestamps=np.empty(0, dtype=time_type),
        has_time=interactions.has_time,
        time_unit=interactions.time_unit,
    )
    # lexsort's order before: by user, then time, ties in file order.
    code = ", w.code" if settings.event_types is not None else ""
    ordered = (
        f"SELECT i.idx AS item, w.timestamp{code} FROM {work} w JOIN {user_index} u USING (user) "
        f"JOIN {item_index} i USING (item) ORDER BY u.idx, w.timestamp, w.row"
    )
    per_event = [name for name in ("items", "timestamps", "events") if getattr(data, name) is not None]
    if destination is None:
        for name in per_event:
            setattr(data, name, np.empty(int(offsets[-1]), dtype=getattr(data, name).dtype))

        def into_memory(name: str, values: np.ndarray, begin: int) -> None:
            getattr(data, name)[begin : begin + len(values)] = values

        _stream(engine, ordered, into_memory, int(offsets[-1]))
        return data
    with atomic_directory(destination) as tmp:
        for name in ("offsets", "user_ids", "item_ids", "event_names"):
            if getattr(data, name) is not None:
                np.save(tmp / f"{name}.npy", getattr(data, name), allow_pickle=False)
        # Written through files, not a writable mapping: the written pages stay in the page cache,
        # out of this process's memory.
        files = {
            name: _npy_file(tmp / f"{name}.npy", getattr(data, name).dtype, int(offsets[-1]))
            for name in per_event
        }
        try:

            def into_files(name: str, values: np.ndarray, begin: int) -> None:
                files[name].write(np.ascontiguousarray(values, dtype=getattr(data, name).dtype).tobytes())

            _stream(engine, ordered, into_files, int(offsets[-1]))
        finally:
            for handle in files.values():
                handle.close()
        (tmp / "meta.json").write_text(json.dumps(data.meta()))
    return SequenceData.load(destination)


def _npy_file(path: Path, dtype: np.dtype, length: int):
    """An open .npy file of `length` values of `dtype` whose header is written: the values follow."""
    handle = open(path, "wb")
    header = {
        "descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
        "fortran_order": False,
        "shape": (length,),
    }
    np.lib.format.write_array_header_1_0(handle, header)
    return handle


def _stream(engine: Engine, ordered: str, write, total: int) -> None:
    """Hand the sorted events, a batch at a time, to `write(array name, values, first position)`."""
    begin = 0
    names = ("items", "timestamps", "events")
    for batch in engine.batches(ordered, _BATCH_ROWS):
        for column, name in enumerate(names[: batch.num_columns]):
            write(name, batch.column(column).to_numpy(), begin)
        begin += batch.num_rows
    if begin != total:
        raise RuntimeError(f"the engine returned {begin} events, having counted {total}")


def _count(engine: Engine, table: str) -> int:
    return int(engine.scalar(f"SELECT count(*) FROM {table}"))


def _column_type(engine: Engine, table: str, column: str) -> str:
    return dict(engine.execute(f"SELECT column_name, column_type FROM (DESCRIBE {table})").fetchall())[column]


def _index(engine: Engine, work: str, column: str) -> str:
    """A table (column, idx): each distinct value of `work.column`, numbered 1.. (items) or 0..
    (users) in sorted order of the raw ids."""
    table = engine.name(f"{column}_index")
    first = 1 if column == "item" else 0
    engine.execute(
        f"CREATE TABLE {table} AS SELECT {column}, row_number() OVER (ORDER BY {column}) - 1 + {first} AS idx "
        f"FROM (SELECT DISTINCT {column} FROM {work})"
    )
    return table


def _ids(engine: Engine, index: str, column: str) -> np.ndarray:
    """The raw ids in index order: int64, or fixed-width strings (never Python objects, so the
    cache needs no pickle)."""
    values = engine.execute(f"SELECT {column} FROM {index} ORDER BY idx").fetchnumpy()[column]
    values = np.asarray(values)
    if values.dtype == object or values.dtype.kind in "OUS" or str(values.dtype).startswith("str"):
        return np.asarray(values.tolist(), dtype=str)
    return values.astype(np.int64)


def _event_codes(interactions: Interactions, where: str, settings: PreprocessSettings, stats: dict) -> str:
    """The SQL expression of each row's event type id 1..E; a name the config does not know is an
    error naming its first row."""
    if "event" not in interactions.columns:
        raise UserInputError(
            f"data.event_types: {interactions.path} has no event column (for an interactions file, map one "
            "with data.columns.event)"
        )
    engine = interactions.engine
    # Rename and code each distinct name once, not each row.
    names = engine.execute(
        f"SELECT event, count(*), min(row) FROM {interactions.table} {where} GROUP BY event"
    ).fetchall()
    renamed = dict(settings.event_map)
    types = list(settings.event_types)
    unknown = [(first, name) for name, _, first in names if renamed.get(name, name) not in types]
    if unknown:
        first, name = min(unknown)
        raise UserInputError(
            f"{interactions.locate(first)}: event {renamed.get(name, name)!r} is not one of data.event_types {types} "
            "(add it there, or rename it with data.event_map)"
        )
    counts = dict.fromkeys(types, 0)
    for name, count, _ in names:
        counts[renamed.get(name, name)] += int(count)
    stats["raw_events_by_type"] = counts
    cases = " ".join(
        f"WHEN {literal(name)} THEN {types.index(renamed.get(name, name)) + 1}" for name, _, _ in names
    )
    return f"CAST(CASE event {cases} END AS TINYINT)"


def _check_time_order(interactions: Interactions, work: str, mode: str) -> dict:
    """Rows of a user that go back in time in file order: an error (time_order=error, for files
    that are meant to be in time order) or counted and logged, then sorted (time_order=sort)."""
    engine = interactions.engine
    users, first = engine.first(
        "SELECT count(DISTINCT user) FILTER (WHERE back), min(row) FILTER (WHERE back) FROM ("
        f"SELECT user, row, timestamp < lag(timestamp) OVER (PARTITION BY user ORDER BY row) AS back FROM {work})"
    )
    if not users:
        return {"users_sorted_by_time": 0}
    if mode == "error":
        timestamp, user = engine.first(f"SELECT timestamp, user FROM {work} WHERE row = ?", [first])
        raise UserInputError(
            f"{interactions.locate(first)}: timestamp {timestamp!r} of user {user!r} is earlier "
            "than that user's previous row (data.time_order: error; use sort to reorder)"
        )
    log.info("data: %d users had rows out of time order in the file; sorted by time (stable)", users)
    return {"users_sorted_by_time": int(users)}


def _drop_short_users(engine: Engine, work: str, min_history: int) -> int:
    """Delete every row of a user with fewer than min_history rows; their count."""
    short = f"SELECT user FROM {work} GROUP BY user HAVING count(*) < {int(min_history)}"
    count = int(engine.scalar(f"SELECT count(*) FROM ({short})"))
    if count:
        log.info("dropped %d users with fewer than %d events after filtering", count, min_history)
        engine.execute(f"DELETE FROM {work} WHERE user IN ({short})")
    return count


def _padding_id(ids: np.ndarray) -> np.ndarray:
    """A placeholder raw id for index 0 of the same dtype as the real ids."""
    if ids.dtype.kind in "US":
        return np.asarray([""], dtype=ids.dtype)
    return np.asarray([-1], dtype=ids.dtype)


def _kcore(engine: Engine, work: str, min_user: int, min_item: int, iterative: bool) -> None:
    """Delete the rows of users with < min_user and items with < min_item interactions.

    Items are filtered before users in each pass (the BERT4Rec ML-1M recipe is one item pass).
    """
    while True:
        before = _count(engine, work)
        for column, minimum in (("item", min_item), ("user", min_user)):
            if minimum > 0:
                engine.execute(
                    f"DELETE FROM {work} WHERE {column} IN "
                    f"(SELECT {column} FROM {work} GROUP BY {column} HAVING count(*) < {int(minimum)})"
                )
        if not iterative or _count(engine, work) == before:
            return
