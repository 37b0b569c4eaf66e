import math

import numpy as np
import pytest
import torch

from recsys.metrics import RankingMetrics, metrics_from_ranks, target_ranks


def scores_from(rows):
    """Rows of item scores 1..N; column 0 (padding) gets a huge score that must never count."""
    body = torch.tensor(rows, dtype=torch.float32)
    return torch.cat([torch.full((body.size(0), 1), 1e9), body], dim=1)


def test_hand_computed_ranks_and_metrics():
    scores = scores_from([[0.1, 0.9, 0.5, 0.3]])  # items 1..4
    assert target_ranks(scores, torch.tensor([2])).item() == 1
    assert target_ranks(scores, torch.tensor([3])).item() == 2
    assert target_ranks(scores, torch.tensor([1])).item() == 4
    values = metrics_from_ranks(torch.tensor([1, 2, 4]), ks=(1, 3))
    assert values["hr@1"].tolist() == [1, 0, 0]
    assert values["hr@3"].tolist() == [1, 1, 0]
    assert values["ndcg@3"].tolist() == pytest.approx([1.0, 1 / math.log2(3), 0.0])
    assert values["mrr@3"].tolist() == pytest.approx([1.0, 0.5, 0.0])


def test_seen_items_are_excluded_but_never_the_target():
    scores = scores_from([[0.1, 0.9, 0.5, 0.3]])
    # Items 2 and 3 were seen: the target 4 ranks first among {1, 4}.
    assert target_ranks(scores, torch.tensor([4]), torch.tensor([[2, 3, 0]])).item() == 1
    # The target itself is in the history: it still counts as a candidate.
    assert target_ranks(scores, torch.tensor([3]), torch.tensor([[2, 3]])).item() == 1


def test_ties_are_pessimistic():
    scores = scores_from([[0.5, 0.5, 0.5, 0.1]])
    assert target_ranks(scores, torch.tensor([1])).item() == 3
    assert target_ranks(scores, torch.tensor([2])).item() == 3


def test_all_equal_scores_get_almost_zero_ndcg():
    num_items = 1000
    scores = torch.zeros(64, num_items + 1)
    targets = torch.randint(1, num_items + 1, (64,))
    ranks = target_ranks(scores, targets)
    assert (ranks == num_items).all()
    assert metrics_from_ranks(ranks)["ndcg@10"].sum() == 0


def test_nan_scores_never_flatter():
    scores = scores_from([[float("nan"), 0.2, 0.1]])
    assert target_ranks(scores, torch.tensor([2])).item() == 2
    assert target_ranks(scores, torch.tensor([1])).item() == 3


def numpy_reference(scores, targets, histories, k):
    """Brute force: sort candidates by score, ties placed before the target."""
    out = {"hr": [], "ndcg": [], "mrr": []}
    for row, target, seen in zip(scores, targets, histories):
        candidates = [i for i in range(1, len(row)) if i == target or i not in set(seen)]
        ordered = sorted(candidates, key=lambda i: (-row[i], 0 if i != target else 1))
        rank = ordered.index(target) + 1
        out["hr"].append(float(rank <= k))
        out["ndcg"].append(1 / math.log2(rank + 1) if rank <= k else 0.0)
        out["mrr"].append(1 / rank if rank <= k else 0.0)
    return {name: np.mean(v) for name, v in out.items()}


@pytest.mark.parametrize("seed", range(5))
def test_against_brute_force_numpy(seed):
    rng = np.random.default_rng(seed)
    users, items = 40, 30
    # Rounded scores make ties common.
    scores = np.round(rng.normal(size=(users, items + 1)), 1)
    targets = rng.integers(1, items + 1, users)
    histories = [
        list(rng.choice(np.arange(1, items + 1), size=rng.integers(0, 10), replace=False))
        for _ in range(users)
    ]
    width = max(len(h) for h in histories)
    exclude = torch.tensor([h + [0] * (width - len(h)) for h in histories], dtype=torch.long)
    ranks = target_ranks(torch.tensor(scores), torch.tensor(targets), exclude)
    values = metrics_from_ranks(ranks, ks=(10,))
    expected = numpy_reference(scores, targets, histories, 10)
    for name in ("hr", "ndcg", "mrr"):
        assert values[f"{name}@10"].mean().item() == pytest.approx(expected[name])


def test_exact_mean_over_uneven_batches_and_a_simulated_reduction():
    ranks = torch.tensor([1, 2, 3, 50, 7, 1, 11])
    whole = RankingMetrics()
    whole.update(ranks)
    parts = [RankingMetrics(), RankingMetrics()]
    parts[0].update(ranks[:2])
    parts[0].update(ranks[2:3])
    parts[1].update(ranks[3:])
    # Stand-in for an all-reduce: each process adds the other's sums and count.
    other = parts[1].compute.__self__
    totals_other = torch.tensor(
        [other.sums[n] for n in other.sums] + [float(other.count)], dtype=torch.float64
    )
    reduced = parts[0].compute(lambda t: t + totals_other)
    for name, value in whole.compute().items():
        assert reduced[name] == pytest.approx(value)
    assert whole.compute()["hr@1"] == pytest.approx(2 / 7)  # not a mean of batch means
