"""Readers that turn every supported source into one canonical interactions table in the engine.

The canonical table (`Interactions`, a table of recsys/data/engine.py's DuckDB connection) has
columns
    row        int64: the row's place in the source (its file order; for a directory of parquet
               parts, the part's rank in name order times 2**40 plus the row within the part)
    user       raw user id (BIGINT when every value is an integer, else VARCHAR)
    item       raw item id (likewise)
    timestamp  BIGINT or DOUBLE; where the source has no time, the row's position, so that a
               stable sort by time keeps file order; a date-time column becomes ns since the epoch
and, when the source has them, `rating` (DOUBLE) and `event` (VARCHAR).

CSV/TSV files (plain or gzipped), parquet files and directories of parquet parts (as Spark, Hive
or an export job writes them) are read by the engine, typed, without a Python object per value.
Types are tried narrowest first: an id column that is not all integers is read again as text, a
time column that is not all integers as a real number and then as date-times; only the error path
reads twice. Sequence files (one line per user) are parsed in Python, as are generated data: both
then enter the engine as a DataFrame.

Every reader only reads: raw files are never modified. Bad input raises `UserInputError` with one
line that names the file and the line (a parquet part and its row), or the column, and what is
wrong.
"""

from __future__ import annotations

import atexit
import csv
import gzip
import io
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd

from recsys.data.engine import Engine, literal, quoted
from recsys.errors import UserInputError

CANONICAL_COLUMNS = ("user", "item", "timestamp", "rating", "event")
# The row numbers of a directory of parts: part rank << PART_SHIFT | row within the part.
PART_SHIFT = 40


@dataclass
class Interactions:
    """The canonical interactions table of one source, held by `engine`."""

    engine: Engine
    table: str  # the engine's table: row, user, item, timestamp[, rating][, event]
    columns: tuple[str, ...]  # the canonical columns it has, besides row
    path: str  # the source, for messages
    locate: Callable[[int], str]  # a row -> where it is ("file:line", "part (row n)")
    has_time: bool = True  # False: the timestamp is the position in the file
    time_unit: str | None = None  # "ns" for parsed date-times; None: numbers as the source has them

    def __len__(self) -> int:
        return int(self.engine.scalar(f"SELECT count(*) FROM {self.table}"))

    def frame(self) -> pd.DataFrame:
        """The table in memory, in row order (for small data and tests)."""
        columns = ", ".join(quoted(c) for c in self.columns)
        frame = self.engine.execute(f"SELECT {columns} FROM {self.table} ORDER BY row").df()
        for name in ("user", "item", "event"):
            if name in frame.columns and frame[name].dtype.kind not in "iu":
                frame[name] = frame[name].astype(str).to_numpy(dtype=str)
        return frame

    @classmethod
    def from_frame(
        cls, frame: pd.DataFrame, engine: Engine | None = None, path: str = "data", has_time: bool = True
    ) -> Interactions:
        """A canonical table built in Python (a sequence file, generated data) moved into the engine;
        its rows are named `path (row n)`."""
        engine = engine or default_engine()
        columns = tuple(c for c in CANONICAL_COLUMNS if c in frame.columns)
        plain = pd.DataFrame({c: _plain(frame[c]) for c in columns})
        view, table = engine.name("frame"), engine.name("interactions")
        engine.connection.register(view, plain)
        try:
            selected = ", ".join(quoted(c) for c in columns)
            engine.execute(
                f"CREATE TABLE {table} AS SELECT row_number() OVER () - 1 AS row, {selected} FROM {view}"
            )
        finally:
            engine.connection.unregister(view)
        return cls(engine, table, columns, path, lambda row: f"{path} (row {row})", has_time)


def _plain(column: pd.Series) -> np.ndarray:
    values = column.to_numpy()
    if values.dtype == object or values.dtype.kind in "US" or str(column.dtype) in ("str", "string"):
        return np.asarray(values, dtype=object).astype(str).astype(object)
    return values


