"""Serving latency of the exported top-K scorer on the CPU: eager PyTorch, TorchScript, ONNX Runtime.

    python benchmarks/serving_latency.py [--model sasrec --items 12101 --max-len 50 --dim 64 --blocks 2 --k 10]
        [--batches 1 256 --runtimes eager torchscript onnxruntime --repeats 100 --warmup 10]

Builds a model of the Amazon Beauty size (12,101 items, 50 positions, d = 64, 2 blocks) with
random weights (latency does not depend on what was learned), wraps it in `recsys.serving.export.TopKScorer`
(history (B, max_len) -> top-k scores and items, seen items excluded) and exports it with
`export_torchscript` / `export_onnx` into a temporary directory. For each runtime and batch size it
times one request, one call on a batch of B right-padded histories of random lengths 1..max_len,
`--repeats` times after `--warmup` untimed calls, and prints one JSON line per (runtime, batch):
the median and 90th-percentile milliseconds per request and the users scored per second. Threads
are left as the environment sets them (torch's default, ONNX Runtime's default) unless --threads
sets both. Other processes on a small machine inflate latency a lot: each line records torch's
thread count, the load average at the start and the share of the CPUs' time that other processes
took while that figure was timed (other_processes_cpu_share, from /proc/stat). The exported
runtimes are checked to return eager PyTorch's top-k items first. Each runtime can be timed in a
process of its own with --runtimes (a serving process holds only one; the thread pools of the
others may still be spinning when the next one is timed).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from report import emit, pick_device, timed

from recsys.models.bert4rec import BERT4Rec
from recsys.models.gru4rec import GRU4Rec
from recsys.models.network import DataInfo
from recsys.models.sasrec import SASRec
from recsys.serving.export import TopKScorer, export_onnx, export_torchscript

RUNTIMES = ("eager", "torchscript", "onnxruntime")


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    if args.model == "sasrec":
        return SASRec(DataInfo(args.items), max_len=args.max_len, dim=args.dim, num_blocks=args.blocks)
    if args.model == "bert4rec":
        return BERT4Rec(DataInfo(args.items), max_len=args.max_len, dim=args.dim, num_blocks=args.blocks)
    return GRU4Rec(DataInfo(args.items), max_len=args.max_len, dim=args.dim)


def busy_cpu_seconds() -> tuple[float, float, float] | None:
    """(CPU seconds all processes have been busy, this process's CPU seconds, wall seconds), to tell
    how much of the machine other processes took while timing; None off Linux."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(value) for value in stat.readline().split()[1:]]
    except OSError:
        return None
    idle = fields[3] + fields[4]  # idle and iowait
    times = os.times()
    return (sum(fields) - idle) / os.sysconf("SC_CLK_TCK"), times.user + times.system, time.perf_counter()


def others_share(before, after) -> float | None:
    """Fraction of all the CPUs' time that other processes were busy between before and after."""
    if before is None or after is None:
        return None
    others = (after[0] - before[0]) - (after[1] - before[1])
    return round(max(others, 0.0) / ((after[2] - before[2]) * (os.cpu_count() or 1)), 3)


def histories(batch: int, width: int, items: int, generator: torch.Generator) -> torch.Tensor:
    ids = torch.randint(1, items + 1, (batch, width), generator=generator)
    lengths = torch.randint(1, width + 1, (batch, 1), generator=generator)
    return ids * (torch.arange(width) < lengths)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=["sasrec", "bert4rec", "gru4rec"], default="sasrec")
    parser.add_argument("--items", type=int, default=12101)
    parser.add_argument("--max-len", type=int, default=50)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 256])
    parser.add_argument("--runtimes", nargs="+", choices=RUNTIMES, default=list(RUNTIMES))
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="intra-op threads of torch and ONNX Runtime; default: as the environment sets them",
    )
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--device", choices=["cpu"], default="cpu", help="serving on the CPU only")
    args = parser.parse_args()
    device = pick_device(args.device)
    options = onnxruntime.SessionOptions()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
        options.intra_op_num_threads = args.threads
    torch.manual_seed(0)
    scorer = TopKScorer(build_model(args), args.k)
    config = {
        **vars(args),
        "weights": "random",
        "torch_threads": torch.get_num_threads(),
        "onnxruntime_threads": options.intra_op_num_threads or "default",
        "onnxruntime": onnxruntime.__version__,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        # Other processes on the machine inflate latency: the 1-minute load average at the start.
        "load_average_1min": round(os.getloadavg()[0], 2),
    }

    with tempfile.TemporaryDirectory() as directory:
        traced = torch.jit.load(str(export_torchscript(scorer, Path(directory) / "model.ts")))
        session = onnxruntime.InferenceSession(
            str(export_onnx(scorer, Path(directory) / "model.onnx")),
            options,
            providers=["CPUExecutionProvider"],
        )

    def onnx_run(history: torch.Tensor):
        return session.run(["scores", "items"], {"history": history.numpy()})

    runtimes = {"eager": scorer, "torchscript": traced, "onnxruntime": onnx_run}
    runtimes = {name: runtimes[name] for name in args.runtimes}
    generator = torch.Generator().manual_seed(1)
    for batch in args.batches:
        history = histories(batch, scorer.width, args.items, generator)
        with torch.inference_mode():
            expected = scorer(history)[1].numpy()
            for name, run in runtimes.items():
                if name != "eager" and not np.array_equal(np.asarray(run(history)[1]), expected):
                    raise SystemExit(f"{name}: top-{args.k} items differ from eager PyTorch's")
        for name, run in runtimes.items():
            before = busy_cpu_seconds()
            with torch.inference_mode():
                times = timed(
                    lambda run=run, history=history: run(history), device, args.repeats, args.warmup
                )
            after = busy_cpu_seconds()
            milliseconds = sorted(1000 * t for t in times)
            median = statistics.median(milliseconds)
            emit(
                "serving_latency",
                device,
                config,
                runtime=name,
                batch=batch,
                latency_ms_median=round(median, 3),
                latency_ms_p90=round(milliseconds[int(0.9 * (len(milliseconds) - 1))], 3),
                users_per_second=round(batch / median * 1000, 1),
                # Above a few per cent the figures are inflated by the machine's other work.
                other_processes_cpu_share=others_share(before, after),
            )


if __name__ == "__main__":
    main()
