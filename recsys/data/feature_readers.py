"""The readers of item-attribute files (recsys/data/item_features.py): one per format, each
returning raw item id (as text) -> the item's attribute tokens "field=value", once each, in file
order, and raising a one-line `UserInputError` that names the file (and line) on bad input. Item
tables are small (one row per item), so they are read in Python and pandas/pyarrow, not by the
interactions engine.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from recsys.data.interactions import is_gzip
from recsys.errors import UserInputError

if TYPE_CHECKING:
    from recsys.data.item_features import FeatureSource

# MovieLens item files, by name (optionally .gz).
_MOVIELENS_FILES = ("u.item", "movies.dat", "movies.csv")
_NO_GENRES = "(no genres listed)"  # ml-latest's movies.csv: the movie has no genre
# pandas' message for a row with more fields than the header: expected, line, found.
_FIELD_COUNT = re.compile(r"Expected (\d+) fields in line (\d+), saw (\d+)")


# ---------------------------------------------------------------------------------------------
# Files


def check_feature_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise UserInputError(f"{path}: item feature file not found (check data.item_features.path)")
    if path.is_dir():
        raise UserInputError(
            f"{path}: is a directory, expected an item feature file (check data.item_features.path)"
        )
    if not os.access(path, os.R_OK):
        raise UserInputError(f"{path}: item feature file is not readable (permission denied)")
    return path


def _open_text(path: Path, encoding: str = "utf-8-sig") -> io.TextIOBase:
    """A plain or gzipped text file (by its magic bytes). utf-8-sig: a BOM, as some editors and
    spreadsheets write, is not part of the first column's name."""
    if is_gzip(path):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding=encoding, errors="strict")
    return open(path, encoding=encoding, errors="strict")


def _read_text(path: Path, encoding: str = "utf-8-sig") -> str:
    try:
        with _open_text(path, encoding) as handle:
            return handle.read()
    except UnicodeDecodeError as err:
        raise UserInputError(f"{path}: not a UTF-8 text file ({err.reason})") from None
    except (OSError, EOFError) as err:
        raise UserInputError(f"{path}: cannot be read ({_first_line(err)})") from None


def _first_line(err: Exception | str) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def _short(value: Any, limit: int = 60) -> str:
    """repr of a value for a one-line message (repr escapes newlines), cut when long."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def sorted_ids(ids: list[str]) -> list[str]:
    if all(_is_integer(i) for i in ids):
        return sorted(ids, key=lambda i: (int(i), i))
    return sorted(ids)


def _is_integer(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


class _Collector:
    """Gathers item -> tokens across a file's rows: tokens once each in order, one row per item."""

    def __init__(self) -> None:
        self.features: dict[str, list[str]] = {}
        self.first_seen: dict[str, str] = {}

    def add(
        self, where: str, seen_at: str, item: str, tokens: Iterable[str], skip_empty: bool = False
    ) -> None:
        """`where`: the row's place for messages ("file:line"); `seen_at`: how a later duplicate
        names it ("line 3", "row 2")."""
        if item in self.first_seen:
            raise UserInputError(
                f"{where}: item {item!r} appears twice (first at {self.first_seen[item]}); "
                "expected one row per item"
            )
        self.first_seen[item] = seen_at
        unique = list(dict.fromkeys(tokens))
        if not unique:
            if skip_empty:
                return
            raise UserInputError(f"{where}: item {item!r} has an empty feature list")
        self.features[item] = unique


