"""Results tables for a set of runs: one row per run, from each run's metrics.json and config.yaml.

    python evaluate.py table=[logs/train/RUN_A,logs/train/RUN_B,...] [table_metrics=[test/ndcg@10,...]]

writes results.md, results.csv and results.tex into the evaluation's output directory.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf

from recsys.errors import UserInputError
from recsys.runs.files import atomic_path

DEFAULT_TABLE_METRICS = ("test/hr@10", "test/ndcg@10", "test/mrr@10", "val/ndcg@10")


def _short_target(config, key: str) -> str | None:
    node = OmegaConf.select(config, key)
    if node is None:
        return None
    return str(node).rsplit(".", 1)[-1]


def run_row(run_dir: str | Path, metrics: Sequence[str]) -> dict:
    run_dir = Path(run_dir)
    metrics_file = run_dir / "metrics.json"
    if not metrics_file.is_file():
        raise UserInputError(f"table: {run_dir} has no metrics.json (not a finished run)")
    values = json.loads(metrics_file.read_text())
    row: dict = {"run": run_dir.name}
    config_file = run_dir / "config.yaml"
    if config_file.is_file():
        config = OmegaConf.load(config_file)
        row["data"] = OmegaConf.select(config, "data.name")
        row["model"] = _short_target(config, "model._target_")
        row["loss"] = _short_target(config, "loss._target_") or _short_target(config, "model.loss._target_")
        row["seed"] = OmegaConf.select(config, "seed")
    for name in metrics:
        if name not in values:
            available = sorted(k for k, v in values.items() if isinstance(v, (int, float)))
            raise UserInputError(f"table_metrics: {metrics_file} has no {name!r}; available: {available}")
        row[name] = values[name]
    for extra in ("best_epoch", "epochs", "train_seconds", "epoch_seconds"):
        if extra in values:
            row[extra] = values[extra]
    return row


def results_table(
    run_dirs: Sequence[str | Path], metrics: Sequence[str] = DEFAULT_TABLE_METRICS
) -> pd.DataFrame:
    if not run_dirs:
        raise UserInputError("table: give at least one run directory")
    return pd.DataFrame([run_row(d, metrics) for d in run_dirs])


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.0f}"
    return "" if value is None else str(value)


def to_markdown(table: pd.DataFrame) -> str:
    header = "| " + " | ".join(table.columns) + " |"
    rule = "|" + "---|" * len(table.columns)
    rows = ["| " + " | ".join(_cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join([header, rule, *rows]) + "\n"


def to_latex(table: pd.DataFrame) -> str:
    def escape(text: str) -> str:
        for char in "\\&%$#_{}":
            text = text.replace(char, "\\" + char)
        return text

    lines = [
        "\\begin{tabular}{"
        + "".join("r" if pd.api.types.is_numeric_dtype(t) else "l" for t in table.dtypes)
        + "}",
        "\\toprule",
        " & ".join(escape(str(c)) for c in table.columns) + " \\\\",
        "\\midrule",
    ]
    lines += [" & ".join(escape(_cell(v)) for v in row) + " \\\\" for row in table.itertuples(index=False)]
    lines += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(lines) + "\n"


def write_tables(table: pd.DataFrame, out_dir: Path, stem: str = "results") -> None:
    for suffix, text in (("md", to_markdown(table)), ("tex", to_latex(table))):
        with atomic_path(out_dir / f"{stem}.{suffix}") as tmp:
            tmp.write_text(text)
    with atomic_path(out_dir / f"{stem}.csv") as tmp:
        table.to_csv(tmp, index=False)


def format_table(metrics: dict[str, float], prefix: str, ks) -> str:
    """A plain-text table, one row per K: HR, NDCG, MRR."""
    lines = [f"{'K':>4} {'HR':>8} {'NDCG':>8} {'MRR':>8}"]
    for k in ks:
        row = [metrics.get(f"{prefix}/{name}@{k}", math.nan) for name in ("hr", "ndcg", "mrr")]
        lines.append(f"{k:>4} " + " ".join(f"{v:8.4f}" for v in row))
    return "\n".join(lines)
