"""Train a sequential recommender, test its best checkpoint, and write the run's results.

    python train.py                                   # SASRec on amazon_beauty (the default)
    python train.py data=amazon_sports trainer=gpu    # any config group / key by override
    python train.py -m model.dropout=0.2,0.5          # a sweep: one directory per run

The run directory (hydra.run.dir) receives config.yaml, checkpoints/, metrics.json, per_user.parquet
and the loggers' files. Pointed at the directory of an interrupted run, train.py resumes it from its
newest complete checkpoint (recsys/training/resume.py).
"""

from __future__ import annotations

import logging
import statistics
from pathlib import Path

import hydra
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import WandbLogger

from recsys.evaluation.debiased import check_gamma, debiased_metrics
from recsys.evaluation.metrics import check_seen_items
from recsys.evaluation.results import write_test_results
from recsys.evaluation.tables import format_table
from recsys.models.from_config import build_model, check_model_config, data_info
from recsys.runs.files import run_with_user_errors, write_config, write_json_atomic
from recsys.runs.loggers import build_loggers, default_wandb_mode, log_wandb_results
from recsys.runs.provenance import git_state, launch_rank
from recsys.training.callbacks import EpochTimer, TrainingState
from recsys.training.distributed import check_trainer_options, trainer_errors
from recsys.training.hardware import check_compile, check_precision, compile_training, uses_cuda
from recsys.training.resume import AtomicCheckpointIO, check_resume_data, plan_resume

log = logging.getLogger(__name__)
OmegaConf.register_new_resolver("project_root", lambda: str(Path(__file__).resolve().parent), replace=True)


def train(cfg: DictConfig, run_dir: Path) -> dict:
    # A finished run is refused; an interrupted one (config.yaml, a checkpoint, no metrics.json)
    # is resumed if its config is the same.
    resume = plan_resume(run_dir, cfg, rank=launch_rank())
    default_wandb_mode()
    torch.set_float32_matmul_precision(cfg.matmul_precision)
    check_model_config(cfg)  # a bad model or loss option fails now, before the data is read
    seen_items = check_seen_items(cfg.evaluation.seen_items)
    ips_gamma = check_gamma(cfg.evaluation.get("ips_gamma"))
    # So does a GPU asked for where there is none; bf16 where the GPU lacks it falls back.
    device_type = "cuda" if uses_cuda(cfg.trainer.accelerator) else "cpu"
    precision = check_precision(cfg.trainer.precision, cfg.trainer.accelerator)
    check_trainer_options(cfg.trainer)  # a strategy or devices that are not there, before the data
    check_compile(cfg.compile, bool(cfg.data.get("static_shapes", False)))
    # Reading and preprocessing are deterministic by themselves.
    datamodule = instantiate(
        cfg.data,
        seen_items=seen_items,
        max_users=cfg.evaluation.get("max_users"),
        cold_items=cfg.evaluation.get("cold_items", "drop"),
        cold_items_share=cfg.evaluation.get("cold_items_share"),
        targets=cfg.evaluation.get("targets", "next"),
    )
    datamodule.prepare_data()
    datamodule.setup("fit")
    if resume is not None:
        check_resume_data(resume, datamodule.fingerprint)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)  # Lightning's line would go to stderr
    log.info("seed %d", cfg.seed)
    model = build_model(cfg, data_info(datamodule))
    compile_training(model, cfg.compile, device_type)
    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c is not None]
    training_state = TrainingState()  # RNG states etc. in every checkpoint, for an exact resume
    callbacks.append(training_state)
    loggers, wandb_artifacts = build_loggers(cfg.logger, run_dir, resume.global_step if resume else None)
    with trainer_errors(cfg.trainer):  # a strategy or devices that are not there: one line
        trainer: pl.Trainer = instantiate(
            cfg.trainer,
            precision=precision,
            callbacks=callbacks,
            logger=loggers or False,
            plugins=[AtomicCheckpointIO()],  # a checkpoint file is complete or absent
        )
    write_config(run_dir / "config.yaml", cfg)
    provenance = {"git": git_state(cfg.paths.root_dir), "data_fingerprint": datamodule.fingerprint}
    for lg in loggers:
        lg.log_hyperparams({**OmegaConf.to_container(cfg, resolve=True), **provenance})

    if resume is not None:
        log.info("resuming from %s (epoch %d, step %d)", resume.checkpoint, resume.epoch, resume.global_step)
    ckpt_path = str(resume.checkpoint) if resume is not None else None
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    train_seconds = training_state.training_seconds()  # with the interrupted runs' training time

    # Test the best validation checkpoint, read back with weights_only=True. It is the one kept by
    # the checkpoint callback that monitors a metric, not last_checkpoint's (the latest epoch),
    # whatever order the callbacks config lists them in.
    best_path = next((c.best_model_path for c in trainer.checkpoint_callbacks if c.monitor), "")
    best_epoch = trainer.current_epoch - 1
    if best_path:
        checkpoint = torch.load(best_path, map_location="cpu", weights_only=True)
        model.load_state_dict(checkpoint["state_dict"])
        best_epoch = int(checkpoint["epoch"])
    val_metrics = trainer.validate(model, datamodule=datamodule, verbose=False)[0]
    test_metrics = trainer.test(model, datamodule=datamodule, verbose=False)[0]

    debiased = {}
    if trainer.is_global_zero:
        frame = write_test_results(datamodule, "test", model, run_dir, ips_gamma)
        if ips_gamma is not None:
            debiased = debiased_metrics(frame, "test")
    timer = next((c for c in callbacks if isinstance(c, EpochTimer)), None)
    epoch_seconds = timer.epoch_seconds if timer else []
    metrics = {
        **{k: float(v) for k, v in val_metrics.items() if k.startswith("val/")},
        **{k: float(v) for k, v in test_metrics.items() if k.startswith("test/")},
        **debiased,
        "ips_gamma": ips_gamma,
        "best_epoch": best_epoch,
        "epochs": trainer.current_epoch,
        "train_seconds": train_seconds,
        "epoch_seconds": statistics.median(epoch_seconds) if epoch_seconds else None,
        "best_checkpoint": str(Path(best_path).relative_to(run_dir)) if best_path else None,
        "data": cfg.data.name,
        "data_fingerprint": datamodule.fingerprint,
        "resumed_from": str(resume.checkpoint.relative_to(run_dir)) if resume is not None else None,
        "exclude_seen": datamodule.exclude_events if datamodule.exclude_events is not None else True,
        "seen_items": seen_items,
        "targets": datamodule.targets,
        **datamodule.evaluation_counts("val"),
        **datamodule.evaluation_counts("test"),
        "protocol": datamodule.protocol(),
    }
    if trainer.is_global_zero:
        write_json_atomic(run_dir / "metrics.json", metrics)
        for lg in loggers:
            if isinstance(lg, WandbLogger):
                log_wandb_results(lg, run_dir, metrics, best_path, wandb_artifacts)
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
