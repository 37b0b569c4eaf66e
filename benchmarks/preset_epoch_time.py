"""Training-epoch time of any preset on any data set, built exactly as train.py builds it.

    python benchmarks/preset_epoch_time.py experiment=bert4rec data=amazon_beauty [--epochs 2] [key=value ...]

Composes the Hydra config (`configs/train.yaml` plus the overrides), builds the data module and the
model through `recsys.models.from_config`, trains for `--epochs` epochs without validation and
prints one JSON line with the median epoch time. Used for the wall-time columns of the presets
table: a full run's time to its best epoch is (best epoch + 1) x this epoch time, measured on an
otherwise idle machine rather than in runs that shared the CPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from recsys.models.from_config import build_model, check_model_config, data_info
from recsys.training.callbacks import EpochTimer

ROOT = Path(__file__).resolve().parents[1]
OmegaConf.register_new_resolver("project_root", lambda: str(ROOT), replace=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for train.py")
    args = parser.parse_args()

    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=["logger=none", *args.overrides])
    check_model_config(cfg)
    datamodule = instantiate(cfg.data)
    datamodule.setup()
    pl.seed_everything(cfg.seed, verbose=False)
    model = build_model(cfg, data_info(datamodule))
    timer = EpochTimer()
    trainer = pl.Trainer(
        accelerator=cfg.trainer.accelerator,
        devices=1,
        precision=cfg.trainer.precision,
        max_epochs=args.epochs,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    trainer.fit(model, datamodule=datamodule)
    print(
        json.dumps(
            {
                "benchmark": "preset_epoch",
                "overrides": args.overrides,
                "model": type(model).__name__,
                "loss": type(model.loss).__name__ if getattr(model, "loss", None) is not None else None,
                "data": cfg.data.name,
                "device": f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"
                if trainer.strategy.root_device.type == "cpu"
                else torch.cuda.get_device_name(),
                "torch": torch.__version__,
                "epoch_seconds_median": round(statistics.median(timer.epoch_seconds), 2),
                "epoch_seconds": [round(s, 2) for s in timer.epoch_seconds],
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
