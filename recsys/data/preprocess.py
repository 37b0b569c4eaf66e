"""One preprocessing path from the canonical interactions table to cached, split-ready sequences.

    interactions -> rating threshold -> k-core -> drop users with < 3 events -> stable time sort
                 -> contiguous item ids (0 = padding) -> CSR arrays (offsets + items)

The leave-one-out split is implicit in the CSR layout: for user u with events
items[offsets[u]:offsets[u+1]], the last is the test target, the one before the validation target,
and everything before that is training history.

The result is cached as one .npz file named by a fingerprint of the source files' bytes and every
setting that changes the result; it is written to a temporary file and renamed into place, so a
crashed or concurrent run never leaves a half-written cache behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from recsys.data import loaders
from recsys.errors import UserInputError

log = logging.getLogger(__name__)

# Bump when the preprocessing logic changes, so that old caches are not reused.
PREPROCESS_VERSION = 1
# The protocol needs a training item, a validation target and a test target.
MIN_HISTORY = 3
FORMATS = ("auto", "sequence", "movielens", "interactions", "synthetic")


@dataclass
class SequenceData:
    """Time-ordered item sequences of all users in CSR form, with the raw ids they came from."""

    offsets: np.ndarray  # (num_users + 1,) int64: user u's events are items[offsets[u]:offsets[u+1]]
    items: np.ndarray  # (num_events,) int64 item indices in 1..num_items; 0 is padding
    user_ids: np.ndarray  # (num_users,) raw user ids
    item_ids: np.ndarray  # (num_items + 1,) raw item ids; entry 0 stands for padding
    fingerprint: str = ""
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def num_users(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_items(self) -> int:
        """Number of real items; valid item indices are 1..num_items."""
        return len(self.item_ids) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def history(self, user: int) -> np.ndarray:
        return self.items[self.offsets[user] : self.offsets[user + 1]]

    def save(self, path: Path) -> None:
        """Write atomically: a temporary file in the same directory, then a rename."""
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = tempfile.NamedTemporaryFile(dir=path.parent, prefix=path.name, suffix=".tmp", delete=False)
        try:
            with handle:
                np.savez(
                    handle,
                    offsets=self.offsets,
                    items=self.items,
                    user_ids=self.user_ids,
                    item_ids=self.item_ids,
                    meta=np.asarray(json.dumps({"fingerprint": self.fingerprint, "stats": self.stats})),
                )
            os.replace(handle.name, path)
        except BaseException:
            Path(handle.name).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: Path) -> SequenceData:
        with np.load(path, allow_pickle=False) as arrays:
            meta = json.loads(str(arrays["meta"]))
            return cls(
                offsets=arrays["offsets"],
                items=arrays["items"],
                user_ids=arrays["user_ids"],
                item_ids=arrays["item_ids"],
                fingerprint=meta["fingerprint"],
                stats=meta["stats"],
            )


@dataclass(frozen=True)
class PreprocessSettings:
    min_rating: float | None = None  # keep ratings >= this (needs a rating column)
    min_user_interactions: int = 0  # k-core threshold for users (0 = off)
    min_item_interactions: int = 0  # k-core threshold for items (0 = off)
    kcore_iterative: bool = True  # repeat until stable; False = one pass (BERT4Rec's ML-1M)

    def as_dict(self) -> dict[str, Any]:
        return {
            "min_rating": self.min_rating,
            "min_user_interactions": self.min_user_interactions,
            "min_item_interactions": self.min_item_interactions,
            "kcore_iterative": self.kcore_iterative,
        }


def preprocess(
    interactions: pd.DataFrame, settings: PreprocessSettings, source: str = "data"
) -> SequenceData:
    """Canonical interactions -> SequenceData (without fingerprint). `source` names it in messages."""
    frame = interactions
    stats: dict[str, Any] = {"raw_interactions": int(len(frame))}
    if settings.min_rating is not None:
        if "rating" not in frame.columns:
            raise UserInputError(
                f"data.min_rating: {source} has no rating column, so it cannot be filtered by rating"
            )
        frame = frame[frame["rating"].to_numpy() >= settings.min_rating]
        stats["after_rating_filter"] = int(len(frame))

    users = _id_array(frame["user"])
    items = _id_array(frame["item"])
    keep = np.ones(len(frame), dtype=bool)
    if settings.min_user_interactions > 0 or settings.min_item_interactions > 0:
        keep = _kcore_mask(
            users,
            items,
            settings.min_user_interactions,
            settings.min_item_interactions,
            settings.kcore_iterative,
        )
        stats["after_kcore"] = int(keep.sum())

    # Users too short for the leave-one-out protocol are dropped and counted, not an error.
    _, user_codes, user_counts = np.unique(users[keep], return_inverse=True, return_counts=True)
    short_users = user_counts < MIN_HISTORY
    stats["dropped_short_users"] = int(short_users.sum())
    if short_users.any():
        log.info(
            "dropped %d users with fewer than %d interactions after filtering",
            short_users.sum(),
            MIN_HISTORY,
        )
        keep_idx = np.flatnonzero(keep)
        keep[keep_idx[short_users[user_codes]]] = False

    if not keep.any():
        raise UserInputError(
            f"{source}: no interactions left after filtering (min_rating={settings.min_rating}, "
            f"min_user_interactions={settings.min_user_interactions}, "
            f"min_item_interactions={settings.min_item_interactions}, at least {MIN_HISTORY} per user)"
        )

    users = users[keep]
    items = items[keep]
    timestamps = frame["timestamp"].to_numpy()[keep]

    user_ids, user_index = np.unique(users, return_inverse=True)
    item_ids, item_index = np.unique(items, return_inverse=True)
    # lexsort is stable and sorts by its last key first: by user, then time, ties in file order.
    order = np.lexsort((timestamps, user_index))
    sorted_users = user_index[order]
    counts = np.bincount(sorted_users, minlength=len(user_ids))
    offsets = np.zeros(len(user_ids) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])

    item_ids_with_padding = np.concatenate([_padding_id(item_ids), item_ids])
    data = SequenceData(
        offsets=offsets,
        items=(item_index[order] + 1).astype(np.int64),
        user_ids=user_ids,
        item_ids=item_ids_with_padding,
    )
    lengths = data.lengths
    stats.update(
        users=data.num_users,
        items=data.num_items,
        interactions=int(len(data.items)),
        median_length=float(np.median(lengths)),
        max_length=int(lengths.max()),
    )
    data.stats = stats
    return data


def _id_array(column: pd.Series) -> np.ndarray:
    """Ids as int64 or fixed-width strings: never Python objects, so the cache needs no pickle."""
    values = column.to_numpy()
    return values.astype(str) if values.dtype == object else values


def _padding_id(ids: np.ndarray) -> np.ndarray:
    """A placeholder raw id for index 0 of the same dtype as the real ids."""
    if ids.dtype.kind in "US":
        return np.asarray([""], dtype=ids.dtype)
    return np.asarray([-1], dtype=ids.dtype)


def _kcore_mask(users, items, min_user: int, min_item: int, iterative: bool) -> np.ndarray:
    """Rows that survive dropping users with < min_user and items with < min_item interactions.

    Items are filtered before users in each pass (the BERT4Rec ML-1M recipe is one item pass).
    """
    _, user_codes = np.unique(users, return_inverse=True)
    _, item_codes = np.unique(items, return_inverse=True)
    keep = np.ones(len(users), dtype=bool)
    while True:
        before = int(keep.sum())
        if min_item > 0:
            item_counts = np.bincount(item_codes[keep], minlength=item_codes.max() + 1)
            keep &= item_counts[item_codes] >= min_item
        if min_user > 0:
            user_counts = np.bincount(user_codes[keep], minlength=user_codes.max() + 1)
            keep &= user_counts[user_codes] >= min_user
        if not iterative or int(keep.sum()) == before:
            return keep


# --- sources, fingerprints and the cache --------------------------------------------------------


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve_format(data_format: str, path: str | None) -> str:
    if data_format not in FORMATS:
        raise UserInputError(f"data.format: {data_format!r} is not one of {list(FORMATS)}")
    if data_format != "auto":
        return data_format
    if path is None:
        raise UserInputError("data.path: required unless data.format is 'synthetic'")
    if loaders.movielens_layout(path):
        return "movielens"
    suffixes = [s.lower() for s in Path(path).suffixes if s.lower() != ".gz"]
    if suffixes and suffixes[-1] in (".csv", ".tsv", ".parquet", ".pq"):
        return "interactions"
    return "sequence"


def load_interactions(
    data_format: str,
    path: str | None,
    columns: dict | None = None,
    sep: str = ",",
    synthetic: dict | None = None,
) -> pd.DataFrame:
    data_format = resolve_format(data_format, path)
    if data_format == "synthetic":
        return loaders.synthetic_interactions(**(synthetic or {}))
    if path is None:
        raise UserInputError(f"data.path: required for data.format={data_format!r}")
    if data_format == "sequence":
        return loaders.read_sequence_file(path)
    if data_format == "movielens":
        return loaders.read_movielens(path)
    if not columns:
        raise UserInputError(f"data.columns: required to read {path} as an interactions file")
    return loaders.read_interactions_file(path, columns, sep=sep)


def fingerprint(source: dict[str, Any], settings: PreprocessSettings) -> str:
    """Hash of the source file's bytes (not its name or time) and of every setting that matters."""
    described = dict(source)
    path = described.pop("path", None)
    if described.get("format") != "synthetic":
        described["sha256"] = file_sha256(loaders.check_readable(path))
    payload = {"version": PREPROCESS_VERSION, "source": described, "preprocess": settings.as_dict()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def load_sequence_data(
    name: str,
    data_format: str,
    path: str | None,
    settings: PreprocessSettings,
    cache_dir: str | os.PathLike | None,
    columns: dict | None = None,
    sep: str = ",",
    synthetic: dict | None = None,
) -> SequenceData:
    """Read, preprocess and cache; a second call with the same inputs reads the cache."""
    resolved = resolve_format(data_format, path)
    source: dict[str, Any] = {"format": resolved, "path": path}
    if resolved == "interactions":
        source.update(columns=dict(columns or {}), sep=sep)
    if resolved == "synthetic":
        source.update(synthetic=dict(synthetic or {}))
    key = fingerprint(source, settings)
    cache_file = Path(cache_dir) / f"{name}-{key[:20]}.npz" if cache_dir else None
    if cache_file is not None and cache_file.exists():
        try:
            data = SequenceData.load(cache_file)
            if data.fingerprint == key:
                log.info("data %s: read cache %s", name, cache_file)
                return data
        except (OSError, ValueError, KeyError) as err:  # an unreadable cache is rebuilt, not fatal
            log.warning("data %s: ignoring unreadable cache %s (%s)", name, cache_file, err)

    interactions = load_interactions(resolved, path, columns=columns, sep=sep, synthetic=synthetic)
    data = preprocess(interactions, settings, source=str(path) if path else name)
    data.fingerprint = key
    log.info("data %s: %s", name, data.stats)
    if cache_file is not None:
        data.save(cache_file)
    return data
