"""The embedded query engine that reads and preprocesses interaction logs out of core (DuckDB).

A retailer's log has hundreds of millions of events: held as Python objects and sorted in memory
it needs about 0.25 GB per million rows (BENCHMARKS.md). DuckDB reads CSV and parquet typed and in
parallel, and its joins, aggregates and sorts spill to disk under a memory limit, so preprocessing
holds a bounded amount of memory whatever the size of the log. (Polars' streaming engine was the
other candidate; DuckDB was chosen because its memory limit is a hard setting that every operator,
the sort included, obeys by spilling, and because a bad row comes back with its line number.)

`Engine` is one DuckDB connection for one preprocessing run: `data.memory_limit` ("auto": an
eighth of this machine's memory, at least 1 GB; or a size such as "4GB"), every core the process
may use, and a scratch directory for the tables and the spill files, removed when the run ends (and,
if its process was killed, by the next engine started on the same machine).
Times are read in UTC.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

import duckdb

from recsys.errors import UserInputError

AUTO = "auto"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|KIB|MIB|GIB|TIB)?\s*$", re.IGNORECASE)
_UNITS = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
# Below this DuckDB cannot hold the buffers of even a small sort.
MIN_MEMORY = 64 * 10**6


def physical_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def memory_limit_bytes(value: str | int | None) -> int:
    """data.memory_limit as bytes: "auto" (or null) = an eighth of the machine's memory, at least
    1 GB; an integer is bytes; a string a size with a unit ("512MB", "4GB", "2GiB")."""
    if value is None or value == AUTO:
        return max(10**9, physical_memory() // 8)
    if isinstance(value, bool):
        raise UserInputError(f"data.memory_limit: expected a size such as '4GB' or 'auto', got {value!r}")
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE.match(str(value))
        if match is None:
            raise UserInputError(f"data.memory_limit: expected a size such as '4GB' or 'auto', got {value!r}")
        size = int(float(match.group(1)) * _UNITS[(match.group(2) or "B").upper()])
    if size < MIN_MEMORY:
        raise UserInputError(
            f"data.memory_limit: {value!r} is too small to preprocess in; give at least {MIN_MEMORY // 10**6}MB"
        )
    return size


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class Engine:
    """One DuckDB connection with a memory limit and a scratch directory (its tables and spill
    files live there; `close` removes it). Use as a context manager."""

    def __init__(
        self,
        memory_limit: str | int | None = AUTO,
        scratch_parent: str | os.PathLike | None = None,
        threads: int | None = None,
    ):
        self.memory_limit = memory_limit_bytes(memory_limit)
        self.memory_limit_setting = memory_limit
        if scratch_parent is not None:
            Path(scratch_parent).mkdir(parents=True, exist_ok=True)
        remove_abandoned_scratch(Path(scratch_parent or tempfile.gettempdir()))
        self.scratch = Path(tempfile.mkdtemp(prefix=f"{_scratch_prefix()}{os.getpid()}-", dir=scratch_parent))
        try:
            # A database file, not an in-memory one: tables larger than the memory limit are paged
            # out to it (compressed) instead of failing.
            self.connection = duckdb.connect(str(self.scratch / "work.duckdb"))
            self.connection.execute(f"SET memory_limit = '{self.memory_limit}B'")
            self.connection.execute(f"SET threads = {int(threads or usable_cores())}")
            self.connection.execute(f"SET temp_directory = '{self.scratch / 'spill'}'")
            self.connection.execute("SET preserve_insertion_order = true")  # row numbers follow the file
            self.connection.execute("SET TimeZone = 'UTC'")
        except BaseException:
            shutil.rmtree(self.scratch, ignore_errors=True)
            raise
        self._names = 0

    def name(self, prefix: str) -> str:
        """A fresh table name."""
        self._names += 1
        return f"{prefix}_{self._names}"

    def execute(self, sql: str, parameters: list | None = None) -> duckdb.DuckDBPyConnection:
        """Run one statement; running out of memory is a config error naming data.memory_limit."""
        try:
            return self.connection.execute(sql, parameters or [])
        except duckdb.OutOfMemoryException as err:
            raise self._too_small(err) from None

    def _too_small(self, err: Exception) -> UserInputError:
        return UserInputError(
            f"data.memory_limit: {self.memory_limit_setting!r} ({self.memory_limit / 1e9:.2f} GB) is too "
            f"small to preprocess this data ({str(err).splitlines()[0]}); raise it"
        )

    def batches(self, sql: str, rows: int):
        """The result of a query as Arrow record batches of `rows` rows, streamed."""
        try:
            yield from self.connection.sql(sql).to_arrow_reader(rows)
        except duckdb.OutOfMemoryException as err:
            raise self._too_small(err) from None

    def first(self, sql: str, parameters: list | None = None) -> tuple | None:
        """The first row of a query's result, or None (the result is read to its end: DuckDB
        refuses other work on a connection with a result left open)."""
        rows = self.execute(sql, parameters).fetchall()
        return rows[0] if rows else None

    def scalar(self, sql: str, parameters: list | None = None):
        return self.first(sql, parameters)[0]

    def close(self) -> None:
        try:
            self.connection.close()
        finally:
            shutil.rmtree(self.scratch, ignore_errors=True)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _scratch_prefix() -> str:
    return f".ingest-{socket.gethostname()}-"


def remove_abandoned_scratch(parent: Path) -> None:
    """Remove the scratch directories that engines of this machine left behind when their process
    was killed (a killed run of a large log leaves gigabytes of spill files). Only this host's, and
    only those whose process is gone: another machine's may be in use on a shared file system."""
    prefix = _scratch_prefix()
    for scratch in parent.glob(f"{prefix}*"):
        pid = scratch.name[len(prefix) :].split("-", 1)[0]
        if pid.isdigit() and not _running(int(pid)):
            shutil.rmtree(scratch, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def quoted(name: str) -> str:
    """An SQL identifier."""
    return '"' + str(name).replace('"', '""') + '"'


def literal(value: str) -> str:
    """An SQL string literal."""
    return "'" + str(value).replace("'", "''") + "'"
