"""The loggers of a run (the `logger` config group), W&B's run id and its end-of-run results."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from recsys.errors import UserInputError
from recsys.runs.files import WANDB_ID_FILE, write_text_atomic
from recsys.runs.provenance import launch_rank


def default_wandb_mode() -> None:
    """W&B stays offline unless the user asked for online (WANDB_MODE) or gave a key."""
    if "WANDB_MODE" not in os.environ and not os.environ.get("WANDB_API_KEY"):
        os.environ["WANDB_MODE"] = "offline"


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
                resumable_csv = node.get("_target_") == "recsys.training.resume.CSVLogger"
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
