"""What every benchmark prints with its figures: the device, torch, peak memory, one JSON line."""

from __future__ import annotations

import json
import os
import platform
import resource
import time

import torch

# Dense bf16 tensor-core peak of the SXM H100 / H200 (vendor datasheet), for model FLOPs utilisation.
PEAK_BF16_FLOPS = {"H100": 989.4e12, "H200": 989.4e12}


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def peak_bf16_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for chip, peak in PEAK_BF16_FLOPS.items() if chip in name), None)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict:
    """CUDA: the allocator's peak since the last reset. CPU: the process's peak resident set size
    (everything, the Python interpreter and torch included; it cannot be reset)."""
    if device.type == "cuda":
        return {
            "peak_memory_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1),
            "peak_memory_kind": "cuda_max_allocated",
        }
    return {
        "peak_memory_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_memory_kind": "process_max_rss",
    }


def available_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def timed(step, device: torch.device, repeats: int, warmup: int = 1) -> list[float]:
    """Seconds of each of `repeats` calls of step() after `warmup` untimed ones."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - started)
    return times


def emit(benchmark: str, device: torch.device, config: dict, **figures) -> None:
    print(
        json.dumps(
            {
                "benchmark": benchmark,
                "device": describe(device),
                "torch": torch.__version__,
                **figures,
                "config": config,
                "date": time.strftime("%Y-%m-%d"),
            }
        ),
        flush=True,
    )


def add_step_arguments(parser) -> None:
    """The training-step options a training benchmark shares with train.py (`compile`,
    `data.static_shapes`); `compile_setting` turns them into the `compile` key's value."""
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the network (with --static-shapes: the whole step)",
    )
    parser.add_argument(
        "--static-shapes", action="store_true", help="data.static_shapes: fixed batch shapes, the masked step"
    )
    parser.add_argument(
        "--cuda-graphs", action="store_true", help="compile=reduce-overhead (needs --static-shapes)"
    )


def compile_setting(args) -> bool | str:
    return "reduce-overhead" if args.cuda_graphs else args.compile
