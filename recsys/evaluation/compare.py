"""Is run B really better than run A, by how much, and how sure are we? Paired comparisons of runs.

Every evaluated run leaves `per_user.parquet`: one row per test user with the target's rank and
every metric. Runs evaluated on the same users and targets are compared *paired*, user by user:

- each run's mean with a 95% t confidence interval over users;
- against the first run (the baseline): the mean paired difference, a paired bootstrap percentile
  interval (users resampled with replacement, seeded), the paired t-test p-value, the Wilcoxon
  signed-rank p-value, and with more than one challenger the Holm-corrected p-value (per metric,
  over the challengers, from the larger of the two tests' p-values);
- runs whose configs differ only in their seeds are also summarised as one row: the mean over
  seeds with a t interval over seeds (the spread that matters when the seed is the only change;
  recsys/evaluation/seeds.py, which also averages each user over a variant's seeds);
- a metric named `ips_<metric>` is the popularity-debiased one (recsys/evaluation/debiased.py):
  each user weighted by `ips_weight`, self-normalised, with delta-method intervals and p-values
  and a paired bootstrap of the weighted ratio (no Wilcoxon test: it has no weighted form here).

An unpaired test on these data would throw away the pairing and understate the evidence; a mean of
per-batch means would weight users unequally. Neither happens here.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import OmegaConf
from scipy import stats

from recsys.errors import UserInputError
from recsys.evaluation.debiased import (
    PREFIX,
    WEIGHT_COLUMN,
    ips_bootstrap_interval,
    ips_mean,
    ips_paired_pvalue,
)

KEY_COLUMNS = ("user_id", "target_item_id", "rank")
# Under evaluation.targets=window a row holds all of a user's targets (recsys/evaluation/results.py).
WINDOW_KEY_COLUMNS = ("user_id", "target_item_ids", "rank")


def target_column(frame: pd.DataFrame) -> str:
    """The column naming a row's target(s): one item, or the list of a user's window targets."""
    return "target_item_ids" if "target_item_ids" in frame.columns else "target_item_id"


def _targets_key(frame: pd.DataFrame) -> list:
    """Each row's target(s) in a form that compares equal when they are the same."""
    return [tuple(t) if not np.isscalar(t) else t for t in frame[target_column(frame)]]


@dataclass
class RunResults:
    name: str
    path: Path
    per_user: pd.DataFrame  # sorted by user_id
    config_key: str | None  # the run's config without seeds and paths, for grouping seeds


# Config keys that say where a run is, never what it learns: left out of the key, so that runs
# copied elsewhere (results/protocol_study) still group by their seeds.
_NOT_IN_KEY = ("seed", "paths", "cache_dir", "dirpath", "default_root_dir", "save_dir", "output_dir")


# Keys added to the configs after runs had been written, each with the value that does what those
# runs did: a config without one groups with the runs that have it at that value.
_LATER_KEYS = {
    ("evaluation", "ips_gamma"): 0.5,
    ("model", "block"): "transformer",
    ("model", "id_dropout"): 0.0,
    ("data", "static_shapes"): False,
    ("data", "batch_times"): False,
    ("model", "time_bias"): False,
}


def _with_later_keys(config: dict) -> dict:
    for (group, key), value in _LATER_KEYS.items():
        node = config.setdefault(group, {})
        if isinstance(node, dict):
            node.setdefault(key, value)
    return config


# The data group's file keys: where its files were read from, which differs between checkouts and
# clusters. Where the run recorded the data's fingerprint (the files' bytes and every setting that
# changes the data), the fingerprint stands in for them.
_DATA_FILE_KEYS = ("path", "test_path", "times_path", "item_features")


def _config_key(run_dir: Path) -> str | None:
    """The run's resolved config with every seed and path removed, as a canonical string; the data
    files named by the data's fingerprint where the run's metrics.json has one."""
    config = run_dir / "config.yaml"
    metrics = run_dir / "metrics.json"
    recorded = json.loads(metrics.read_text()) if metrics.is_file() else {}
    if not config.is_file():
        ckpt = recorded.get("ckpt_path")  # an evaluate.py output points at its checkpoint's run
        if ckpt:
            config = Path(ckpt).parent.parent / "config.yaml"
    if not config.is_file():
        return None
    own_dir = str(config.parent.resolve())

    def inside_run(value) -> bool:  # e.g. trainer.default_root_dir, logger save_dir: the run's own
        return isinstance(value, str) and (value == own_dir or value.startswith(own_dir + "/"))

    def strip(node):
        if isinstance(node, dict):
            # A key set to null is a key the run did not set: configs written before a new
            # optional key existed group with those that leave it null (a group left empty too).
            kept = {k: strip(v) for k, v in node.items() if k not in _NOT_IN_KEY and not inside_run(v)}
            return {k: v for k, v in kept.items() if v is not None and v != {}}
        if isinstance(node, list):
            return [strip(v) for v in node]
        return node

    container = _with_later_keys(OmegaConf.to_container(OmegaConf.load(config), resolve=False))
    data = container.get("data")
    if recorded.get("data_fingerprint") and isinstance(data, dict):
        for key in _DATA_FILE_KEYS:
            data.pop(key, None)
        data["fingerprint"] = recorded["data_fingerprint"]
    return json.dumps(strip(container), sort_keys=True, default=str)


