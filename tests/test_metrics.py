import math

import numpy as np
import pytest
import torch

from recsys.errors import UserInputError
from recsys.evaluation import metrics as metrics_module
from recsys.evaluation.metrics import (
    ListMetrics,
    RankingMetrics,
    chunked_ranking,
    chunked_top_k,
    metrics_from_ranks,
    sample_unseen,
    sampled_target_ranks,
    target_ranks,
    top_k_items,
)
from recsys.models.network import DataInfo
from recsys.models.sasrec import SASRec
from tests.builders import module


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


def test_precision_and_map_from_the_rank():
    values = metrics_from_ranks(torch.tensor([1, 4, 12]), ks=(5,))
    assert values["precision@5"].tolist() == pytest.approx([0.2, 0.2, 0.0])
    assert values["map@5"].tolist() == pytest.approx([1.0, 0.25, 0.0])  # one relevant item: 1 / rank


@pytest.mark.parametrize("ties", [False, True])
def test_metrics_agree_with_trec_eval_on_random_rankings(ties):
    pytrec_eval = pytest.importorskip("pytrec_eval")
    generator = torch.Generator().manual_seed(0)
    num_users, num_items = 300, 60
    scores = torch.rand(num_users, num_items + 1, generator=generator)  # continuous: no ties
    if ties:
        scores = (scores * 8).round() / 8  # 9 distinct values: many items tie with the target
    target = torch.randint(1, num_items + 1, (num_users,), generator=generator)
    exclude = torch.randint(1, num_items + 1, (num_users, 5), generator=generator)
    exclude = torch.where(exclude == target[:, None], 0, exclude)  # the target is never excluded here
    ours = metrics_from_ranks(target_ranks(scores, target, exclude), ks=(5, 10))
    # trec_eval gets each user's ranked list with the seen items already removed, built here in
    # plain Python (none of our ranking code): candidates sorted by score, best first, an item
    # tied with the target placed before it (pessimistic ties); trec_eval's scores are the list
    # positions, so that it keeps this order.
    run, qrels = {}, {}
    for u in range(num_users):
        row, seen, answer = scores[u].tolist(), set(exclude[u].tolist()), int(target[u])
        candidates = [i for i in range(1, num_items + 1) if i not in seen]
        items = sorted(candidates, key=lambda i: (-row[i], i == answer))
        run[str(u)] = {str(i): float(len(items) - pos) for pos, i in enumerate(items)}
        qrels[str(u)] = {str(answer): 1}
    evaluator = pytrec_eval.RelevanceEvaluator(
        qrels, {"ndcg_cut.5,10", "P.5,10", "map_cut.5,10", "recall.5,10"}
    )
    theirs = evaluator.evaluate(run)
    for k in (5, 10):
        for ours_name, trec_name in (
            ("ndcg", "ndcg_cut"),
            ("precision", "P"),
            ("map", "map_cut"),
            ("hr", "recall"),
        ):
            expected = [theirs[str(u)][f"{trec_name}_{k}"] for u in range(num_users)]
            assert ours[f"{ours_name}@{k}"].tolist() == pytest.approx(expected, abs=1e-6), (ours_name, k)


def test_top_k_lists_leave_out_padding_and_seen_items():
    scores = scores_from([[0.1, 0.9, 0.5, 0.3], [0.4, 0.3, 0.2, 0.1]])
    top = top_k_items(scores, torch.tensor([[2, 0], [1, 3]]), 2)
    assert top.tolist() == [[3, 4], [2, 4]]


def test_list_metrics_by_hand_and_exact_across_processes():
    counts = torch.tensor([0, 10, 5, 1, 0])  # items 1..4; 16 training interactions
    top = torch.tensor([[1, 2], [1, 3], [2, 1]])
    whole = ListMetrics((1, 2), counts)
    whole.update(top)
    result = whole.compute()
    assert result["coverage@1"] == pytest.approx(2 / 4)  # items 1 and 2
    assert result["coverage@2"] == pytest.approx(3 / 4)
    assert result["arp@1"] == pytest.approx((10 + 10 + 5) / 3)
    assert result["arp@2"] == pytest.approx((7.5 + 5.5 + 7.5) / 3)
    info = -np.log2((counts.numpy() + 1) / (16 + 4))
    assert result["novelty@1"] == pytest.approx((info[1] + info[1] + info[2]) / 3)
    # Two "processes" with half the users each, their totals added by the reduce hook: the same numbers.
    parts = [ListMetrics((1, 2), counts), ListMetrics((1, 2), counts)]
    parts[0].update(top[:1])
    parts[1].update(top[1:])
    first_totals = []
    parts[0].compute(lambda totals: first_totals.append(totals) or totals)
    assert parts[1].compute(lambda totals: totals + first_totals[0]) == pytest.approx(result)


