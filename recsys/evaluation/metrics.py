"""The one ranking-metrics module: full ranking, seen items excluded, pessimistic ties.

Every metric is derived from one number per user, the 1-based rank of the target among all
candidate items:

    rank = 1 + #{candidates scored higher than the target} + #{other candidates scored equal}

Counting ties above the target (pessimistic) means a model that gives every item the same score
gets rank = number of candidates, i.e. ~0 NDCG, never 1. Candidates are all real items (index 0 is
padding) except the `exclude`d ones; which items those are is the task (`evaluation.seen_items`,
applied by the data module, which builds `exclude` and chooses the users):

* `exclude` (default): "which new item next". The user's seen items are not candidates, and a user
  whose target is one of them is left out of the split and counted: such a target cannot be
  ranked, and keeping it as the one seen item among the candidates would make the exclusion depend
  on the answer (a model that scores recent items high then puts it at rank 1).
* `keep`: "what next, repeats included". Every item is a candidate, seen ones too; nothing is
  excluded and every user is ranked.
* `exclude_but_target`: the seen items are excluded except the target itself. That leaks the
  answer when the target repeats a seen item; it exists only to reproduce numbers reported that way.

The functions below rank whatever they are given: an `exclude` that holds the target keeps it as a
candidate (the third task), since the target is counted once, as "1 +".

From the rank r:  HR@K = [r <= K],  NDCG@K = [r <= K] / log2(r + 1),  MRR@K = [r <= K] / r,
Precision@K = HR@K / K and MAP@K = MRR@K (with one relevant item, average precision is the
precision at its rank, 1 / r): named separately because users look for them by those names.

Metrics of the recommended lists rather than of the target, from the same scores: catalogue
coverage@K (share of items in anyone's top K), average recommendation popularity ARP@K (mean
training count of the top-K items) and novelty@K (mean self-information -log2 p(item) of the
top-K items, p = the item's share of training interactions, +1 smoothed). `ListMetrics` keeps them.

Sampled ranking (the target ranked among N sampled non-seen items instead of all items) is an
explicit opt-in for comparison with old papers, labelled with its sampler and N; it is known to
mislead (Krichene & Rendle, KDD 2020). `sampled_target_ranks` computes it.

Several targets per user (`evaluation.targets=window` under a time split: every new item the user
interacted with in the window). Each target's rank is first taken among the candidates that are not
targets of that user (recsys/evaluation/window_ranking.py: pessimistic ties as above); the
targets are then placed in one list, best first, each after those ranked before it
(`list_positions` there: the i-th best target at rank r sits at position r + i - 1; a target that is not
a candidate, e.g. a cold item kept as a miss, sits past the catalogue). From the positions p_j of
the n targets, as IR defines them for several relevant items (trec_eval's recall, ndcg_cut, P,
map_cut): Recall@K = #{p_j <= K} / n, HR@K = [any p_j <= K], Precision@K = #{p_j <= K} / K,
NDCG@K = sum_{p_j <= K} 1 / log2(p_j + 1) over the ideal DCG of min(n, K) targets at the top,
MAP@K = (sum over the targets at p_j <= K of the precision at p_j) / n, MRR@K = 1 / min p_j if
that is <= K. With one target each equals the single-target metric above.

Means are exact across batches and processes: the accumulators keep sums and a count, and a
distributed run adds them up (never a mean of means).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from recsys.errors import UserInputError

DEFAULT_KS = (1, 5, 10, 20)
# evaluation.seen_items: what is done with the items a user has already interacted with (above).
SEEN_ITEMS = ("exclude", "keep", "exclude_but_target")
METRIC_NAMES = ("hr", "ndcg", "mrr", "map", "precision")
# evaluation.targets: one target per user (the first event of the window, or leave-one-out's), or
# every new item of the user's window (time splits).
TARGETS = ("next", "window")
LIST_METRIC_NAMES = ("coverage", "arp", "novelty")


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
    candidate = _candidates(scores, exclude)
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
        out[f"map@{k}"] = out[f"mrr@{k}"]
        out[f"precision@{k}"] = out[f"hr@{k}"] / k
    return out


def metric_names(ks: Sequence[int] = DEFAULT_KS, targets: str = "next") -> list[str]:
    names = METRIC_NAMES + (("recall",) if targets == "window" else ())
    return [f"{name}@{k}" for k in ks for name in names]


def metrics_from_positions(
    positions: torch.Tensor, ks: Sequence[int] = DEFAULT_KS
) -> dict[str, torch.Tensor]:
    """Per-user metric values of several targets per user (see the module docstring), from their
    list positions (B, T) (`list_positions`; 0: no target in that column). Every row has a target."""
    positions = positions.to(torch.float64)
    present = positions > 0
    count = present.sum(dim=1).to(torch.float64)
    # Ascending positions, absent ones last: the i-th hit's precision is i / p.
    ordered = torch.where(present, positions, torch.inf).sort(dim=1).values
    place = torch.arange(1, positions.size(1) + 1, dtype=torch.float64)
    ideal_gain = 1.0 / torch.log2(place + 1.0)
    out: dict[str, torch.Tensor] = {}
    for k in ks:
        hit = ordered <= k
        hits = hit.sum(dim=1).to(torch.float64)
        dcg = torch.where(hit, 1.0 / torch.log2(ordered + 1.0), 0.0).sum(dim=1)
        ideal = torch.cumsum(ideal_gain, 0)[(count.clamp(max=k) - 1).long().clamp(min=0)]
        out[f"hr@{k}"] = (hits > 0).to(torch.float64)
        out[f"ndcg@{k}"] = dcg / ideal
        out[f"mrr@{k}"] = torch.where(hit[:, 0], 1.0 / ordered[:, 0], 0.0)
        out[f"map@{k}"] = torch.where(hit, place / ordered, 0.0).sum(dim=1) / count
        out[f"precision@{k}"] = hits / k
        out[f"recall@{k}"] = hits / count
    return out


def check_targets(value: str, key: str = "evaluation.targets") -> str:
    if value not in TARGETS:
        raise UserInputError(f"{key}: {value!r} is not one of {list(TARGETS)}")
    return value


def check_ks(ks: Sequence[int], num_items: int) -> None:
    too_large = [k for k in ks if k > num_items]
    if too_large or any(k < 1 for k in ks):
        raise UserInputError(f"model.ks: each K must lie in 1..{num_items} (the catalogue), got {list(ks)}")


def check_seen_items(value: str, key: str = "evaluation.seen_items") -> str:
    if value not in SEEN_ITEMS:
        raise UserInputError(f"{key}: {value!r} is not one of {list(SEEN_ITEMS)}")
    return value


def _candidates(scores: torch.Tensor, exclude: torch.Tensor | None) -> torch.Tensor:
    candidate = torch.ones_like(scores, dtype=torch.bool)
    candidate[:, 0] = False
    if exclude is not None and exclude.numel() > 0:
        candidate.scatter_(1, exclude, False)
    return candidate


def top_k_items(scores: torch.Tensor, exclude: torch.Tensor | None, k: int) -> torch.Tensor:
    """(B, k) the k best-scored items per row, padding and the `exclude`d (seen) items left out."""
    masked = scores.float().masked_fill(~_candidates(scores, exclude), -torch.inf)
    return masked.topk(min(k, scores.size(1) - 1), dim=1).indices


def chunked_ranking(
    queries: torch.Tensor,
    item_vectors: torch.Tensor,
    target: torch.Tensor | None,
    exclude: torch.Tensor | None,
    k: int | None,
    chunk_size: int = 65536,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """`target_ranks` and `top_k_items` for dot-product scores, a chunk of items at a time.

    scores = queries (B, d) @ item_vectors (num_items + 1, d)^T are never held whole: each chunk's
    (B, chunk_size) scores, padding and seen items set to -inf, add to the count of items scored
    at or above the target and to a running top k, so memory stays B x chunk_size however large
    the catalogue. Ranks equal `target_ranks` on the full scores (same pessimistic ties, NaN
    counted above, a target scored NaN or -inf ranked last among the candidates); the top-k lists hold the same items, in the same order unless scores tie. Scores are float32
    with autocast off: bf16 would tie many items and, with pessimistic ties, cost real rank.
    Returns (ranks (B,) or None when target is None, top items (B, k) or None when k is None);
    `chunked_top_k` is the top-k alone, for recommending.
    """
    ranks, _, items = _chunked_pass(queries, item_vectors, target, exclude, k, chunk_size)
    return ranks, items


# Float64 products held at a time by _exact_dot: a model whose scores tie massively (attribute_knn:
# every item sharing nothing with the history scores 0) sends millions of pairs at once.
_EXACT_BLOCK_ELEMENTS = 1 << 22


def _exact_dot(a: torch.Tensor, a_rows: torch.Tensor, b: torch.Tensor, b_rows: torch.Tensor) -> torch.Tensor:
    """Dot products (n,) of the rows a[a_rows[i]] and b[b_rows[i]] in float64, summed in one fixed
    order for every pair (float32 products are exact in float64): equal pairs of vectors give
    bit-equal results. Gathered a block of pairs at a time (bounded memory)."""
    block = max(1, _EXACT_BLOCK_ELEMENTS // max(a.size(1), 1))
    out = torch.empty(len(a_rows), dtype=torch.float64, device=a.device)
    for begin in range(0, len(a_rows), block):
        rows = slice(begin, begin + block)
        products = a[a_rows[rows]].double() * b[b_rows[rows]].double()
        total = products[:, 0].clone()
        for j in range(1, products.size(1)):
            total += products[:, j]
        out[rows] = total
    return out


def _chunked_pass(queries, item_vectors, target, exclude, k, chunk_size):
    """(ranks or None, top-k scores or None, top-k items or None): see `chunked_ranking`."""
    with torch.autocast(device_type=queries.device.type, enabled=False):
        queries, item_vectors = queries.float(), item_vectors.float()
        batch, width = queries.size(0), item_vectors.size(0)
        rows = torch.arange(batch, device=queries.device)
        # Without targets, one dummy target column keeps the code below in one shape.
        target_vectors = item_vectors[target if target is not None else torch.zeros_like(rows)]
        if target is not None:
            # Two float32 products of the same vectors can differ by rounding: a BLAS sums a
            # column in an order that depends on its place in the matrix. Scores that close to the
            # target's (within twice the float32 error bound of a d-term dot product) are compared
            # again from `_exact_dot`, which computes every pair the same way: an item with the
            # target's very vector then ties with it exactly, and is counted above (pessimistic).
            exact_target = _exact_dot(queries, rows, item_vectors, target)
            bound = queries.norm(dim=1) * item_vectors.norm(dim=1).max()
            tolerance = queries.size(1) * 2.0**-23 * bound
        above = torch.zeros(batch, dtype=torch.long, device=queries.device)
        k = None if k is None else min(k, width - 1)
        best_scores = best_items = None
        broken = None  # targets scored NaN or -inf: ranked last, below every candidate
        for begin in range(0, width, chunk_size):
            end = min(begin + chunk_size, width)
            size = end - begin
            both = queries @ torch.cat([item_vectors[begin:end], target_vectors]).T
            target_score = both[:, size:].diagonal().clone()
            if broken is None:
                broken = target_score.isnan() | (target_score == -torch.inf)
            # Seen items of this chunk to -inf; those of other chunks land in column `size`, which
            # holds only the target scores just copied out.
            if exclude is not None and exclude.numel() > 0:
                inside = (exclude >= begin) & (exclude < end)
                both.scatter_(1, torch.where(inside, exclude - begin, size), -torch.inf)
            scores = both[:, :size]
            if begin == 0:
                scores[:, 0] = -torch.inf  # padding
            # NaN < t is False, so NaN scores (and every item, if t is NaN) count as above.
            if target is not None:
                below = scores < target_score[:, None]
                # Only finite scores: padding and seen items (-inf) keep their place below the
                # target even when a non-finite item norm makes the tolerance infinite.
                near = ((scores - target_score[:, None]).abs() <= tolerance[:, None]) & scores.isfinite()
                near_rows, near_items = near.nonzero(as_tuple=True)
                if near_rows.numel():
                    exact = _exact_dot(queries, near_rows, item_vectors, begin + near_items)
                    below[near_rows, near_items] = exact < exact_target[near_rows]
                # The target is not above itself: it is the "1 +" below.
                is_target = (target >= begin) & (target < end)
                at_target_below = below[rows, (target - begin).clamp(0, size - 1)]
                above += size - below.sum(dim=1) - (is_target & ~at_target_below).long()
            if k is not None:
                best_scores, best_items = _merge_top_k(scores, begin, k, best_scores, best_items)
        if target is None:
            return None, best_scores, best_items
        ranks = 1 + above
        if bool(broken.any()):
            ranks = torch.where(broken, _candidate_count(width, target, exclude), ranks)
    return ranks, best_scores, best_items


def _merge_top_k(scores, begin, k, best_scores, best_items):
    """The running top k (scores, items) after one more chunk of `scores` (items from `begin`)."""
    top = scores.topk(min(k, scores.size(1)), dim=1)
    items = top.indices + begin
    if best_scores is None:
        return top.values, items
    merged_scores = torch.cat([best_scores, top.values], dim=1)
    merged = merged_scores.topk(min(k, merged_scores.size(1)), dim=1)
    return merged.values, torch.cat([best_items, items], dim=1).gather(1, merged.indices)


def _left_out(scores: torch.Tensor, items: torch.Tensor | None, begin: int, end: int) -> None:
    """Set to -inf the scores (B, end - begin + 1) of the rows' `items` in [begin, end); the
    others land in the spare last column."""
    if items is None or items.numel() == 0:
        return
    inside = (items >= begin) & (items < end)
    scores.scatter_(1, torch.where(inside, items - begin, end - begin), -torch.inf)


def chunked_top_k(
    queries: torch.Tensor,
    item_vectors: torch.Tensor,
    exclude: torch.Tensor | None,
    k: int,
    chunk_size: int = 65536,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores (B, k), items (B, k)): the k best items per row by dot product, padding and the
    `exclude`d items left out, a chunk of items at a time (see `chunked_ranking`). Where fewer than
    k items are left, the last columns hold excluded items scored -inf."""
    _, scores, items = _chunked_pass(queries, item_vectors, None, exclude, k, chunk_size)
    return scores, items


