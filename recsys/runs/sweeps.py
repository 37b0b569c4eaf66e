"""Sweeps: one summary table per multirun, and W&B runs grouped by sweep.

    python train.py -m model=sasrec,bert4rec data=amazon_beauty        # a grid, one run per combination
    python train.py +hparams_search=sasrec_optuna                       # an Optuna search (configs/hparams_search/)
    python train.py -m hydra/launcher=slurm model.dropout=0.2,0.4       # the same on a SLURM cluster
    python -m recsys.runs.sweeps logs/multirun/<time>                        # (re)write a sweep's summary

`SweepSummary` is a Hydra callback (configs/train.yaml, `hydra.callbacks`). In a multirun it
- records each run's overrides in `<run dir>/overrides.yaml` when the run starts (in the run's own
  process, wherever the launcher put it), so that a run that fails is still listed with them;
- sets `WANDB_RUN_GROUP` to the sweep directory's name, so every run is its own W&B run and the
  runs of one sweep are grouped (unless the environment already names a group);
- writes `sweep_summary.csv` and `sweep_summary.md` into the sweep directory: one row per run with
  its overrides, validation and test metrics, best epoch and directory, best first; as each run
  ends (in the run's process) and once more when every run has returned (in the launching process,
  after a submitit launcher's jobs have finished too).

Runs without metrics.json are listed with status `failed`. A sweep whose launching process was
stopped (or a run killed outright) gets its summary from `python -m recsys.runs.sweeps SWEEP_DIR`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from recsys.runs.files import atomic_path, write_text_atomic

log = logging.getLogger(__name__)

OVERRIDES_FILE = "overrides.yaml"
SUMMARY_STEM = "sweep_summary"
SORT_METRIC = "val/ndcg@10"
SUMMARY_METRICS = ("val/ndcg@10", "test/ndcg@10", "test/hr@10", "best_epoch")


class SweepSummary(Callback):
    """Hydra callback: per-run overrides, W&B grouping, and the summary table of a multirun."""

    def __init__(self, metrics: Sequence[str] = SUMMARY_METRICS) -> None:
        self.metrics = tuple(metrics)
        self._group: str | None = None

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        run_dir = Path(config.hydra.runtime.output_dir)
        overrides = [str(o) for o in config.hydra.overrides.task]
        write_text_atomic(run_dir / OVERRIDES_FILE, OmegaConf.to_yaml(OmegaConf.create(overrides)))
        # Ours from an earlier run of this process, or the user's own: only ever fill it in.
        if os.environ.get("WANDB_RUN_GROUP") in (None, self._group):
            self._group = Path(str(config.hydra.sweep.dir)).name
            os.environ["WANDB_RUN_GROUP"] = self._group

    def on_job_end(self, config: DictConfig, job_return: Any = None, **kwargs: Any) -> None:
        # Rewritten as each run ends, so that a sweep that stops at a failed run (Hydra's sweepers
        # raise after the batch, skipping on_multirun_end) still leaves its summary.
        if config.hydra.mode != RunMode.MULTIRUN or _rank() != 0:
            return
        try:
            write_sweep_summary(Path(str(config.hydra.sweep.dir)), self.metrics)
        except OSError as err:  # concurrent runs of a sweep rewrite it too; the run itself is done
            log.warning(f"sweep summary not written: {err}")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        table = write_sweep_summary(sweep_dir, self.metrics)
        completed = int((table["status"] == "completed").sum()) if len(table) else 0
        log.info(
            f"sweep summary ({completed} of {len(table)} runs completed): {sweep_dir / SUMMARY_STEM}.md, .csv"
        )


def _rank() -> int:
    """This process's rank in a multi-process run, from the variables Lightning reads (0 otherwise)."""
    for name in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def find_runs(sweep_dir: str | os.PathLike) -> list[Path]:
    """Run directories under a sweep directory: those with overrides.yaml or metrics.json."""
    sweep_dir = Path(sweep_dir)
    runs = set()
    for name in (OVERRIDES_FILE, "metrics.json"):
        for path in sweep_dir.rglob(name):
            parts = path.relative_to(sweep_dir).parts
            if len(parts) > 1 and not any(p.startswith(".") for p in parts):
                runs.add(path.parent)
    return sorted(runs, key=lambda p: _natural_key(p.relative_to(sweep_dir).as_posix()))


