"""Run directories: atomic writes, the one-line error exit, and the metrics summary.

Nothing the user gave is overwritten: files are written to a temporary name and renamed into
place, a finished run's directory is never reused, and a run that fails on bad input before it
wrote anything leaves no directory behind.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from recsys.errors import UserInputError

log = logging.getLogger(__name__)

# The W&B run id of a run directory, kept so that a resumed run continues the same W&B run.
WANDB_ID_FILE = "wandb_run_id"


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in payload.items()}
    write_text_atomic(path, json.dumps(clean, indent=2, sort_keys=True) + "\n")


def write_config(path: str | os.PathLike, cfg: DictConfig) -> None:
    write_text_atomic(path, OmegaConf.to_yaml(cfg, resolve=True))


def default_wandb_mode() -> None:
    """W&B stays offline unless the user asked for online (WANDB_MODE) or gave a key."""
    if "WANDB_MODE" not in os.environ and not os.environ.get("WANDB_API_KEY"):
        os.environ["WANDB_MODE"] = "offline"


def run_with_user_errors(run_dir: Path, body: Callable[[], Any]) -> Any:
    """Run `body`; on bad input print one line and exit 2, removing a run dir that holds only logs."""
    try:
        return body()
    except (UserInputError, OmegaConfBaseException) as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if isinstance(err, OmegaConfBaseException) and getattr(err, "full_key", None):
            message = f"config key {err.full_key}: {message}"
        _remove_if_only_logs(run_dir)
        print(f"error: {message}", file=sys.stderr)
        logging.shutdown()
        sys.exit(2)


def _remove_if_only_logs(run_dir: Path) -> None:
    if not run_dir.is_dir():
        return
    if all(p.is_file() and (p.suffix == ".log" or p.name == WANDB_ID_FILE) for p in run_dir.iterdir()):
        logging.shutdown()  # close Hydra's log file before removing it
        shutil.rmtree(run_dir, ignore_errors=True)


def format_table(metrics: dict[str, float], prefix: str, ks) -> str:
    """A plain-text table, one row per K: HR, NDCG, MRR."""
    lines = [f"{'K':>4} {'HR':>8} {'NDCG':>8} {'MRR':>8}"]
    for k in ks:
        row = [metrics.get(f"{prefix}/{name}@{k}", math.nan) for name in ("hr", "ndcg", "mrr")]
        lines.append(f"{k:>4} " + " ".join(f"{v:8.4f}" for v in row))
    return "\n".join(lines)


def launch_rank() -> int:
    """This process's global rank as the launcher set it (0 for a single process)."""
    from pytorch_lightning.utilities.rank_zero import rank_zero_only

    return int(getattr(rank_zero_only, "rank", 0) or 0)


def git_state(directory: str | os.PathLike) -> dict[str, Any]:
    """{"commit": HEAD's hash, "dirty": uncommitted changes to tracked files}; None where unknown."""
    import subprocess

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", *args], cwd=directory, capture_output=True, text=True, timeout=10, check=True
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip()

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit or None, "dirty": None if status is None else bool(status)}


def wandb_run_id(run_dir: Path, rank: int = 0) -> str | None:
    """The W&B run id of this run directory: the one it was started with, or a new one (rank 0)."""
    path = run_dir / WANDB_ID_FILE
    if path.exists():
        return path.read_text().strip() or None
    if rank != 0:
        return None  # only rank 0 logs to W&B
    import secrets
    import string

    run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))  # as W&B's
    write_text_atomic(path, run_id + "\n")
    return run_id


def is_wandb_config(node: Any) -> bool:
    return str(node.get("_target_", "")).endswith("WandbLogger")


def build_loggers(
    logger_cfg: DictConfig | None, run_dir: Path, resume_step: int | None = None
) -> tuple[list[Any], dict[str, bool]]:
    """Instantiate the `logger` group: every entry but W&B as configured; W&B with this run
    directory's run id (`resume="allow"`: a resumed run continues its W&B run) and without its
    `artifacts` switches, which train.py applies at the end (returned as the second item). On a
    resume (`resume_step`: the checkpoint's global step) our CSVLogger keeps the earlier rows."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    loggers, artifacts = [], {}
    for name, node in (logger_cfg or {}).items():
        if node is None:
            continue
        try:
            if not is_wandb_config(node):
                resumable_csv = node.get("_target_") == "recsys.resume.CSVLogger"
                loggers.append(
                    instantiate(node, **({"keep_until_step": resume_step} if resumable_csv else {}))
                )
                continue
            options = OmegaConf.to_container(node, resolve=True)
            artifacts = {k: bool(v) for k, v in (options.pop("artifacts", None) or {}).items()}
            options.setdefault("id", wandb_run_id(run_dir, launch_rank()))
            options.setdefault("resume", "allow")
            loggers.append(instantiate(options))
        except InstantiationException as err:
            if isinstance(err.__cause__, ImportError):  # e.g. logger=tensorboard without tensorboard
                first = str(err.__cause__).strip().splitlines()[0]
                raise UserInputError(f"logger.{name}: {first} (or choose logger=wandb|csv|none)") from None
            raise
    return loggers, artifacts


def log_wandb_results(
    logger: Any,
    run_dir: Path,
    metrics: dict[str, Any],
    best_checkpoint: str | None,
    artifacts: dict[str, bool],
) -> None:
    """The end of a W&B run: final metrics as its summary, and as artifacts (if switched on) the
    results files (per_user.parquet, slices.csv, metrics.json, plus slices.csv as a W&B table) and
    the best checkpoint. Files are referenced, not copied (policy "immutable"): an offline run
    reads them from the run directory when it is synced."""
    import wandb

    run = logger.experiment
    run.summary.update({k: v for k, v in metrics.items() if isinstance(v, (int, float, str))})
    if artifacts.get("results", False):
        results = wandb.Artifact(f"results-{run.id}", type="results", metadata={"data": metrics.get("data")})
        for name in ("per_user.parquet", "slices.csv", "metrics.json"):
            if (run_dir / name).is_file():
                results.add_file(str(run_dir / name), policy="immutable")
        run.log_artifact(results)
        if (run_dir / "slices.csv").is_file():
            import pandas as pd

            run.log({"test/slices": wandb.Table(dataframe=pd.read_csv(run_dir / "slices.csv"))})
    if artifacts.get("best_checkpoint", False) and best_checkpoint and Path(best_checkpoint).is_file():
        metadata = {
            k: metrics.get(k) for k in ("best_epoch", "val/ndcg@10", "test/ndcg@10", "data_fingerprint")
        }
        model = wandb.Artifact(f"model-{run.id}", type="model", metadata=metadata)
        model.add_file(str(best_checkpoint), name="best.ckpt", policy="immutable")
        run.log_artifact(model, aliases=["best", "latest"])
    run.finish()  # flushes the artifacts; the next run of a sweep in this process is a new W&B run
