"""Per-user results and the slices made of them.

`per_user.parquet`: one row per evaluated user with the raw user id, the raw target item id, the
target's 1-based rank after exclusion, every metric, and what slices are cut by: the length of the
history before the target, the target's training count and whether the target repeats a seen item
(`repeat_target`; never under evaluation.seen_items=exclude, which leaves those users out).
Under evaluation.targets=window a row holds all of the user's targets (`window_per_user_frame`).
Where the model produced them, `top_item_ids` holds the user's recommended list (raw ids, best
first, max(model.ks) long: what `evaluate.py interleave=` mixes), and `ips_weight` the target's
inverse exposure propensity (recsys/evaluation/debiased.py, under evaluation.ips_gamma).
`slices.csv`: the mean metrics by history-length bucket, by target-popularity bucket, by
repeat or new target and, under a time split, by warm or cold target (`cold_target`: the item has
no training event), with the user count of each bucket.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from recsys.data.sequences import SequenceData
from recsys.errors import UserInputError
from recsys.evaluation.debiased import WEIGHT_COLUMN, propensity_weights
from recsys.evaluation.metrics import metrics_from_positions, metrics_from_ranks
from recsys.runs.files import atomic_path

if TYPE_CHECKING:  # for the annotation only: training writes results without loading compare.py
    from recsys.evaluation.compare import RunResults

# Left-closed bucket edges; the last bucket is open-ended.
HISTORY_LENGTH_EDGES = (1, 3, 5, 10, 20, 50, 200)
TARGET_COUNT_EDGES = (0, 1, 5, 20, 100, 500)


# compare_slice: the users compared, by a per-user column of per_user.parquet and its value.
SLICES = {
    "warm": ("cold_target", False),
    "cold": ("cold_target", True),
    "new": ("repeat_target", False),
    "repeat": ("repeat_target", True),
}


def restrict_to_slice(
    runs: Sequence[RunResults], name: str | None, key: str = "compare_slice", same_users: bool = True
) -> list[RunResults]:
    """The runs with only the users of slice `name` (warm or cold targets: evaluation.cold_items_share
    or a time split's new items; new or repeat targets), each run by its own per-user flags; None:
    every user. `same_users`: the runs must agree on who is in the slice (a paired comparison of
    the runs themselves); runs of other seeds may disagree (items held out with their own seed),
    which `seeds.average_over_seeds(..., partial_users=True)` then averages over the seeds each user is
    in the slice in."""
    if name is None:
        return list(runs)
    if name not in SLICES:
        raise UserInputError(f"{key}: {name!r} is not one of {list(SLICES)}")
    column, value = SLICES[name]
    kept = []
    for run in runs:
        if column not in run.per_user.columns:
            raise UserInputError(
                f"{key}: {run.path}/per_user.parquet has no {column} column to choose {name} targets by"
            )
        frame = run.per_user[run.per_user[column].astype(bool) == value].reset_index(drop=True)
        if len(frame) == 0:
            raise UserInputError(f"{key}: no user of {run.path} has a {name} target")
        if same_users and kept and not frame["user_id"].equals(kept[0].per_user["user_id"]):
            raise UserInputError(
                f"{key}: {run.path} and {kept[0].path} have {name} targets for different users "
                "(items held out with other seeds?); compare one seed's runs, or set average_seeds=true"
            )
        kept.append(dataclasses.replace(run, per_user=frame))
    return kept


def per_user_frame(
    data: SequenceData,
    split: str,
    users: torch.Tensor,
    ranks: torch.Tensor,
    ks,
    item_counts: torch.Tensor | None = None,
    target_positions: np.ndarray | None = None,
    repeat_targets: np.ndarray | None = None,
    cold_items: np.ndarray | None = None,
    top_items: torch.Tensor | None = None,
    ips_gamma: float | None = None,
) -> pd.DataFrame:
    """`target_positions`: each user's target event of `split` (the data module's split); by
    default plain leave-one-out's (the last event for test, the one before for val).
    `repeat_targets`: per user, whether the target is a seen item (the data module's rule).
    `cold_items`: per item, no training event (a time split's cold items), for `cold_target`.
    `top_items`: (users, K) recommended items, in the order of `users`. `ips_gamma`: the
    exponent of the exposure propensities (needs `item_counts`)."""
    users_np = users.numpy().astype(np.int64)
    order = np.argsort(users_np, kind="stable")
    users_np = users_np[order]
    ranks = ranks[torch.from_numpy(order)]
    if target_positions is None:
        target_pos = data.offsets[users_np + 1] - (2 if split == "val" else 1)
    else:
        target_pos = np.asarray(target_positions)[users_np]
    target_items = data.items[target_pos]
    frame = pd.DataFrame(
        {
            "user_id": data.user_ids[users_np],
            "target_item_id": data.item_ids[target_items],
            "rank": ranks.numpy().astype(np.int64),
            "history_length": target_pos - data.offsets[users_np],
        }
    )
    if item_counts is not None:
        frame["target_train_count"] = item_counts.numpy()[target_items]
        if ips_gamma is not None:
            frame[WEIGHT_COLUMN] = propensity_weights(frame["target_train_count"].to_numpy(), ips_gamma)
    if repeat_targets is not None:
        frame["repeat_target"] = np.asarray(repeat_targets)[users_np]
    if cold_items is not None:
        frame["cold_target"] = np.asarray(cold_items)[target_items]
    if top_items is not None:
        frame["top_item_ids"] = list(data.item_ids[top_items.numpy()[order]])
    for name, values in metrics_from_ranks(ranks, ks).items():
        frame[name] = values.numpy()
    return frame


def window_per_user_frame(
    data: SequenceData,
    results: dict[str, torch.Tensor],
    ks,
    evaluated_users: np.ndarray,
    windows,
    cold_items: np.ndarray | None = None,
    item_counts: torch.Tensor | None = None,
    ips_gamma: float | None = None,
) -> pd.DataFrame:
    """per_user.parquet under evaluation.targets=window: one row per user with the number of
    targets, their raw item ids (in the order first met in the window) and list positions (same
    order; past the catalogue for a miss), the best position as `rank`, the history length
    before the window and every metric. `windows` (recsys/data/evaluated.py) holds the targets of
    `evaluated_users`, of which the results' users are a subset. With `ips_gamma` (and
    `item_counts`) a user's `ips_weight` is the mean of their targets' weights."""
    users = results["user"].numpy().astype(np.int64)
    counts = results["targets"].numpy().astype(np.int64)
    flat = results["ranks"].numpy().astype(np.int64)
    index = np.searchsorted(evaluated_users, users)
    begins = windows.offsets[index]
    if not (np.diff(windows.offsets)[index] == counts).all():
        raise RuntimeError("test: the ranked targets do not match the evaluated users' window targets")
    bounds = np.concatenate([[0], np.cumsum(counts)])
    item_ids = [data.item_ids[windows.items[b : b + n]].tolist() for b, n in zip(begins, counts)]
    positions = np.zeros((len(users), int(counts.max(initial=1))), dtype=np.int64)
    column = np.arange(len(flat)) - np.repeat(bounds[:-1], counts)
    positions[np.repeat(np.arange(len(users)), counts), column] = flat
    frame = pd.DataFrame(
        {
            "user_id": data.user_ids[users],
            "targets": counts,
            "target_item_ids": item_ids,
            "ranks": [flat[b:e].tolist() for b, e in zip(bounds[:-1], bounds[1:])],
            "rank": results["rank"].numpy().astype(np.int64),
            "history_length": windows.history_end[index] - data.offsets[users],
        }
    )
    if cold_items is not None:  # how many of the user's targets have no training event
        cold = np.asarray(cold_items)[windows.items].astype(np.int64)
        frame["cold_targets"] = [int(cold[b : b + n].sum()) for b, n in zip(begins, counts)]
    if ips_gamma is not None and item_counts is not None:
        weights = propensity_weights(item_counts.numpy()[windows.items], ips_gamma)
        owner = np.repeat(np.arange(len(windows.offsets) - 1), np.diff(windows.offsets))
        sums = np.bincount(owner, weights, minlength=len(windows.offsets) - 1)
        frame[WEIGHT_COLUMN] = sums[index] / counts
    if "top" in results:
        frame["top_item_ids"] = list(data.item_ids[results["top"].numpy()])
    for name, values in metrics_from_positions(torch.from_numpy(positions), ks).items():
        frame[name] = values.numpy()
    return frame


def bucket_labels(edges) -> list[str]:
    labels = []
    for low, high in zip(edges, (*edges[1:], None)):
        if high is None:
            labels.append(f"{low}+")
        elif high - low == 1:
            labels.append(str(low))
        else:
            labels.append(f"{low}-{high - 1}")
    return labels


def slice_metrics(frame: pd.DataFrame, metrics=("hr@10", "ndcg@10", "mrr@10")) -> pd.DataFrame:
    """Mean metrics per history-length bucket and per target-popularity bucket."""
    slices = [("history_length", HISTORY_LENGTH_EDGES, bucket_labels(HISTORY_LENGTH_EDGES))]
    if "target_train_count" in frame.columns:
        slices.append(("target_train_count", TARGET_COUNT_EDGES, bucket_labels(TARGET_COUNT_EDGES)))
    if "repeat_target" in frame.columns:
        slices.append(("repeat_target", (0, 1), ["new item", "repeat"]))
    if "cold_target" in frame.columns:  # time splits: targets with and without a training event
        slices.append(("cold_target", (0, 1), ["warm", "cold"]))
    present = [m for m in metrics if m in frame.columns]
    rows = []
    for column, edges, labels in slices:
        values = frame[column].to_numpy().astype(np.int64)
        index = np.searchsorted(np.asarray(edges), values, side="right") - 1
        for bucket, label in enumerate(labels):
            members = frame[index == bucket]
            if len(members) == 0:
                continue
            row = {"slice": column, "bucket": label, "users": len(members)}
            row.update({m: float(members[m].mean()) for m in present})
            rows.append(row)
    return pd.DataFrame(rows, columns=["slice", "bucket", "users", *present])


def write_parquet_atomic(frame: pd.DataFrame, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)


def write_csv_atomic(frame: pd.DataFrame, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def write_test_results(
    datamodule, split: str, model, out_dir: str | os.PathLike, ips_gamma: float | None = None
) -> pd.DataFrame:
    """per_user.parquet and slices.csv of a model's last test pass (train.py and evaluate.py)."""
    if "targets" in model.test_results:  # evaluation.targets=window
        evaluated = datamodule.evaluated(split)
        frame = window_per_user_frame(
            datamodule.data,
            model.test_results,
            model.ks,
            evaluated.users,
            evaluated.windows,
            datamodule.cold_item_mask(),
            datamodule.train_item_counts(),
            ips_gamma,
        )
        write_parquet_atomic(frame, os.path.join(out_dir, "per_user.parquet"))
        write_csv_atomic(slice_metrics(frame), os.path.join(out_dir, "slices.csv"))
        return frame
    frame = per_user_frame(
        datamodule.data,
        split,
        model.test_results["user"],
        model.test_results["rank"],
        model.ks,
        datamodule.train_item_counts(),
        datamodule.split.val_pos if split == "val" else datamodule.split.test_pos,
        datamodule.repeat_targets(split),
        datamodule.cold_item_mask(),
        model.test_results.get("top"),
        ips_gamma,
    )
    write_parquet_atomic(frame, os.path.join(out_dir, "per_user.parquet"))
    write_csv_atomic(slice_metrics(frame), os.path.join(out_dir, "slices.csv"))
    return frame
