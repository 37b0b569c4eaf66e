"""Per-event features computed from the data beside the item ids: time-gap buckets.

With event-typed data (`data.event_types`) every batch carries, besides each position's event type,
its time-gap bucket: the log of the time since the same user's previous event (`input_gaps` /
`target_gaps` in training batches, `history_gaps` in evaluation batches). Models built to read them
embed the bucket (recsys/models/events.py); the others ignore it. Buckets are small integers so that
an embedding table of NUM_GAP_BUCKETS rows covers every gap, whatever the timestamps' unit.
"""

from __future__ import annotations

import numpy as np

# Time-gap buckets: 0 padding or unknown (a BERT4Rec [MASK]), 1 a user's first event, then
# 2 + floor(log2(1 + gap)) in the timestamps' unit (seconds: 2 is under a second, 13 about an
# hour, 18 about a day), capped so that every int64 gap has a bucket.
NUM_GAP_BUCKETS = 66


def gap_bucket(gaps: np.ndarray) -> np.ndarray:
    """int8 bucket (2 and up) of time gaps in the timestamps' unit."""
    buckets = 2 + np.floor(np.log2(1.0 + np.maximum(gaps.astype(np.float64), 0.0)))
    return np.minimum(buckets, NUM_GAP_BUCKETS - 1).astype(np.int8)


def time_gap_buckets(offsets: np.ndarray, timestamps: np.ndarray, chunk: int = 1 << 24) -> np.ndarray:
    """(num_events,) int8 bucket of the time since the same user's previous event (computed
    `chunk` events at a time: the float temporaries stay small on a large log)."""
    buckets = np.empty(len(timestamps), dtype=np.int8)
    for begin in range(0, len(timestamps), chunk):
        # Each chunk starts one event early, for the gap of its first event.
        times = np.asarray(timestamps[max(begin - 1, 0) : begin + chunk], dtype=np.float64)
        gaps = np.diff(times) if begin else np.diff(times, prepend=0.0)
        buckets[begin : begin + chunk] = gap_bucket(gaps)
    first = offsets[:-1][np.diff(offsets) > 0]
    buckets[first] = 1
    return buckets


def compacted_gap_buckets(times: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """Gap buckets of right-compacted rows of timestamps (B, L), real where `kept`: each counts
    from the row's previous kept event, the first is bucket 1, padding 0."""
    buckets = np.ones(times.shape, dtype=np.int8)
    if times.shape[1] > 1:
        buckets[:, 1:] = gap_bucket(np.diff(times.astype(np.float64), axis=1))
    return np.where(kept, buckets, 0).astype(np.int8)