def test_sampled_ranks_draw_only_unseen_items_and_are_seeded():
    target = torch.tensor([3, 5])
    exclude = torch.tensor([[1, 2, 0], [4, 0, 0]])
    draws = [
        sample_unseen(target, exclude, 8, 200, torch.Generator().manual_seed(seed)) for seed in (1, 1, 2)
    ]
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
    negatives = draws[0]
    assert not torch.isin(negatives[0], torch.tensor([0, 1, 2, 3])).any()
    assert not torch.isin(negatives[1], torch.tensor([0, 4, 5])).any()
    scores = torch.arange(9, dtype=torch.float32).expand(2, 9)  # item i scores i
    negatives = torch.tensor([[4, 6, 1], [2, 5, 7]])
    ranks = sampled_target_ranks(scores.gather(1, target[:, None]), scores.gather(1, negatives))
    assert ranks.tolist() == [3, 3]  # 3 < 4, 6; and 5 ties with 5 (pessimistic), below 7


def test_k_larger_than_the_catalogue_is_a_user_error():
    with pytest.raises(
        UserInputError, match=r"model.ks: each K must lie in 1..5 \(the catalogue\), got \[1, 10\]"
    ):
        module(SASRec(DataInfo(5)), ks=(1, 10))


@pytest.mark.parametrize("chunk_size", [1, 4, 13, 50, 1000])
def test_chunked_ranking_equals_full_ranking(chunk_size):
    generator = torch.Generator().manual_seed(chunk_size)
    queries = torch.randn(9, 6, generator=generator)
    items = torch.randn(51, 6, generator=generator)
    items[7] = items[8]  # a tie, to check pessimistic counting across chunks
    target = torch.randint(1, 51, (9,), generator=generator)
    target[0] = 7
    exclude = torch.randint(0, 51, (9, 12), generator=generator)
    exclude[1, 0] = target[1]  # a seen target stays a candidate
    # The reference scores from one elementwise product: items 7 and 8 score exactly the same.
    # (A matrix product need not give them equal scores: its rounding depends on the column.)
    scores = (queries[:, None, :].double() * items[None, :, :].double()).sum(dim=-1).float()
    assert torch.equal(scores[:, 7], scores[:, 8])
    ranks, top = chunked_ranking(queries, items, target, exclude, 10, chunk_size)
    assert torch.equal(ranks, target_ranks(scores, target, exclude))
    # The same items; tied ones (7 and 8) may come in either order.
    assert torch.equal(top.sort(dim=1).values, top_k_items(scores, exclude, 10).sort(dim=1).values)
    torch.testing.assert_close(
        scores.gather(1, top), scores.gather(1, top).sort(dim=1, descending=True).values
    )


def test_chunked_ranking_counts_nan_above_and_can_skip_lists():
    queries = torch.ones(2, 1)
    items = torch.tensor([[0.0], [1.0], [float("nan")], [3.0], [2.0]])
    for exclude in (None, torch.tensor([[3, 3, 0], [4, 2, 4]])):
        ranks, top = chunked_ranking(queries, items, torch.tensor([1, 2]), exclude, None, chunk_size=2)
        assert top is None
        assert torch.equal(ranks, target_ranks(queries @ items.T, torch.tensor([1, 2]), exclude))
    items[1] = -torch.inf  # a target scored -inf is ranked last as well
    ranks, _ = chunked_ranking(queries, items, torch.tensor([1, 3]), None, None, chunk_size=3)
    assert torch.equal(ranks, target_ranks(queries @ items.T, torch.tensor([1, 3])))


