"""Item features: per-item categorical attributes read from a file (`data.item_features`) and
aligned with a data set's item catalogue in CSR arrays.

A feature file maps raw item ids to attributes. Every reader returns the same thing: raw item id
(as text) -> the item's attribute tokens "field=value", each once, in file order. The field
keeps attributes of different columns apart ("brand=3" is not "category=3"); the token, not
the field, is what gets an index. Supported files (FORMATS; their readers are
recsys/data/feature_readers.py):
    s3rec      the S3-Rec/ICLRec `*_item2attributes.json`: one JSON object {"<item>": [attr, ...]}
               -> "attribute=<id>" (LastFM's lists repeat ids: kept once)
    movielens  u.item (with u.genre beside it), movies.dat or movies.csv -> "genre=<name>"; a movie
               without a genre simply has no attributes
    jsonl      one JSON object per line: an item field and attribute fields (a value or a list)
    csv        CSV/TSV with a header: an item column and attribute columns; a cell may hold
               several values separated by `value_sep`
    parquet    an item column and attribute columns; list columns hold several values
`align_item_features` puts them in the order of a catalogue's item indices: row r holds the
attributes of item index r (row 0 is padding), then rows for items that have features but no
interactions; a row's attribute indices ascend. Bad input raises `UserInputError` with one line
that names the file (and the line where there is one) and what is wrong.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from recsys.data.feature_readers import (
    check_columns,
    check_feature_file,
    genre_file,
    movielens_file,
    read_csv,
    read_jsonl,
    read_movielens,
    read_parquet,
    read_s3rec,
    sorted_ids,
)
from recsys.data.formats import file_sha256
from recsys.errors import UserInputError
from recsys.runs.files import atomic_directory

FORMATS = ("auto", "s3rec", "movielens", "jsonl", "csv", "parquet")

# The FeatureSource fields that change what a format reads (they enter the fingerprint).
_OPTIONS: dict[str, tuple[str, ...]] = {
    "s3rec": (),
    "movielens": (),
    "jsonl": ("item_column", "columns"),
    "csv": ("item_column", "columns", "sep", "value_sep"),
    "parquet": ("item_column", "columns"),
}


@dataclass(frozen=True)
class FeatureSource:
    """data.item_features: where an item-attribute table comes from."""

    path: str
    format: str = "auto"  # auto: by file name (see resolve_feature_format)
    item_column: str = "item"  # jsonl/csv/parquet: the column naming the item
    columns: tuple[str, ...] | None = None  # jsonl/csv/parquet: attribute columns; None = every other column
    sep: str = ","  # csv: field separator ("\t" for TSV)
    value_sep: str | None = "|"  # csv: separates several values in one cell; None = one value per cell

    def __post_init__(self) -> None:
        # A config list (or a single name) as a tuple: hashable, and what the readers take.
        columns = self.columns
        if isinstance(columns, str):
            columns = (columns,)
        if columns is not None:
            object.__setattr__(self, "columns", tuple(str(c) for c in columns))
        if not self.path:
            raise UserInputError("data.item_features.path: required (the item feature file)")
        object.__setattr__(self, "path", str(self.path))

    @classmethod
    def from_config(cls, item_features: dict | str | None) -> FeatureSource | None:
        """data.item_features: null, a path, or a mapping of this class's fields, checked key by key."""
        if item_features is None:
            return None
        if isinstance(item_features, str):
            item_features = {"path": item_features}
        unknown = sorted(set(item_features) - set(cls.__dataclass_fields__))
        if unknown:
            raise UserInputError(
                f"data.item_features.{unknown[0]}: not a key; use {sorted(cls.__dataclass_fields__)}"
            )
        return cls(**item_features)

    def describe(self) -> dict[str, Any]:
        """What of this source enters the data cache fingerprint: the resolved format, the
        options that change what it reads, and the sha256 of the file's bytes (never its path,
        so a moved copy keeps its cache)."""
        name = resolve_feature_format(self)
        described: dict[str, Any] = {"format": name}
        for option in _OPTIONS[name]:
            value = getattr(self, option)
            described[option] = list(value) if isinstance(value, tuple) else value
        path = check_feature_file(self.path)
        described["sha256"] = file_sha256(path)
        if name == "movielens" and movielens_file(path) == "u.item":
            # The genre names are u.genre's: a changed u.genre changes what is read.
            described["genre_sha256"] = file_sha256(genre_file(path))
        return described


def resolve_feature_format(source: FeatureSource) -> str:
    """The format to read: `source.format` itself, or for `auto` the one the file name suggests."""
    if source.format not in FORMATS:
        raise UserInputError(f"data.item_features.format: {source.format!r} is not one of {list(FORMATS)}")
    if source.format != "auto":
        return source.format
    path = Path(source.path)
    name = path.name.lower()
    movielens = movielens_file(path)
    if name.endswith("item2attributes.json"):
        return "s3rec"
    if movielens in ("u.item", "movies.dat"):
        return "movielens"
    if movielens == "movies.csv" and any(
        (path.parent / ratings).exists() for ratings in ("ratings.csv", "ratings.csv.gz")
    ):
        return "movielens"
    suffixes = [s.lower() for s in path.suffixes if s.lower() != ".gz"]
    last = suffixes[-1] if suffixes else ""
    if last in (".jsonl", ".json"):
        return "jsonl"
    if last in (".csv", ".tsv"):
        return "csv"
    if last in (".parquet", ".pq"):
        return "parquet"
    raise UserInputError(
        f"{path}: cannot tell the item-feature format from the file name; set data.item_features.format "
        f"to one of {list(FORMATS[1:])}"
    )


