"""The benchmark scripts run and print one JSON line with their figures (tiny sizes, CPU)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "script,args,figure",
    [
        (
            "loss.py",
            ["--items", "300", "--tokens", "64", "--dim", "8", "--impl", "chunked", "--repeats", "1"],
            "peak_memory_mb",
        ),
        (
            "loss.py",
            ["--items", "300", "--tokens", "64", "--dim", "8", "--impl", "full", "--repeats", "1"],
            "seconds_median",
        ),
        (
            "ranking.py",
            ["--items", "500", "--users", "40", "--dim", "8", "--chunk-size", "128"],
            "users_per_second",
        ),
        (
            "serving_latency.py",
            [
                "--items",
                "200",
                "--max-len",
                "8",
                "--dim",
                "16",
                "--repeats",
                "3",
                "--warmup",
                "1",
                "--batches",
                "2",
            ],
            "latency_ms_median",
        ),
        (
            "attention.py",
            ["--batch", "4", "--length", "8", "--dim", "16", "--repeats", "2", "--padding"],
            "sdpa_speedup",
        ),
        (
            "train_throughput.py",
            [
                "--items",
                "200",
                "--users",
                "60",
                "--max-len",
                "20",
                "--batch-size",
                "16",
                "--dim",
                "16",
                "--steps",
                "2",
                "--warmup",
                "1",
                "--warmup-epochs",
                "1",
                "--precision",
                "32-true",
                "--width-multiple",
                "8",
            ],
            "target_tokens_per_second",
        ),
    ],
)
def test_benchmark_prints_one_json_line(script, args, figure):
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / script),
            *args,
            "--device" if script != "train_throughput.py" else "--accelerator",
            "cpu",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert record[figure] is not None and record["device"].startswith("cpu")
