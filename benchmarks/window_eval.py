"""Test-pass time and memory of `evaluation.targets=window` against `next`, as train.py evaluates.

    python benchmarks/window_eval.py [--repeats 3] [key=value ...]

Composes the Hydra config (`configs/train.yaml`, by default `experiment=sasrec_ce
data=amazon_beauty_time data.split=time data.test_window=30D`, plus the overrides), builds the data
module and the model through `recsys.models.from_config` (weights as initialised: the cost of
ranking does not depend on them), and times the test pass (`trainer.test`) under each target mode,
each in a fresh process so that each peak resident set is its own. Prints one JSON line per mode
and one with the window / next ratios.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
DEFAULTS = ["experiment=sasrec_ce", "data=amazon_beauty_time", "data.split=time", "data.test_window=30D"]


def rss_mb() -> float:
    """The process's resident set now (Linux /proc), in MB."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize() / 2**20


def measure(targets: str, repeats: int, overrides: list[str]) -> dict:
    from recsys.models.from_config import build_model, data_info

    OmegaConf.register_new_resolver("project_root", lambda: str(ROOT), replace=True)
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(
            "train", overrides=["logger=none", *DEFAULTS, *overrides, f"evaluation.targets={targets}"]
        )
    datamodule = instantiate(cfg.data, targets=targets)
    datamodule.setup()
    pl.seed_everything(cfg.seed, verbose=False)
    model = build_model(cfg, data_info(datamodule))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    before = rss_mb()
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        results = trainer.test(model, datamodule=datamodule, verbose=False)[0]
        seconds.append(time.perf_counter() - started)
    counts = datamodule.evaluation_counts("test")
    return {
        "benchmark": "window_eval",
        "targets": targets,
        "overrides": [*DEFAULTS, *overrides],
        "device": f"cpu ({torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "users": counts["test/users"],
        "targets_ranked": counts.get("test/targets", counts["test/users"]),
        "test_seconds_median": round(statistics.median(seconds), 3),
        "test_seconds": [round(s, 3) for s in seconds],
        "rss_before_test_mb": round(before, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "test_ndcg@10": results["test/ndcg@10"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mode", choices=["next", "window"], help=argparse.SUPPRESS)  # one child process
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for train.py")
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(measure(args.mode, args.repeats, args.overrides)))
        return
    lines = {}
    for mode in ("next", "window"):
        command = [sys.executable, __file__, "--mode", mode, "--repeats", str(args.repeats), *args.overrides]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        lines[mode] = json.loads(output.strip().splitlines()[-1])
        print(json.dumps(lines[mode]))
    next_, window = lines["next"], lines["window"]
    print(
        json.dumps(
            {
                "benchmark": "window_eval_ratio",
                "time_ratio": round(window["test_seconds_median"] / next_["test_seconds_median"], 3),
                "peak_rss_ratio": round(window["peak_rss_mb"] / next_["peak_rss_mb"], 3),
                "test_rss_growth_mb": {
                    m: round(lines[m]["peak_rss_mb"] - lines[m]["rss_before_test_mb"], 1) for m in lines
                },
            }
        )
    )


if __name__ == "__main__":
    main()