def _item_key(value: Any) -> str | None:
    """A raw item id as text (integral floats, as pandas or parquet may hold ids, as integers);
    None for a missing one."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, float):
        if value != value:  # NaN
            return None
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, (dict, list, tuple)):
        return None
    text = str(value).strip()
    return text or None


def _value_texts(value: Any) -> list[str] | None:
    """The attribute values of one field: a scalar is one, a list several, null/"" none; None
    when the value is not a scalar or a flat list (a nested list or object)."""
    values = value if isinstance(value, (list, tuple, np.ndarray)) else [value]
    texts = []
    for element in values:
        if element is None or (isinstance(element, float) and element != element):
            continue
        if isinstance(element, (dict, list, tuple, np.ndarray)):
            return None
        if isinstance(element, bool):
            text = "true" if element else "false"  # JSON's spelling
        else:
            text = str(element).strip()
        if text:
            texts.append(text)
    return texts


# ---------------------------------------------------------------------------------------------
# S3-Rec


def read_s3rec(path: Path) -> dict[str, list[str]]:
    text = _read_text(path)

    def refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        for key, value in pairs:
            if key in seen:
                raise UserInputError(f"{path}: item {key!r} appears twice; expected one entry per item")
            seen[key] = value
        return seen

    try:
        table = json.loads(text, object_pairs_hook=refuse_duplicates)
    except json.JSONDecodeError as err:
        hint = "; a JSON-lines file is data.item_features.format: jsonl" if err.msg == "Extra data" else ""
        raise UserInputError(
            f"{path}:{err.lineno}: malformed JSON ({err.msg}, column {err.colno}){hint}"
        ) from None
    wrong = f'{path}: not one JSON object of lists (S3-Rec: {{"<item id>": [attr_id, ...]}})'
    if not isinstance(table, dict):
        raise UserInputError(f"{wrong}; found a {_json_kind(table)}")
    collector = _Collector()
    for item, attributes in table.items():
        if not isinstance(attributes, list):
            raise UserInputError(f"{wrong}; item {item!r} has {_short(attributes)}")
        tokens = []
        for attribute in attributes:
            key = _item_key(attribute)  # an attribute id reads like an id: an integer or a string
            if key is None:
                raise UserInputError(
                    f"{path}: item {item!r} has attribute {_short(attribute)}, expected an integer or string id"
                )
            tokens.append(f"attribute={key}")
        collector.add(str(path), str(path), item.strip(), tokens)
    return collector.features


def _json_kind(value: Any) -> str:
    kinds = {list: "list", str: "string", dict: "object", bool: "boolean", int: "number", float: "number"}
    return "JSON " + kinds.get(type(value), "null")


# ---------------------------------------------------------------------------------------------
# MovieLens


def movielens_file(path: Path) -> str | None:
    """Which MovieLens item file a name stands for (u.item, movies.dat, movies.csv; optionally .gz)."""
    name = path.name
    if name.endswith(".gz"):
        name = name[: -len(".gz")]
    return name if name in _MOVIELENS_FILES else None


def genre_file(path: Path) -> Path:
    genre = path.parent / "u.genre"
    if not genre.is_file():
        raise UserInputError(
            f"{genre}: not found (the genre names of {path.name} are read from the u.genre beside it)"
        )
    return genre


def read_movielens(path: Path) -> dict[str, list[str]]:
    layout = movielens_file(path)
    if layout == "u.item":
        return _read_u_item(path)
    if layout == "movies.dat":
        return _read_movies_dat(path)
    if layout == "movies.csv":
        return _read_movies_csv(path)
    raise UserInputError(
        f"{path}: unknown MovieLens item file; expected one of {list(_MOVIELENS_FILES)} (optionally .gz)"
    )


def _read_u_genre(path: Path) -> list[str]:
    """u.genre: `name|index` lines, indices 0..n-1 (the order of u.item's flags)."""
    names: dict[int, str] = {}
    for line_number, line in enumerate(_read_text(path, "latin-1").splitlines(), start=1):
        if not line.strip():
            continue
        name, _, number = line.rpartition("|")
        if not name or not _is_integer(number) or int(number) in names:
            raise UserInputError(
                f"{path}:{line_number}: malformed row {_short(line)} (expected 'genre|index')"
            )
        names[int(number)] = name.strip()
    if sorted(names) != list(range(len(names))) or not names:
        raise UserInputError(f"{path}: genre indices are {sorted(names)}, expected 0..n-1")
    return [names[i] for i in range(len(names))]


def _read_u_item(path: Path) -> dict[str, list[str]]:
    """ML-100K u.item: `id|title|release|video release|IMDb URL|flag|...|flag`, latin-1, one 0/1
    flag per u.genre genre."""
    genres = _read_u_genre(genre_file(path))
    fields = 5 + len(genres)
    collector = _Collector()
    for line_number, line in enumerate(_read_text(path, "latin-1").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{line_number}"
        parts = line.split("|")
        if len(parts) != fields:
            raise UserInputError(
                f"{where}: malformed row: expected {fields} '|'-separated fields (movie id|title|release date|"
                f"video release date|IMDb URL and {len(genres)} genre flags), found {len(parts)}"
            )
        flags = [p.strip() for p in parts[5:]]
        bad = next((f for f in flags if f not in ("0", "1")), None)
        if bad is not None:
            raise UserInputError(f"{where}: malformed row: genre flag {bad!r}, expected 0 or 1")
        item = _row_item(where, parts[0])
        tokens = [f"genre={name}" for name, flag in zip(genres, flags) if flag == "1"]
        collector.add(where, f"line {line_number}", item, tokens, skip_empty=True)
    return collector.features


def _read_movies_dat(path: Path) -> dict[str, list[str]]:
    """ML-1M movies.dat: `MovieID::Title::Genre|Genre`, latin-1."""
    collector = _Collector()
    for line_number, line in enumerate(_read_text(path, "latin-1").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{line_number}"
        parts = line.split("::")
        if len(parts) != 3:
            raise UserInputError(
                f"{where}: malformed row: expected 3 '::'-separated fields (MovieID::Title::Genres), "
                f"found {len(parts)}"
            )
        genres = [g.strip() for g in parts[2].split("|")]
        tokens = [f"genre={g}" for g in genres if g and g != _NO_GENRES]
        collector.add(where, f"line {line_number}", _row_item(where, parts[0]), tokens, skip_empty=True)
    return collector.features


def _read_movies_csv(path: Path) -> dict[str, list[str]]:
    """ml-latest movies.csv: `movieId,title,genres` with a header, genres `A|B`."""
    frame, lines = _csv_frame(path, ",")
    _require_columns(path, list(frame.columns), ["movieId", "genres"], "the MovieLens movies.csv header")
    collector = _Collector()
    for item, genres, line in zip(frame["movieId"], frame["genres"], lines):
        where = f"{path}:{line}"
        tokens = [f"genre={g.strip()}" for g in genres.split("|") if g.strip() and g.strip() != _NO_GENRES]
        collector.add(where, f"line {line}", _row_item(where, item, "movieId"), tokens, skip_empty=True)
    return collector.features


def _row_item(where: str, value: Any, column: str | None = None) -> str:
    item = _item_key(value)
    if item is None:
        named = f" in column {column!r}" if column else ""
        raise UserInputError(f"{where}: malformed row: no item id{named}")
    return item


# ---------------------------------------------------------------------------------------------
# Generic tables: JSON lines, CSV/TSV, parquet


def check_columns(source: FeatureSource) -> None:
    if source.columns is not None and not source.columns:
        raise UserInputError(
            "data.item_features.columns: empty; name the attribute columns, or null for every other column"
        )
    if source.columns is not None and source.item_column in source.columns:
        raise UserInputError(
            f"data.item_features.columns: {source.item_column!r} is the item column "
            "(data.item_features.item_column), not an attribute"
        )


def _require_columns(path: Path, present: list[str], needed: list[str], role: str) -> None:
    for name in needed:
        if name not in present:
            hint = " (check data.item_features.sep)" if len(present) == 1 else ""
            raise UserInputError(f"{path}: missing column {name!r} ({role}); the file has {present}{hint}")


def _attribute_columns(path: Path, source: FeatureSource, present: list[str]) -> list[str]:
    """The attribute columns of a table: `columns`, each present, or every column but the item's."""
    _require_columns(path, present, [source.item_column], "data.item_features.item_column")
    if source.columns is not None:
        _require_columns(path, present, list(source.columns), "data.item_features.columns")
        return list(source.columns)
    attributes = [c for c in present if c != source.item_column]
    if not attributes:
        raise UserInputError(f"{path}: no attribute columns besides the item column {source.item_column!r}")
    return attributes


def read_jsonl(path: Path, source: FeatureSource) -> dict[str, list[str]]:
    collector = _Collector()
    used: set[str] = set()
    try:
        with _open_text(path) as handle:
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{line_number}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise UserInputError(
                        f"{where}: malformed JSON line ({err.msg}, column {err.colno})"
                    ) from None
                if not isinstance(row, dict):
                    raise UserInputError(
                        f"{where}: malformed JSON line (expected an object, found a {_json_kind(row)})"
                    )
                if source.item_column not in row:
                    raise UserInputError(
                        f"{where}: no item field {source.item_column!r} (data.item_features.item_column); "
                        f"the line has {list(row)}"
                    )
                item = _item_key(row[source.item_column])
                if item is None:
                    raise UserInputError(
                        f"{where}: item field {source.item_column!r} is {_short(row[source.item_column])}, "
                        "expected an id"
                    )
                names = (
                    source.columns
                    if source.columns is not None
                    else [k for k in row if k != source.item_column]
                )
                tokens = []
                for name in names:
                    if name not in row:
                        continue  # a sparse line: this field has no value for this item
                    used.add(name)
                    values = _value_texts(row[name])
                    if values is None:
                        raise UserInputError(
                            f"{where}: field {name!r} is {_short(row[name])}, expected a value or a list of values"
                        )
                    tokens.extend(f"{name}={v}" for v in values)
                collector.add(where, f"line {line_number}", item, tokens)
    except UnicodeDecodeError as err:
        raise UserInputError(f"{path}: not a UTF-8 text file ({err.reason})") from None
    except (OSError, EOFError) as err:
        raise UserInputError(f"{path}: cannot be read ({_first_line(err)})") from None
    missing = [name for name in source.columns or () if name not in used]
    if missing and collector.first_seen:
        # A field no line has is a misspelt name, not a sparse one.
        raise UserInputError(f"{path}: no line has field {missing[0]!r} (data.item_features.columns)")
    return collector.features


def _csv_frame(path: Path, sep: str) -> tuple[pd.DataFrame, np.ndarray]:
    """A CSV/TSV file with a header, every cell as text, and each row's line in the file.

    Read without a header so that the header's field count is the one every row is checked
    against (with one, pandas would take a longer first row's extra leading fields as an index)."""
    if not sep:
        raise UserInputError("data.item_features.sep: empty; expected the field separator, e.g. ',' or '\\t'")
    try:
        frame = pd.read_csv(
            path,
            sep=sep if len(sep) == 1 else re.escape(sep),  # longer ones are regular expressions to pandas
            header=None,
            dtype=str,
            keep_default_na=False,
            na_filter=False,
            skip_blank_lines=False,  # kept, then dropped below, so that row i is line i + 1
            encoding="utf-8-sig",
            compression="gzip" if is_gzip(path) else None,
            engine="c" if len(sep) == 1 else "python",
        )
    except UnicodeDecodeError as err:
        raise UserInputError(f"{path}: not a UTF-8 text file ({err.reason})") from None
    except pd.errors.EmptyDataError:
        raise UserInputError(f"{path}: no rows (expected a header and one row per item)") from None
    except (pd.errors.ParserError, ValueError) as err:
        fields = _FIELD_COUNT.search(str(err))
        if fields:
            expected, line, found = fields.groups()
            raise UserInputError(
                f"{path}:{line}: malformed row: expected {expected} fields (as the header), found {found}"
            ) from None
        raise UserInputError(f"{path}: malformed CSV ({_first_line(err)})") from None
    except (OSError, EOFError) as err:
        raise UserInputError(f"{path}: cannot be read ({_first_line(err)})") from None
    lines = np.arange(len(frame)) + 1
    blank = (frame == "").all(axis=1).to_numpy()
    frame, lines = frame[~blank], lines[~blank]
    if frame.empty:
        raise UserInputError(f"{path}: no rows (expected a header and one row per item)")
    header = [str(name).strip() for name in frame.iloc[0]]
    twice = next((name for i, name in enumerate(header) if name in header[:i]), None)
    if twice is not None:
        raise UserInputError(f"{path}:{lines[0]}: column {twice!r} appears twice in the header")
    frame = frame.iloc[1:]
    frame.columns = header
    return frame, lines[1:]


def read_csv(path: Path, source: FeatureSource) -> dict[str, list[str]]:
    if source.value_sep == "":
        raise UserInputError("data.item_features.value_sep: empty; expected a separator such as '|', or null")
    frame, lines = _csv_frame(path, source.sep)
    attributes = _attribute_columns(path, source, list(frame.columns))
    collector = _Collector()
    cells = [frame[name].tolist() for name in attributes]
    for row, (item, line) in enumerate(zip(frame[source.item_column].tolist(), lines.tolist())):
        where = f"{path}:{line}"
        tokens = []
        for name, column in zip(attributes, cells):
            cell = column[row]
            values = cell.split(source.value_sep) if source.value_sep is not None else [cell]
            tokens.extend(f"{name}={v.strip()}" for v in values if v.strip())
        collector.add(where, f"line {line}", _row_item(where, item, source.item_column), tokens)
    return collector.features


def read_parquet(path: Path, source: FeatureSource) -> dict[str, list[str]]:
    import pyarrow.parquet as pq  # only this format needs it

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow's errors (ArrowInvalid, OSError) on a file that is not parquet
        raise UserInputError(f"{path}: cannot be read as parquet ({_first_line(err)})") from None
    attributes = _attribute_columns(path, source, list(table.column_names))
    items = table.column(source.item_column).to_pylist()
    cells = [table.column(name).to_pylist() for name in attributes]
    collector = _Collector()
    for row, item in enumerate(items):
        where = f"{path} (row {row})"
        tokens = []
        for name, column in zip(attributes, cells):
            values = _value_texts(column[row])
            if values is None:
                raise UserInputError(
                    f"{where}: column {name!r} holds {_short(column[row])}, expected a value or a list of values"
                )
            tokens.extend(f"{name}={v}" for v in values)
        collector.add(where, f"row {row}", _row_item(where, item, source.item_column), tokens)
    return collector.features