def _natural_key(text: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def _read_overrides(run_dir: Path) -> list[str]:
    path = run_dir / OVERRIDES_FILE
    if not path.is_file():
        return []
    return [str(o) for o in OmegaConf.to_container(OmegaConf.load(path))]


def sweep_table(sweep_dir: str | os.PathLike, metrics: Sequence[str] = SUMMARY_METRICS) -> pd.DataFrame:
    """One row per run of the sweep, best `val/ndcg@10` first (failed runs last).

    Columns: `best` (the top run), `run` (its path under the sweep directory), `status` (`completed`
    when it wrote metrics.json, else `failed`), `overrides` (a list), the metrics, `run_dir`.
    """
    sweep_dir = Path(sweep_dir)
    rows = []
    for run_dir in find_runs(sweep_dir):
        metrics_file = run_dir / "metrics.json"
        values = json.loads(metrics_file.read_text()) if metrics_file.is_file() else None
        row: dict[str, Any] = {
            "run": run_dir.relative_to(sweep_dir).as_posix(),
            "status": "completed" if values is not None else "failed",
            "overrides": _read_overrides(run_dir),
        }
        for key in metrics:
            value = (values or {}).get(key)
            row[key] = None if isinstance(value, float) and math.isnan(value) else value
        row["run_dir"] = str(run_dir.resolve())
        rows.append(row)
    columns = ["best", "run", "status", "overrides", *metrics, "run_dir"]
    if not rows:
        return pd.DataFrame(columns=columns)
    table = pd.DataFrame(rows)
    for key in metrics:  # whole numbers (best_epoch) stay whole where a failed run leaves a gap
        present = [row[key] for row in rows if row[key] is not None]
        if present and all(isinstance(v, int) and not isinstance(v, bool) for v in present):
            table[key] = table[key].astype("Int64")
    if SORT_METRIC in table:
        table = table.sort_values(SORT_METRIC, ascending=False, na_position="last", kind="stable")
    table = table.reset_index(drop=True)
    # Sorted with missing values last: the first row is the best one if it has a value at all.
    has_value = table[SORT_METRIC].notna() if SORT_METRIC in table else False
    table["best"] = (table.index == 0) & has_value
    return table[columns]


def _cell(value: Any) -> str:
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value).replace("|", "\\|")


def summary_markdown(table: pd.DataFrame, sweep_dir: str | os.PathLike) -> str:
    """The table as Markdown: the overrides every run shares above it, each row only those that vary."""
    sweep_dir = Path(sweep_dir)
    split = list(table["overrides"])
    common = set.intersection(*(set(s) for s in split)) if split else set()
    completed = int((table["status"] == "completed").sum())
    lines = [
        f"# Sweep {sweep_dir.name}",
        "",
        f"`{sweep_dir.resolve()}`: {len(table)} runs, {completed} completed, {len(table) - completed} failed.",
    ]
    if common:
        lines.append(f"Overrides of every run: `{' '.join(o for o in split[0] if o in common)}`.")
    best = table[table["best"]]
    if len(best):
        lines.append(f"Best {SORT_METRIC}: run `{best['run'].iloc[0]}` ({best[SORT_METRIC].iloc[0]:.4f}).")
    results = sweep_dir / "optimization_results.yaml"
    if results.is_file():
        optuna = OmegaConf.load(results)
        if "best_params" in optuna:
            # With a stored study the best trial may be a run of an earlier sweep.
            where = ""
            if optuna.get("best_run_dir"):
                run_dir = Path(optuna.best_run_dir)
                inside = run_dir.resolve().is_relative_to(sweep_dir.resolve())
                where = (
                    f" (run `{run_dir.resolve().relative_to(sweep_dir.resolve()) if inside else run_dir}`)"
                )
            lines.append(
                f"Optuna (optimization_results.yaml): best value {optuna.best_value:.4f}{where} with "
                + ", ".join(f"{k}={v}" for k, v in optuna.best_params.items())
                + "."
            )
    metrics = [c for c in table.columns if c not in ("best", "run", "status", "overrides", "run_dir")]
    header = ["", "run", "status", "overrides", *metrics]
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row, own in zip(table.to_dict("records"), split):
        cells = [
            "**best**" if row["best"] else "",
            row["run"],
            row["status"],
            " ".join(f"`{o}`" for o in own if o not in common),
            *(row[m] for m in metrics),
        ]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def write_sweep_summary(
    sweep_dir: str | os.PathLike, metrics: Sequence[str] = SUMMARY_METRICS
) -> pd.DataFrame:
    """Write sweep_summary.csv and sweep_summary.md into the sweep directory (atomically); return the table."""
    sweep_dir = Path(sweep_dir)
    table = sweep_table(sweep_dir, metrics)
    with atomic_path(sweep_dir / f"{SUMMARY_STEM}.csv") as tmp:
        table.assign(overrides=table["overrides"].map(" ".join)).to_csv(tmp, index=False)
    write_text_atomic(sweep_dir / f"{SUMMARY_STEM}.md", summary_markdown(table, sweep_dir))
    return table


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    usage = "usage: python -m recsys.runs.sweeps SWEEP_DIR   (writes SWEEP_DIR/sweep_summary.md and .csv)"
    if args in (["-h"], ["--help"]):
        print(usage)
        return 0
    if len(args) != 1:
        print(usage, file=sys.stderr)
        return 2
    sweep_dir = Path(args[0])
    if not sweep_dir.is_dir():
        print(f"error: {sweep_dir}: not a directory", file=sys.stderr)
        return 2
    table = write_sweep_summary(sweep_dir)
    print(summary_markdown(table, sweep_dir), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
