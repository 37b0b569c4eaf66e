"""The one LightningDataModule that every model trains and is evaluated through.

Training batches hold right-padded item sequences (padding id 0 at the end) trimmed to the longest
sequence in the batch: with right padding a causal model needs no attention mask at all (real tokens
only ever look left, at real tokens), which lets SDPA pick its flash kernel on a GPU. Users of similar
length are batched together so that little of each batch is padding; the Amazon sets are mostly
padding at max length 50 (median history 6). Such batches hold from a few hundred to thousands of
target positions; the models weigh each batch's loss by its target count
(`SequentialRecommender._training_loss`), so that grouping by length does not change the weight
each target gets.

Batches are built by fancy indexing into the CSR arrays, one whole batch per `__getitem__` call: no
per-user Python loop.

Batch widths (`data.width_multiple`): trimmed to the longest sequence, batches at max length 200 come
in up to 200 widths, and a GPU pays for each new shape once (cuBLAS and cuDNN plan per shape;
torch.compile and CUDA graphs capture per shape). Rounding the width up to a multiple of 8 leaves at
most 25. The extra columns are padding: no model output at a real position changes (causal models
look left; BERT4Rec masks padding keys; the GRU runs left to right) and they carry no target.

Device batches (`data.device_batches`): for a small model on a GPU, gathering each batch on the CPU
and copying it to the device takes longer than the training step, and the GPU sits idle. When on,
the padded matrix of all training windows (num_windows x longest window, a few MB for the Amazon
sets) is built once and kept on the device; each epoch uploads its batch order once, and a batch is
one indexing of that matrix, trimmed to a width computed on the CPU from the window lengths (no
device-to-host sync). The batches are exactly the DataLoader's: same sampler, same order, same
trimming. `auto` turns it on for a CUDA trainer when the matrix fits DEVICE_BATCHES_MAX_BYTES;
`true` on any device (tests use it on the CPU).

Event types (browse vs buy, data with `data.event_types`): every batch also carries the type id of
each position (`input_events` / `target_events`, `history_events` / `target_event`) and its time-gap
bucket (`input_gaps` / `target_gaps`, `history_gaps`; see `time_gap_buckets`); models that were
built to read them do, the others ignore them. `data.target_events` makes the split and the loss
follow those types: a user's test target is their last event of a target type and the validation
target the one before it (the history is the full mixed sequence before each), and training
batches carry `target_mask`, true where the next event is of a target type; only those positions
enter the loss. `data.exclude_events` says which items count as seen: those of the history's events
of these types (default: every earlier item; for next-purchase, previously *bought* items only,
since customers buy what they viewed).

Seen items (`evaluation.seen_items`, see recsys/metrics.py): `exclude` removes them from the
ranking and leaves out of the split each user whose target is one of them (counted:
`evaluation_counts`); `keep` excludes nothing and evaluates every user; `exclude_but_target`
excludes them but keeps a seen target as a candidate (leaks the answer; for comparisons only).

Several processes (`trainer=ddp`): the data module gives each process its share itself, and the
trainer must not wrap the loaders in a DistributedSampler (`use_distributed_sampler: false`, set by
`configs/trainer/ddp.yaml`). Every process builds the same batches in the same order (same seed,
same epoch) and batch i goes to rank i % world_size (`deal_batches`). Training: the last round is
padded with the first batches, so that every rank takes the same number of optimizer steps (DDP
all-reduces the gradients of each step). Validation and test: nothing is repeated, every user is
evaluated exactly once, in the very batches one process would form, so the metrics, reduced as
exact sums and counts (recsys/models/base.py), do not depend on the number of processes; a rank
left without a batch gets one empty batch, because Lightning refuses an empty loader on one rank and
every rank must reach the epoch-end reduction.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from recsys.data.preprocess import PreprocessSettings, SequenceData, load_sequence_data
from recsys.errors import UserInputError
from recsys.metrics import check_seen_items

log = logging.getLogger(__name__)

SPLITS = ("val", "test")
# Time-gap buckets: 0 padding or unknown (a BERT4Rec [MASK]), 1 a user's first event, then
# 2 + floor(log2(1 + gap)) in the timestamps' unit (seconds: 2 is under a second, 13 about an
# hour, 18 about a day), capped so that every int64 gap has a bucket.
NUM_GAP_BUCKETS = 66


def gap_bucket(gaps: np.ndarray) -> np.ndarray:
    """int8 bucket (2 and up) of time gaps in the timestamps' unit."""
    buckets = 2 + np.floor(np.log2(1.0 + np.maximum(gaps.astype(np.float64), 0.0)))
    return np.minimum(buckets, NUM_GAP_BUCKETS - 1).astype(np.int8)


