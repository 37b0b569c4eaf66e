"""Which samples go into which batch, in what order, on which process, and on which device.

Length bucketing (`data.length_bucketing`): users of similar length are batched together so that
little of each batch is padding; the Amazon sets are mostly padding at max length 50 (median
history 6). Such batches hold from a few hundred to thousands of target positions; the models weigh
each batch's loss by its target count (`SequentialRecommender._weighted`, recsys/training/module.py), so that grouping by
length does not change the weight each target gets.

Device batches (`data.device_batches`): for a small model on a GPU, gathering each batch on the CPU
and copying it to the device takes longer than the training step, and the GPU sits idle. When on,
the padded matrix of all training windows (num_windows x longest window, a few MB for the Amazon
sets) is built once and kept on the device; each epoch uploads its batch order once, and a batch is
one indexing of that matrix, trimmed to a width computed on the CPU from the window lengths (no
device-to-host sync). The batches are exactly the DataLoader's: same sampler, same order, same
trimming. `auto` turns it on for a CUDA trainer when the matrix fits DEVICE_BATCHES_MAX_BYTES;
`true` on any device (tests use it on the CPU).

Several processes (`trainer=ddp`): the data module gives each process its share itself, and the
trainer must not wrap the loaders in a DistributedSampler (`use_distributed_sampler: false`, set by
`configs/trainer/ddp.yaml`). Every process builds the same batches in the same order (same seed,
same epoch) and batch i goes to rank i % world_size (`deal_batches`). Training: the last round is
padded with the first batches, so that every rank takes the same number of optimizer steps (DDP
all-reduces the gradients of each step). Validation and test: nothing is repeated, every user is
evaluated exactly once, in the very batches one process would form, so the metrics, reduced as
exact sums and counts (recsys/training/module.py), do not depend on the number of processes; a rank
left without a batch gets one empty batch, because Lightning refuses an empty loader on one rank and
every rank must reach the epoch-end reduction.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler

from recsys.data.datasets import TrainWindows, pad_rows, window_batch_width
from recsys.errors import UserInputError

log = logging.getLogger(__name__)

# `data.device_batches: auto` keeps the training windows on a CUDA device only up to this size.
DEVICE_BATCHES_MAX_BYTES = 1 << 30


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
        static_rows: int | None = None,
    ):
        self.matrix = matrix
        self.width_multiple = width_multiple
        self.static_rows = static_rows  # as TrainWindows.static_rows
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
        static = self.static_rows is not None
        widths = [window_batch_width(w, self.width_multiple, widest, static) for w in widths]
        order = torch.from_numpy(order).to(self.device)  # one host-to-device copy per epoch
        for begin, end, width in zip(bounds[:-1], bounds[1:], widths):
            windows = self.matrix[order[begin:end], :width].long()
            targets = windows[:, 1:].contiguous()
            # As TrainWindows: inputs padded out wherever there is no target.
            inputs = windows[:, :-1].masked_fill(targets == 0, 0)
            yield pad_rows({"input_ids": inputs, "target_ids": targets}, self.static_rows)


def device_batches_setting(value) -> bool | str:
    """data.device_batches as auto, True or False (also from the strings "true" / "false", when
    not parsed by YAML)."""
    if isinstance(value, str):
        value = {"auto": "auto", "true": True, "false": False}.get(value.lower(), value)
    if value != "auto" and not isinstance(value, bool):
        raise UserInputError(f"data.device_batches: must be auto, true or false, got {value!r}")
    return value


def window_dtype(num_items: int) -> type:
    """The dtype of the device window matrix: int32 halves the device memory (batches are cast to
    int64 when indexed)."""
    return np.int32 if num_items < 2**31 else np.int64


def train_batch_device(
    device_batches: bool | str,
    device: torch.device,
    windows: TrainWindows,
    num_items: int,
    per_position_features: bool,
) -> torch.device | None:
    """The device to keep the training windows on (data.device_batches on a trainer whose root
    device is `device`), or None for the DataLoader."""
    if device_batches is False:
        return None
    if per_position_features:
        # The device matrix holds item ids only; event types, gaps and times come through the loader.
        if device_batches is True:
            raise UserInputError(
                "data.device_batches: not available for event-typed data (data.event_types) or with "
                "data.batch_times; use auto or false"
            )
        return None
    if device_batches is True:
        return device
    if device.type != "cuda":
        return None
    size = len(windows) * int(windows.lengths.max()) * np.dtype(window_dtype(num_items)).itemsize
    if size > DEVICE_BATCHES_MAX_BYTES:
        log.info(
            "data.device_batches=auto: the training windows (%.1f GiB) exceed %.1f GiB; using the DataLoader",
            size / 2**30,
            DEVICE_BATCHES_MAX_BYTES / 2**30,
        )
        return None
    return device
