"""The one LightningDataModule that every model trains and is evaluated through.

`SequenceDataModule` composes the parts of recsys/data: it reads, preprocesses and caches one data
set (formats.py, preprocess.py, cache.py), splits it into training histories and validation / test
targets (split.py), and serves training windows and evaluation queries (datasets.py) in batches
dealt to the device and to each process (batching.py); the evaluation side is `EvaluationBatches`
(evaluation_batches.py). Its constructor takes the `data.*` config
keys; a bad value is a `UserInputError` naming the key.
"""

from __future__ import annotations

import logging

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from recsys.data.batching import (
    DeviceTrainBatches,
    LengthBucketBatchSampler,
    RankBatches,
    device_batches_setting,
    train_batch_device,
    window_dtype,
)
from recsys.data.cache import load_item_features, load_sequence_data, source_fingerprint, with_item_features
from recsys.data.datasets import (
    TrainWindows,
    padded_windows,
    training_windows,
)
from recsys.data.engine import memory_limit_bytes
from recsys.data.evaluated import (
    EvaluatedUsers,
    check_window_keys,
)
from recsys.data.evaluation_batches import EvaluationBatches
from recsys.data.features import time_gap_buckets
from recsys.data.formats import Source
from recsys.data.held_out_items import TrainingPart, check_share, held_out_items, without_items
from recsys.data.item_features import FeatureSource, ItemFeatures
from recsys.data.preprocess import PreprocessSettings
from recsys.data.sequences import SequenceData
from recsys.data.split import (
    COLD_ITEMS,
    PROTOCOLS,
    TIME_UNITS,
    EventSplit,
    Split,
    TimeSplit,
    check_event_keys,
    target_codes,
    time_split,
    training_item_counts,
)
from recsys.errors import UserInputError
from recsys.evaluation.metrics import check_seen_items, check_targets

log = logging.getLogger(__name__)


