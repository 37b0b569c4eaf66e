"""Several targets per user (evaluation.targets=window): ranks, list positions and the IR metrics."""

import math

import pytest
import torch

from recsys.evaluation.metrics import (
    RankingMetrics,
    metrics_from_positions,
    metrics_from_ranks,
    target_ranks,
    top_k_items,
)
from recsys.evaluation.window_ranking import chunked_window_ranks, list_positions, window_target_ranks


def padded_targets(generator, rows, num_items, most):
    """(rows, most) distinct targets per row, 1..most of them, 0-padded at the end."""
    targets = torch.zeros(rows, most, dtype=torch.long)
    for row in range(rows):
        count = int(torch.randint(1, most + 1, (1,), generator=generator))
        targets[row, :count] = torch.randperm(num_items, generator=generator)[:count] + 1
    return targets


def test_hand_worked_positions_and_metrics():
    # Items 1..6 scored 0.6, 0.5, 0.4, 0.3, 0.2, 0.1: the list is 1, 2, 3, 4, 5, 6.
    scores = torch.tensor([[9e9, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]])
    targets = torch.tensor([[4, 2, 0]])
    ranks = window_target_ranks(scores, targets)
    assert ranks.tolist() == [[3, 2, 0]]  # among the non-targets 1, 3, 5, 6
    positions = list_positions(ranks, None, num_items=6)
    assert positions.tolist() == [[4, 2, 0]]  # their places in the full list
    values = metrics_from_positions(positions, ks=(1, 3, 5))
    assert values["hr@1"].item() == 0 and values["hr@3"].item() == 1
    assert values["recall@3"].item() == pytest.approx(0.5)
    assert values["recall@5"].item() == pytest.approx(1.0)
    assert values["precision@5"].item() == pytest.approx(2 / 5)
    assert values["mrr@5"].item() == pytest.approx(0.5)
    assert values["map@5"].item() == pytest.approx((1 / 2 + 2 / 4) / 2)
    ideal = 1 + 1 / math.log2(3)
    assert values["ndcg@5"].item() == pytest.approx((1 / math.log2(3) + 1 / math.log2(5)) / ideal)
    assert values["ndcg@3"].item() == pytest.approx((1 / math.log2(3)) / ideal)


def test_ties_stay_pessimistic_and_tied_targets_take_consecutive_places():
    scores = torch.tensor([[9e9, 0.5, 0.5, 0.5, 0.1]])
    # Targets 1 and 2 tie with item 3: both rank after it, one of them after the other.
    positions = list_positions(window_target_ranks(scores, torch.tensor([[1, 2]])), None, 4)
    assert sorted(positions[0].tolist()) == [2, 3]


def test_a_miss_sits_past_the_catalogue_and_counts_among_the_targets():
    scores = torch.tensor([[9e9, 0.9, 0.5, 0.4]])
    targets = torch.tensor([[1, 3]])
    miss = torch.tensor([[False, True]])  # item 3 is no candidate (e.g. a cold item kept)
    positions = list_positions(window_target_ranks(scores, targets, torch.tensor([[3]])), miss, 3)
    assert positions.tolist() == [[1, 4]]
    values = metrics_from_positions(positions, ks=(2,))
    assert values["recall@2"].item() == pytest.approx(0.5)
    assert values["ndcg@2"].item() == pytest.approx(1 / (1 + 1 / math.log2(3)))


@pytest.mark.parametrize("seed", range(4))
def test_one_target_per_row_gives_the_single_target_metrics(seed):
    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand(50, 41, generator=generator)
    target = torch.randint(1, 41, (50,), generator=generator)
    exclude = torch.randint(0, 41, (50, 6), generator=generator)
    exclude = torch.where(exclude == target[:, None], 0, exclude)
    single = target_ranks(scores, target, exclude)
    window = list_positions(window_target_ranks(scores, target[:, None], exclude), None, 40)
    assert window[:, 0].tolist() == single.tolist()
    ours = metrics_from_positions(window, ks=(1, 5, 10))
    for name, values in metrics_from_ranks(single, ks=(1, 5, 10)).items():
        assert ours[name].tolist() == pytest.approx(values.tolist(), abs=1e-12), name
    assert ours["recall@10"].tolist() == pytest.approx(ours["hr@10"].tolist())