def test_chunked_top_k_scores_leave_excluded_items_at_minus_infinity():
    generator = torch.Generator().manual_seed(5)
    queries, items = torch.randn(3, 4, generator=generator), torch.randn(8, 4, generator=generator)
    exclude = torch.tensor([[1, 2, 3, 4, 5], [0, 0, 0, 0, 0], [7, 7, 1, 0, 0]])
    scores, top = chunked_top_k(queries, items, exclude, 7, chunk_size=3)
    full = queries @ items.T
    finite = scores.isfinite()
    reference = top_k_items(full, exclude, 7)
    for row in range(3):  # the same unseen items, best first; the -inf filler may differ
        count = int(finite[row].sum())
        assert top[row, :count].tolist() == reference[row, :count].tolist()
    torch.testing.assert_close(scores[finite], full.gather(1, top)[finite])
    assert finite.sum(dim=1).tolist() == [2, 7, 5]  # 7 items minus the distinct seen ones


def random_ranking_case(seed):
    """Queries and item vectors of random sizes, with what chunking can get wrong: small-integer
    entries (exact dot products in float32, so many exact ties), items that duplicate an item of
    another chunk (the target's own vector among them), a target that is also in its excluded history, duplicated and padding entries
    in the history, a NaN item, a query of NaNs and an infinite item coordinate (targets scored
    NaN, +inf or -inf; an infinite item norm)."""
    generator = torch.Generator().manual_seed(seed)

    def draw(low, high):
        return int(torch.randint(low, high + 1, (), generator=generator))

    if seed % 2:
        batch, num_items, dim = draw(1, 9), draw(2, 70), draw(1, 6)
    else:  # sizes at which a BLAS (MKL) sums some columns of one product in another order
        batch, num_items, dim = draw(1, 4), draw(2, 200), draw(20, 130)
    width = num_items + 1
    # Chunk sizes that divide the width (padding row included) and ones that do not.
    divisors = [c for c in range(1, width + 1) if width % c == 0]
    chunk_size = divisors[draw(0, len(divisors) - 1)] if seed % 2 else draw(1, width + 3)
    if seed % 3 == 0:
        queries = torch.randint(-3, 4, (batch, dim), generator=generator).float()
        items = torch.randint(-3, 4, (width, dim), generator=generator).float()
    else:
        queries, items = (
            torch.randn(batch, dim, generator=generator),
            torch.randn(width, dim, generator=generator),
        )
    for _ in range(draw(1, 4)):  # exact ties that straddle chunk boundaries
        source = draw(1, num_items)
        items[min(num_items, source + chunk_size * draw(1, 2))] = items[source]
    target = torch.randint(1, width, (batch,), generator=generator)
    for row in range(batch):  # the target's own vector in another chunk: an exact tie
        twin = int(target[row]) + chunk_size * draw(1, 2)
        if twin <= num_items:
            items[twin] = items[target[row]]
    exclude = torch.randint(0, width, (batch, draw(0, 8)), generator=generator)
    if exclude.size(1) and batch > 1:
        exclude[1, 0] = target[1]  # a target in its own history stays a candidate
    if seed % 5 == 1:
        items[draw(1, num_items)] = torch.nan
    if seed % 7 == 2:
        queries[draw(0, batch - 1)] = torch.nan
    if seed % 11 == 3:
        items[draw(1, num_items), draw(0, dim - 1)] = torch.inf
    k = draw(1, num_items + 3)
    return queries, items, target, exclude, k, chunk_size


def exact_scores(queries, items):
    """The (B, items) dot products from one elementwise product summed in float64: equal item
    vectors score exactly equal (a matrix product need not), then float32 as the ranking uses."""
    return (queries[:, None, :].double() * items[None, :, :].double()).sum(dim=-1).float()


