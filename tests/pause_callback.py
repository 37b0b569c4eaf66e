"""A Lightning callback for tests that kill a training run at a point they choose.

train.py takes it as one more callback through Hydra overrides (`pause_overrides`), so that the
killed run, its resumption and the uninterrupted run it is compared with share one config. It acts
only in the process whose environment names a file in `PAUSE_FILE`: at the start of the chosen
training batch it writes where it stopped (epoch, batch, global step) to that file and waits there
to be killed (for at most `timeout` seconds, then it fails the run). Elsewhere it does nothing and
touches no random generator.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytorch_lightning as pl

PAUSE_FILE = "RECSYS_TEST_PAUSE_FILE"


def pause_overrides(epoch: int, batch: int) -> list[str]:
    """The train.py overrides that add the callback, pausing at (epoch, batch), both 0-based."""
    key = "+callbacks.pause_for_kill"
    return [f"{key}._target_={__name__}.PauseForKill", f"{key}.epoch={epoch}", f"{key}.batch={batch}"]


class PauseForKill(pl.Callback):
    def __init__(self, epoch: int, batch: int, timeout: float = 300.0):
        self.epoch, self.batch, self.timeout = epoch, batch, timeout

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        path = os.environ.get(PAUSE_FILE)
        if not path or (trainer.current_epoch, batch_idx) != (self.epoch, self.batch):
            return
        where = {"epoch": trainer.current_epoch, "batch": batch_idx, "global_step": trainer.global_step}
        Path(path).write_text(json.dumps(where))
        time.sleep(self.timeout)
        raise RuntimeError(f"PauseForKill: not killed within {self.timeout} s")
