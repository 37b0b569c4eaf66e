"""Read, preprocess and cache one data set: `load_sequence_data` and its fingerprint.

The result of preprocessing (recsys/data/preprocess.py) is cached as one .npz file named by a
fingerprint of the source files' bytes and every setting that changes the result (the source's
description comes from its format's registry entry, recsys/data/formats.py); it is written to a
temporary file and renamed into place, so a crashed or concurrent run never leaves a half-written
cache behind. Checkpoints record the fingerprint of the data they were trained on, and are refused
on data with another one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from recsys.data.formats import Source, describe, read_interactions
from recsys.data.preprocess import PREPROCESS_VERSION, PreprocessSettings, SequenceData, preprocess

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


def load_sequence_data(
    name: str,
    source: Source,
    settings: PreprocessSettings,
    cache_dir: str | os.PathLike | None,
    key: str | None = None,
) -> SequenceData:
    """Read, preprocess and cache; a second call with the same inputs reads the cache. `key`: the
    `source_fingerprint`, when the caller has it already (it reads every byte of the files)."""
    key = key or source_fingerprint(source, settings)
    cache_file = Path(cache_dir) / f"{name}-{key[:20]}.npz" if cache_dir else None
    if cache_file is not None and cache_file.exists():
        try:
            data = SequenceData.load(cache_file)
            if data.fingerprint == key:
                log.info("data %s: read cache %s", name, cache_file)
                return data
        except (OSError, ValueError, KeyError) as err:  # an unreadable cache is rebuilt, not fatal
            log.warning("data %s: ignoring unreadable cache %s (%s)", name, cache_file, err)

    interactions = read_interactions(source)
    data = preprocess(interactions, settings, source=str(source.path) if source.path else name)
    data.fingerprint = key
    log.info("data %s: %s", name, data.stats)
    if cache_file is not None:
        data.save(cache_file)
    return data