def time_gap_buckets(offsets: np.ndarray, timestamps: np.ndarray) -> np.ndarray:
    """(num_events,) int8 bucket of the time since the same user's previous event."""
    buckets = gap_bucket(np.diff(timestamps.astype(np.float64), prepend=0.0))
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


class EventSplit:
    """Where each user's validation and test targets are, and where their training part ends.

    Without target types (plain leave-one-out): the last event is the test target, the one before
    it the validation target. With target types: the user's last and second-to-last events of
    those types. Positions index the data's CSR arrays; -1 means none (a user with a single target
    event is tested but not validated; one with none is skipped). A target needs at least one
    event before it to be evaluated.
    """

    def __init__(self, data: SequenceData, target_codes: list[int] | None):
        starts, ends = data.offsets[:-1], data.offsets[1:]
        self.is_target = None if target_codes is None else np.isin(data.events, target_codes)
        if self.is_target is None:
            self.test_pos = ends - 1
            self.val_pos = ends - 2
        else:
            positions = np.flatnonzero(self.is_target)
            owner = np.searchsorted(ends, positions, side="right")  # user of each target event
            self.test_pos = np.full(data.num_users, -1, dtype=np.int64)
            np.maximum.at(self.test_pos, owner, positions)
            self.val_pos = np.full(data.num_users, -1, dtype=np.int64)
            earlier = positions < self.test_pos[owner]
            np.maximum.at(self.val_pos, owner[earlier], positions[earlier])
        self.skipped_users = int((self.test_pos < 0).sum())  # users with no target event
        # Training uses everything before the validation target (or the test target, for a user
        # without one): no target is ever trained on.
        train_end = np.where(self.val_pos >= 0, self.val_pos, self.test_pos)
        self.train_end = np.where(train_end >= 0, train_end, starts)
        self.starts = starts

    def targets(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(users, target positions) of the users evaluable on `split`, users ascending."""
        positions = self.val_pos if split == "val" else self.test_pos
        users = np.flatnonzero(positions > self.starts)  # -1 < start; a target needs a history
        return users, positions[users]


# `data.device_batches: auto` keeps the training windows on a CUDA device only up to this size.
DEVICE_BATCHES_MAX_BYTES = 1 << 30


def gather_windows(
    items: np.ndarray, starts: np.ndarray, ends: np.ndarray, width: int | None = None
) -> np.ndarray:
    """Rows items[starts[i]:ends[i]], right-padded with 0 to the longest row (or to `width`)."""
    lengths = ends - starts
    if width is None:
        width = int(lengths.max()) if len(lengths) else 0
    columns = np.arange(width, dtype=np.int64)
    index = starts[:, None] + columns[None, :]
    valid = columns[None, :] < lengths[:, None]
    return np.where(valid, items[np.minimum(index, len(items) - 1)], 0)


def rounded_width(longest: int, multiple: int, cap: int) -> int:
    """`longest` rounded up to a multiple of `multiple`, but not past `cap` (nor below `longest`)."""
    return max(longest, min(cap, -(-longest // multiple) * multiple))


def window_batch_width(longest: int, multiple: int, widest: int) -> int:
    """Columns of a training batch whose longest window has `longest` items: its inputs (one fewer)
    rounded up to a multiple, never wider than those of the `widest` window of all, plus the last
    window item (a target only). The DataLoader and device batches both size batches by it."""
    return rounded_width(longest - 1, multiple, widest - 1) + 1


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
    ):
        self.items, self.starts, self.ends = items, starts, ends
        # Per-event arrays aligned with `items` (event-typed data only).
        self.events, self.gaps, self.is_target = events, gaps, is_target
        self.width_multiple = width_multiple
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
            width = window_batch_width(int((ends - starts).max()), self.width_multiple, self.widest)
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
        if self.is_target is not None:
            # Only positions whose next event is of a target type enter the loss.
            mask = gather_windows(self.is_target, starts, ends, width)[:, 1:].astype(bool)
            batch["target_mask"] = torch.from_numpy(np.ascontiguousarray(mask))
        return batch


class EvalUsers(Dataset):
    """Validation or test queries: (history, target, items to exclude) of each given user.

    `target_pos[i]` is user `users[i]`'s target event (see EventSplit); the history is everything
    before it. `history` is its last max_len items (what the model sees); `exclude` is the items of
    the whole history that are removed from the ranking: all of them, or with `exclude_codes` only
    those of events of these types, or with `exclude_seen=False` none ((B, 0)). Event-typed data also yields `history_events`, `history_gaps`
    and `target_event` (the type of event being predicted, e.g. a purchase). `hide_target_item`
    leaves the target item's own earlier events out of the history (see data.hide_target_item).
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
    ):
        self.data = data
        self.exclude_seen = exclude_seen
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
        target = data.items[target_pos]
        seen_start = self.seen_start[indices]
        # Every event before the target, right-padded; with hide_target_item, without the
        # target item's own earlier events (then compacted, still right-padded).
        seen = gather_windows(data.items, seen_start, target_pos)
        per_event = {"events": data.events, "gaps": self.gaps} if data.has_events else {}
        if self.hide_target_item and data.has_events:
            # As if the hidden events never happened: the gaps are recomputed from the kept events'
            # timestamps (a hidden event in between would otherwise show through its neighbour's gap).
            per_event["times"] = data.timestamps
            del per_event["gaps"]
        seen_features = {k: gather_windows(v, seen_start, target_pos) for k, v in per_event.items()}
        if self.hide_target_item:
            keep = (seen != 0) & (seen != target[:, None])
            order = np.argsort(~keep, axis=1, kind="stable")  # kept positions first, in time order
            kept = np.take_along_axis(keep, order, axis=1)
            seen = np.where(kept, np.take_along_axis(seen, order, axis=1), 0)
            seen_features = {
                k: np.where(kept, np.take_along_axis(v, order, axis=1), 0) for k, v in seen_features.items()
            }
            if "times" in seen_features:
                seen_features["gaps"] = compacted_gap_buckets(seen_features.pop("times"), kept)
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
        batch = {
            "user": torch.from_numpy(self.users[indices]),
            "history": torch.from_numpy(history_of(seen)),
            "target": torch.from_numpy(target),
            "exclude": torch.from_numpy(exclude),
        }
        if data.has_events:
            batch["history_events"] = torch.from_numpy(history_of(seen_features["events"]))
            batch["target_event"] = torch.from_numpy(data.events[target_pos].astype(np.int64))
            batch["history_gaps"] = torch.from_numpy(history_of(seen_features["gaps"]))
        return batch