def load_run(path: str | Path, key: str = "compare") -> RunResults:
    """A run's per-user results, sorted by user; `key` names the option in errors."""
    path = Path(path)
    per_user = path / "per_user.parquet"
    if not path.is_dir():
        raise UserInputError(f"{key}: {path} is not a directory")
    if not per_user.is_file():
        raise UserInputError(f"{key}: {path} has no per_user.parquet (train.py and evaluate.py write it)")
    frame = pd.read_parquet(per_user)
    missing = [
        c
        for c in (WINDOW_KEY_COLUMNS if "target_item_ids" in frame.columns else KEY_COLUMNS)
        if c not in frame.columns
    ]
    if missing:
        raise UserInputError(f"{key}: {per_user} lacks the column(s) {missing}")
    if frame["user_id"].duplicated().any():
        raise UserInputError(f"{key}: {per_user} has more than one row for some users")
    frame = frame.sort_values("user_id", kind="stable").reset_index(drop=True)
    return RunResults(path.name, path, frame, _config_key(path))


def check_paired(runs: Sequence[RunResults], key: str = "compare") -> None:
    """Refuse runs that were not evaluated on exactly the same users and targets."""
    base = runs[0].per_user
    for run in runs[1:]:
        other = run.per_user
        same = len(other) == len(base) and (
            (other["user_id"].to_numpy() == base["user_id"].to_numpy()).all()
            and _targets_key(other) == _targets_key(base)
        )
        if not same:
            raise UserInputError(
                f"{key}: {run.path} was evaluated on other users or targets than {runs[0].path} "
                f"({len(other)} vs {len(base)} users); paired comparison needs the same ones"
            )


