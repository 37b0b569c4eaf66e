"""What the models read: training windows and evaluation queries, built from the CSR arrays.

Training batches hold right-padded item sequences (padding id 0 at the end) trimmed to the longest
sequence in the batch: with right padding a causal model needs no attention mask at all (real tokens
only ever look left, at real tokens), which lets SDPA pick its flash kernel on a GPU. Batches are
built by fancy indexing into the CSR arrays, one whole batch per `__getitem__` call (the samplers in
recsys/data/batching.py hand over a whole batch of indices): no per-user Python loop.

Batch widths (`data.width_multiple`): trimmed to the longest sequence, batches at max length 200 come
in up to 200 widths, and a GPU pays for each new shape once (cuBLAS and cuDNN plan per shape;
torch.compile and CUDA graphs capture per shape). Rounding the width up to a multiple of 8 leaves at
most 25. The extra columns are padding: no model output at a real position changes (causal models
look left; BERT4Rec masks padding keys; the GRU runs left to right) and they carry no target.

Event types (browse vs buy, data with `data.event_types`): every batch also carries the type id of
each position (`input_events` / `target_events`, `history_events` / `target_event`) and its time-gap
bucket (`input_gaps` / `target_gaps`, `history_gaps`; see recsys/data/features.py); models that were
built to read them do, the others ignore them. With `data.target_events`, training batches carry
`target_mask` (see recsys/data/split.py). With `batch_times` (a model that reads timestamps, such
as HSTU's time bias), batches carry each position's timestamp: `input_times`, `history_times`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import Dataset

from recsys.data.features import compacted_gap_buckets
from recsys.data.sequences import SequenceData
from recsys.data.split import Split

if TYPE_CHECKING:  # recsys/data/evaluated.py reads this module's histories
    from recsys.data.evaluated import WindowTargets


def gather_windows(
    items: np.ndarray, starts: np.ndarray, ends: np.ndarray, width: int | None = None
) -> np.ndarray:
    """Rows items[starts[i]:ends[i]], right-padded with 0 to the longest row (or to `width`).
    Integers come out as int64 whatever the cache stores them as (items are int32 there where
    the catalogue fits): batches and their consumers see one dtype."""
    lengths = ends - starts
    if width is None:
        width = int(lengths.max()) if len(lengths) else 0
    columns = np.arange(width, dtype=np.int64)
    index = starts[:, None] + columns[None, :]
    valid = columns[None, :] < lengths[:, None]
    rows = np.where(valid, items[np.minimum(index, len(items) - 1)], 0)
    return rows.astype(np.int64, copy=False) if rows.dtype.kind in "iu" else rows


# The narrowest batch of data.static_shapes, in input columns: narrower windows are padded up to it.
MIN_STATIC_WIDTH = 8


def rounded_width(longest: int, multiple: int, cap: int) -> int:
    """`longest` rounded up to a multiple of `multiple`, but not past `cap` (nor below `longest`)."""
    return max(longest, min(cap, -(-longest // multiple) * multiple))


def window_batch_width(longest: int, multiple: int, widest: int, static: bool = False) -> int:
    """Columns of a training batch whose longest window has `longest` items: its inputs (one fewer)
    rounded up to a multiple, never wider than those of the `widest` window of all, plus the last
    window item (a target only). The DataLoader and device batches both size batches by it.

    `static` (data.static_shapes): the inputs rounded up to a power of two of at least
    MIN_STATIC_WIDTH instead, so that a run sees at most a handful of widths (8, 16, 32, 50 at
    max_len 50; six at max_len 200), each one graph for torch.compile and CUDA graphs."""
    inputs = longest - 1
    if static:
        bucket = max(MIN_STATIC_WIDTH, 1 << max(inputs - 1, 0).bit_length())
        return max(inputs, min(widest - 1, bucket)) + 1
    return rounded_width(inputs, multiple, widest - 1) + 1


def pad_rows(batch: dict[str, torch.Tensor], rows: int | None) -> dict[str, torch.Tensor]:
    """A training batch grown to `rows` rows (data.static_shapes: every batch as tall as
    data.batch_size) with empty rows: all padding, so they hold no target and no model reads them."""
    if rows is None:
        return batch
    missing = rows - next(iter(batch.values())).size(0)
    if missing <= 0:
        return batch
    return {
        key: torch.cat([value, value.new_zeros(missing, *value.shape[1:])]) for key, value in batch.items()
    }


class TrainWindows(Dataset):
    """Training samples: windows of at most max_len + 1 items from each user's training history.

    A window w gives inputs items[w][:-1] and next-item targets items[w][1:], so a causal model
    learns from every position of one sequence in one pass (no per-prefix samples).
    """

    def __init__(
        self,
        items: np.ndarray,
        starts: np.ndarray,
        ends: np.ndarray,
        events: np.ndarray | None = None,
        gaps: np.ndarray | None = None,
        is_target: np.ndarray | None = None,
        width_multiple: int = 1,
        times: np.ndarray | None = None,
    ):
        self.items, self.starts, self.ends = items, starts, ends
        # Per-event arrays aligned with `items` (event-typed data only; times: batch_times).
        self.events, self.gaps, self.is_target, self.times = events, gaps, is_target, times
        self.width_multiple = width_multiple
        # data.static_shapes: every batch this many rows (data.batch_size), widths in powers of two.
        self.static_rows: int | None = None
        # The widest window of all, as wide as the device path's matrix.
        self.widest = int(self.lengths.max()) if len(starts) else 0

    def __len__(self) -> int:
        return len(self.starts)

    @property
    def lengths(self) -> np.ndarray:
        return self.ends - self.starts

    def __getitem__(self, indices) -> dict[str, torch.Tensor]:
        indices = np.asarray(indices, dtype=np.int64)
        starts, ends = self.starts[indices], self.ends[indices]
        width = None
        if len(indices):
            longest = int((ends - starts).max())
            width = window_batch_width(
                longest, self.width_multiple, self.widest, self.static_rows is not None
            )
        windows = gather_windows(self.items, starts, ends, width)
        targets = windows[:, 1:]
        # The last item of a window is only a target: padding it out of the inputs keeps every
        # row's inputs exactly the positions that have a target, as at inference.
        inputs = np.where(targets != 0, windows[:, :-1], 0)
        batch = {
            "input_ids": torch.from_numpy(np.ascontiguousarray(inputs)),
            "target_ids": torch.from_numpy(np.ascontiguousarray(targets)),
        }
        for name, values in (("events", self.events), ("gaps", self.gaps)):
            if values is not None:
                window = gather_windows(values, starts, ends, width).astype(np.int64)
                batch[f"input_{name}"] = torch.from_numpy(np.where(targets != 0, window[:, :-1], 0))
                batch[f"target_{name}"] = torch.from_numpy(np.ascontiguousarray(window[:, 1:]))
        if self.times is not None:  # an input's time only: the target's time is what comes next
            window = gather_windows(self.times, starts, ends, width).astype(np.int64)
            batch["input_times"] = torch.from_numpy(np.where(targets != 0, window[:, :-1], 0))
        if self.is_target is not None:
            # Only positions whose next event is of a target type enter the loss.
            mask = gather_windows(self.is_target, starts, ends, width)[:, 1:].astype(bool)
            batch["target_mask"] = torch.from_numpy(np.ascontiguousarray(mask))
        return pad_rows(batch, self.static_rows)


class EvalUsers(Dataset):
    """Validation or test queries: (history, target, items to exclude) of each given user.

    `target_pos[i]` is user `users[i]`'s target event (see EventSplit); the history is everything
    before it. `history` is its last max_len items (what the model sees); `exclude` is the items of
    the whole history that are removed from the ranking: all of them, or with `exclude_codes` only
    those of events of these types, or with `exclude_seen=False` none ((B, 0)). Event-typed data also yields `history_events`, `history_gaps`
    and `target_event` (the type of event being predicted, e.g. a purchase). `hide_target_item`
    leaves the target item's own earlier events out of the history (see data.hide_target_item).
    With `batch_times`, also `history_times`, the history's timestamps.
    With `windows` (evaluation.targets=window), `target` is (B, T), each user's window targets
    0-padded, `miss` (B, T) marks those counted as misses, and the history ends at the window.
    """

    def __init__(
        self,
        data: SequenceData,
        users: np.ndarray,
        target_pos: np.ndarray,
        max_len: int,
        exclude_codes: list[int] | None = None,
        gaps: np.ndarray | None = None,
        hide_target_item: bool = False,
        width_multiple: int = 1,
        exclude_seen: bool = True,
        not_candidates: np.ndarray | None = None,
        misses: np.ndarray | None = None,
        windows: WindowTargets | None = None,
        batch_times: bool = False,
    ):
        self.data = data
        self.batch_times = batch_times
        # evaluation.targets=window: several targets per user and a history that ends where the
        # window begins; `target_pos` is then each user's first target event (its type is the
        # `target_event`).
        self.windows = windows
        self.history_end = target_pos if windows is None else windows.history_end
        self.exclude_seen = exclude_seen
        # Items no user may be recommended (a time split's items without a training event), added
        # to every row's exclusions; and per user, a target counted as a miss whatever its rank.
        self.not_candidates = not_candidates
        self.misses = misses
        self.hide_target_item = hide_target_item
        self.max_len = max_len
        self.width_multiple = width_multiple
        self.users = users
        self.target_pos = target_pos
        self.seen_start = data.offsets[:-1][users]
        self.exclude_codes = exclude_codes
        self.gaps = gaps

    def __len__(self) -> int:
        return len(self.users)

    def __getitem__(self, indices) -> dict[str, torch.Tensor]:
        indices = np.asarray(indices, dtype=np.int64)
        data = self.data
        target_pos = self.target_pos[indices]
        target = data.items[target_pos].astype(np.int64)
        history_end = self.history_end[indices]
        seen_start = self.seen_start[indices]
        # Every event before the target, right-padded; with hide_target_item, without the
        # target item's own earlier events (then compacted, still right-padded).
        seen = gather_windows(data.items, seen_start, history_end)
        per_event = {"events": data.events, "gaps": self.gaps} if data.has_events else {}
        recompute_gaps = self.hide_target_item and data.has_events
        if recompute_gaps:
            # As if the hidden events never happened: the gaps are recomputed from the kept events'
            # timestamps (a hidden event in between would otherwise show through its neighbour's gap).
            del per_event["gaps"]
        if recompute_gaps or self.batch_times:
            per_event["times"] = data.timestamps
        seen_features = {k: gather_windows(v, seen_start, history_end) for k, v in per_event.items()}
        if self.hide_target_item:
            keep = (seen != 0) & (seen != target[:, None])
            order = np.argsort(~keep, axis=1, kind="stable")  # kept positions first, in time order
            kept = np.take_along_axis(keep, order, axis=1)
            seen = np.where(kept, np.take_along_axis(seen, order, axis=1), 0)
            seen_features = {
                k: np.where(kept, np.take_along_axis(v, order, axis=1), 0) for k, v in seen_features.items()
            }
            if recompute_gaps:
                seen_features["gaps"] = compacted_gap_buckets(seen_features["times"], kept)
        lengths = (seen != 0).sum(axis=1)
        # The model sees the last max_len of them.
        begin = np.maximum(lengths - self.max_len, 0)
        # Trimmed to the longest row (rounded up to a multiple of data.width_multiple).
        width = rounded_width(
            min(self.max_len, max(int(lengths.max(initial=0)), 1)), self.width_multiple, self.max_len
        )
        columns = begin[:, None] + np.arange(width)[None, :]
        in_history = columns < lengths[:, None]
        columns = np.minimum(columns, max(seen.shape[1] - 1, 0))

        def history_of(values: np.ndarray) -> np.ndarray:
            if values.shape[1] == 0:
                return values.astype(np.int64)
            return np.where(in_history, np.take_along_axis(values, columns, axis=1), 0).astype(np.int64)

        exclude = seen
        if not self.exclude_seen:
            exclude = np.zeros((len(indices), 0), dtype=np.int64)
        elif self.exclude_codes is not None:
            exclude = np.where(np.isin(seen_features["events"], self.exclude_codes), seen, 0)
        if self.not_candidates is not None and len(self.not_candidates):
            exclude = np.concatenate(
                [exclude, np.broadcast_to(self.not_candidates, (len(indices), len(self.not_candidates)))],
                axis=1,
            )
        batch = {
            "user": torch.from_numpy(self.users[indices]),
            "history": torch.from_numpy(history_of(seen)),
            "target": torch.from_numpy(target),
            "exclude": torch.from_numpy(np.ascontiguousarray(exclude)),
        }
        if self.misses is not None:
            batch["miss"] = torch.from_numpy(self.misses[indices])
        if self.windows is not None:  # (B, T) targets, 0-padded, and which of them are misses
            offsets = self.windows.offsets
            begins, ends = offsets[indices], offsets[indices + 1]
            batch["target"] = torch.from_numpy(gather_windows(self.windows.items, begins, ends))
            miss = gather_windows(self.windows.miss, begins, ends).astype(bool)
            batch["miss"] = torch.from_numpy(np.ascontiguousarray(miss))
        if data.has_events:
            batch["history_events"] = torch.from_numpy(history_of(seen_features["events"]))
            batch["target_event"] = torch.from_numpy(data.events[target_pos].astype(np.int64))
            batch["history_gaps"] = torch.from_numpy(history_of(seen_features["gaps"]))
        if self.batch_times:
            batch["history_times"] = torch.from_numpy(history_of(seen_features["times"]))
        return batch


def padded_windows(windows: TrainWindows, dtype: np.dtype, chunk_rows: int = 1 << 18) -> np.ndarray:
    """All windows as one right-padded matrix (num_windows x longest window), built in chunks of
    rows to bound the temporary index arrays."""
    width = int(windows.lengths.max()) if len(windows) else 0
    matrix = np.zeros((len(windows), width), dtype=dtype)
    for begin in range(0, len(windows), chunk_rows):
        rows = slice(begin, begin + chunk_rows)
        part = gather_windows(windows.items, windows.starts[rows], windows.ends[rows])
        matrix[rows, : part.shape[1]] = part
    return matrix


def training_windows(
    data: SequenceData,
    split: Split,
    max_len: int,
    sliding_window_step: int | None,
    gaps: np.ndarray | None,
    width_multiple: int,
    batch_times: bool = False,
) -> TrainWindows:
    """Windows of at most max_len + 1 items over each user's training part (`split.train_end`):
    the most recent one, or with `sliding_window_step` also one every `step` items before it."""
    first = data.offsets[:-1]
    train_end = split.train_end
    span = max_len + 1
    if sliding_window_step is None:
        ends = train_end
    else:
        # Windows ending at train_end, train_end - step, ... so every training target is predicted.
        counts = np.maximum(0, (train_end - first - 2) // sliding_window_step + 1)
        user_of = np.repeat(np.arange(data.num_users), counts)
        rank = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        ends = train_end[user_of] - rank * sliding_window_step
        first = first[user_of]
    starts = np.maximum(first, ends - span)
    usable = ends - starts >= 2  # at least one (input, target) pair
    is_target = split.is_target
    if is_target is not None:
        # A window whose every next event is of another type has nothing to learn from.
        targets_before = np.concatenate([[0], np.cumsum(is_target)])
        usable &= targets_before[np.maximum(ends, starts + 1)] - targets_before[starts + 1] > 0
    return TrainWindows(
        data.items,
        starts[usable],
        ends[usable],
        events=data.events,
        gaps=gaps,
        is_target=is_target,
        width_multiple=width_multiple,
        times=data.timestamps if batch_times else None,
    )


# Histories gathered this many at a time when checking targets against them (bounded memory).
_CHUNK_USERS = 4096


def repeat_targets(
    data: SequenceData, users: np.ndarray, positions: np.ndarray, codes: list[int] | None
) -> np.ndarray:
    """(len(users),) bool: the target item at `positions` occurs among the user's earlier events
    (only those of types `codes`, when given): a repeat."""
    repeat = np.zeros(len(users), dtype=bool)
    for begin in range(0, len(users), _CHUNK_USERS):
        rows = slice(begin, begin + _CHUNK_USERS)
        starts = data.offsets[:-1][users[rows]]
        seen = gather_windows(data.items, starts, positions[rows])
        if codes is not None:
            seen = np.where(np.isin(gather_windows(data.events, starts, positions[rows]), codes), seen, 0)
        repeat[rows] = (seen == data.items[positions[rows]][:, None]).any(axis=1)
    return repeat


def history_besides_target(data: SequenceData, users: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """(len(users),) bool: the user did something before `positions` other than with the target
    item itself (what is left of the history under data.hide_target_item)."""
    keep = np.zeros(len(users), dtype=bool)
    for begin in range(0, len(users), _CHUNK_USERS):
        rows = slice(begin, begin + _CHUNK_USERS)
        seen = gather_windows(data.items, data.offsets[:-1][users[rows]], positions[rows])
        target = data.items[positions[rows]]
        keep[rows] = ((seen != 0) & (seen != target[:, None])).any(axis=1)
    return keep
