"""Small Lightning callbacks used by train.py."""

from __future__ import annotations

import random
import time

import numpy as np
import pytorch_lightning as pl
import torch


class EpochTimer(pl.Callback):
    """Wall-clock seconds of each training epoch (the training loop only, without validation)."""

    def __init__(self):
        self.epoch_seconds: list[float] = []
        self._start: float | None = None
        self._validation_seconds = 0.0
        self._validation_start: float | None = None

    def state_dict(self) -> dict:
        return {"epoch_seconds": list(self.epoch_seconds)}  # a resumed run keeps the earlier epochs'

    def load_state_dict(self, state_dict: dict) -> None:
        self.epoch_seconds = [float(s) for s in state_dict.get("epoch_seconds", [])]

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


class TrainingState(pl.Callback):
    """What Lightning's checkpoints lack for an exact resume, saved in every checkpoint.

    - the random number generators: torch (dropout), CUDA, numpy and Python `random` (Lightning
      saves none of them), so the resumed epochs draw the same dropout masks as an uninterrupted
      run (see `load_state_dict` for when they are restored);
    - the generators of the sampling losses' `NegativeSampler`s (seeded, one per loss);
    - whether training had been told to stop (early stopping), so that a run interrupted after it
      stopped does not train one more epoch;
    - the training seconds before the interruption (`train_seconds` in metrics.json adds them up).

    Under DDP the checkpoint holds rank 0's states; every rank restores the shared torch, numpy
    and Python states (all ranks are seeded alike), and only rank 0 restores its negative sampler.
    A run moved to another directory has ModelCheckpoint's paths in its checkpoint rewritten to
    the new directory before they are loaded.
    """

    def __init__(self):
        self.seconds_before = 0.0
        self._fit_start: float | None = None
        self._trainer: pl.Trainer | None = None
        self._module: pl.LightningModule | None = None
        self._should_stop = False

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._trainer, self._module = trainer, pl_module

    def on_fit_start(self, trainer, pl_module) -> None:
        self._fit_start = time.perf_counter()

    def training_seconds(self) -> float:
        """Seconds of training so far, this process's and those of the runs it resumed."""
        running = time.perf_counter() - self._fit_start if self._fit_start is not None else 0.0
        return self.seconds_before + running

    def state_dict(self) -> dict:
        state = {"rng": rng_states(), "samplers": {}, "seconds": self.training_seconds()}
        state["should_stop"] = bool(self._trainer.should_stop) if self._trainer is not None else False
        if self._module is not None:
            for name, sampler in negative_samplers(self._module):
                generator = getattr(sampler, "_generator", None)
                if generator is not None:
                    state["samplers"][name] = {
                        "state": generator.get_state(),
                        "device": str(generator.device),
                    }
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        # Applied when Lightning restores the checkpoint, before the training loop creates its
        # data iterator. That iterator draws from torch's generator (the DataLoader's base seed),
        # as the iterator of the next epoch did in the uninterrupted run right after the
        # checkpoint was saved, so the resumed epochs draw the same dropout masks.
        self.seconds_before = float(state_dict.get("seconds", 0.0))
        set_rng_states(state_dict.get("rng", {}))
        trainer, module = self._trainer, self._module
        if module is not None and (trainer is None or trainer.global_rank == 0):
            samplers = dict(negative_samplers(module))
            for name, saved in state_dict.get("samplers", {}).items():
                if name in samplers:
                    generator = torch.Generator(device=saved["device"])
                    generator.set_state(saved["state"])
                    samplers[name]._generator = generator
        self._should_stop = bool(state_dict.get("should_stop", False))

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        relocate_model_checkpoints(trainer, checkpoint)

    def on_train_start(self, trainer, pl_module) -> None:
        if self._should_stop:  # Lightning clears should_stop when fit starts
            trainer.should_stop = True
        self._should_stop = False


def negative_samplers(module: torch.nn.Module):
    """(name, NegativeSampler) of every sampler held by a submodule (the sampling losses')."""
    from recsys.losses import NegativeSampler

    for name, submodule in module.named_modules():
        if isinstance(submodule, NegativeSampler):
            yield name, submodule


def rng_states() -> dict:
    """torch, CUDA, numpy and Python random states, as tensors and plain values (weights_only loads them)."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": [
            kind,
            torch.from_numpy(keys.astype(np.int64)),
            int(position),
            int(has_gauss),
            float(cached_gaussian),
        ],
        "python": [version, list(internal), gauss_next],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    if "torch" in states:
        torch.set_rng_state(states["torch"])
    if "numpy" in states:
        kind, keys, position, has_gauss, cached_gaussian = states["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
    if "python" in states:
        version, internal, gauss_next = states["python"]
        random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])


def relocate_model_checkpoints(trainer, checkpoint: dict) -> None:
    """Point ModelCheckpoint's saved paths at its current directory when the run was moved.

    Lightning keeps the best score and paths only if the directory is unchanged; a moved run would
    otherwise lose track of its best checkpoint and test the best since the resumption.
    """
    from pytorch_lightning.callbacks import ModelCheckpoint

    states = checkpoint.get("callbacks", {})
    for callback in trainer.checkpoint_callbacks:
        state = states.get(callback.state_key) if isinstance(callback, ModelCheckpoint) else None
        if not state or not callback.dirpath or state.get("dirpath") in (None, callback.dirpath):
            continue
        old, new = str(state["dirpath"]), str(callback.dirpath)

        def moved(path, old=old, new=new):
            return new + path[len(old) :] if isinstance(path, str) and path.startswith(old) else path

        for key in ("best_model_path", "kth_best_model_path", "last_model_path"):
            if key in state:
                state[key] = moved(state[key])
        if "best_k_models" in state:
            state["best_k_models"] = {moved(k): v for k, v in state["best_k_models"].items()}
        state["dirpath"] = new
