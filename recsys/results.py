"""Per-user results: one row per evaluated user, with raw ids, the target's rank and every metric."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import torch

from recsys.data.preprocess import SequenceData
from recsys.metrics import metrics_from_ranks
from recsys.runs import atomic_path


def per_user_frame(
    data: SequenceData, split: str, users: torch.Tensor, ranks: torch.Tensor, ks
) -> pd.DataFrame:
    users_np = users.numpy().astype(np.int64)
    order = np.argsort(users_np, kind="stable")
    users_np = users_np[order]
    ranks = ranks[torch.from_numpy(order)]
    target_pos = data.offsets[users_np + 1] - (2 if split == "val" else 1)
    frame = pd.DataFrame(
        {
            "user_id": data.user_ids[users_np],
            "target_item_id": data.item_ids[data.items[target_pos]],
            "rank": ranks.numpy().astype(np.int64),
        }
    )
    for name, values in metrics_from_ranks(ranks, ks).items():
        frame[name] = values.numpy()
    return frame


def write_parquet_atomic(frame: pd.DataFrame, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)
