"""The one ranking-metrics module: full ranking, seen items excluded, pessimistic ties.

Every metric is derived from one number per user, the 1-based rank of the target among all
candidate items:

    rank = 1 + #{candidates scored higher than the target} + #{other candidates scored equal}

Counting ties above the target (pessimistic) means a model that gives every item the same score
gets rank = number of candidates, i.e. ~0 NDCG, never 1. Candidates are all real items (index 0 is
padding) except those in the user's history; the target itself always stays a candidate, even if
the user saw it before.

From the rank r:  HR@K = [r <= K],  NDCG@K = [r <= K] / log2(r + 1),  MRR@K = [r <= K] / r.

Means are exact across batches and processes: `RankingMetrics` keeps sums and a count, and a
distributed run adds them up (never a mean of means).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

DEFAULT_KS = (1, 5, 10, 20)
METRIC_NAMES = ("hr", "ndcg", "mrr")


def target_ranks(
    scores: torch.Tensor, target: torch.Tensor, exclude: torch.Tensor | None = None
) -> torch.Tensor:
    """1-based pessimistic rank of each target among all items but padding and seen ones.

    scores:  (B, num_items + 1), column 0 is padding and never a candidate
    target:  (B,) item indices in 1..num_items
    exclude: (B, L) item indices to remove from the candidates (0 entries are ignored)
    """
    scores = scores.float()
    rows = torch.arange(scores.size(0), device=scores.device)
    target_score = scores[rows, target]
    candidate = torch.ones_like(scores, dtype=torch.bool)
    candidate[:, 0] = False
    if exclude is not None and exclude.numel() > 0:
        candidate.scatter_(1, exclude, False)
    candidate[rows, target] = False  # the target is counted once, below, as "1 +"
    # NaN scores compare False both ways; count them as ranked above so that a broken model
    # cannot look good.
    above = (scores >= target_score[:, None]) | scores.isnan()
    if target_score.isnan().any():
        above = above | target_score.isnan()[:, None]
    return 1 + (above & candidate).sum(dim=1)


def metrics_from_ranks(ranks: torch.Tensor, ks: Sequence[int] = DEFAULT_KS) -> dict[str, torch.Tensor]:
    """Per-user metric values, {'hr@10': (B,), 'ndcg@10': (B,), 'mrr@10': (B,), ...}."""
    ranks = ranks.to(torch.float64)
    out: dict[str, torch.Tensor] = {}
    for k in ks:
        hit = ranks <= k
        out[f"hr@{k}"] = hit.to(torch.float64)
        out[f"ndcg@{k}"] = torch.where(hit, 1.0 / torch.log2(ranks + 1.0), 0.0)
        out[f"mrr@{k}"] = torch.where(hit, 1.0 / ranks, 0.0)
    return out


def metric_names(ks: Sequence[int] = DEFAULT_KS) -> list[str]:
    return [f"{name}@{k}" for k in ks for name in METRIC_NAMES]


class RankingMetrics:
    """Accumulates per-user metric sums and the user count; computes exact means.

    `reduce_sum` (e.g. a Lightning strategy's all-reduce) adds the sums up across processes.
    """

    def __init__(self, ks: Sequence[int] = DEFAULT_KS):
        self.ks = tuple(ks)
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, float] = dict.fromkeys(metric_names(self.ks), 0.0)
        self.count = 0

    def update(self, ranks: torch.Tensor) -> dict[str, torch.Tensor]:
        values = metrics_from_ranks(ranks, self.ks)
        for name, per_user in values.items():
            self.sums[name] += float(per_user.sum())
        self.count += int(ranks.numel())
        return values

    def compute(self, reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, float]:
        names = list(self.sums)
        totals = torch.tensor([self.sums[n] for n in names] + [float(self.count)], dtype=torch.float64)
        if reduce_sum is not None:
            totals = reduce_sum(totals)
        count = float(totals[-1])
        if count == 0:
            return {name: math.nan for name in names}
        return {name: float(totals[i]) / count for i, name in enumerate(names)}