class SequenceDataModule(EvaluationBatches, pl.LightningDataModule):
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
        times_path: str | None = None,
        min_history: int = 3,
        time_order: str = "sort",
        event_types: list[str] | None = None,
        event_map: dict[str, str] | None = None,
        keep_events: list[str] | None = None,
        target_events: list[str] | None = None,
        exclude_events: list[str] | None = None,
        hide_target_item: bool = False,
        width_multiple: int = 1,
        static_shapes: bool = False,
        seen_items: str = "exclude",
        memory_limit: str | int | None = "auto",
        max_users: int | None = None,
        split: str = "leave_one_out",
        test_window: str | None = None,
        test_start: str | None = None,
        test_share: float | None = None,
        val_window: str | None = None,
        time_unit: str = "s",
        cold_items: str = "drop",
        targets: str = "next",
        item_features: dict | None = None,
        cold_items_share: float | None = None,
        batch_times: bool = False,
    ):
        super().__init__()
        # Not a data key: train.py and evaluate.py pass evaluation.seen_items.
        self.seen_items = check_seen_items(seen_items)
        # Not a data key either: evaluation.max_users.
        if max_users is not None and (
            isinstance(max_users, bool) or not isinstance(max_users, int) or max_users < 1
        ):
            raise UserInputError(f"evaluation.max_users: must be an integer >= 1 or null, got {max_users!r}")
        self.max_users = max_users
        if split not in PROTOCOLS:
            raise UserInputError(f"data.split: {split!r} is not one of {list(PROTOCOLS)}")
        if time_unit not in TIME_UNITS:
            raise UserInputError(f"data.time_unit: {time_unit!r} is not one of {list(TIME_UNITS)}")
        if cold_items not in COLD_ITEMS:  # not a data key: evaluation.cold_items
            raise UserInputError(f"evaluation.cold_items: {cold_items!r} is not one of {list(COLD_ITEMS)}")
        self.protocol_name = split
        # Not a data key: evaluation.cold_items_share (recsys/data/held_out_items.py).
        self.cold_items_share = check_share(cold_items_share, split)
        self._held_out: np.ndarray | None = None
        self._training: TrainingPart | None = None
        self.targets = check_window_keys(check_targets(targets), split, seen_items, hide_target_item)
        self.time_keys = dict(
            test_window=test_window, test_start=test_start, test_share=test_share, val_window=val_window
        )
        self.time_unit = time_unit
        self.cold_items = cold_items
        self.hide_target_item = hide_target_item
        self.width_multiple = _integer_at_least_one("width_multiple", width_multiple)
        if not isinstance(static_shapes, bool):
            raise UserInputError(f"data.static_shapes: must be true or false, got {static_shapes!r}")
        self.static_shapes = static_shapes
        if not isinstance(batch_times, bool):
            raise UserInputError(f"data.batch_times: must be true or false, got {batch_times!r}")
        # Each position's timestamp in every batch, for a model that reads them (HSTU's
        # model.time_bias, which this key follows in data/common.yaml).
        self.batch_times = batch_times
        self.device_batches = device_batches_setting(device_batches)
        _at_least_one("max_len", max_len)
        _at_least_one("val_users", val_users, nullable=True)
        _at_least_one("sliding_window_step", sliding_window_step, nullable=True)
        self.name = name
        self.feature_source = FeatureSource.from_config(item_features)
        self.item_features: ItemFeatures | None = None
        self.source = Source(format, path, columns, sep, synthetic, test_path, times_path)
        check_event_keys(event_types, keep_events, target_events, exclude_events)
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
        memory_limit_bytes(memory_limit)  # checked now, before any data is read
        self.memory_limit = memory_limit
        self.seed = seed
        # The split that test_dataloader (trainer.test) serves.
        self.test_split = "test"
        self.data: SequenceData | None = None
        self.split: Split | None = None
        self._gaps: np.ndarray | None = None
        self._evaluated: dict[str, EvaluatedUsers] = {}
        self._source_fingerprint: str | None = None
        self._device_windows: tuple[torch.Tensor, np.ndarray] | None = None
        self._train_item_counts: torch.Tensor | None = None

    # --- preparation ---------------------------------------------------------------------------

    def _load(self) -> SequenceData:
        return load_sequence_data(
            self.name,
            self.source,
            self.settings,
            self.cache_dir,
            key=self._sequence_key(),
            memory_limit=self.memory_limit,
        )

    def prepare_data(self) -> None:
        # Runs on one process per node: builds the cache that setup() then reads on every rank.
        # The trainer calls it again before validate/test; data already loaded need no second look.
        if self.data is None:
            self._load()

    def setup(self, stage: str | None = None) -> None:
        if self.data is None:
            self.data = self._load()
        if self.feature_source is not None and self.item_features is None:
            self.item_features = load_item_features(self.name, self.feature_source, self.data, self.cache_dir)
        if self.split is None:  # also for data set directly (benchmarks build it in memory)
            self._split(self.data)

    def _split(self, data: SequenceData) -> None:
        """The targets (data.target_events), checked, and the time gaps of event-typed data."""
        codes = target_codes(data, self.target_events, self.name)
        if self.exclude_events is not None:
            data.event_ids(self.exclude_events, "data.exclude_events")  # names checked now
        if self.protocol_name == "time":
            split = time_split(data, codes, self.name, self.time_unit, **self.time_keys)
            log.info("data %s: time split, %s", self.name, split.cuts.describe())
        else:
            split = EventSplit(data, codes)
        if split.skipped_users:
            kind = "" if self.target_events is None else "/".join(self.target_events) + " "
            where = "in the test window" if self.protocol_name == "time" else ""
            log.info(
                "data %s: skipped %d users with no %sevent %s(nothing to predict for them)",
                self.name,
                split.skipped_users,
                kind,
                where + " " if where else "",
            )
        if self.batch_times and not data.has_time:
            raise UserInputError(
                f"data.batch_times (model.time_bias): data {self.name} has no event times (a sequence "
                "file's positions are not times; see data.times_path or data.columns.timestamp)"
            )
        if data.has_events:
            self._gaps = time_gap_buckets(data.offsets, data.timestamps)
        if self.cold_items_share is not None:
            self._held_out = held_out_items(data.num_items, self.cold_items_share, self.seed)
            self._training = without_items(data, split.train_end, split.is_target, self._held_out)
            log.info(
                "data %s: %d items held out of training (evaluation.cold_items_share=%s)",
                self.name,
                int(self._held_out.sum()),
                self.cold_items_share,
            )
        self.split = split

    def recent_item_counts(self, days: float) -> torch.Tensor:
        """Like `train_item_counts`, but only the training events of the last `days` days before a
        time split's validation cut (model.window_days of the popularity baseline)."""
        self.setup()
        if not isinstance(self.split, TimeSplit):
            raise UserInputError("model.window_days: needs data.split=time (days before its validation cut)")
        return torch.from_numpy(self.split.recent_item_counts(self.data, days))

    def cold_item_mask(self) -> np.ndarray | None:
        """(num_items + 1,) bool: the items with no event in the training part, which an id-only
        model cannot recommend: under data.split=time those first seen after the validation cut,
        with evaluation.cold_items_share the held-out items; None otherwise."""
        self.setup()
        if self._held_out is not None:
            return self._held_out
        return self.split.cold_items(self.data) if isinstance(self.split, TimeSplit) else None

    def _not_candidates(self) -> np.ndarray | None:
        """Items no user is ranked: a time split's cold items, unless evaluation.cold_items=rank."""
        mask = self.cold_item_mask()
        ranked = self.cold_items == "rank" or self._held_out is not None
        return None if mask is None or ranked else np.flatnonzero(mask)

    def trained_item_mask(self) -> np.ndarray | None:
        """(num_items + 1,) bool: the items with an event in the training part, the classes of
        the training loss (the complement of `cold_item_mask`); None when every item is one."""
        mask = self.cold_item_mask()
        return None if mask is None else ~mask

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
        """What a checkpoint records of its data: the data's fingerprint, with data.item_features
        that of the features too."""
        self.setup()
        return with_item_features(self.data.fingerprint, self.feature_source)

    def source_fingerprint(self) -> str:
        """`fingerprint` before anything is read into memory or cached."""
        return with_item_features(self._sequence_key(), self.feature_source)

    def _sequence_key(self) -> str:
        """The fingerprint of the preprocessed sequences, their cache's key (data set in memory, as
        benchmarks do, has no source: its own fingerprint)."""
        if self.data is not None:
            return self.data.fingerprint
        if self._source_fingerprint is None:  # hashing reads the files: once per data module
            self._source_fingerprint = source_fingerprint(self.source, self.settings)
        return self._source_fingerprint

    def train_windows(self) -> TrainWindows:
        """Window bounds over each user's training part (all events but the last two)."""
        self.setup()
        part, data, gaps = self.split, self.data, self._gaps
        if self._training is not None:  # without the held-out items' events
            part, data, gaps = self._training, self._training.data, self._training.gaps
        windows = training_windows(
            data, part, self.max_len, self.sliding_window_step, gaps, self.width_multiple, self.batch_times
        )
        windows.static_rows = self.batch_size if self.static_shapes else None
        return windows

    def train_item_counts(self) -> torch.Tensor:
        """How often each item (index = item id, 0 = padding) occurs in the training part of the
        histories (all events before each user's validation target): popularity without the
        held-out items. With data.target_events, only events of those types count (next-purchase
        popularity is what is bought, not what is viewed)."""
        self.setup()
        if self._train_item_counts is None:  # asked for by the model, its loss and the results
            part = self._training or self.split
            data = self.data if self._training is None else self._training.data
            self._train_item_counts = torch.from_numpy(
                training_item_counts(data, part.train_end, part.is_target)
            )
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
            matrix,
            lengths,
            sampler,
            rank=rank,
            world_size=world_size,
            width_multiple=self.width_multiple,
            static_rows=windows.static_rows,
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
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        return train_batch_device(
            self.device_batches,
            device,
            windows,
            self.data.num_items,
            self.data.has_events or self.batch_times,
        )

    def _windows_on(self, device: torch.device, windows: TrainWindows) -> tuple[torch.Tensor, np.ndarray]:
        """The padded window matrix on `device` and the window lengths, built once and kept."""
        if self._device_windows is None or self._device_windows[0].device != device:
            matrix = torch.from_numpy(padded_windows(windows, window_dtype(self.data.num_items))).to(device)
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


# --- checks of the constructor's config keys (each error names its key) --------------------------


def _at_least_one(key: str, value, nullable: bool = False) -> None:
    if nullable and value is None:
        return
    if value < 1:
        raise UserInputError(f"data.{key}: must be >= 1{' or null' if nullable else ''}, got {value}")


def _integer_at_least_one(key: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserInputError(f"data.{key}: must be an integer >= 1, got {value!r}")
    return value
