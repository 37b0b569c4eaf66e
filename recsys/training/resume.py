"""Resuming an interrupted run in its own directory, and checkpoints that are never half-written.

`train.py` pointed at a run directory (`hydra.run.dir=RUN`) that holds `config.yaml` and a
checkpoint but no `metrics.json` resumes that run: `plan_resume` refuses a finished run, a
different config (naming the keys) and a directory without a complete checkpoint, and picks the
newest complete checkpoint (`checkpoints/*.ckpt`, or a SLURM requeue's `hpc_ckpt_*.ckpt`).
Lightning restores weights, optimizer, scheduler, loops and callback states (early stopping,
best checkpoint); `recsys.training.callbacks.TrainingState` adds the random number generators.

`AtomicCheckpointIO` writes every checkpoint to a temporary file beside it and renames it into
place, so a checkpoint file is either complete or absent. `CSVLogger` keeps a resumed run's
earlier rows of metrics.csv (Lightning's starts the file again).
"""

from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import CSVLogger as LightningCSVLogger
from pytorch_lightning.plugins import TorchCheckpointIO

from recsys.errors import UserInputError
from recsys.runs.files import atomic_path

log = logging.getLogger(__name__)

# Keys that may differ between an interrupted run and its resumption because they do not change
# the results: where things live (a moved run directory or data directory; the data itself is
# checked by its fingerprint), how data are loaded, what is displayed, and which loggers record.
# Everything else (seed, model, loss, data, optimizer, trainer.max_epochs, which also sets the
# cosine schedule's length, devices, precision, ...) must be equal.
RESUME_MAY_DIFFER = (
    "paths",
    "logger",
    "data.path",
    "data.cache_dir",
    "data.num_workers",
    "data.pin_memory",
    "data.device_batches",
    "trainer.default_root_dir",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "trainer.log_every_n_steps",
    "callbacks.rich_progress_bar",
    "callbacks.model_checkpoint.dirpath",
    # Which checkpoint files are kept, not what is trained (runs started before 2026-12-06 had
    # model_checkpoint.save_last and no last_checkpoint).
    "callbacks.last_checkpoint",
    "callbacks.model_checkpoint.save_last",
)


@dataclass
class Resume:
    checkpoint: Path
    epoch: int
    global_step: int
    data_fingerprint: str | None


def plan_resume(run_dir: Path, cfg: DictConfig, rank: int = 0) -> Resume | None:
    """What to do with `run_dir`: None for a new run, a `Resume` for an interrupted one.

    Raises UserInputError for a finished run and a config that differs from the saved one. An
    interrupted run with the same config but no complete checkpoint (stopped in its first epoch,
    e.g. a SLURM job preempted early and requeued) starts over, with a warning.
    """
    if (run_dir / "metrics.json").exists():
        raise UserInputError(f"hydra.run.dir: {run_dir} already holds a finished run; choose a new directory")
    saved_config = run_dir / "config.yaml"
    if not saved_config.exists():
        if checkpoint_candidates(run_dir) and rank == 0:
            raise UserInputError(
                f"hydra.run.dir: {run_dir} holds checkpoints but no config.yaml, so it cannot be resumed "
                f"or checked; choose a new directory"
            )
        return None
    differences = config_differences(OmegaConf.load(saved_config), cfg)
    if differences:
        shown = ", ".join(differences[:5]) + (
            f" and {len(differences) - 5} more" if len(differences) > 5 else ""
        )
        raise UserInputError(
            f"hydra.run.dir: {run_dir} holds an interrupted run with another config ({shown}); "
            f"resume it with the overrides it was started with (see its config.yaml) or choose a new directory"
        )
    resume = newest_checkpoint(run_dir, rename_unreadable=rank == 0)
    if resume is None and rank == 0:
        # Stopped before its first checkpoint (a SLURM job preempted or timed out in its first
        # epoch comes back here on requeue): with the same config, starting over is resuming.
        log.warning(
            "hydra.run.dir: %s holds an interrupted run with the same config but no complete checkpoint; "
            "starting it over",
            run_dir,
        )
    return resume


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        flat: dict[str, Any] = {}
        for key, value in node.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat if flat or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: node}


def config_differences(saved: DictConfig, new: DictConfig) -> list[str]:
    """`key: saved -> new` for every resolved key that differs, except RESUME_MAY_DIFFER."""
    old = _flatten(OmegaConf.to_container(saved, resolve=True))
    now = _flatten(OmegaConf.to_container(new, resolve=True))
    missing = object()
    differences = []
    for key in sorted(set(old) | set(now)):
        if any(key == k or key.startswith(k + ".") for k in RESUME_MAY_DIFFER):
            continue
        before, after = old.get(key, missing), now.get(key, missing)
        if before != after:
            shown = ["(absent)" if v is missing else repr(v) for v in (before, after)]
            differences.append(f"{key}: {shown[0]} -> {shown[1]}")
    return differences


