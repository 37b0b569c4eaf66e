"""The data formats (`data.format`): one registry entry per format, with its reader and what of the
source enters the cache fingerprint.

A data config names its source with `data.format`, `data.path` and the options some formats read
(`data.columns`, `data.sep`, `data.synthetic`, `data.test_path`, `data.times_path`); together they
are a `Source`.
`FORMATS` maps each format name to a `DataFormat`: the function that reads a source into the
canonical interactions table in the engine (recsys/data/interactions.py; readers in loaders.py
and tabular.py), the source options that change what it reads
(they enter the fingerprint, beside the file's bytes), and whether it reads a file at all. Adding a
format is one entry here (and its reader). `data.format: auto` picks one by the file name
(`resolve_format`).

The fingerprint's description of a source (`describe`) must stay exactly what it has been for the
existing formats: every trained checkpoint records its data's fingerprint and is refused when it
differs. It holds the format, the options the entry names, and the sha256 of the file (and of the
test file, when there is one), never their paths. A directory of parquet parts is hashed part by
part, with each part's name relative to the directory.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recsys.data import loaders, tabular
from recsys.data.engine import Engine
from recsys.data.interactions import Interactions, check_readable, default_engine
from recsys.data.synthetic import synthetic_interactions
from recsys.data.tabular import is_parquet, parquet_parts
from recsys.errors import UserInputError

AUTO = "auto"


@dataclass(frozen=True)
class Source:
    """Where a data set comes from: data.format, data.path and the options some formats read."""

    format: str = AUTO
    path: str | None = None
    columns: dict = field(default_factory=dict)  # interactions: canonical name -> file column
    sep: str = ","  # interactions: the field separator of a CSV/TSV
    synthetic: dict = field(default_factory=dict)  # synthetic: the generator's parameters
    test_path: str | None = None  # retailrocket: the held-out test purchases
    times_path: str | None = None  # sequence: a parallel file of each event's time

    def __post_init__(self) -> None:
        # Config mappings (or null) as plain dicts: what readers and the fingerprint take.
        object.__setattr__(self, "columns", dict(self.columns or {}))
        object.__setattr__(self, "synthetic", dict(self.synthetic or {}))


@dataclass(frozen=True)
class DataFormat:
    """How one format is read, and what of its source enters the fingerprint."""

    read: Callable[[Source, Engine], Interactions]  # the source -> the canonical interactions table
    options: tuple[str, ...] = ()  # Source fields that enter the fingerprint (beyond format and files)
    reads_file: bool = True  # False: generated, no data.path
    reads_test_path: bool = False  # reads data.test_path (any other format refuses one)
    reads_times_path: bool = False  # reads data.times_path (any other format refuses one)


def _read_interactions_file(source: Source, engine: Engine) -> Interactions:
    if not source.columns:
        raise UserInputError(f"data.columns: required to read {source.path} as an interactions file")
    return tabular.read_interactions_file(source.path, source.columns, sep=source.sep, engine=engine)


def _generated(source: Source, engine: Engine) -> Interactions:
    return Interactions.from_frame(synthetic_interactions(**source.synthetic), engine, "synthetic data")


FORMATS: dict[str, DataFormat] = {
    # One line per user: `user item item ...` (the Amazon, LastFM and ML-1M sequence files).
    # With data.times_path, a parallel `user time time ...` file gives each event's time.
    "sequence": DataFormat(
        lambda s, engine: loaders.read_sequence_file(s.path, engine, times_path=s.times_path),
        reads_times_path=True,
    ),
    # MovieLens ratings.dat / u.data / ratings.csv.
    "movielens": DataFormat(lambda s, engine: loaders.read_movielens(s.path, engine=engine)),
    # Any CSV/TSV file (plain or gzipped), parquet file or directory of parquet parts, with a
    # column mapping.
    "interactions": DataFormat(_read_interactions_file, options=("columns", "sep")),
    # Generated data (recsys/data/synthetic.py).
    "synthetic": DataFormat(_generated, options=("synthetic",), reads_file=False),
    # The Retail Rocket multi-behaviour subset and its test purchases.
    "retailrocket": DataFormat(
        lambda s, engine: loaders.read_retailrocket(s.path, s.test_path, engine), reads_test_path=True
    ),
    # Kaggle's Retail Rocket events.csv.
    "retailrocket_raw": DataFormat(lambda s, engine: loaders.read_retailrocket_raw(s.path, engine)),
    # Taobao UserBehavior.csv.
    "taobao": DataFormat(lambda s, engine: loaders.read_taobao(s.path, engine)),
}


def resolve_format(data_format: str, path: str | None) -> str:
    """The format to read: `data_format` itself, or for `auto` the one the file name suggests."""
    if data_format != AUTO and data_format not in FORMATS:
        raise UserInputError(f"data.format: {data_format!r} is not one of {[AUTO, *FORMATS]}")
    if data_format != AUTO:
        return data_format
    if path is None:
        raise UserInputError("data.path: required unless data.format is 'synthetic'")
    if loaders.movielens_layout(path):
        return "movielens"
    suffixes = [s.lower() for s in Path(path).suffixes if s.lower() != ".gz"]
    if is_parquet(path) or (suffixes and suffixes[-1] in (".csv", ".tsv")):
        return "interactions"
    return "sequence"


def read_interactions(source: Source, engine: Engine | None = None) -> Interactions:
    """The canonical interactions table of `source` in `engine` (recsys/data/interactions.py)."""
    name = resolve_format(source.format, source.path)
    data_format = FORMATS[name]
    if data_format.reads_file:
        if source.path is None:
            raise UserInputError(f"data.path: required for data.format={name!r}")
        for key, reads in (("test_path", "reads_test_path"), ("times_path", "reads_times_path")):
            if getattr(source, key) is not None and not getattr(data_format, reads):
                readers = [n for n, f in FORMATS.items() if getattr(f, reads)]
                raise UserInputError(
                    f"data.{key}: only data.format={'/'.join(readers)} reads one, not {name!r}"
                )
    return data_format.read(source, engine or default_engine())


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes; of a directory of parquet parts, of each part's relative name
    and bytes, in name order."""
    path = Path(path)
    digest = hashlib.sha256()
    if path.is_dir():
        for part in parquet_parts(path):
            digest.update(f"{part.relative_to(path)}\0{file_sha256(part)}\0".encode())
        return digest.hexdigest()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def describe(source: Source) -> dict[str, Any]:
    """What of `source` enters the fingerprint: the resolved format, the options its entry names,
    and the sha256 of its file and test file (their bytes, not their names or times)."""
    name = resolve_format(source.format, source.path)
    data_format = FORMATS[name]
    described: dict[str, Any] = {"format": name}
    described.update((option, getattr(source, option)) for option in data_format.options)
    if data_format.reads_file:
        if source.path is None:
            raise UserInputError(f"data.path: required for data.format={name!r}")
        described["sha256"] = file_sha256(check_readable(source.path, directory_ok=name == "interactions"))
    if source.test_path is not None:
        described["test_sha256"] = file_sha256(check_readable(source.test_path))
    if source.times_path is not None:  # only when set: fingerprints without it stay as they were
        described["times_sha256"] = file_sha256(check_readable(source.times_path))
    return described
