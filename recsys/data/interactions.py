"""The canonical interactions table that every reader produces, in the engine.

`Interactions` is a table of recsys/data/engine.py's DuckDB connection with columns
    row        int64: the row's place in the source (its file order; for a directory of parquet
               parts, the part's rank in name order times 2**40 plus the row within the part)
    user       raw user id (BIGINT when every value is an integer, else VARCHAR)
    item       raw item id (likewise)
    timestamp  BIGINT or DOUBLE; where the source has no time, the row's position, so that a
               stable sort by time keeps file order; a date-time column becomes ns since the epoch
and, when the source has them, `rating` (DOUBLE) and `event` (VARCHAR), plus where each row came
from (`locate`, for messages). The readers are in recsys/data/tabular.py (CSV and parquet, read by
the engine) and recsys/data/loaders.py (sequence files and the named formats).
"""

from __future__ import annotations

import atexit
import gzip
import io
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from recsys.data.engine import Engine, quoted
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


def is_gzip(path: Path) -> bool:
    with open(path, "rb") as raw:
        return raw.read(2) == b"\x1f\x8b"


def open_text(path: Path) -> io.TextIOBase:
    """Open a plain or gzipped text file (detected by its magic bytes, not its name)."""
    check_readable(path)
    if is_gzip(path):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", errors="strict")
    return open(path, encoding="utf-8", errors="strict")