def test_chunked_ranking_equals_the_full_score_matrix_over_random_cases():
    """50 random cases: ranks equal `target_ranks` of the full scores; the top-k lists (of
    `chunked_ranking` and `chunked_top_k`) hold candidates only, each once, with the very scores
    of `top_k_items` in the same order (tied items may swap)."""
    for seed in range(50):
        queries, items, target, exclude, k, chunk_size = random_ranking_case(seed)
        scores = exact_scores(queries, items)
        ranks, top = chunked_ranking(queries, items, target, exclude, k, chunk_size)
        assert torch.equal(ranks, target_ranks(scores, target, exclude)), seed
        reference = top_k_items(scores, exclude, k)
        top_scores, top_alone = chunked_top_k(queries, items, exclude, k, chunk_size)
        assert torch.equal(top_alone, top), seed
        assert top.shape == reference.shape, seed
        masked = scores.masked_fill(~_candidate_mask(scores, exclude), -torch.inf)
        torch.testing.assert_close(masked.gather(1, top), masked.gather(1, reference), equal_nan=True)
        torch.testing.assert_close(top_scores, masked.gather(1, top), equal_nan=True, msg=f"seed {seed}")
        for row in range(len(top)):
            listed = [i for i, s in zip(top[row].tolist(), top_scores[row].tolist()) if s != -math.inf]
            allowed = set(range(1, scores.size(1))) - set(exclude[row].tolist())
            assert len(set(listed)) == len(listed) and set(listed) <= allowed, seed


def _candidate_mask(scores, exclude):
    """True where an item is a candidate: a real item (not 0) that is not excluded."""
    mask = torch.ones_like(scores, dtype=torch.bool)
    mask[:, 0] = False
    for row, seen in enumerate(exclude.tolist()):
        mask[row, seen] = False
    return mask


@pytest.mark.parametrize("query_dtype", [torch.float32, torch.bfloat16])
def test_chunked_ranking_scores_in_float32_under_cpu_bf16_autocast(query_dtype):
    """Ranks, top-k items and scores under a bf16 autocast equal those of float32 operands without
    it (user vectors may come as bf16 from an autocast model): bf16 scores would tie items."""
    generator = torch.Generator().manual_seed(1)
    queries = torch.randn(16, 48, generator=generator).to(query_dtype)
    items = torch.randn(300, 48, generator=generator)
    target = torch.randint(1, 300, (16,), generator=generator)
    exclude = torch.randint(0, 300, (16, 10), generator=generator)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ranks, top = chunked_ranking(queries, items, target, exclude, 20, chunk_size=64)
        scores, top_alone = chunked_top_k(queries, items, exclude, 20, chunk_size=64)
    want_ranks, want_top = chunked_ranking(queries.float(), items, target, exclude, 20, chunk_size=64)
    want_scores, _ = chunked_top_k(queries.float(), items, exclude, 20, chunk_size=64)
    assert scores.dtype == torch.float32
    assert torch.equal(ranks, want_ranks) and torch.equal(top, want_top) and torch.equal(top_alone, top)
    assert torch.equal(scores, want_scores)
    assert torch.equal(ranks, target_ranks(exact_scores(queries.float(), items), target, exclude))


@pytest.mark.parametrize("huge", [1e20, float("inf")])
def test_chunked_ranking_with_a_huge_item_vector_equals_the_full_ranking(huge):
    queries = torch.tensor([[1.0, 1.0]])
    # padding (scores 5), a huge item, the target (scores 1), an excluded item (scores 2)
    items = torch.tensor([[5.0, 0.0], [huge, 0.0], [1.0, 0.0], [2.0, 0.0]])
    target, exclude = torch.tensor([2]), torch.tensor([[3]])
    scores = exact_scores(queries, items)
    assert target_ranks(scores, target, exclude).tolist() == [2]  # below the huge item only
    ranks, _ = chunked_ranking(queries, items, target, exclude, None, chunk_size=2)
    assert ranks.tolist() == [2]


def test_massive_ties_are_compared_exactly_a_block_at_a_time(monkeypatch):
    # Every item scores 0 after an all-zero query (a history sharing no attribute with any item):
    # every item is a near tie of the target, checked exactly in blocks of a few pairs.
    monkeypatch.setattr(metrics_module, "_EXACT_BLOCK_ELEMENTS", 64)
    generator = torch.Generator().manual_seed(0)
    queries = torch.zeros(3, 40)
    items = torch.randn(101, 40, generator=generator)
    target = torch.tensor([5, 17, 99])
    exclude = torch.tensor([[1, 2, 0], [0, 0, 0], [3, 3, 4]])
    ranks, _ = chunked_ranking(queries, items, target, exclude, None, chunk_size=32)
    assert ranks.tolist() == [98, 100, 98]  # pessimistic: after every candidate
    assert ranks.tolist() == target_ranks(queries @ items.T, target, exclude).tolist()
