"""Read, preprocess and cache one data set: `load_sequence_data` and its fingerprint.

The result of preprocessing (recsys/data/preprocess.py) is cached as a directory of plain arrays
named by a fingerprint of the source files' bytes and every setting that changes the result (the
source's description comes from its format's registry entry, recsys/data/formats.py). It is built
in a temporary directory and renamed into place, so a crashed or concurrent run never leaves a
half-written cache behind, and it is mapped into memory when read, so the processes of one machine
share one copy. Checkpoints record the fingerprint of the data they were trained on, and are
refused on data with another one.

Item attributes (`data.item_features`) are cached beside the data they were aligned with, and
enter the fingerprint checkpoints record (`with_item_features`).

Preprocessing runs in the engine (recsys/data/engine.py) under `memory_limit`, with its scratch
files beside the cache; the memory limit does not change the result, so it is not in the
fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from recsys.data.engine import AUTO, Engine
from recsys.data.formats import Source, describe, read_interactions
from recsys.data.item_features import FeatureSource, ItemFeatures, align_item_features, read_item_features
from recsys.data.preprocess import PREPROCESS_VERSION, PreprocessSettings, preprocess
from recsys.data.sequences import SequenceData

log = logging.getLogger(__name__)


def fingerprint(source: dict[str, Any], settings: PreprocessSettings) -> str:
    """Hash of a source's description (`formats.describe`: its format, options and file hashes)
    and of every preprocessing setting that matters."""
    payload = {"version": PREPROCESS_VERSION, "source": source, "preprocess": settings.as_dict()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def source_fingerprint(source: Source, settings: PreprocessSettings) -> str:
    """The fingerprint `load_sequence_data` gives this data, from the files' bytes alone: nothing
    is preprocessed or cached (evaluate.py and predict.py check a checkpoint's data with it first)."""
    return fingerprint(describe(source), settings)


def cache_path(cache_dir: str | os.PathLike, name: str, key: str) -> Path:
    """Where data set `name` with fingerprint `key` is cached."""
    return Path(cache_dir) / f"{name}-{key[:20]}"


def load_sequence_data(
    name: str,
    source: Source,
    settings: PreprocessSettings,
    cache_dir: str | os.PathLike | None,
    key: str | None = None,
    memory_limit: str | int | None = AUTO,
) -> SequenceData:
    """Read, preprocess and cache; a second call with the same inputs maps the cache. `key`: the
    `source_fingerprint`, when the caller has it already (it reads every byte of the files)."""
    key = key or source_fingerprint(source, settings)
    cached = cache_path(cache_dir, name, key) if cache_dir else None
    if cached is not None and cached.is_dir():
        try:
            data = SequenceData.load(cached)
            if data.fingerprint == key:
                log.info("data %s: mapped cache %s", name, cached)
                return data
        except (OSError, ValueError, KeyError) as err:  # an unreadable cache is rebuilt, not fatal
            log.warning("data %s: rebuilding unreadable cache %s (%s)", name, cached, err)
        shutil.rmtree(cached, ignore_errors=True)

    scratch = Path(cache_dir) if cache_dir else Path(tempfile.gettempdir())
    with Engine(memory_limit, scratch_parent=scratch) as engine:
        interactions = read_interactions(source, engine)
        data = preprocess(
            interactions,
            settings,
            source=str(source.path) if source.path else name,
            destination=cached,
            fingerprint=key,
        )
    log.info("data %s: %s", name, data.stats)
    return data


def with_item_features(key: str, features: FeatureSource | None) -> str:
    """The fingerprint a checkpoint records for data `key` read with `features` (data.item_features):
    `key` itself without features, so that every existing fingerprint stays what it was."""
    if features is None:
        return key
    payload = {"data": key, "item_features": features.describe()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def load_item_features(
    name: str, features: FeatureSource, data: SequenceData, cache_dir: str | os.PathLike | None
) -> ItemFeatures:
    """data.item_features read and aligned with `data`'s catalogue; cached beside the data (a
    directory named by both fingerprints, written atomically), mapped on a second call."""
    key = with_item_features(data.fingerprint, features)
    cached = (
        Path(f"{cache_path(cache_dir, name, data.fingerprint)}.features-{key[:20]}") if cache_dir else None
    )
    if cached is not None and cached.is_dir():
        try:
            return ItemFeatures.load(cached)
        except (OSError, ValueError, KeyError) as err:  # an unreadable cache is rebuilt, not fatal
            log.warning("data %s: rebuilding unreadable item features %s (%s)", name, cached, err)
            shutil.rmtree(cached, ignore_errors=True)
    aligned = align_item_features(read_item_features(features), data.item_ids, features.path)
    log.info("data %s: item features %s", name, aligned.stats)
    if cached is not None:
        aligned.save(cached)
    return aligned
