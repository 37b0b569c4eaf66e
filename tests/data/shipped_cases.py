"""The shipped data sets, each with the data settings it is preprocessed under, and a digest of
what preprocessing makes of it: tests/data/test_shipped_data.py holds every preprocessing change to
the digests frozen in tests/fixtures/shipped_data_digests.json (written by the code before the
engine, issue 27), so that every published number keeps its exact data."""

from __future__ import annotations

import hashlib

import numpy as np

# Resolved by the data configs' ${paths.shared_data_dir} (RECSYS_SHARED_DATA or ../shared/data).
SHARED = "${paths.shared_data_dir}"
TAOBAO = f"{SHARED}/taobao_userbehavior"
RETAILROCKET_COLUMNS = {"user": "user_id", "item": "item_id", "event": "behavior", "timestamp": "timestamp"}

# name -> (data config, overrides)
CASES: dict[str, tuple[str, dict]] = {
    "amazon_beauty": ("amazon_beauty", {}),
    "amazon_sports": ("amazon_sports", {}),
    "amazon_toys": ("amazon_toys", {}),
    "lastfm": ("lastfm", {}),
    "ml100k": ("ml100k", {}),
    "ml1m": ("ml1m", {}),
    "ml_latest_small": ("ml_latest_small", {}),
    "retailrocket": ("retailrocket", {}),
    "retailrocket_purchases": ("retailrocket", {"keep_events": ["buy"]}),
    "retailrocket_as_interactions": (
        "interactions_file",
        {
            "path": f"{SHARED}/retailrocket_mb/events.csv.gz",
            "columns": RETAILROCKET_COLUMNS,
            "event_types": ["view", "cart", "buy"],
            "min_item_interactions": 2,
            "min_user_interactions": 3,
        },
    ),
    "ml_latest_small_rated_4": ("ml_latest_small", {"min_rating": 4.0, "min_user_interactions": 5}),
    "taobao_head": (
        "taobao",
        {"path": f"{TAOBAO}/head_fattydelivery/UserBehavior.csv", "time_order": "sort"},
    ),
    "taobao_tail": ("taobao", {"path": f"{TAOBAO}/tail_betashepherd/UserBehavior.csv", "time_order": "sort"}),
    "taobao_timeslice": (
        "taobao",
        {"path": f"{TAOBAO}/timeslice_rdav27/UserBehavior.csv.gz", "time_order": "sort"},
    ),
    "synthetic": ("synthetic", {}),
}


def _array_digest(values: np.ndarray) -> str:
    values = np.asarray(values)
    if values.dtype.kind in "iub":
        payload = np.ascontiguousarray(values.astype(np.int64)).tobytes()
    elif values.dtype.kind == "f":
        payload = np.ascontiguousarray(values.astype(np.float64)).tobytes()
    else:
        payload = "\n".join(str(v) for v in values.tolist()).encode()
    return hashlib.sha256(payload).hexdigest()[:16]


def digest(data) -> dict[str, str]:
    """A short hash of each array that defines the preprocessed data (timestamps only with event
    types: the cache before the engine kept them only then)."""
    arrays = {
        "offsets": data.offsets,
        "items": data.items,
        "user_ids": data.user_ids,
        "item_ids": data.item_ids,
    }
    if data.events is not None:
        arrays.update(events=data.events, event_names=data.event_names, timestamps=data.timestamps)
    return {name: _array_digest(values) for name, values in arrays.items()}


# Data sets that add real times to a shipped one: their sequences and ids must be the same.
TIMED = {"amazon_beauty_time": "amazon_beauty", "amazon_sports_time": "amazon_sports"}