_DEFAULT: Engine | None = None


def default_engine() -> Engine:
    """A process-wide engine for readers called without one (tests, notebooks, small data)."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = Engine()
        atexit.register(_DEFAULT.close)
    return _DEFAULT


def check_readable(path: str | os.PathLike, directory_ok: bool = False) -> Path:
    path = Path(path)
    if not path.exists():
        raise UserInputError(f"{path}: data file not found (check data.path)")
    if path.is_dir() and not directory_ok:
        raise UserInputError(f"{path}: is a directory, expected a data file (check data.path)")
    if not os.access(path, os.R_OK):
        raise UserInputError(f"{path}: data file is not readable (permission denied)")
    return path


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as raw:
        return raw.read(2) == b"\x1f\x8b"


def _open_text(path: Path) -> io.TextIOBase:
    """Open a plain or gzipped text file (detected by its magic bytes, not its name)."""
    check_readable(path)
    if _is_gzip(path):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", errors="strict")
    return open(path, encoding="utf-8", errors="strict")


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
        with _open_text(times_path) as handle:
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


# --- tabular sources, read by the engine -------------------------------------------------------

_CSV_LINE = re.compile(r"CSV Error on Line: (\d+)")
_CSV_FIELDS = re.compile(r"Expected Number of Columns: (\d+) Found: (\d+)")
_BAD_COLUMN = re.compile(r'converting column "(.*?)"')
_BAD_VALUE = re.compile(r'Could not convert string "(.*?)" to')
# The type a mapped column is read as first, and the next one when a value does not fit it.
_FIRST_TYPE = {
    "user": "BIGINT",
    "item": "BIGINT",
    "timestamp": "BIGINT",
    "rating": "DOUBLE",
    "event": "VARCHAR",
}
_WIDER = {
    "user": {"BIGINT": "VARCHAR"},  # string ids (e.g. Amazon ASINs) are fine
    "item": {"BIGINT": "VARCHAR"},
    "timestamp": {"BIGINT": "DOUBLE", "DOUBLE": "VARCHAR"},  # text: parsed as date-times after
}


def _check_mapping(columns: Mapping[str, str | None]) -> dict[str, str]:
    unknown = sorted(set(columns) - set(CANONICAL_COLUMNS))
    if unknown:
        raise UserInputError(
            f"data.columns: unknown key(s) {unknown}; allowed keys are {list(CANONICAL_COLUMNS)}"
        )
    for required in ("user", "item"):
        if not columns.get(required):
            raise UserInputError(f"data.columns.{required}: required, got {columns.get(required)!r}")
    return {canonical: str(name) for canonical, name in columns.items() if name is not None}


def _header(path: Path, sep: str) -> list[str]:
    try:
        with _open_text(path) as handle:
            first = handle.readline().rstrip("\r\n")
    except UnicodeDecodeError as err:
        raise UserInputError(f"{path}: not a UTF-8 text file ({err.reason})") from None
    except (OSError, EOFError) as err:
        raise UserInputError(f"{path}: cannot be read ({err})") from None
    if not first.strip():
        raise UserInputError(f"{path}: no rows")
    if len(sep) == 1:
        return next(csv.reader([first], delimiter=sep))
    return first.split(sep)


def read_delimited(
    path: str | os.PathLike,
    columns: Mapping[str, str | None],
    sep: str = ",",
    header: bool = True,
    names: tuple[str, ...] | None = None,
    engine: Engine | None = None,
) -> Interactions:
    """A CSV/TSV file (plain or gzipped) as a canonical table: `columns` maps canonical names to
    the file's column names, which come from its header or, without one, from `names`."""
    engine = engine or default_engine()
    path = check_readable(path)
    mapping = _check_mapping(columns)
    file_columns = list(names) if names is not None else _header(path, sep)
    if header and names is not None:
        _header(path, sep)  # an empty file says so; the header's names are not used
    for canonical, name in mapping.items():
        if name not in file_columns:
            raise UserInputError(
                f"{path}: missing column {name!r} (data.columns.{canonical}); the file has {file_columns}"
            )
    first_line = 2 if header else 1
    types = {name: "VARCHAR" for name in file_columns}
    for canonical, name in mapping.items():
        types[name] = _FIRST_TYPE[canonical]
    compression = "gzip" if _is_gzip(path) else "none"
    table = engine.name("interactions")
    while True:
        spec = ", ".join(f"{literal(name)}: {literal(kind)}" for name, kind in types.items())
        scan = (
            f"read_csv({literal(str(path))}, delim={literal(sep)}, header={str(header).lower()}, "
            f"auto_detect=false, columns={{{spec}}}, quote='\"', escape='\"', compression={literal(compression)})"
        )
        selected = ", ".join(f"{quoted(name)} AS {quoted(canonical)}" for canonical, name in mapping.items())
        try:
            engine.execute(
                f"CREATE OR REPLACE TABLE {table} AS SELECT row_number() OVER () - 1 AS row, {selected} FROM {scan}"
            )
            break
        except duckdb.ConversionException as err:
            message = str(err)
            column = _match(_BAD_COLUMN, message)
            canonical = next((c for c, n in mapping.items() if n == column), None)
            wider = _WIDER.get(canonical, {}).get(types.get(column))
            if wider is not None:
                types[column] = wider
                continue
            line, value = _match(_CSV_LINE, message), _match(_BAD_VALUE, message)
            raise UserInputError(
                f"{path}:{line}: malformed row: column {column!r} is {value!r}, expected a number"
            ) from None
        except duckdb.InvalidInputException as err:
            raise _csv_error(path, str(err), file_columns) from None
        except duckdb.Error as err:
            raise UserInputError(f"{path}: cannot be read ({_first_line(err)})") from None

    def locate(row: int) -> str:
        return f"{path}:{row + first_line}"

    interactions = Interactions(engine, table, _canonical_order(mapping), str(path), locate)
    return _finish(interactions, mapping)


