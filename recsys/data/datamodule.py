"""The one LightningDataModule that every model trains and is evaluated through.

Training batches hold right-padded item sequences (padding id 0 at the end) trimmed to the longest
sequence in the batch: with right padding a causal model needs no attention mask at all (real tokens
only ever look left, at real tokens), which lets SDPA pick its flash kernel on a GPU. Users of similar
length are batched together so that little of each batch is padding; the Amazon sets are mostly
padding at max length 50 (median history 6).

Batches are built by fancy indexing into the CSR arrays, one whole batch per `__getitem__` call: no
per-user Python loop.
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

log = logging.getLogger(__name__)

SPLITS = ("val", "test")


def gather_windows(items: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Rows items[starts[i]:ends[i]], right-padded with 0 to the longest row."""
    lengths = ends - starts
    width = int(lengths.max()) if len(lengths) else 0
    columns = np.arange(width, dtype=np.int64)
    index = starts[:, None] + columns[None, :]
    valid = columns[None, :] < lengths[:, None]
    return np.where(valid, items[np.minimum(index, len(items) - 1)], 0)


class TrainWindows(Dataset):
    """Training samples: windows of at most max_len + 1 items from each user's training history.

    A window w gives inputs items[w][:-1] and next-item targets items[w][1:], so a causal model
    learns from every position of one sequence in one pass (no per-prefix samples).
    """

    def __init__(self, items: np.ndarray, starts: np.ndarray, ends: np.ndarray):
        self.items, self.starts, self.ends = items, starts, ends

    def __len__(self) -> int:
        return len(self.starts)

    @property
    def lengths(self) -> np.ndarray:
        return self.ends - self.starts

    def __getitem__(self, indices) -> dict[str, torch.Tensor]:
        indices = np.asarray(indices, dtype=np.int64)
        windows = gather_windows(self.items, self.starts[indices], self.ends[indices])
        targets = windows[:, 1:]
        # The last item of a window is only a target: padding it out of the inputs keeps every
        # row's inputs exactly the positions that have a target, as at inference.
        inputs = np.where(targets != 0, windows[:, :-1], 0)
        return {
            "input_ids": torch.from_numpy(np.ascontiguousarray(inputs)),
            "target_ids": torch.from_numpy(np.ascontiguousarray(targets)),
        }


class EvalUsers(Dataset):
    """Validation or test queries: (history, target, items to exclude) for every user.

    For split 'val' the target is the second-to-last event and the history everything before it; for
    'test' the target is the last event and the history includes the validation item. `history` is
    the last max_len items (what the model sees); `exclude` is the whole history (seen items that
    are removed from the ranking).
    """

    def __init__(self, data: SequenceData, split: str, max_len: int, users: np.ndarray | None = None):
        if split not in SPLITS:
            raise UserInputError(f"split: {split!r} is not one of {list(SPLITS)}")
        self.data = data
        self.max_len = max_len
        self.users = np.arange(data.num_users, dtype=np.int64) if users is None else users
        starts = data.offsets[:-1][self.users]
        self.target_pos = data.offsets[1:][self.users] - (2 if split == "val" else 1)
        self.seen_start = starts
        self.history_start = np.maximum(starts, self.target_pos - max_len)

    def __len__(self) -> int:
        return len(self.users)

    def __getitem__(self, indices) -> dict[str, torch.Tensor]:
        indices = np.asarray(indices, dtype=np.int64)
        items = self.data.items
        target_pos = self.target_pos[indices]
        return {
            "user": torch.from_numpy(self.users[indices]),
            "history": torch.from_numpy(gather_windows(items, self.history_start[indices], target_pos)),
            "target": torch.from_numpy(items[target_pos]),
            "exclude": torch.from_numpy(gather_windows(items, self.seen_start[indices], target_pos)),
        }


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
    ):
        super().__init__()
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
        }
        self.settings = PreprocessSettings(
            min_rating=min_rating,
            min_user_interactions=min_user_interactions,
            min_item_interactions=min_item_interactions,
            kcore_iterative=kcore_iterative,
        )
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
        self.data: SequenceData | None = None
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
        train_end = data.offsets[1:] - 2
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
        return TrainWindows(data.items, starts[usable], ends[usable])

    def train_item_counts(self) -> torch.Tensor:
        """How often each item (index = item id, 0 = padding) occurs in the training part of the
        histories (all events but each user's last two): popularity without the held-out items."""
        self.setup()
        if self._train_item_counts is None:  # asked for by the model, its loss and the results
            data = self.data
            lengths = np.diff(data.offsets)
            position = np.arange(len(data.items)) - np.repeat(data.offsets[:-1], lengths)
            in_train = position < np.repeat(lengths - 2, lengths)
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

    def train_dataloader(self) -> DataLoader:
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
        return self._loader(windows, sampler)

    def validation_users(self) -> np.ndarray | None:
        """The fixed, seeded subset of users validated on when data.val_users is set (else None)."""
        self.setup()
        if self.val_users is None or self.val_users >= self.data.num_users:
            return None
        rng = np.random.default_rng([self.seed, 1])  # independent of the training order's stream
        return np.sort(rng.choice(self.data.num_users, self.val_users, replace=False))

    def eval_dataloader(self, split: str, all_users: bool = False) -> DataLoader:
        """Batches of (user, history, target, exclude). Validation during training uses the
        data.val_users subset if set; test, and `all_users=True`, always use every user."""
        self.setup()
        subset = self.validation_users() if split == "val" and not all_users else None
        users = EvalUsers(self.data, split, self.max_len, users=subset)
        sampler = LengthBucketBatchSampler(
            np.zeros(len(users)), self.eval_batch_size, shuffle=False, bucketing=False
        )
        return self._loader(users, sampler)

    def val_dataloader(self) -> DataLoader:
        return self.eval_dataloader("val")

    def test_dataloader(self) -> DataLoader:
        return self.eval_dataloader("test")
