"""Epoch time, training throughput and peak memory of SASRec on amazon_beauty; prints one JSON line.

    python benchmarks/epoch_time.py [--epochs 3] [--batch-size 128] [--accelerator cpu|gpu]
                                    [--precision 32-true|bf16-mixed] [--compile] [--data PATH]

Trains through the same Lightning Trainer and datamodule as train.py (validation off) and reports
the median over epochs of the training-loop time. Peak memory is the process's maximum resident
set size on CPU, torch.cuda.max_memory_allocated on GPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.profilers import SimpleProfiler
from report import add_step_arguments, compile_setting

from recsys.data import SequenceDataModule
from recsys.losses import FullCrossEntropy
from recsys.models.network import DataInfo
from recsys.models.sasrec import SASRec
from recsys.training.callbacks import EpochTimer
from recsys.training.hardware import check_precision, compile_training, uses_cuda
from recsys.training.module import SequentialRecommender

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default=str(ROOT / "data" / "amazon_beauty" / "Beauty.txt.gz"))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--max-len", type=int, default=50)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--dropout", type=float, default=0.4)
    parser.add_argument(
        "--chunk-size", type=int, default=256, help="tokens per loss chunk; 0 = F.cross_entropy"
    )
    parser.add_argument("--no-bucketing", action="store_true", help="plain shuffled batches")
    parser.add_argument("--fused", action="store_true", help="the Triton loss kernels (loss.fused=true)")
    add_step_arguments(parser)
    parser.add_argument(
        "--device-batches", default="auto", help="auto | true | false (see configs/data/common.yaml)"
    )
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--profile", default=None, help="folder for Lightning's simple profiler report")
    parser.add_argument("--precision", default="32-true")
    args = parser.parse_args()
    torch.set_float32_matmul_precision("high")  # TF32 on a GPU, as train.py sets it (matmul_precision)

    pl.seed_everything(0, verbose=False)
    datamodule = SequenceDataModule(
        name="amazon_beauty",
        path=args.data,
        format="sequence",
        max_len=args.max_len,
        batch_size=args.batch_size,
        length_bucketing=not args.no_bucketing,
        device_batches=args.device_batches,
        static_shapes=args.static_shapes,
        cache_dir=str(ROOT / ".cache" / "data"),
    )
    datamodule.setup()
    windows = datamodule.train_windows()
    network = SASRec(
        DataInfo(datamodule.num_items),
        max_len=args.max_len,
        dim=args.dim,
        num_blocks=args.blocks,
        dropout=args.dropout,
    )
    loss = FullCrossEntropy(chunk_size=args.chunk_size or None, fused=args.fused)
    model = SequentialRecommender(network, loss=loss, static_step=args.static_shapes)
    compiled = compile_training(
        model, compile_setting(args), "cuda" if uses_cuda(args.accelerator) else "cpu"
    )
    timer = EpochTimer()
    trainer = pl.Trainer(
        accelerator=args.accelerator,
        devices=1,
        precision=check_precision(args.precision, args.accelerator),
        max_epochs=args.epochs,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
        profiler=SimpleProfiler(dirpath=args.profile, filename="profile") if args.profile else None,
    )
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    trainer.fit(model, datamodule=datamodule)
    total = time.perf_counter() - started
    epoch_seconds = statistics.median(timer.epoch_seconds)
    on_gpu = trainer.strategy.root_device.type == "cuda"
    peak_mb = (
        torch.cuda.max_memory_allocated() / 2**20
        if on_gpu
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    print(
        json.dumps(
            {
                "benchmark": "sasrec_epoch",
                "data": "amazon_beauty",
                "device": torch.cuda.get_device_name()
                if on_gpu
                else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
                "torch": torch.__version__,
                "epoch_seconds_median": round(epoch_seconds, 3),
                "epoch_seconds": [round(s, 3) for s in timer.epoch_seconds],
                "train_sequences_per_second": round(len(windows) / epoch_seconds, 1),
                "target_tokens_per_second": round(int((windows.lengths - 1).sum()) / epoch_seconds, 1),
                "peak_memory_mb": round(peak_mb, 1),
                "peak_memory_kind": "cuda_max_allocated" if on_gpu else "process_max_rss",
                "total_seconds": round(total, 1),
                "config": {**vars(args), "compiled": compiled},
            }
        )
    )


if __name__ == "__main__":
    main()
