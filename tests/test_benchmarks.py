"""The benchmark scripts run and print one JSON line with their figures (tiny sizes, CPU)."""

import json
import re
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


def test_ingest_prints_its_table_and_appends_one_json_line(tmp_path):
    """benchmarks/ingest.py on 20,000 rows: a CSV file through every stage, and beside it a
    directory of parquet parts through preprocessing (each stage is a fresh Python process that
    spends most of its time importing torch)."""
    runs = {
        fmt: subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "benchmarks" / "ingest.py"),
                *("--rows", "20000", "--format", fmt, "--events", "--workdir", str(tmp_path / fmt)),
                *("--results", str(tmp_path / f"{fmt}.jsonl")),
                *(["--skip-datamodule"] if fmt == "parts" else []),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        for fmt in ("csv", "parts")
    }
    for fmt, process in runs.items():
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, (out + err)[-2000:]
        for stage in ("generate", "fingerprint", "preprocess", *(["datamodule"] if fmt == "csv" else [])):
            assert re.search(rf"^ +20,000 {fmt} +{stage} ", out, re.MULTILINE), out
        (line,) = (tmp_path / f"{fmt}.jsonl").read_text().splitlines()
        record = json.loads(line)
        assert record == json.loads(out.strip().splitlines()[-1])
        assert record["benchmark"] == "ingest" and record["rows"] == 20000 and record["format"] == fmt
        preprocess = record["stages"]["preprocess"]
        assert preprocess["stats"]["raw_interactions"] == 20000
        assert preprocess["cache_gb"] > 0 and preprocess["peak_rss_gb"] > 0
    assert record["stages"].keys() == {"generate", "fingerprint", "preprocess"}  # parts: --skip-datamodule
    assert json.loads((tmp_path / "csv.jsonl").read_text())["stages"]["datamodule"]["mapped"]