def read_item_features(source: FeatureSource) -> dict[str, list[str]]:
    """raw item id (as str, e.g. "12" or "B00XYZ") -> the item's attribute tokens "field=value",
    each once, in file order.

    Fields: s3rec -> "attribute=<id>"; movielens -> "genre=<name>" (u.item: names from the u.genre
    file beside it; 'unknown' genre included like any other); jsonl/csv/parquet -> "<column>=<value>".
    Items without attributes are absent (a MovieLens movie without a genre); an item listed with
    an empty attribute list is an error, as it is most likely a broken file.
    """
    name = resolve_feature_format(source)
    path = check_feature_file(source.path)
    if name == "s3rec":
        features = read_s3rec(path)
    elif name == "movielens":
        features = read_movielens(path)
    else:
        check_columns(source)
        reader = {"jsonl": read_jsonl, "csv": read_csv, "parquet": read_parquet}[name]
        features = reader(path, source)
    if not features:
        raise UserInputError(f"{path}: no items with attributes")
    return features


@dataclass
class ItemFeatures:
    """Item attributes aligned with a data set's catalogue, in CSR form (what models and the cache read).

    Rows: 0 = padding (no attributes), 1..num_items = the catalogue's items in index order, then
    the extra items (features but no interactions: kept so that a model may still embed them)."""

    offsets: np.ndarray  # (num_rows + 1,) int64; row r's attributes are values[offsets[r]:offsets[r+1]]
    values: np.ndarray  # int32 attribute indices 1..num_attributes (0 is padding, never stored here)
    vocabulary: np.ndarray  # (num_attributes + 1,) str tokens; entry 0 is "" (padding)
    extra_item_ids: np.ndarray  # raw ids (str) of items with features but no interactions: rows num_items+1..
    num_items: int
    stats: dict = field(default_factory=dict)

    def num_attributes(self) -> int:
        """Number of real attributes; valid attribute indices are 1..num_attributes."""
        return len(self.vocabulary) - 1

    def save(self, path: str | os.PathLike) -> None:
        """Write a directory of .npy arrays plus meta.json, atomically
        (recsys.runs.files.atomic_directory): a reader finds the whole directory or none, and a
        directory already at `path` (another process's finished copy) stays. Strings are numpy
        unicode arrays, so nothing needs pickle to load."""
        with atomic_directory(path) as tmp:
            for name in ("offsets", "values", "vocabulary", "extra_item_ids"):
                np.save(tmp / f"{name}.npy", np.asarray(getattr(self, name)), allow_pickle=False)
            meta = {"num_items": int(self.num_items), "stats": self.stats}
            (tmp / "meta.json").write_text(json.dumps(meta, sort_keys=True))

    @classmethod
    def load(cls, path: str | os.PathLike) -> ItemFeatures:
        path = Path(path)
        meta = json.loads((path / "meta.json").read_text())
        arrays = {
            name: np.load(path / f"{name}.npy", allow_pickle=False)
            for name in ("offsets", "values", "vocabulary", "extra_item_ids")
        }
        return cls(**arrays, num_items=int(meta["num_items"]), stats=meta["stats"])


def align_item_features(raw: dict[str, list[str]], item_ids: np.ndarray, where: str) -> ItemFeatures:
    """Put `raw` (read_item_features) in the order of a catalogue's item indices.

    item_ids: (num_items + 1,) raw ids of the catalogue (entry 0 is padding; dtype int or str).
    Ids match by str(id), so integer catalogue ids match a file's "12". Vocabulary: the tokens
    sorted (the same indices however the file's rows are ordered), index 1.. . Catalogue items
    without an entry get no attributes (counted). Items in `raw` that are not in the catalogue
    become extra rows, sorted by id (numerically when all are integers). `where` names the file
    in errors.
    """
    catalogue = [
        item.decode() if isinstance(item, bytes) else str(item) for item in np.asarray(item_ids)[1:].tolist()
    ]
    index: dict[str, int] = {}
    for row, key in enumerate(catalogue, start=1):
        index.setdefault(key, row)
    if not raw:
        raise UserInputError(f"{where}: no items with attributes")
    if not any(key in index for key in raw):
        example = next(iter(raw))
        raise UserInputError(
            f"{where}: none of its {len(raw)} item ids is an item of the interactions (e.g. {example!r}); "
            "is data.item_features the file of this data set?"
        )
    extra = sorted_ids([key for key in raw if key not in index])
    tokens = sorted({token for attributes in raw.values() for token in attributes})
    vocabulary = {token: i for i, token in enumerate(tokens, start=1)}

    def row_attributes(key: str | None) -> list[int]:
        # Ascending indices: items with the same attributes pool them in the same order, so their
        # vectors are bit-identical (also for a new item at inference, recsys/serving/new_items.py).
        return [] if key is None else sorted(vocabulary[token] for token in raw.get(key, ()))

    rows = [row_attributes(None), *(row_attributes(key) for key in catalogue), *map(row_attributes, extra)]
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    values = np.fromiter((v for r in rows for v in r), dtype=np.int32, count=int(offsets[-1]))
    catalogue_lengths = lengths[1 : len(catalogue) + 1]
    with_features = int(np.count_nonzero(catalogue_lengths))
    stats = {
        "items_with_features": with_features,
        "items_without_features": len(catalogue) - with_features,
        "extra_items": len(extra),
        "attributes": len(tokens),
        # Over the catalogue's items that have attributes (the items the model will see).
        "mean_attributes_per_item": round(float(catalogue_lengths.sum()) / max(with_features, 1), 4),
    }
    return ItemFeatures(
        offsets=offsets,
        values=values,
        vocabulary=np.asarray(["", *tokens], dtype=str),
        extra_item_ids=np.asarray(extra, dtype=str),
        num_items=len(catalogue),
        stats=stats,
    )
