"""CSV/TSV files (plain or gzipped), parquet files and directories of parquet parts, read by the
engine into the canonical interactions table (recsys/data/interactions.py).

They are read typed, in parallel, without a Python object per value (as Spark, Hive or an export
job writes them, for parts). Types are tried narrowest first: an id column that is not all integers
is read again as text, a time column that is not all integers as a real number and then as
date-times; only the error path reads twice. Bad input raises `UserInputError` with one line that
names the file and the line (a parquet part and its row), or the column, and what is wrong.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Mapping
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd

from recsys.data.engine import Engine, literal, quoted
from recsys.data.interactions import (
    CANONICAL_COLUMNS,
    PART_SHIFT,
    Interactions,
    check_readable,
    default_engine,
    is_gzip,
    open_text,
)
from recsys.errors import UserInputError

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


def header_names(path: Path, sep: str) -> list[str]:
    try:
        with open_text(path) as handle:
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
    file_columns = list(names) if names is not None else header_names(path, sep)
    if header and names is not None:
        header_names(path, sep)  # an empty file says so; the header's names are not used
    for canonical, name in mapping.items():
        if name not in file_columns:
            raise UserInputError(
                f"{path}: missing column {name!r} (data.columns.{canonical}); the file has {file_columns}"
            )
    first_line = 2 if header else 1
    types = {name: "VARCHAR" for name in file_columns}
    for canonical, name in mapping.items():
        types[name] = _FIRST_TYPE[canonical]
    compression = "gzip" if is_gzip(path) else "none"
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
