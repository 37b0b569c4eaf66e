"""Runs that differ only in their seeds: grouping them, naming a group, averaging each user's
metrics over a group's seeds (`evaluate.py compare ... average_seeds=true`) and the summary over
seeds that `comparison.md` shows beside the paired table (`recsys/evaluation/compare.py`)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from recsys.errors import UserInputError
from recsys.evaluation.compare import RunResults, _targets_key, check_paired, mean_interval, target_column

# Overrides that change what a run logs or where, not what it learns: left out of variant names.
_NOT_IN_NAMES = ("seed=", "logger", "trainer.enable_progress_bar", "callbacks.rich_progress_bar", "hydra.")


def seed_groups(runs: Sequence[RunResults]) -> list[list[RunResults]]:
    """Runs whose configs differ only in their seeds, grouped, in the order groups first appear;
    a run without a config is a group of its own."""
    groups: dict[str, list[RunResults]] = {}
    for run in runs:
        key = run.config_key if run.config_key is not None else f"no config: {run.path}"
        groups.setdefault(key, []).append(run)
    return list(groups.values())


def _group_name(members: Sequence[RunResults]) -> str:
    """A seed group's name: its first run's overrides without the seed (multiruns), else its
    first run's directory name; with the number of seeds."""
    overrides = members[0].path / "overrides.yaml"
    name = members[0].name
    if overrides.is_file():
        listed = OmegaConf.to_container(OmegaConf.load(overrides))
        if isinstance(listed, list):
            kept = [str(o) for o in listed if not str(o).lstrip("+~").startswith(_NOT_IN_NAMES)]
            name = " ".join(kept) or name
    return f"{name} ({len(members)} seed{'s' if len(members) > 1 else ''})"


def average_over_seeds(runs: Sequence[RunResults], partial_users: bool = False) -> list[RunResults]:
    """One RunResults per group of runs whose configs differ only in their seeds, in the order the
    groups first appear: each user's metrics (and rank) averaged over the group's seeds.

    Comparing these averages user by user is the paired test across seeds: the seed-to-seed noise
    of each variant is averaged out before the variants are compared on the same users.
    `partial_users` (runs restricted to a slice whose users differ by seed, e.g. warm targets when
    each seed holds out its own items): a user's metrics are averaged over the seeds that have the
    user, so two variants run with the same seeds are averaged over the same seeds for every user."""
    averaged = []
    for members in seed_groups(runs):
        frames = [m.per_user for m in members]
        keys = ["user_id", target_column(frames[0])]
        numeric = [c for c in frames[0].columns if c not in keys]
        numeric = [
            c for c in numeric if all(c in f.columns for f in frames) and frames[0][c].dtype.kind in "iuf"
        ]
        if not partial_users:
            check_paired(members)
        per_user = _mean_over_present_users(members, keys, numeric)
        averaged.append(RunResults(_group_name(members), members[0].path, per_user, members[0].config_key))
    return averaged


def _mean_over_present_users(
    members: Sequence[RunResults], keys: list[str], numeric: list[str]
) -> pd.DataFrame:
    """Each user's metrics averaged over the members that hold the user, users in id order; a user's
    target(s) must be the same in every member that holds the user."""
    stacked = pd.concat(
        [m.per_user[["user_id", *numeric]].astype({c: np.float64 for c in numeric}) for m in members]
    )
    mean = stacked.groupby("user_id", sort=True)[numeric].mean()
    targets = pd.concat([m.per_user[keys].assign(key=_targets_key(m.per_user)) for m in members])
    distinct = targets.drop_duplicates(["user_id", "key"])
    if distinct["user_id"].duplicated().any():
        user = distinct.loc[distinct["user_id"].duplicated(), "user_id"].iloc[0]
        raise UserInputError(
            f"compare: user {user} has other targets in some of the runs of {members[0].path}'s "
            "seeds; averaging over seeds needs the same targets"
        )
    first = distinct.drop(columns="key").set_index("user_id").loc[mean.index]
    return pd.concat([first.reset_index(), mean.reset_index(drop=True)], axis=1)


def seed_summary(
    runs: Sequence[RunResults], metrics: Sequence[str], confidence: float = 0.95
) -> pd.DataFrame:
    """For each group of runs whose configs differ only in seeds: mean over seeds with a t interval."""
    rows = []
    for members in seed_groups(runs):
        if len(members) < 2 or members[0].config_key is None:
            continue
        for metric in metrics:
            run_means = np.array([m.per_user[metric].mean() for m in members])
            mean, low, high = mean_interval(run_means, confidence)
            rows.append(
                {
                    "metric": metric,
                    "runs": ", ".join(m.name for m in members),
                    "seeds": len(members),
                    "mean": mean,
                    "ci_low": low,
                    "ci_high": high,
                    "std": float(run_means.std(ddof=1)),
                }
            )
    return pd.DataFrame(rows, columns=["metric", "runs", "seeds", "mean", "ci_low", "ci_high", "std"])