class LengthBucketBatchSampler(Sampler[np.ndarray]):
    """Shuffled batches of indices in which samples have similar lengths.

    Each epoch: shuffle all samples, sort each block of `bucket_batches` batches by length, cut it
    into batches, shuffle the batch order. Deterministic for a given (seed, epoch).
    """

    def __init__(
        self,
        lengths: np.ndarray,
        batch_size: int,
        shuffle: bool = True,
        bucketing: bool = True,
        seed: int = 0,
        bucket_batches: int = 64,
    ):
        if batch_size < 1:
            raise UserInputError(f"data.batch_size: must be >= 1, got {batch_size}")
        self.lengths = np.asarray(lengths)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.bucketing = bucketing
        self.seed = seed
        self.bucket_batches = bucket_batches
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return (len(self.lengths) + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[np.ndarray]:
        n = len(self.lengths)
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        if self.bucketing:
            block = self.batch_size * self.bucket_batches
            for begin in range(0, n, block):
                chunk = order[begin : begin + block]
                order[begin : begin + block] = chunk[np.argsort(self.lengths[chunk], kind="stable")]
        batches = [order[i : i + self.batch_size] for i in range(0, n, self.batch_size)]
        if self.bucketing and self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        # Without set_epoch from the trainer, still give each epoch a fresh order.
        self.epoch += 1
        yield from batches


def deal_batches(batches: list[np.ndarray], rank: int, world_size: int, pad: bool) -> list[np.ndarray]:
    """This rank's share of one shared batch order: batches rank, rank + world_size, ...

    pad=True (training): every rank gets ceil(len / world_size) batches, the last round completed
    with batches from the start (as DistributedSampler pads). pad=False (evaluation): no batch is
    repeated, so ranks may get one batch fewer; a rank with none gets one empty batch.
    """
    if world_size == 1:
        return batches
    if pad:
        total = -(-len(batches) // world_size) * world_size
        return [batches[i % len(batches)] for i in range(rank, total, world_size)] if batches else []
    share = batches[rank::world_size]
    return share if share else [np.empty(0, dtype=np.int64)]


class RankBatches(Sampler[np.ndarray]):
    """The batches of a LengthBucketBatchSampler that fall to one rank (see `deal_batches`).

    Passes set_epoch on, which Lightning calls on a DataLoader's sampler each epoch.
    """

    def __init__(self, sampler: LengthBucketBatchSampler, rank: int, world_size: int, pad: bool):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        self.sampler = sampler
        self.rank = rank
        self.world_size = world_size
        self.pad = pad

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        n = len(self.sampler)
        if self.pad:
            return -(-n // self.world_size) if n else 0
        return max(1, len(range(self.rank, n, self.world_size)))

    def __iter__(self) -> Iterator[np.ndarray]:
        yield from deal_batches(list(self.sampler), self.rank, self.world_size, self.pad)


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


class DeviceTrainBatches:
    """Training batches indexed out of a padded window matrix that lives on the device.

    Takes its batches from a LengthBucketBatchSampler (`sampler`, which Lightning's set_epoch finds
    as on a DataLoader) and yields the same dicts as TrainWindows, already on the device. With
    world_size > 1, batch i of the shared order goes to rank i % world_size; the last round is padded
    with the first batches so that all ranks get len(self) batches.
    """

    def __init__(
        self,
        matrix: torch.Tensor,
        lengths: np.ndarray,
        sampler: LengthBucketBatchSampler,
        rank: int = 0,
        world_size: int = 1,
        width_multiple: int = 1,
    ):
        self.matrix = matrix
        self.width_multiple = width_multiple
        self.lengths = np.asarray(lengths)
        self.sampler = sampler
        self.rank = rank
        self.world_size = world_size

    @property
    def device(self) -> torch.device:
        return self.matrix.device

    def __len__(self) -> int:
        return -(-len(self.sampler) // self.world_size)

    def _batches(self) -> list[np.ndarray]:
        return deal_batches(list(self.sampler), self.rank, self.world_size, pad=True)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        batches = self._batches()
        if not batches:
            return
        order = np.concatenate(batches).astype(np.int64, copy=False)
        bounds = np.cumsum([0] + [len(batch) for batch in batches]).tolist()
        widths = np.maximum.reduceat(self.lengths[order], bounds[:-1]).tolist()
        widest = self.matrix.shape[1]
        widths = [window_batch_width(w, self.width_multiple, widest) for w in widths]
        order = torch.from_numpy(order).to(self.device)  # one host-to-device copy per epoch
        for begin, end, width in zip(bounds[:-1], bounds[1:], widths):
            windows = self.matrix[order[begin:end], :width].long()
            targets = windows[:, 1:].contiguous()
            # As TrainWindows: inputs padded out wherever there is no target.
            inputs = windows[:, :-1].masked_fill(targets == 0, 0)
            yield {"input_ids": inputs, "target_ids": targets}


class SequenceDataModule(pl.LightningDataModule):
    """Reads, preprocesses and caches one data set, then serves train / val / test batches."""

    def __init__(
        self,
        name: str,
        path: str | None = None,
        format: str = "auto",  # noqa: A002 - the config key users write
        columns: dict | None = None,
        sep: str = ",",
        synthetic: dict | None = None,
        min_rating: float | None = None,
        min_user_interactions: int = 0,
        min_item_interactions: int = 0,
        kcore_iterative: bool = True,
        max_len: int = 50,
        sliding_window_step: int | None = None,
        batch_size: int = 128,
        eval_batch_size: int = 256,
        val_users: int | None = None,
        length_bucketing: bool = True,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        cache_dir: str | None = None,
        seed: int = 0,
        device_batches: bool | str = "auto",
        test_path: str | None = None,
        min_history: int = 3,
        time_order: str = "sort",
        event_types: list[str] | None = None,
        event_map: dict[str, str] | None = None,
        keep_events: list[str] | None = None,
        target_events: list[str] | None = None,
        exclude_events: list[str] | None = None,
        hide_target_item: bool = False,
        width_multiple: int = 1,
        seen_items: str = "exclude",
    ):
        super().__init__()
        # Not a data key: train.py and evaluate.py pass evaluation.seen_items.
        self.seen_items = check_seen_items(seen_items)
        self.hide_target_item = hide_target_item
        if isinstance(width_multiple, bool) or not isinstance(width_multiple, int) or width_multiple < 1:
            raise UserInputError(f"data.width_multiple: must be an integer >= 1, got {width_multiple!r}")
        self.width_multiple = width_multiple
        if isinstance(device_batches, str):  # also "true" / "false" when not parsed by YAML
            choices = {"auto": "auto", "true": True, "false": False}
            device_batches = choices.get(device_batches.lower(), device_batches)
        if device_batches != "auto" and not isinstance(device_batches, bool):
            raise UserInputError(f"data.device_batches: must be auto, true or false, got {device_batches!r}")
        if max_len < 1:
            raise UserInputError(f"data.max_len: must be >= 1, got {max_len}")
        if val_users is not None and val_users < 1:
            raise UserInputError(f"data.val_users: must be >= 1 or null, got {val_users}")
        if sliding_window_step is not None and sliding_window_step < 1:
            raise UserInputError(f"data.sliding_window_step: must be >= 1 or null, got {sliding_window_step}")
        self.name = name
        self.source = {
            "data_format": format,
            "path": path,
            "columns": dict(columns) if columns else None,
            "sep": sep,
            "synthetic": dict(synthetic) if synthetic else None,
            "test_path": test_path,
        }
        for key, value in (("target_events", target_events), ("exclude_events", exclude_events)):
            if value is not None and event_types is None:
                raise UserInputError(f"data.{key}: needs data.event_types (the event names the data holds)")
        if target_events is not None and len(target_events) == 0:
            raise UserInputError(
                "data.target_events: an empty list predicts nothing; use null for every event"
            )
        if target_events is not None and keep_events is not None:
            dropped = [name for name in target_events if name not in keep_events]
            if dropped:
                raise UserInputError(
                    f"data.target_events: {dropped} would be dropped by data.keep_events {list(keep_events)}"
                )
        self.settings = PreprocessSettings(
            min_rating=min_rating,
            min_user_interactions=min_user_interactions,
            min_item_interactions=min_item_interactions,
            kcore_iterative=kcore_iterative,
            min_history=min_history,
            time_order=time_order,
            event_types=None if event_types is None else tuple(str(e) for e in event_types),
            event_map=tuple(sorted((str(k), str(v)) for k, v in (event_map or {}).items())),
            keep_events=None if keep_events is None else tuple(str(e) for e in keep_events),
        )
        self.target_events = None if target_events is None else [str(e) for e in target_events]
        self.exclude_events = None if exclude_events is None else [str(e) for e in exclude_events]
        self.max_len = max_len
        self.sliding_window_step = sliding_window_step
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.val_users = val_users
        self.length_bucketing = length_bucketing
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.cache_dir = cache_dir
        self.seed = seed
        self.device_batches = device_batches
        # The split that test_dataloader (trainer.test) serves.
        self.test_split = "test"
        self.data: SequenceData | None = None
        self.split: EventSplit | None = None
        self._gaps: np.ndarray | None = None
        self._evaluated: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._evaluation_counts: dict[str, dict[str, float]] = {}
        self._device_windows: tuple[torch.Tensor, np.ndarray] | None = None
        self._train_item_counts: torch.Tensor | None = None

    # --- preparation ---------------------------------------------------------------------------

    def _load(self) -> SequenceData:
        return load_sequence_data(self.name, settings=self.settings, cache_dir=self.cache_dir, **self.source)

    def prepare_data(self) -> None:
        # Runs on one process per node: builds the cache that setup() then reads on every rank.
        # The trainer calls it again before validate/test; data already loaded need no second look.
        if self.data is None:
            self._load()

    def setup(self, stage: str | None = None) -> None:
        if self.data is None:
            self.data = self._load()
        if self.split is None:  # also for data set directly (benchmarks build it in memory)
            self._split(self.data)

    def _split(self, data: SequenceData) -> None:
        """The targets (data.target_events), checked, and the time gaps of event-typed data."""
        target_codes = None
        if self.target_events is not None:
            target_codes = data.event_ids(self.target_events, "data.target_events")
            present = set(np.unique(data.events).tolist())
            absent = [n for n, c in zip(self.target_events, target_codes) if c not in present]
            if absent:
                raise UserInputError(f"data.target_events: {absent} never occur in data {self.name}")
        if self.exclude_events is not None:
            data.event_ids(self.exclude_events, "data.exclude_events")  # names checked now
        split = EventSplit(data, target_codes)
        if split.skipped_users:
            log.info(
                "data %s: skipped %d users with no %s event (nothing to predict for them)",
                self.name,
                split.skipped_users,
                "/".join(self.target_events),
            )
        if data.has_events:
            self._gaps = time_gap_buckets(data.offsets, data.timestamps)
        self.split = split

    @property
    def num_event_types(self) -> int:
        """Event types of the data (0 without event types); ids are 1..num_event_types."""
        self.setup()
        return len(self.data.event_names) - 1 if self.data.has_events else 0

    @property
    def num_items(self) -> int:
        self.setup()
        return self.data.num_items

    @property
    def fingerprint(self) -> str:
        self.setup()
        return self.data.fingerprint

    def train_windows(self) -> TrainWindows:
        """Window bounds over each user's training part (all events but the last two)."""
        self.setup()
        data = self.data
        first = data.offsets[:-1]
        train_end = self.split.train_end
        span = self.max_len + 1
        if self.sliding_window_step is None:
            ends = train_end
        else:
            # Windows ending at train_end, train_end - step, ... so every training target is predicted.
            counts = np.maximum(0, (train_end - first - 2) // self.sliding_window_step + 1)
            user_of = np.repeat(np.arange(data.num_users), counts)
            rank = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
            ends = train_end[user_of] - rank * self.sliding_window_step
            first = first[user_of]
        starts = np.maximum(first, ends - span)
        usable = ends - starts >= 2  # at least one (input, target) pair
        is_target = self.split.is_target
        if is_target is not None:
            # A window whose every next event is of another type has nothing to learn from.
            targets_before = np.concatenate([[0], np.cumsum(is_target)])
            usable &= targets_before[np.maximum(ends, starts + 1)] - targets_before[starts + 1] > 0
        return TrainWindows(
            data.items,
            starts[usable],
            ends[usable],
            events=data.events,
            gaps=self._gaps,
            is_target=is_target,
            width_multiple=self.width_multiple,
        )

    def train_item_counts(self) -> torch.Tensor:
        """How often each item (index = item id, 0 = padding) occurs in the training part of the
        histories (all events before each user's validation target): popularity without the
        held-out items. With data.target_events, only events of those types count (next-purchase
        popularity is what is bought, not what is viewed)."""
        self.setup()
        if self._train_item_counts is None:  # asked for by the model, its loss and the results
            data = self.data
            lengths = np.diff(data.offsets)
            position = np.arange(len(data.items))
            in_train = position < np.repeat(self.split.train_end, lengths)
            if self.split.is_target is not None:
                in_train &= self.split.is_target
            counts = np.bincount(data.items[in_train], minlength=data.num_items + 1)
            self._train_item_counts = torch.from_numpy(counts.astype(np.int64))
        return self._train_item_counts

    # --- loaders ---------------------------------------------------------------------------------

    def _loader(self, dataset: Dataset, sampler: Sampler) -> DataLoader:
        pin = torch.cuda.is_available() if self.pin_memory is None else self.pin_memory
        return DataLoader(
            dataset,
            sampler=sampler,
            batch_size=None,  # the sampler yields whole batches of indices
            num_workers=self.num_workers,
            pin_memory=pin,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader | DeviceTrainBatches:
        windows = self.train_windows()
        if len(windows) == 0:
            raise UserInputError(f"data {self.name}: no user has a training history of 2 or more items")
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        sampler = LengthBucketBatchSampler(
            windows.lengths,
            self.batch_size,
            shuffle=True,
            bucketing=self.length_bucketing,
            seed=self.seed,
        )
        sampler.set_epoch(epoch)
        rank, world_size = self._process_share()
        device = self._train_batch_device(windows)
        if device is None:
            if world_size > 1:
                return self._loader(windows, RankBatches(sampler, rank, world_size, pad=True))
            return self._loader(windows, sampler)
        matrix, lengths = self._windows_on(device, windows)
        return DeviceTrainBatches(
            matrix, lengths, sampler, rank=rank, world_size=world_size, width_multiple=self.width_multiple
        )

    def _process_share(self) -> tuple[int, int]:
        """(rank, world_size) of this process in the trainer's data parallelism; (0, 1) alone."""
        trainer = self.trainer
        if trainer is None or trainer.world_size == 1:
            return 0, 1
        # Lightning's own sharding would split each rank's share again and pad it with duplicates.
        # (Its flag has no public getter; getattr keeps this a check, not a dependency.)
        connector = getattr(trainer, "_accelerator_connector", None)
        if getattr(connector, "use_distributed_sampler", False):
            raise UserInputError(
                f"trainer.use_distributed_sampler: must be false with {trainer.world_size} processes "
                "(the data module deals each process its own users); use trainer=ddp"
            )
        return trainer.global_rank, trainer.world_size

    def _train_batch_device(self, windows: TrainWindows) -> torch.device | None:
        """The device to keep the training windows on, or None for the DataLoader."""
        if self.device_batches is False:
            return None
        if self.data.has_events:
            # The device matrix holds item ids only; event types and gaps come through the loader.
            if self.device_batches is True:
                raise UserInputError(
                    "data.device_batches: not available for event-typed data (data.event_types); use auto or false"
                )
            return None
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        if self.device_batches is True:
            return device
        if device.type != "cuda":
            return None
        size = len(windows) * int(windows.lengths.max()) * np.dtype(self._window_dtype()).itemsize
        if size > DEVICE_BATCHES_MAX_BYTES:
            log.info(
                "data.device_batches=auto: the training windows (%.1f GiB) exceed %.1f GiB; using the DataLoader",
                size / 2**30,
                DEVICE_BATCHES_MAX_BYTES / 2**30,
            )
            return None
        return device

    def _window_dtype(self) -> type:
        # int32 halves the device memory; batches are cast to int64 when indexed.
        return np.int32 if self.data.num_items < 2**31 else np.int64

    def _windows_on(self, device: torch.device, windows: TrainWindows) -> tuple[torch.Tensor, np.ndarray]:
        """The padded window matrix on `device` and the window lengths, built once and kept."""
        if self._device_windows is None or self._device_windows[0].device != device:
            matrix = torch.from_numpy(padded_windows(windows, self._window_dtype())).to(device)
            self._device_windows = (matrix, windows.lengths)
            log.info(
                "Training batches indexed on %s from %d windows (%.1f MB)",
                device,
                matrix.shape[0],
                matrix.numel() * matrix.element_size() / 1e6,
            )
        return self._device_windows

    def teardown(self, stage: str) -> None:
        if stage == "fit":
            self._device_windows = None  # free the device memory once training is over

    def protocol(self) -> str:
        """The evaluation protocol in words, for metrics.json."""
        if self.target_events is None:
            target = "leave-one-out"
        else:
            target = f"next {'/'.join(self.target_events)} event from the full history before it"
        if self.exclude_events is None:
            seen = "seen items"
        elif not self.exclude_events:
            seen = "no items"  # nothing counts as seen: the same as keeping them
        else:
            seen = f"items of earlier {'/'.join(self.exclude_events)} events"
        rule = {
            "exclude": f"{seen} excluded, users whose target is one of them left out",
            "keep": "seen items kept (repeats ranked)",
            "exclude_but_target": f"{seen} excluded but a seen target kept (leaks repeat targets)",
        }[self.seen_items]
        return f"{target}, full ranking, {rule}, pessimistic ties"

    def _exclude_codes(self) -> list[int] | None:
        """Event type ids whose items count as seen (None: every event's)."""
        if self.exclude_events is None:
            return None
        return self.data.event_ids(self.exclude_events, "data.exclude_events")

    def seen_targets(self, users: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """(len(users),) bool: the target item at `positions` is a seen item of the user, i.e. it
        occurs among the user's earlier events (of the data.exclude_events types, when set), a
        repeat. Never with hide_target_item, which hides the target item's earlier events."""
        self.setup()
        data, codes = self.data, self._exclude_codes()
        repeat = np.zeros(len(users), dtype=bool)
        if self.hide_target_item:
            return repeat
        for begin in range(0, len(users), 4096):  # bounded memory: 4096 histories at a time
            rows = slice(begin, begin + 4096)
            starts = data.offsets[:-1][users[rows]]
            seen = gather_windows(data.items, starts, positions[rows])
            if codes is not None:
                seen = np.where(np.isin(gather_windows(data.events, starts, positions[rows]), codes), seen, 0)
            repeat[rows] = (seen == data.items[positions[rows]][:, None]).any(axis=1)
        return repeat

    def evaluated_users(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(users, target positions) evaluated on `split`: every user whose target has a history
        (all users under plain leave-one-out; see EventSplit), but, under evaluation.seen_items=
        exclude, those whose target is a seen item (counted in `evaluation_counts`)."""
        self.setup()
        if split in self._evaluated:  # asked for at every validation and test pass
            return self._evaluated[split]
        users, positions = self.split.targets(split)
        if self.hide_target_item:
            # Without the target item's own events a history may be empty: nothing to rank from.
            data, keep = self.data, np.zeros(len(users), dtype=bool)
            for begin in range(0, len(users), 4096):
                rows = slice(begin, begin + 4096)
                seen = gather_windows(data.items, data.offsets[:-1][users[rows]], positions[rows])
                target = data.items[positions[rows]]
                keep[rows] = ((seen != 0) & (seen != target[:, None])).any(axis=1)
            if not keep.all():
                log.info(
                    "data %s: %d %s targets left out: the user did nothing before them but with the target item",
                    self.name,
                    int((~keep).sum()),
                    split,
                )
            users, positions = users[keep], positions[keep]
        repeat = self.seen_targets(users, positions)
        repeats = int(repeat.sum())
        left_out = repeats if self.seen_items == "exclude" else 0
        if left_out:
            log.info(
                "data %s: %d of %d %s users (%.1f%%) left out: their target is an item they had seen "
                "(evaluation.seen_items=exclude; keep ranks them)",
                self.name,
                left_out,
                len(users),
                split,
                100.0 * left_out / len(users),
            )
            users, positions = users[~repeat], positions[~repeat]
        self._evaluation_counts[split] = {
            f"{split}/users": len(users),
            f"{split}/repeat_targets": repeats,
            f"{split}/repeat_target_share": repeats / max(len(users) + left_out, 1),
            f"{split}/users_left_out": left_out,
        }
        self._evaluated[split] = (users, positions)
        return users, positions

    def evaluation_counts(self, split: str) -> dict[str, float]:
        """For metrics.json: `<split>/users` evaluated (every user of the split, not the
        data.val_users subset), `<split>/repeat_targets` (users whose target is a seen item) and
        their share among the split's users, `<split>/users_left_out` (those of them left out:
        all under evaluation.seen_items=exclude, none otherwise)."""
        self.evaluated_users(split)
        return dict(self._evaluation_counts[split])

    def validation_users(self) -> np.ndarray | None:
        """The fixed, seeded subset of users validated on when data.val_users is set (else None)."""
        self.setup()
        if self.val_users is None or self.val_users >= self.data.num_users:
            return None
        rng = np.random.default_rng([self.seed, 1])  # independent of the training order's stream
        return np.sort(rng.choice(self.data.num_users, self.val_users, replace=False))

    def eval_dataloader(self, split: str, all_users: bool = False) -> DataLoader:
        """Batches of (user, history, target, exclude). Validation during training uses the
        data.val_users subset if set; test, and `all_users=True`, always use every user.

        Users in index order, eval_batch_size at a time; with several processes each process gets
        every world_size-th of these batches (each user exactly once, nothing padded)."""
        self.setup()
        if split not in SPLITS:
            raise UserInputError(f"split: {split!r} is not one of {list(SPLITS)}")
        users, target_pos = self.evaluated_users(split)
        subset = self.validation_users() if split == "val" and not all_users else None
        if subset is not None:
            chosen = np.isin(users, subset)
            users, target_pos = users[chosen], target_pos[chosen]
        users = EvalUsers(
            self.data,
            users,
            target_pos,
            self.max_len,
            self._exclude_codes(),
            self._gaps,
            self.hide_target_item,
            width_multiple=self.width_multiple,
            exclude_seen=self.seen_items != "keep",
        )
        sampler = LengthBucketBatchSampler(
            np.zeros(len(users)), self.eval_batch_size, shuffle=False, bucketing=False
        )
        rank, world_size = self._process_share()
        if world_size > 1:
            return self._loader(users, RankBatches(sampler, rank, world_size, pad=False))
        return self._loader(users, sampler)

    def val_dataloader(self) -> DataLoader:
        return self.eval_dataloader("val")

    def test_dataloader(self) -> DataLoader:
        # Every user; evaluate.py sets test_split = "val" to test a checkpoint on the validation targets.
        return self.eval_dataloader(self.test_split, all_users=True)
