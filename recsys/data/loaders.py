"""Readers of the sequence files and of the named formats (MovieLens, Retail Rocket, Taobao), each
into the canonical interactions table (recsys/data/interactions.py); any CSV/TSV or parquet file
with a column mapping is recsys/data/tabular.py's.

Sequence files (one line per user) are parsed in Python, which keeps each error's line (they are
research files of at most a few million events), then handed to the engine; the named formats are
CSV files with known columns, read by the engine. Every reader only reads: raw files are never
modified. Bad input raises `UserInputError` with one line that names the file and the line, or the
column, and what is wrong.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from recsys.data.engine import Engine
from recsys.data.interactions import Interactions, check_readable, open_text
from recsys.data.tabular import header_names, read_delimited, read_interactions_file
from recsys.errors import UserInputError


def read_sequence_file(
    path: str | os.PathLike, engine: Engine | None = None, times_path: str | os.PathLike | None = None
) -> Interactions:
    """One line per user, `user item item ...`, separated by whitespace, plain or gzipped.

    This is the format of the S3-Rec/ICLRec Amazon files, LastFM and our ML-1M sequence file. Items
    are in chronological order; the timestamp becomes the position within the line, or, with
    `times_path`, the time at the same position of the same user's line of that file (`user time
    time ...`, e.g. the TiCoSeRec `*_time_org_rank.txt` files beside the Amazon sequences). (These
    files are research data sets of at most a few million events: parsed in Python, which keeps
    every error's line, then moved into the engine.)
    """
    path = Path(path)
    users: list[str] = []
    lengths: list[int] = []
    tokens: list[str] = []
    seen_users: dict[str, int] = {}
    try:
        with open_text(path) as handle:
            for line_number, line in enumerate(handle, start=1):
                parts = line.split()
                if not parts:
                    continue  # blank lines (e.g. a trailing one) carry no user
                if len(parts) < 2:
                    raise UserInputError(
                        f"{path}:{line_number}: malformed row: user {parts[0]!r} has no items "
                        "(expected 'user item item ...')"
                    )
                user = parts[0]
                if user in seen_users:
                    raise UserInputError(
                        f"{path}:{line_number}: malformed row: user {user!r} already appeared on line "
                        f"{seen_users[user]} (expected one line per user)"
                    )
                seen_users[user] = line_number
                users.append(user)
                lengths.append(len(parts) - 1)
                tokens.extend(parts[1:])
    except UnicodeDecodeError as err:
        raise UserInputError(f"{path}: not a UTF-8 text file ({err.reason})") from None
    except (OSError, EOFError) as err:
        raise UserInputError(f"{path}: cannot be read ({err})") from None
    if not users:
        raise UserInputError(f"{path}: no rows (expected one line per user: 'user item item ...')")

    item_array = _ids_as_array(tokens)
    user_array = _ids_as_array(users)
    if item_array.dtype.kind in "US" and user_array.dtype.kind not in "US":
        # Integer users with non-integer items: the file is not in the id format we expect.
        bad = next(i for i, tok in enumerate(tokens) if not _parses_as(tok, int))
        line = int(np.searchsorted(np.cumsum(lengths), bad, side="right"))
        raise UserInputError(
            f"{path}: malformed row for user {users[line]!r}: item {tokens[bad]!r} is not an integer id"
        )
    lengths_array = np.asarray(lengths, dtype=np.int64)
    if times_path is None:
        starts = np.repeat(np.cumsum(lengths_array) - lengths_array, lengths_array)
        times = np.arange(len(tokens), dtype=np.int64) - starts
    else:
        times = _parallel_times(Path(times_path), path, users, lengths)
    frame = pd.DataFrame(
        {"user": np.repeat(user_array, lengths_array), "item": item_array, "timestamp": times}
    )
    return Interactions.from_frame(frame, engine, str(path), has_time=times_path is not None)


def _parallel_times(times_path: Path, path: Path, users: list[str], lengths: list[int]) -> np.ndarray:
    """The times of a sequence file's events from a file with the same users on the same lines,
    `user time time ...`, one time per item (numbers, e.g. unix seconds)."""
    values: list[str] = []
    index = 0  # the user (non-blank line) this line is for
    try:
        with open_text(times_path) as handle:
            for line_number, line in enumerate(handle, start=1):
                parts = line.split()
                if not parts:
                    continue
                if index >= len(users):
                    raise UserInputError(
                        f"{times_path}:{line_number}: more lines than {path} has users ({len(users)})"
                    )
                if parts[0] != users[index]:
                    raise UserInputError(
                        f"{times_path}:{line_number}: user {parts[0]!r}, where {path} has user "
                        f"{users[index]!r} (expected the same users on the same lines)"
                    )
                if len(parts) - 1 != lengths[index]:
                    raise UserInputError(
                        f"{times_path}:{line_number}: {len(parts) - 1} times for user {parts[0]!r}, who has "
                        f"{lengths[index]} items in {path}"
                    )
                values.extend(parts[1:])
                index += 1
    except UnicodeDecodeError as err:
        raise UserInputError(f"{times_path}: not a UTF-8 text file ({err.reason})") from None
    except (OSError, EOFError) as err:
        raise UserInputError(f"{times_path}: cannot be read ({err})") from None
    if index < len(users):
        raise UserInputError(f"{times_path}: fewer lines than {path} has users ({len(users)})")
    try:
        return np.asarray(values, dtype=np.int64)
    except (ValueError, OverflowError):
        try:
            return np.asarray(values, dtype=np.float64)
        except ValueError:
            bad = next(v for v in values if not _parses_as(v, float))
            raise UserInputError(f"{times_path}: time {bad!r} is not a number") from None


def _parses_as(token: str, kind: type) -> bool:
    """Whether `kind(token)` (int, float) reads the token."""
    try:
        kind(token)
    except ValueError:
        return False
    return True


def _ids_as_array(tokens: list[str]) -> np.ndarray:
    """Integer ids as int64 when every token is an integer, else as strings."""
    try:
        return np.asarray(tokens, dtype=np.int64)
    except (ValueError, OverflowError):
        return np.asarray(tokens, dtype=str)


# Known MovieLens layouts: file name -> (separator, has header, column names in file order).
MOVIELENS_LAYOUTS: dict[str, tuple[str, bool, tuple[str, ...]]] = {
    "ratings.dat": ("::", False, ("user", "item", "rating", "timestamp")),  # ML-1M, ML-10M
    "u.data": ("\t", False, ("user", "item", "rating", "timestamp")),  # ML-100K
    "ratings.csv": (",", True, ("user", "item", "rating", "timestamp")),  # ML-20M, ML-latest
}


def movielens_layout(path: str | os.PathLike) -> str | None:
    """The MovieLens layout a file name stands for ('ratings.dat', 'u.data', 'ratings.csv'), or None."""
    name = Path(path).name
    if name.endswith(".gz"):
        name = name[: -len(".gz")]
    return name if name in MOVIELENS_LAYOUTS else None


def read_movielens(
    path: str | os.PathLike, layout: str | None = None, engine: Engine | None = None
) -> Interactions:
    """MovieLens ratings: `ratings.dat` (`::`), `u.data` (tab) or `ratings.csv` (with a header,
    whose names, userId,movieId,..., are taken by position)."""
    path = check_readable(path)
    layout = layout or movielens_layout(path)
    if layout not in MOVIELENS_LAYOUTS:
        raise UserInputError(
            f"{path}: unknown MovieLens file; expected one of {sorted(MOVIELENS_LAYOUTS)} (optionally .gz)"
        )
    sep, header, names = MOVIELENS_LAYOUTS[layout]
    return read_delimited(path, {n: n for n in names}, sep=sep, header=header, names=names, engine=engine)


def read_retailrocket(
    path: str | os.PathLike, test_path: str | os.PathLike | None = None, engine: Engine | None = None
) -> Interactions:
    """The Retail Rocket multi-behaviour subset of ../shared/data/retailrocket_mb.

    `path`: `user_id,item_id,behavior,timestamp` (header; behavior view|cart|buy; unix seconds),
    rows grouped by user in time order. `test_path`: `user_id,item_id` (header), one held-out
    purchase per user with no timestamp. Each test purchase is appended after its user's last
    event, as a `buy` at that event's timestamp, so that "the user's last purchase" is the test
    target and the one before it (the last training purchase) the validation target.
    """
    columns = {"user": "user_id", "item": "item_id", "event": "behavior", "timestamp": "timestamp"}
    events = read_interactions_file(path, columns, engine=engine)
    if test_path is None:
        return events
    engine = events.engine
    test = read_delimited(test_path, {"user": "user_id", "item": "item_id"}, engine=engine)
    test_path = Path(test_path)
    twice = engine.first(
        f"SELECT row, user FROM (SELECT row, user, row_number() OVER (PARTITION BY user ORDER BY row) AS n "
        f"FROM {test.table}) WHERE n = 2 ORDER BY row LIMIT 1"
    )
    if twice is not None:
        raise UserInputError(
            f"{test_path}:{twice[0] + 2}: malformed row: user {twice[1]!r} has a second test purchase "
            "(expected one per user)"
        )
    stranger = engine.first(
        f"SELECT row, user FROM {test.table} WHERE user NOT IN (SELECT user FROM {events.table}) "
        "ORDER BY row LIMIT 1"
    )
    if stranger is not None:
        raise UserInputError(f"{test_path}:{stranger[0] + 2}: user {stranger[1]!r} has no events in {path}")
    # The test rows come after every row of the events file.
    after = engine.scalar(f"SELECT max(row) + 1 FROM {events.table}")
    engine.execute(
        f"INSERT INTO {events.table} (row, user, item, event, timestamp) "
        f"SELECT t.row + {after}, t.user, t.item, 'buy', last.time FROM {test.table} t "
        f"JOIN (SELECT user, max(timestamp) AS time FROM {events.table} GROUP BY user) last USING (user)"
    )
    locate_events = events.locate

    def locate(row: int) -> str:
        return locate_events(row) if row < after else f"{test_path}:{row - after + 2}"

    events.locate = locate
    return events


# Kaggle's Retail Rocket events.csv: the columns in file order and the event names it uses.
RETAILROCKET_RAW_COLUMNS = ("timestamp", "visitorid", "event", "itemid", "transactionid")


def read_retailrocket_raw(path: str | os.PathLike, engine: Engine | None = None) -> Interactions:
    """The original Kaggle Retail Rocket `events.csv`: `timestamp,visitorid,event,itemid,transactionid`
    with a header, millisecond timestamps (made seconds here, as in the subset) and events
    `view`, `addtocart`, `transaction` (renamed by the data config's event_map). Not sorted by
    visitor: rows are put in time order by preprocessing."""
    path = check_readable(path)
    present = header_names(path, ",")
    missing = [c for c in RETAILROCKET_RAW_COLUMNS[:4] if c not in present]
    if missing:
        raise UserInputError(
            f"{path}: missing column(s) {missing}; expected the Kaggle header "
            f"{','.join(RETAILROCKET_RAW_COLUMNS)}"
        )
    columns = {"user": "visitorid", "item": "itemid", "event": "event", "timestamp": "timestamp"}
    interactions = read_delimited(path, columns, engine=engine)
    engine, table = interactions.engine, interactions.table
    kind = dict(engine.execute(f"SELECT column_name, column_type FROM (DESCRIBE {table})").fetchall())[
        "timestamp"
    ]
    seconds = "timestamp // 1000" if kind == "BIGINT" else "timestamp / 1000.0"
    engine.execute(f"UPDATE {table} SET timestamp = {seconds}")
    return interactions


TAOBAO_COLUMNS = ("user", "item", "category", "event", "timestamp")


def read_taobao(path: str | os.PathLike, engine: Engine | None = None) -> Interactions:
    """Taobao UserBehavior: `user,item,category,behavior,timestamp`, no header, unix seconds,
    behaviours pv|cart|fav|buy, rows grouped by user in time order. A last line cut off mid-row,
    as in one public excerpt (`301780,543546,4181361,pv,15`), still has five fields: it is caught
    as a timestamp going backwards (data.time_order: error); remove it from a copy of the file."""
    columns = {"user": "user", "item": "item", "event": "event", "timestamp": "timestamp"}
    return read_delimited(path, columns, sep=",", header=False, names=TAOBAO_COLUMNS, engine=engine)