def _match(pattern: re.Pattern, message: str) -> str | None:
    found = pattern.search(message)
    return found.group(1) if found else None


def _first_line(err: Exception) -> str:
    lines = [line for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def _csv_error(path: Path, message: str, file_columns: list[str]) -> UserInputError:
    line = _match(_CSV_LINE, message)
    fields = _CSV_FIELDS.search(message)
    if line and fields:
        return UserInputError(
            f"{path}:{line}: malformed row: expected {fields.group(1)} fields ({', '.join(file_columns)}), "
            f"found {fields.group(2)}"
        )
    if "unicode" in message.lower() or "utf-8" in message.lower():
        return UserInputError(f"{path}: not a UTF-8 text file" + (f" (line {line})" if line else ""))
    where = f"{path}:{line}" if line else str(path)
    return UserInputError(f"{where}: malformed row ({_first_line(message)})")


def _canonical_order(mapping: Mapping[str, str]) -> tuple[str, ...]:
    """The table's columns: the mapped ones in mapping order, and a timestamp in any case."""
    return (*mapping, *(() if "timestamp" in mapping else ("timestamp",)))


def _finish(interactions: Interactions, mapping: Mapping[str, str]) -> Interactions:
    """Check a freshly read table: no empty values, text times parsed; a table without a time
    column gets the row's position as its time."""
    engine, table = interactions.engine, interactions.table
    count = engine.scalar(f"SELECT count(*) FROM {table}")
    if count == 0:
        raise UserInputError(f"{interactions.path}: no rows")
    kinds = dict(engine.execute(f"SELECT column_name, column_type FROM (DESCRIBE {table})").fetchall())
    empty = []
    for canonical in mapping:
        test = f"{quoted(canonical)} IS NULL"
        if kinds[canonical] == "VARCHAR":
            test += f" OR trim({quoted(canonical)}) = ''"
        empty.append(f"min(row) FILTER (WHERE {test})")
    first_empty = engine.first(f"SELECT {', '.join(empty)} FROM {table}")
    rows = [(row, canonical) for row, canonical in zip(first_empty, mapping) if row is not None]
    if rows:
        row, canonical = min(rows)
        raise UserInputError(
            f"{interactions.locate(row)}: malformed row: no value in column {mapping[canonical]!r}"
        )
    if "timestamp" not in mapping:
        engine.execute(f"ALTER TABLE {table} ADD COLUMN timestamp BIGINT")
        engine.execute(f"UPDATE {table} SET timestamp = row")
        interactions.has_time = False
    elif kinds["timestamp"] == "VARCHAR":
        _parse_times(interactions, mapping["timestamp"])
    return interactions


def _parse_times(interactions: Interactions, name: str) -> None:
    """A text time column: numbers if any value is one (then every value must be), else date-times
    (ISO 8601, with or without a zone; without one, UTC), as ns since the epoch."""
    engine, table = interactions.engine, interactions.table
    numeric = engine.scalar(f"SELECT bool_or(TRY_CAST(timestamp AS DOUBLE) IS NOT NULL) FROM {table}")
    target, expected = (
        ("DOUBLE", "a number like the rows before") if numeric else ("TIMESTAMPTZ", "a number or a date-time")
    )
    bad = engine.first(
        f"SELECT row, timestamp FROM {table} WHERE TRY_CAST(timestamp AS {target}) IS NULL ORDER BY row LIMIT 1"
    )
    if bad is not None:
        raise UserInputError(
            f"{interactions.locate(bad[0])}: malformed row: column {name!r} is {bad[1]!r}, expected {expected}"
        )
    converted = "CAST(timestamp AS DOUBLE)" if numeric else "epoch_ns(CAST(timestamp AS TIMESTAMPTZ))"
    interactions.time_unit = None if numeric else "ns"
    engine.execute(
        f"CREATE OR REPLACE TABLE {table} AS SELECT * REPLACE ({converted} AS timestamp) FROM {table}"
    )


_INTEGER_TYPES = ("TINYINT", "SMALLINT", "INTEGER", "BIGINT", "UTINYINT", "USMALLINT", "UINTEGER")
_REAL_TYPES = ("FLOAT", "DOUBLE", "REAL")


def parquet_parts(path: Path) -> list[Path]:
    """A parquet file, or the parts of a directory of them (in name order, subdirectories too)."""
    if not path.is_dir():
        return [path]
    parts = sorted(p for p in path.rglob("*") if p.suffix.lower() in (".parquet", ".pq") and p.is_file())
    if not parts:
        raise UserInputError(f"{path}: no parquet parts (*.parquet) in this directory (check data.path)")
    return parts


def read_parquet(
    path: str | os.PathLike, columns: Mapping[str, str | None], engine: Engine | None = None
) -> Interactions:
    """A parquet file, or a directory of parquet parts, as a canonical table."""
    engine = engine or default_engine()
    path = check_readable(path, directory_ok=True)
    mapping = _check_mapping(columns)
    parts = parquet_parts(path)
    listing = "[" + ", ".join(literal(str(p)) for p in parts) + "]"
    scan = f"read_parquet({listing}, union_by_name=true, filename=true, file_row_number=true)"
    try:
        schema = dict(
            engine.execute(f"SELECT column_name, column_type FROM (DESCRIBE SELECT * FROM {scan})").fetchall()
        )
    except duckdb.Error as err:
        raise _bad_part(engine, parts, err) from None
    available = [c for c in schema if c not in ("filename", "file_row_number")]
    for canonical, name in mapping.items():
        if name not in available:
            raise UserInputError(
                f"{path}: missing column {name!r} (data.columns.{canonical}); the file has {available}"
            )
    selected = []
    time_unit = None
    for canonical, name in mapping.items():
        kind, column = schema[name], quoted(name)
        if canonical in ("user", "item"):
            selected.append(f"CAST({column} AS {'BIGINT' if kind in _INTEGER_TYPES else 'VARCHAR'})")
        elif canonical == "timestamp":
            if kind in _INTEGER_TYPES:
                selected.append(f"CAST({column} AS BIGINT)")
            elif kind in _REAL_TYPES or kind.startswith("DECIMAL"):
                selected.append(f"CAST({column} AS DOUBLE)")
            elif kind.startswith("TIMESTAMP") or kind == "DATE":
                selected.append(f"epoch_ns(CAST({column} AS TIMESTAMPTZ))")
                time_unit = "ns"
            else:
                selected.append(f"CAST({column} AS VARCHAR)")
        elif canonical == "rating":
            selected.append(f"TRY_CAST({column} AS DOUBLE)")
        else:
            selected.append(f"CAST({column} AS VARCHAR)")
    names = ", ".join(f"{expression} AS {quoted(c)}" for expression, c in zip(selected, mapping))
    index = engine.name("parts")
    engine.connection.register(
        index, pd.DataFrame({"filename": [str(p) for p in parts], "part": np.arange(len(parts))})
    )
    table = engine.name("interactions")
    try:
        engine.execute(
            f"CREATE TABLE {table} AS SELECT (p.part << {PART_SHIFT}) + s.file_row_number AS row, {names} "
            f"FROM {scan} s JOIN {index} p USING (filename)"
        )
    except duckdb.Error as err:
        raise _bad_part(engine, parts, err) from None
    finally:
        engine.connection.unregister(index)

    def locate(row: int) -> str:
        part, within = row >> PART_SHIFT, row & ((1 << PART_SHIFT) - 1)
        return f"{parts[part]} (row {within})"

    interactions = Interactions(
        engine, table, _canonical_order(mapping), str(path), locate, time_unit=time_unit
    )
    if "rating" in mapping:  # a value that is not a number became null: name it
        bad = engine.scalar(f"SELECT min(row) FROM {table} WHERE rating IS NULL")
        if bad is not None:
            raise UserInputError(
                f"{locate(bad)}: malformed row: column {mapping['rating']!r} is empty or not a number"
            )
    return _finish(interactions, mapping)


def _bad_part(engine: Engine, parts: list[Path], err: Exception) -> UserInputError:
    """The part a parquet error comes from (read one by one: the error path only)."""
    for part in parts:
        try:
            engine.execute(f"SELECT count(*) FROM read_parquet({literal(str(part))})")
        except duckdb.Error as part_err:
            return UserInputError(f"{part}: cannot be read as parquet ({_first_line(part_err)})")
    return UserInputError(f"{parts[0].parent}: cannot be read as parquet ({_first_line(err)})")


def is_parquet(path: str | os.PathLike) -> bool:
    path = Path(path)
    suffixes = [s.lower() for s in path.suffixes]
    return path.is_dir() or ".parquet" in suffixes or ".pq" in suffixes


def read_interactions_file(
    path: str | os.PathLike,
    columns: Mapping[str, str | None],
    sep: str = ",",
    engine: Engine | None = None,
) -> Interactions:
    """Any CSV/TSV (plain or gzipped) or parquet file, or directory of parquet parts, of
    interactions, with a column mapping.

    `columns` maps canonical names (user, item, timestamp, rating, event) to the file's column
    names; user and item are required, the others may be null. Without a timestamp column the
    file order is the time order.
    """
    if is_parquet(path):
        return read_parquet(path, columns, engine)
    return read_delimited(path, columns, sep=sep, header=True, engine=engine)


# --- named formats ---------------------------------------------------------------------------

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
    present = _header(path, ",")
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