@pytest.mark.parametrize("ties", [False, True])
def test_window_metrics_agree_with_trec_eval(ties):
    pytrec_eval = pytest.importorskip("pytrec_eval")
    generator = torch.Generator().manual_seed(1)
    num_users, num_items = 200, 50
    scores = torch.rand(num_users, num_items + 1, generator=generator)
    if ties:
        scores = (scores * 8).round() / 8
    targets = padded_targets(generator, num_users, num_items, 6)
    exclude = torch.randint(1, num_items + 1, (num_users, 5), generator=generator)
    exclude = torch.where((exclude[:, :, None] == targets[:, None, :]).any(-1), 0, exclude)
    positions = list_positions(window_target_ranks(scores, targets, exclude), None, num_items)
    ours = metrics_from_positions(positions, ks=(5, 10))
    # trec_eval gets each user's list with the excluded items removed, sorted by score in plain
    # Python, a target tied with a non-target placed after it (pessimistic ties), tied targets in
    # the order of their item ids; the list positions are its scores, so that it keeps this order.
    run, qrels = {}, {}
    for u in range(num_users):
        row, seen = scores[u].tolist(), set(exclude[u].tolist())
        answers = {int(t) for t in targets[u] if t > 0}
        candidates = [i for i in range(1, num_items + 1) if i not in seen]
        items = sorted(candidates, key=lambda i: (-row[i], i in answers, i))
        run[str(u)] = {str(i): float(len(items) - pos) for pos, i in enumerate(items)}
        qrels[str(u)] = {str(i): 1 for i in answers}
        expected = sorted(items.index(i) + 1 for i in answers)
        assert sorted(p for p in positions[u].tolist() if p) == expected
    measures = {"ndcg_cut.5,10", "P.5,10", "map_cut.5,10", "recall.5,10", "recip_rank"}
    theirs = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run)
    for k in (5, 10):
        for ours_name, trec_name in (
            ("ndcg", "ndcg_cut"),
            ("precision", "P"),
            ("map", "map_cut"),
            ("recall", "recall"),
        ):
            expected = [theirs[str(u)][f"{trec_name}_{k}"] for u in range(num_users)]
            assert ours[f"{ours_name}@{k}"].tolist() == pytest.approx(expected, abs=1e-6), (ours_name, k)
    everything = metrics_from_positions(positions, ks=(num_items,))
    expected = [theirs[str(u)]["recip_rank"] for u in range(num_users)]
    assert everything[f"mrr@{num_items}"].tolist() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("seed", range(6))
def test_chunked_window_ranks_equal_the_plain_reference_over_random_shapes(seed):
    generator = torch.Generator().manual_seed(seed)
    batch = int(torch.randint(1, 20, (1,), generator=generator))
    num_items = int(torch.randint(5, 300, (1,), generator=generator))
    dim = int(torch.randint(1, 24, (1,), generator=generator))
    most = int(torch.randint(1, min(num_items, 8) + 1, (1,), generator=generator))
    queries = torch.randn(batch, dim, generator=generator)
    items = torch.randn(num_items + 1, dim, generator=generator)
    if seed % 2:  # duplicated item vectors: exact ties with targets
        items[1 : num_items // 2 + 1] = items[num_items // 2 + 1 : 2 * (num_items // 2) + 1]
    targets = padded_targets(generator, batch, num_items, most)
    exclude = torch.randint(0, num_items + 1, (batch, int(torch.randint(0, 10, (1,), generator=generator))))
    exclude = torch.where((exclude[:, :, None] == targets[:, None, :]).any(-1), 0, exclude)
    scores = queries @ items.T
    chunk = int(torch.randint(1, num_items + 2, (1,), generator=generator))
    reference = window_target_ranks(scores, targets, exclude)
    ranks, top = chunked_window_ranks(queries, items, targets, exclude, 3, chunk)
    assert ranks.tolist() == reference.tolist()
    # The lists leave out only the excluded items: the targets are recommended like any other.
    expected = top_k_items(scores, exclude, 3)
    assert torch.equal(scores.gather(1, top), scores.gather(1, expected))


def test_chunked_window_ranks_put_a_nan_target_last():
    queries = torch.tensor([[1.0, 0.0]])
    items = torch.tensor([[0.0, 0.0], [1.0, 0.0], [float("nan"), 0.0], [0.5, 0.0], [0.2, 0.0]])
    ranks, _ = chunked_window_ranks(queries, items, torch.tensor([[2, 4]]), torch.tensor([[1]]), None, 2)
    assert ranks.tolist() == [[2, 2]]  # candidates: item 3 only; the NaN target after it


def test_window_metric_sums_are_exact_over_batches():
    positions = torch.tensor([[1, 5, 0], [3, 0, 0], [12, 2, 7]])
    whole = RankingMetrics(ks=(5,), targets="window")
    whole.update(positions)
    parts = RankingMetrics(ks=(5,), targets="window")
    parts.update(positions[:1, :2])
    parts.update(positions[1:])
    assert parts.compute() == pytest.approx(whole.compute())
    assert whole.compute()["recall@5"] == pytest.approx((1 + 1 + 1 / 3) / 3)
    with pytest.raises(RuntimeError):
        whole.update(torch.tensor([1, 2]))
