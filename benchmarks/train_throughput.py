"""Training throughput of SASRec, BERT4Rec or HSTU on a synthetic catalogue; prints one JSON line.

    python benchmarks/train_throughput.py --model sasrec --items 100000 --max-len 200 \
        [--batch-size 256] [--precision bf16-mixed] [--compile] [--steps 60] [--warmup 15] \
        [--width-multiple 8]

Generates Zipf-popular sequences with a learnable successor structure (`recsys.data.synthetic`),
trains through the same Lightning Trainer, data module (device batches on a GPU), model and loss
that train.py uses, and times `--steps` steps after `--warmup-epochs` whole epochs and `--warmup`
steps (compilation, allocator and per-shape kernel planning stay out; the warm-up's time is
reported as warmup_seconds). Reports target tokens/s (positions that carry a loss: every real position for SASRec, the
masked ones for BERT4Rec), input tokens/s, sequences/s, and model FLOPs utilisation against the
chip's dense bf16 peak: FLOPs counted as 6 x multiply-adds (forward + backward) of the blocks
(12 d^2 per real token plus 2 L d for attention) and of the output layer (items x d per target).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pytorch_lightning as pl
import torch
from report import (
    add_step_arguments,
    compile_setting,
    emit,
    peak_bf16_flops,
    peak_memory,
    reset_peak_memory,
    synchronize,
)

from recsys.data import SequenceDataModule
from recsys.data.sequences import SequenceData
from recsys.data.synthetic import generate_sequences
from recsys.losses import FullCrossEntropy
from recsys.models.bert4rec import BERT4Rec
from recsys.models.hstu import HSTU
from recsys.models.network import DataInfo
from recsys.models.sasrec import SASRec
from recsys.training.hardware import check_precision, compile_training
from recsys.training.module import SequentialRecommender


class StepTimer(pl.Callback):
    """Times `steps` training steps after a warm-up; counts real and target tokens without syncing.

    The warm-up is `warmup_epochs` whole epochs plus `warmup` steps. Whole epochs matter on a GPU:
    batches are trimmed to their longest sequence, and the first batch of each width pays for
    cuBLAS (and, where it is used, cuDNN) planning that later batches of that width do not
    (BENCHMARKS.md), so a few dozen steps at length 200 measure the planning, not training.
    """

    def __init__(self, warmup: int, warmup_epochs: int, steps: int):
        self.warmup_steps = warmup
        self.warmup_epochs = warmup_epochs
        self.steps_wanted = steps
        self.warmup = None
        self.fit_started = None
        self.started = None
        self.warmup_seconds = None
        self.steps = 0
        self.inputs = self.sequences = 0

    def on_train_start(self, trainer, module):
        self.warmup = self.warmup_steps + self.warmup_epochs * trainer.num_training_batches
        self.fit_started = time.perf_counter()

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == self.warmup and self.started is None:
            synchronize(module.device)
            reset_peak_memory(module.device)
            self.started = time.perf_counter()
            self.warmup_seconds = self.started - self.fit_started
        if self.started is not None:
            self.steps += 1
            self.inputs += (batch["input_ids"] != 0).sum()
            self.sequences += (batch["input_ids"][:, 0] != 0).sum()  # not data.static_shapes' empty rows

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if self.steps >= self.steps_wanted:
            trainer.should_stop = True

    def on_train_end(self, trainer, module):
        synchronize(module.device)
        self.seconds = time.perf_counter() - self.started


def _profiler(folder: str | None):
    """Lightning's wrapper of torch.profiler: a table of the ops by time (device time on a GPU)."""
    if folder is None:
        return None
    from pytorch_lightning.profilers import PyTorchProfiler

    sort = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    return PyTorchProfiler(dirpath=folder, filename="ops", sort_by_key=sort, row_limit=40)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=["sasrec", "bert4rec", "hstu"], default="sasrec")
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--users", type=int, default=50_000)
    parser.add_argument("--max-len", type=int, default=200)
    parser.add_argument("--mean-length", type=float, default=None, help="default: 3/4 of --max-len")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--heads", type=int, default=1)
    parser.add_argument("--precision", default="bf16-mixed")
    add_step_arguments(parser)
    parser.add_argument("--item-chunk-size", type=int, default=None)
    parser.add_argument("--fused", action="store_true", help="the Triton loss kernels (loss.fused=true)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=15, help="warm-up steps (after --warmup-epochs)")
    parser.add_argument(
        "--warmup-epochs", type=int, default=0, help="whole epochs of warm-up: every batch width seen once"
    )
    parser.add_argument(
        "--width-multiple",
        type=int,
        default=1,
        help="data.width_multiple: batch widths rounded up to a multiple",
    )
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--profile", default=None, help="folder for a torch.profiler table of the run")
    args = parser.parse_args()
    torch.set_float32_matmul_precision("high")  # TF32 on a GPU, as train.py sets it (matmul_precision)

    offsets, items = generate_sequences(
        args.users,
        args.items,
        min_length=10,
        max_length=args.max_len + 3,
        mean_length=args.mean_length,
        seed=0,
    )
    datamodule = SequenceDataModule(
        name="synthetic_benchmark",
        max_len=args.max_len,
        batch_size=args.batch_size,
        width_multiple=args.width_multiple,
        static_shapes=args.static_shapes,
    )
    datamodule.data = SequenceData(
        offsets=offsets,
        items=items,
        user_ids=np.arange(args.users),
        item_ids=np.arange(args.items + 1),
        fingerprint="synthetic-benchmark",
    )
    loss = FullCrossEntropy(item_chunk_size=args.item_chunk_size, fused=args.fused)
    model_class = {"sasrec": SASRec, "bert4rec": BERT4Rec, "hstu": HSTU}[args.model]
    network = model_class(
        DataInfo(args.items),
        max_len=args.max_len,
        dim=args.dim,
        num_blocks=args.blocks,
        num_heads=args.heads,
        dropout=0.2,
    )
    model = SequentialRecommender(network, loss=loss, static_step=args.static_shapes)
    masked_share = network.mask_prob if args.model == "bert4rec" else 1.0
    timer = StepTimer(args.warmup, args.warmup_epochs, args.steps)
    trainer = pl.Trainer(
        accelerator=args.accelerator,
        devices=1,
        precision=check_precision(args.precision, args.accelerator),
        max_epochs=-1,  # StepTimer stops the run after its steps
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
        profiler=_profiler(args.profile),
    )
    device = trainer.strategy.root_device
    compiled = compile_training(model, compile_setting(args), device.type)
    started = time.perf_counter()
    trainer.fit(model, datamodule=datamodule)
    total = time.perf_counter() - started

    inputs = int(timer.inputs)
    # SASRec, HSTU: every real input position has a target. BERT4Rec: about mask_prob of them are masked.
    targets = int(round(inputs * masked_share))
    width = args.max_len
    # Per token and block: a transformer's 4 d^2 projections and 8 d^2 feed-forward; HSTU's
    # d -> 4d (u, v, q, k at per-head width d / heads) and d -> d output, no feed-forward.
    projection_macs = 5 * args.dim**2 if args.model == "hstu" else 12 * args.dim**2
    block_macs = args.blocks * (projection_macs + 2 * width * args.dim) * inputs
    output_macs = args.items * args.dim * targets
    flops = 6 * (block_macs + output_macs)
    achieved = flops / timer.seconds
    peak = peak_bf16_flops(device)
    emit(
        "train_throughput",
        device,
        {**vars(args), "compiled": compiled, "data_events": int(len(items))},
        target_tokens_per_second=round(targets / timer.seconds, 1),
        input_tokens_per_second=round(inputs / timer.seconds, 1),
        sequences_per_second=round(int(timer.sequences) / timer.seconds, 1),
        step_ms=round(1000 * timer.seconds / timer.steps, 2),
        model_tflops_per_second=round(achieved / 1e12, 2),
        mfu_vs_bf16_peak=None if peak is None else round(achieved / peak, 4),
        warmup_seconds=round(timer.warmup_seconds, 1),
        total_seconds=round(total, 1),
        **peak_memory(device),
    )


if __name__ == "__main__":
    main()