def checkpoint_candidates(run_dir: Path) -> list[Path]:
    """The checkpoints a run directory can hold: ModelCheckpoint's and Lightning's SLURM ones."""
    return sorted((run_dir / "checkpoints").glob("*.ckpt")) + sorted(run_dir.glob("hpc_ckpt_*.ckpt"))


def read_checkpoint_header(path: Path) -> dict[str, Any] | None:
    """epoch, global_step and data fingerprint of a complete, resumable checkpoint; else None.

    Loads with weights_only=True and mmap (tensors are mapped, not read): a truncated file has
    no zip directory at its end and fails here, as does any file torch cannot load.
    """
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - any failure means "not usable"
        log.warning("resume: skipping %s: it does not load (%s)", path, str(err).splitlines()[0][:200])
        return None
    if not isinstance(checkpoint, dict) or "loops" not in checkpoint or "optimizer_states" not in checkpoint:
        log.warning("resume: skipping %s: it holds no training state (weights only)", path)
        return None
    return {
        "epoch": int(checkpoint.get("epoch", -1)),
        "global_step": int(checkpoint.get("global_step", -1)),
        "data_fingerprint": checkpoint.get("data_fingerprint"),
    }


def newest_checkpoint(run_dir: Path, rename_unreadable: bool = True) -> Resume | None:
    """The complete checkpoint with the most training steps (ties: the newest file).

    A file that does not load is never used; with `rename_unreadable` (rank 0) it is renamed to
    `<name>.unreadable`, so that Lightning's checkpointing does not version around it, and the
    temporary files of interrupted saves are removed.
    """
    if rename_unreadable:  # a job killed while saving leaves its temporary file behind
        for leftover in [*(run_dir / "checkpoints").glob(".*.ckpt.*.tmp"), *run_dir.glob(".hpc_ckpt_*.tmp")]:
            log.info("resume: removing %s, left by a save that was interrupted", leftover)
            leftover.unlink(missing_ok=True)
    usable = []
    for path in checkpoint_candidates(run_dir):
        header = read_checkpoint_header(path)
        if header is None:
            if rename_unreadable:
                path.replace(path.with_name(path.name + ".unreadable"))
            continue
        usable.append((header["global_step"], path.stat().st_mtime, path, header))
    if not usable:
        return None
    *_, path, header = max(usable, key=lambda u: (u[0], u[1]))
    return Resume(path, header["epoch"], header["global_step"], header["data_fingerprint"])


def check_resume_data(resume: Resume, fingerprint: str) -> None:
    if resume.data_fingerprint is not None and resume.data_fingerprint != fingerprint:
        raise UserInputError(
            f"hydra.run.dir: {resume.checkpoint} was trained on other data (data fingerprint "
            f"{resume.data_fingerprint[:12]}..., the data now give {fingerprint[:12]}...)"
        )


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save to a temporary file in the checkpoint's directory, fsync, then rename into place.

    A job killed while saving leaves the previous checkpoint intact (and a `.<name>.*.tmp` file,
    which resuming ignores). Remote (fsspec URL) paths are written as Lightning writes them.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        path = Path(path)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as handle:
                torch.save(checkpoint, handle)
                handle.flush()
                os.fsync(handle.fileno())
        _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class CSVLogger(LightningCSVLogger):
    """Lightning's CSVLogger, except that a resumed run keeps the rows of its metrics.csv up to the
    checkpoint's step (`keep_until_step`, set by `build_loggers`) instead of starting it again."""

    def __init__(self, *args: Any, keep_until_step: int | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._keep_until_step = keep_until_step

    @property
    def experiment(self):
        if self._experiment is not None or self._keep_until_step is None:
            return super().experiment
        path = Path(self.log_dir) / "metrics.csv"
        header, rows = [], []
        if path.is_file():
            with open(path, newline="") as handle:
                reader = csv.DictReader(handle)
                header = list(reader.fieldnames or [])
                rows = [
                    r
                    for r in reader
                    if r.get("step", "").isdigit() and int(r["step"]) <= self._keep_until_step
                ]
            # A row with more values than the header (DictReader files them under None) was written
            # by a save that the requeue signal interrupted after Lightning had widened its keys but
            # before it rewrote the header: its values no longer line up with any column.
            misaligned = [r for r in rows if None in r]
            if misaligned:
                log.warning("%s: %d rows with more values than columns left out", path, len(misaligned))
                rows = [r for r in rows if None not in r]
        experiment = super().experiment  # Lightning's writer removes the old file here
        if experiment is not None and header:
            with open(path, "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=header)
                writer.writeheader()
                writer.writerows(rows)
            experiment.metrics_keys = sorted(header)
        return experiment
