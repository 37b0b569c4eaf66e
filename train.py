"""Train a sequential recommender, test its best checkpoint, and write the run's results.

    python train.py                                   # SASRec on amazon_beauty (the default)
    python train.py data=amazon_sports trainer=gpu    # any config group / key by override
    python train.py -m model.dropout=0.2,0.5          # a sweep: one directory per run

The run directory (hydra.run.dir) receives config.yaml, checkpoints/, metrics.json, per_user.parquet
and the loggers' files.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import hydra
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import WandbLogger

from recsys.callbacks import EpochTimer
from recsys.errors import UserInputError
from recsys.hardware import check_precision, maybe_compile, uses_cuda
from recsys.models.from_config import build_model, check_model_config
from recsys.results import per_user_frame, slice_metrics, write_csv_atomic, write_parquet_atomic
from recsys.runs import (
    default_wandb_mode,
    format_table,
    run_with_user_errors,
    write_config,
    write_json_atomic,
)

OmegaConf.register_new_resolver("project_root", lambda: str(Path(__file__).resolve().parent), replace=True)


def train(cfg: DictConfig, run_dir: Path) -> dict:
    if (run_dir / "metrics.json").exists():
        raise UserInputError(f"hydra.run.dir: {run_dir} already holds a finished run; choose a new directory")
    default_wandb_mode()
    torch.set_float32_matmul_precision(cfg.matmul_precision)
    check_model_config(cfg)  # a bad model or loss option fails now, before the data is read
    # So does a GPU asked for where there is none; bf16 where the GPU lacks it falls back.
    device_type = "cuda" if uses_cuda(cfg.trainer.accelerator) else "cpu"
    precision = check_precision(cfg.trainer.precision, cfg.trainer.accelerator)
    datamodule = instantiate(cfg.data)  # reading and preprocessing are deterministic by themselves
    datamodule.prepare_data()
    datamodule.setup("fit")
    pl.seed_everything(cfg.seed, workers=True)
    model = build_model(cfg, datamodule)
    maybe_compile(model, cfg.compile, device_type)
    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c is not None]
    loggers = [instantiate(c) for c in cfg.logger.values() if c is not None] if cfg.logger else []
    trainer: pl.Trainer = instantiate(
        cfg.trainer,
        precision=precision,
        callbacks=callbacks,
        logger=loggers or False,
    )
    write_config(run_dir / "config.yaml", cfg)
    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    started = time.perf_counter()
    trainer.fit(model, datamodule=datamodule)
    train_seconds = time.perf_counter() - started

    # Test the best validation checkpoint, read back with weights_only=True.
    best_path = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    best_epoch = trainer.current_epoch - 1
    if best_path:
        checkpoint = torch.load(best_path, map_location="cpu", weights_only=True)
        model.load_state_dict(checkpoint["state_dict"])
        best_epoch = int(checkpoint["epoch"])
    val_metrics = trainer.validate(model, datamodule=datamodule, verbose=False)[0]
    test_metrics = trainer.test(model, datamodule=datamodule, verbose=False)[0]

    if trainer.is_global_zero:
        frame = per_user_frame(
            datamodule.data,
            "test",
            model.test_results["user"],
            model.test_results["rank"],
            model.ks,
            datamodule.train_item_counts(),
        )
        write_parquet_atomic(frame, run_dir / "per_user.parquet")
        write_csv_atomic(slice_metrics(frame), run_dir / "slices.csv")
    timer = next((c for c in callbacks if isinstance(c, EpochTimer)), None)
    epoch_seconds = timer.epoch_seconds if timer else []
    metrics = {
        **{k: float(v) for k, v in val_metrics.items() if k.startswith("val/")},
        **{k: float(v) for k, v in test_metrics.items() if k.startswith("test/")},
        "best_epoch": best_epoch,
        "epochs": trainer.current_epoch,
        "train_seconds": train_seconds,
        "epoch_seconds": statistics.median(epoch_seconds) if epoch_seconds else None,
        "best_checkpoint": str(Path(best_path).relative_to(run_dir)) if best_path else None,
        "data": cfg.data.name,
        "data_fingerprint": datamodule.fingerprint,
        "exclude_seen": True,
        "protocol": "leave-one-out, full ranking, seen items excluded, pessimistic ties",
    }
    if trainer.is_global_zero:
        write_json_atomic(run_dir / "metrics.json", metrics)
        for lg in loggers:
            if isinstance(lg, WandbLogger):
                lg.experiment.summary.update(
                    {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
                )
        print(f"\ntest metrics ({cfg.data.name}, best epoch {best_epoch}), run dir {run_dir}")
        print(format_table(metrics, "test", model.ks))
    return metrics


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    metrics = run_with_user_errors(run_dir, lambda: train(cfg, run_dir))
    return metrics.get("val/ndcg@10")  # what a sweeper optimises


if __name__ == "__main__":
    main()