def _candidate_count(width: int, target: torch.Tensor, exclude: torch.Tensor | None) -> torch.Tensor:
    """Candidates of each row, the target included: real items minus the distinct seen ones."""
    if exclude is None or exclude.numel() == 0:
        return torch.full_like(target, width - 1)
    seen = exclude.masked_fill(exclude == target[:, None], 0).sort(dim=1).values
    distinct = (seen[:, 1:] != seen[:, :-1]) & (seen[:, 1:] != 0)
    return width - 1 - distinct.sum(dim=1) - (seen[:, 0] != 0).long()


def sampled_target_ranks(target_scores: torch.Tensor, negative_scores: torch.Tensor) -> torch.Tensor:
    """1-based pessimistic rank of each target, scored (B, 1), among its (B, N) sampled negatives."""
    target_scores, negative_scores = target_scores.float(), negative_scores.float()
    above = (negative_scores >= target_scores) | negative_scores.isnan() | target_scores.isnan()
    return 1 + above.sum(dim=1)


def sample_unseen(
    target: torch.Tensor,
    exclude: torch.Tensor | None,
    num_items: int,
    num_negatives: int,
    generator: torch.Generator,
    probabilities: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, N) items drawn uniformly (or by `probabilities`), never the target or a seen item."""
    forbidden = torch.zeros(target.size(0), num_items + 1, dtype=torch.bool, device=target.device)
    forbidden[:, 0] = True
    if exclude is not None and exclude.numel() > 0:
        forbidden.scatter_(1, exclude, True)
    forbidden[torch.arange(target.size(0), device=target.device), target] = True
    weights = probabilities if probabilities is not None else torch.ones(num_items + 1, device=target.device)
    weights = weights.float().clone()
    weights[0] = 0.0

    def draw(count: int) -> torch.Tensor:
        return torch.multinomial(weights, count, replacement=True, generator=generator)

    negatives = draw(target.size(0) * num_negatives).view(target.size(0), num_negatives)
    for _ in range(1000):  # redraw forbidden ones: exact sampling from the allowed items
        bad = forbidden.gather(1, negatives)
        if not bad.any():
            return negatives
        negatives[bad] = draw(int(bad.sum()))
    raise RuntimeError("sampled metrics: could not draw unseen negatives (history covers the catalogue?)")


class ListMetrics:
    """Coverage@K, ARP@K and novelty@K of the recommended top-K lists, exact across processes.

    item_counts: training interaction count of every item (index 0 = padding).
    """

    def __init__(self, ks: Sequence[int], item_counts: torch.Tensor):
        self.ks = tuple(ks)
        counts = item_counts.to(torch.float64)
        self.popularity = counts
        share = (counts + 1.0) / (counts[1:].sum() + (len(counts) - 1))
        self.self_information = -torch.log2(share)
        self.reset()

    def reset(self) -> None:
        self.recommended = {k: torch.zeros(len(self.popularity), dtype=torch.float64) for k in self.ks}
        self.sums = {f"{name}@{k}": 0.0 for k in self.ks for name in ("arp", "novelty")}
        self.count = 0

    def update(self, top_items: torch.Tensor) -> None:
        """top_items: (B, >= max K) item ids, best first."""
        top_items = top_items.cpu()
        for k in self.ks:
            items = top_items[:, :k]
            self.recommended[k][items.flatten()] = 1.0
            self.sums[f"arp@{k}"] += float(self.popularity[items].mean(dim=1).sum())
            self.sums[f"novelty@{k}"] += float(self.self_information[items].mean(dim=1).sum())
        self.count += top_items.size(0)

    def compute(self, reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, float]:
        names = list(self.sums)
        totals = torch.cat(
            [torch.tensor([self.sums[n] for n in names] + [float(self.count)], dtype=torch.float64)]
            + [self.recommended[k] for k in self.ks]
        )
        if reduce_sum is not None:
            totals = reduce_sum(totals)
        count = float(totals[len(names)])
        out = {name: float(totals[i]) / count if count else math.nan for i, name in enumerate(names)}
        width = len(self.popularity)
        for index, k in enumerate(self.ks):
            begin = len(names) + 1 + index * width
            seen = totals[begin + 1 : begin + width] > 0  # items 1..num_items
            out[f"coverage@{k}"] = float(seen.sum()) / (width - 1)
        return out


class RankingMetrics:
    """Accumulates per-user metric sums and the user count; computes exact means.

    `reduce_sum` (e.g. a Lightning strategy's all-reduce) adds the sums up across processes.
    """

    def __init__(self, ks: Sequence[int] = DEFAULT_KS, targets: str = "next"):
        self.ks = tuple(ks)
        self.targets = check_targets(targets)
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, float] = dict.fromkeys(metric_names(self.ks, self.targets), 0.0)
        self.count = 0

    def update(self, ranks: torch.Tensor) -> dict[str, torch.Tensor]:
        """ranks: (B,) one target's rank per user, or under targets=window (B, T) list positions."""
        if (ranks.dim() == 2) != (self.targets == "window"):
            raise RuntimeError(f"metrics for targets={self.targets} got ranks of shape {tuple(ranks.shape)}")
        if self.targets == "window":
            values = metrics_from_positions(ranks, self.ks)
        else:
            values = metrics_from_ranks(ranks, self.ks)
        for name, per_user in values.items():
            self.sums[name] += float(per_user.sum())
        self.count += int(ranks.size(0))
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