def mean_interval(values: np.ndarray, confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean and its two-sided t confidence interval."""
    values = np.asarray(values, dtype=np.float64)
    mean = float(values.mean())
    if len(values) < 2:
        return mean, math.nan, math.nan
    half = stats.t.ppf(0.5 + confidence / 2, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def paired_bootstrap_interval(
    differences: np.ndarray, samples: int = 10_000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile interval of the mean paired difference, resampling users with replacement."""
    differences = np.asarray(differences, dtype=np.float64)
    rng = np.random.default_rng(seed)
    n = len(differences)
    means = np.empty(samples)
    chunk = max(1, 2_000_000 // max(n, 1))  # keep each block of indices around 16 MB
    for begin in range(0, samples, chunk):
        size = min(chunk, samples - begin)
        means[begin : begin + size] = differences[rng.integers(0, n, (size, n))].mean(axis=1)
    alpha = 1.0 - confidence
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def paired_t_pvalue(a: np.ndarray, b: np.ndarray) -> float:
    differences = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    if np.all(differences == differences[0]):
        return 1.0 if differences[0] == 0 else 0.0  # no variance: identical, or a constant shift
    return float(stats.ttest_rel(b, a).pvalue)


def wilcoxon_pvalue(a: np.ndarray, b: np.ndarray) -> float:
    differences = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    if not np.any(differences != 0):
        return 1.0
    return float(stats.wilcoxon(differences).pvalue)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the input order."""
    p = np.asarray(pvalues, dtype=np.float64)
    m = len(p)
    order = np.argsort(p, kind="stable")
    adjusted = np.empty(m)
    running = 0.0
    for i, index in enumerate(order):
        running = max(running, min(1.0, (m - i) * p[index]))
        adjusted[index] = running
    return adjusted.tolist()


def compare_runs(
    runs: Sequence[RunResults],
    metrics: Sequence[str] = ("ndcg@10", "hr@10", "mrr@10"),
    confidence: float = 0.95,
    bootstrap_samples: int = 10_000,
    seed: int = 0,
) -> pd.DataFrame:
    """One row per (metric, run): mean and interval; for challengers, the paired statistics."""
    if len(runs) < 2:
        raise UserInputError(f"compare: needs at least two runs, got {len(runs)}")
    check_paired(runs)
    for name in metrics:
        column = _metric_column(name)
        missing = [str(r.path) for r in runs if column not in r.per_user.columns]
        if column != name:
            unweighted = [str(r.path) for r in runs if WEIGHT_COLUMN not in r.per_user.columns]
            if unweighted:
                raise UserInputError(
                    f"compare.metrics: {name!r} needs {WEIGHT_COLUMN} in per_user.parquet, which "
                    f"{unweighted[0]} lacks (evaluate it again with evaluation.ips_gamma set)"
                )
            weights = runs[0].per_user[WEIGHT_COLUMN].to_numpy()
            for run in runs[1:]:
                if not np.allclose(run.per_user[WEIGHT_COLUMN].to_numpy(), weights, rtol=1e-12, atol=0):
                    raise UserInputError(
                        f"compare.metrics: {name!r}: {run.path} has other {WEIGHT_COLUMN}s than "
                        f"{runs[0].path} (other training data or another evaluation.ips_gamma)"
                    )
        if missing:
            available = sorted(
                c
                for c in runs[0].per_user.columns
                if runs[0].per_user[c].dtype.kind in "iufb" and c not in KEY_COLUMNS
            )
            raise UserInputError(
                f"compare.metrics: no metric {name!r} in {missing[0]}; available: {available}"
            )
    rows = []
    for metric in metrics:
        column = _metric_column(metric)
        weights = runs[0].per_user[WEIGHT_COLUMN].to_numpy(np.float64) if column != metric else None
        base = runs[0].per_user[column].to_numpy(np.float64)
        block = []
        for index, run in enumerate(runs):
            values = run.per_user[column].to_numpy(np.float64)
            if weights is None:
                mean, low, high = mean_interval(values, confidence)
            else:
                mean, low, high = ips_mean(values, weights, confidence)
            row = {
                "metric": metric,
                "run": run.name,
                "path": str(run.path),
                "users": len(values),
                "mean": mean,
                "ci_low": low,
                "ci_high": high,
            }
            if index > 0 and weights is None:
                differences = values - base
                row["diff"] = float(differences.mean())
                row["diff_ci_low"], row["diff_ci_high"] = paired_bootstrap_interval(
                    differences, bootstrap_samples, confidence, seed
                )
                row["p_ttest"] = paired_t_pvalue(base, values)
                row["p_wilcoxon"] = wilcoxon_pvalue(base, values)
            elif index > 0:
                differences = values - base
                row["diff"] = float((weights * differences).sum() / weights.sum())
                row["diff_ci_low"], row["diff_ci_high"] = ips_bootstrap_interval(
                    differences, weights, bootstrap_samples, confidence, seed
                )
                row["p_ttest"] = ips_paired_pvalue(differences, weights)
                row["p_wilcoxon"] = math.nan
            block.append(row)
        challengers = block[1:]
        if len(challengers) > 1:
            adjusted = holm([float(np.nanmax([r["p_ttest"], r["p_wilcoxon"]])) for r in challengers])
            for row, p in zip(challengers, adjusted):
                row["p_holm"] = p
        rows.extend(block)
    columns = [
        "metric",
        "run",
        "path",
        "users",
        "mean",
        "ci_low",
        "ci_high",
        "diff",
        "diff_ci_low",
        "diff_ci_high",
        "p_ttest",
        "p_wilcoxon",
        "p_holm",
    ]
    return pd.DataFrame(rows).reindex(columns=columns)


def _metric_column(metric: str) -> str:
    """The per-user column a compared metric reads: `ips_ndcg@10` weights the `ndcg@10` column."""
    return metric[len(PREFIX) :] if metric.startswith(PREFIX) else metric


def _format_p(p: float) -> str:
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return ""
    if p < 1e-300:
        return "<1e-300"  # below what a double resolves
    return f"{p:.2e}" if p < 1e-3 else f"{p:.3f}"


def comparison_markdown(
    table: pd.DataFrame, seeds: pd.DataFrame | None = None, confidence: float = 0.95
) -> str:
    level = f"{round(confidence * 100)}%"
    lines = [
        f"Paired comparison against `{table['run'].iloc[0]}` ({int(table['users'].iloc[0])} users; {level} "
        "intervals: t over users for means, paired bootstrap for differences)",
        "",
        "| metric | run | mean [CI] | diff vs first [CI] | p (paired t) | p (Wilcoxon) | p (Holm) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in table.itertuples(index=False):
        mean = f"{row.mean:.4f} [{row.ci_low:.4f}, {row.ci_high:.4f}]"
        if isinstance(row.diff, float) and not math.isnan(row.diff):
            diff = f"{row.diff:+.4f} [{row.diff_ci_low:+.4f}, {row.diff_ci_high:+.4f}]"
        else:
            diff = "(baseline)"
        lines.append(
            f"| {row.metric} | {row.run} | {mean} | {diff} | {_format_p(row.p_ttest)} | "
            f"{_format_p(row.p_wilcoxon)} | {_format_p(row.p_holm)} |"
        )
    if table["metric"].str.startswith(PREFIX).any():
        lines += [
            "",
            f"`{PREFIX}*`: popularity-debiased (each user weighted by `{WEIGHT_COLUMN}`, self-normalised; "
            "delta-method intervals and t-test, a paired bootstrap of the weighted ratio; no Wilcoxon).",
        ]
    if seeds is not None and len(seeds):
        lines += [
            "",
            f"Runs that differ only in their seed (mean over seeds, {level} t interval over seeds)",
            "",
            "| metric | runs | seeds | mean [CI] | std |",
            "|---|---|---|---|---|",
        ]
        for row in seeds.itertuples(index=False):
            lines.append(
                f"| {row.metric} | {row.runs} | {row.seeds} | {row.mean:.4f} [{row.ci_low:.4f}, "
                f"{row.ci_high:.4f}] | {row.std:.4f} |"
            )
    return "\n".join(lines) + "\n"
