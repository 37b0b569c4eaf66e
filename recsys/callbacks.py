"""Small Lightning callbacks used by train.py."""

from __future__ import annotations

import time

import pytorch_lightning as pl


class EpochTimer(pl.Callback):
    """Wall-clock seconds of each training epoch (the training loop only, without validation)."""

    def __init__(self):
        self.epoch_seconds: list[float] = []
        self._start: float | None = None
        self._validation_seconds = 0.0
        self._validation_start: float | None = None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter()
        self._validation_seconds = 0.0

    def on_validation_start(self, trainer, pl_module) -> None:
        self._validation_start = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._validation_start is not None and self._start is not None:
            self._validation_seconds += time.perf_counter() - self._validation_start
        self._validation_start = None

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        # Lightning runs validation before on_train_epoch_end, so subtract its time.
        if self._start is not None:
            seconds = time.perf_counter() - self._start - self._validation_seconds
            self.epoch_seconds.append(seconds)
            pl_module.log("train/epoch_seconds", seconds, on_step=False, on_epoch=True)
        self._start = None
