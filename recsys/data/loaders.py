"""Readers that turn every supported source file into one canonical interactions table.

The canonical table is a pandas DataFrame with columns
    user       raw user id (int64 or str)
    item       raw item id (int64 or str)
    timestamp  int64 or float64; where the source has no time, the position in the file, so that a
               stable sort by time keeps file order
and, when the source has them, `rating` (float64) and `event` (str).

Each data format (recsys/data/formats.py) names its reader here; generated data come in the same
table from recsys/data/synthetic.py. Every reader only reads: raw files are never modified. Bad
input raises `UserInputError` with a one-line message that names the file (and the line or column)
and what is wrong.
"""

from __future__ import annotations

import gzip
import io
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from recsys.errors import UserInputError

CANONICAL_COLUMNS = ("user", "item", "timestamp", "rating", "event")


def _open_text(path: Path) -> io.TextIOBase:
    """Open a plain or gzipped text file (detected by its magic bytes, not its name)."""
    check_readable(path)
    with open(path, "rb") as raw:
        magic = raw.read(2)
    if magic == b"\x1f\x8b":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", errors="strict")
    return open(path, encoding="utf-8", errors="strict")


def check_readable(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise UserInputError(f"{path}: data file not found (check data.path)")
    if path.is_dir():
        raise UserInputError(f"{path}: is a directory, expected a data file (check data.path)")
    if not os.access(path, os.R_OK):
        raise UserInputError(f"{path}: data file is not readable (permission denied)")
    return path


def read_sequence_file(path: str | os.PathLike) -> pd.DataFrame:
    """One line per user, `user item item ...`, separated by whitespace, plain or gzipped.

    This is the format of the S3-Rec/ICLRec Amazon files, LastFM and our ML-1M sequence file. Items
    are in chronological order; the timestamp becomes the position within the line.
    """
    path = Path(path)
    users: list[str] = []
    lengths: list[int] = []
    tokens: list[str] = []
    seen_users: dict[str, int] = {}
    try:
        with _open_text(path) as handle:
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
        bad = next(i for i, tok in enumerate(tokens) if not _is_int(tok))
        line = int(np.searchsorted(np.cumsum(lengths), bad, side="right"))
        raise UserInputError(
            f"{path}: malformed row for user {users[line]!r}: item {tokens[bad]!r} is not an integer id"
        )
    lengths_array = np.asarray(lengths, dtype=np.int64)
    starts = np.repeat(np.cumsum(lengths_array) - lengths_array, lengths_array)
    position = np.arange(len(tokens), dtype=np.int64) - starts
    return pd.DataFrame(
        {
            "user": np.repeat(user_array, lengths_array),
            "item": item_array,
            "timestamp": position,
        }
    )


def _is_int(token: str) -> bool:
    try:
        int(token)
    except ValueError:
        return False
    return True


def _ids_as_array(tokens: list[str]) -> np.ndarray:
    """Integer ids as int64 when every token is an integer, else as strings."""
    try:
        return np.asarray(tokens, dtype=np.int64)
    except (ValueError, OverflowError):
        return np.asarray(tokens, dtype=str)


# --- tabular sources -------------------------------------------------------------------------------

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


def read_movielens(path: str | os.PathLike, layout: str | None = None) -> pd.DataFrame:
    """MovieLens ratings: `ratings.dat` (`::`), `u.data` (tab) or `ratings.csv` (with header)."""
    path = check_readable(path)
    layout = layout or movielens_layout(path)
    if layout not in MOVIELENS_LAYOUTS:
        raise UserInputError(
            f"{path}: unknown MovieLens file; expected one of {sorted(MOVIELENS_LAYOUTS)} (optionally .gz)"
        )
    sep, header, names = MOVIELENS_LAYOUTS[layout]
    text = _read_all_text(path)
    if sep == "::":
        # The C parser takes single-character separators only; MovieLens titles are not in this
        # file, so '::' never appears inside a field and a plain replacement is exact.
        text = text.replace("::", "\t")
        sep = "\t"
    frame = _read_delimited(io.StringIO(text), path, sep=sep, header=header, names=names)
    if header:  # ratings.csv names its columns userId,movieId,...: take them by position
        if frame.shape[1] != len(names):
            raise UserInputError(
                f"{path}: expected {len(names)} columns ({', '.join(names)}), the header has {frame.shape[1]}"
            )
        frame.columns = list(names)
    return _typed_interactions(
        frame, path, {name: name for name in names}, first_data_line=2 if header else 1
    )


def read_interactions_file(
    path: str | os.PathLike,
    columns: Mapping[str, str | None],
    sep: str = ",",
) -> pd.DataFrame:
    """Any CSV/TSV (plain or gzipped) or parquet file of interactions, with a column mapping.

    `columns` maps canonical names (user, item, timestamp, rating, event) to the file's column
    names; user and item are required, the others may be null. Without a timestamp column the
    file order is the time order.
    """
    path = check_readable(path)
    unknown = sorted(set(columns) - set(CANONICAL_COLUMNS))
    if unknown:
        raise UserInputError(
            f"data.columns: unknown key(s) {unknown}; allowed keys are {list(CANONICAL_COLUMNS)}"
        )
    for required in ("user", "item"):
        if not columns.get(required):
            raise UserInputError(f"data.columns.{required}: required, got {columns.get(required)!r}")
    suffixes = [s.lower() for s in path.suffixes]
    if ".parquet" in suffixes or ".pq" in suffixes:
        try:
            frame = pd.read_parquet(path)
        except Exception as err:  # pyarrow raises several unrelated types for a bad file
            raise UserInputError(f"{path}: cannot be read as parquet ({err})") from None
        first_data_line = None
    else:
        frame = _read_delimited(_open_text(path), path, sep=sep, header=True, names=None)
        first_data_line = 2
    return _typed_interactions(frame, path, dict(columns), first_data_line=first_data_line)


def _read_all_text(path: Path) -> str:
    try:
        with _open_text(path) as handle:
            return handle.read()
    except UnicodeDecodeError as err:
        raise UserInputError(f"{path}: not a UTF-8 text file ({err.reason})") from None
    except (OSError, EOFError) as err:
        raise UserInputError(f"{path}: cannot be read ({err})") from None


def _read_delimited(source, path: Path, sep: str, header: bool, names) -> pd.DataFrame:
    try:
        return pd.read_csv(
            source,
            sep=sep,
            header=0 if header else None,
            names=list(names) if names is not None and not header else None,
            dtype=str,
            keep_default_na=False,
            engine="c",
        )
    except pd.errors.ParserError as err:
        # pandas says e.g. "Expected 4 fields in line 3, saw 5": keep it, it has the line number.
        message = str(err).strip().splitlines()[-1]
        raise UserInputError(f"{path}: malformed row: {message}") from None
    except pd.errors.EmptyDataError:
        raise UserInputError(f"{path}: no rows") from None
    except UnicodeDecodeError as err:
        raise UserInputError(f"{path}: not a UTF-8 text file ({err.reason})") from None
    finally:
        if hasattr(source, "close"):
            source.close()


def _typed_interactions(
    frame: pd.DataFrame, path: Path, columns: dict[str, str | None], first_data_line: int | None
) -> pd.DataFrame:
    """Select, rename and type the mapped columns; report the first bad value with its line."""
    if len(frame) == 0:
        raise UserInputError(f"{path}: no rows")
    available = [str(c) for c in frame.columns]
    out: dict[str, np.ndarray] = {}
    for canonical, source in columns.items():
        if source is None:
            continue
        if source not in frame.columns:
            raise UserInputError(
                f"{path}: missing column {source!r} (data.columns.{canonical}); the file has {available}"
            )
        values = frame[source]
        missing = (values.isna() | (values.astype(str).str.strip() == "")).to_numpy()
        if missing.any():
            position = int(np.argmax(missing))
            raise UserInputError(
                f"{_where(path, position, first_data_line)}: malformed row: no value in column {source!r}"
            )
        if canonical in ("user", "item"):
            out[canonical] = _id_column(values, path, source, first_data_line)
        elif canonical == "timestamp":
            out[canonical] = _time_column(values, path, source, first_data_line)
        elif canonical == "rating":
            out[canonical] = _numeric_column(values, path, source, first_data_line, np.float64)
        else:
            out[canonical] = values.astype(str).to_numpy()
    if "timestamp" not in out:
        out["timestamp"] = np.arange(len(frame), dtype=np.int64)
    table = pd.DataFrame(out)
    # Lets preprocessing name the file line of a bad row (None: parquet, rows are not lines).
    table.attrs["first_data_line"] = first_data_line
    table.attrs["path"] = str(path)
    return table


def _where(path: Path, position: int, first_data_line: int | None) -> str:
    if first_data_line is None:
        return f"{path} (row {position})"
    return f"{path}:{position + first_data_line}"


def _check_values(
    bad: np.ndarray, values: pd.Series, path: Path, name: str, first_data_line, expected: str
) -> None:
    """Raise for the first row where `bad` is set, naming its line, column and value."""
    if bad.any():
        position = int(np.argmax(bad))
        raise UserInputError(
            f"{_where(path, position, first_data_line)}: malformed row: column {name!r} is "
            f"{values.iloc[position]!r}, expected {expected}"
        )


def _id_column(values: pd.Series, path: Path, name: str, first_data_line: int | None) -> np.ndarray:
    if values.dtype.kind in "iu":
        return values.to_numpy(dtype=np.int64)
    as_text = values.astype(str)
    numeric = pd.to_numeric(as_text, errors="coerce")
    if numeric.notna().all() and (numeric == numeric.round()).all():
        return numeric.to_numpy(dtype=np.int64)
    return as_text.to_numpy(dtype=str)  # string ids (e.g. Amazon ASINs) are fine


def _numeric_column(values, path: Path, name: str, first_data_line: int | None, dtype) -> np.ndarray:
    if values.dtype.kind in "iuf":
        numeric = values.astype(dtype)
    else:
        numeric = pd.to_numeric(values.astype(str), errors="coerce")
    _check_values(numeric.isna().to_numpy(), values, path, name, first_data_line, "a number")
    return numeric.to_numpy(dtype=dtype)


def _time_column(values, path: Path, name: str, first_data_line: int | None) -> np.ndarray:
    """Numbers are taken as they are (seconds, ms, ...); text is parsed as a date-time."""
    if values.dtype.kind in "iuf":
        return values.to_numpy()
    as_text = values.astype(str)
    numeric = pd.to_numeric(as_text, errors="coerce")
    if numeric.notna().any():  # a numeric column: every value must be a number
        _check_values(
            numeric.isna().to_numpy(), values, path, name, first_data_line, "a number like the rows before"
        )
        if (numeric == numeric.round()).all():
            return numeric.to_numpy(dtype=np.int64)
        return numeric.to_numpy(dtype=np.float64)
    parsed = pd.to_datetime(as_text, errors="coerce", utc=True, format="mixed")
    _check_values(parsed.isna().to_numpy(), values, path, name, first_data_line, "a number or a date-time")
    return parsed.astype("int64").to_numpy()  # nanoseconds since the epoch


# --- event-typed sources (browse vs buy) --------------------------------------------------------


def read_retailrocket(path: str | os.PathLike, test_path: str | os.PathLike | None = None) -> pd.DataFrame:
    """The Retail Rocket multi-behaviour subset of ../shared/data/retailrocket_mb.

    `path`: `user_id,item_id,behavior,timestamp` (header; behavior view|cart|buy; unix seconds),
    rows grouped by user in time order. `test_path`: `user_id,item_id` (header), one held-out
    purchase per user with no timestamp. Each test purchase is appended after its user's last
    event, as a `buy` at that event's timestamp, so that "the user's last purchase" is the test
    target and the one before it (the last training purchase) the validation target.
    """
    columns = {"user": "user_id", "item": "item_id", "event": "behavior", "timestamp": "timestamp"}
    events = read_interactions_file(path, columns)
    if test_path is None:
        return events
    test_path = check_readable(test_path)
    test = _typed_interactions(
        _read_delimited(_open_text(test_path), test_path, sep=",", header=True, names=None),
        test_path,
        {"user": "user_id", "item": "item_id"},
        first_data_line=2,
    )
    duplicated = test["user"].duplicated().to_numpy()
    if duplicated.any():
        row = int(np.argmax(duplicated))
        raise UserInputError(
            f"{test_path}:{row + 2}: malformed row: user {test['user'].iloc[row].item()!r} has a second test "
            "purchase (expected one per user)"
        )
    last_time = events.groupby("user", sort=False)["timestamp"].max()
    unknown = ~test["user"].isin(last_time.index).to_numpy()
    if unknown.any():
        row = int(np.argmax(unknown))
        raise UserInputError(
            f"{test_path}:{row + 2}: user {test['user'].iloc[row].item()!r} has no events in {path}"
        )
    test = test.assign(event="buy", timestamp=last_time.loc[test["user"]].to_numpy())
    combined = pd.concat([events, test[list(events.columns)]], ignore_index=True)
    combined.attrs.update(events.attrs)  # lines past the events file's are the test file's rows
    return combined


# Kaggle's Retail Rocket events.csv: the columns in file order and the event names it uses.
RETAILROCKET_RAW_COLUMNS = ("timestamp", "visitorid", "event", "itemid", "transactionid")


def read_retailrocket_raw(path: str | os.PathLike) -> pd.DataFrame:
    """The original Kaggle Retail Rocket `events.csv`: `timestamp,visitorid,event,itemid,transactionid`
    with a header, millisecond timestamps (made seconds here, as in the subset) and events
    `view`, `addtocart`, `transaction` (renamed by the data config's event_map). Not sorted by
    visitor: rows are put in time order by preprocessing."""
    path = check_readable(path)
    frame = _read_delimited(_open_text(path), path, sep=",", header=True, names=None)
    missing = [c for c in RETAILROCKET_RAW_COLUMNS[:4] if c not in frame.columns]
    if missing:
        raise UserInputError(
            f"{path}: missing column(s) {missing}; expected the Kaggle header "
            f"{','.join(RETAILROCKET_RAW_COLUMNS)}"
        )
    columns = {"user": "visitorid", "item": "itemid", "event": "event", "timestamp": "timestamp"}
    frame = _typed_interactions(frame, path, columns, first_data_line=2)
    frame["timestamp"] = (
        frame["timestamp"] // 1000 if frame["timestamp"].dtype.kind in "iu" else (frame["timestamp"] / 1000.0)
    )
    return frame


TAOBAO_COLUMNS = ("user", "item", "category", "event", "timestamp")


def read_taobao(path: str | os.PathLike) -> pd.DataFrame:
    """Taobao UserBehavior: `user,item,category,behavior,timestamp`, no header, unix seconds,
    behaviours pv|cart|fav|buy, rows grouped by user in time order. A last line cut off mid-row,
    as in one public excerpt (`301780,543546,4181361,pv,15`), still has five fields: it is caught
    as a timestamp going backwards (data.time_order: error); remove it from a copy of the file."""
    path = check_readable(path)
    frame = _read_delimited(_open_text(path), path, sep=",", header=False, names=TAOBAO_COLUMNS)
    if frame.shape[1] != len(TAOBAO_COLUMNS):
        raise UserInputError(
            f"{path}: expected 5 columns ({', '.join(TAOBAO_COLUMNS)}), got {frame.shape[1]}"
        )
    columns = {"user": "user", "item": "item", "event": "event", "timestamp": "timestamp"}
    return _typed_interactions(frame, path, columns, first_data_line=1)
