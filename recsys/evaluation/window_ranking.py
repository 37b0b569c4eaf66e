"""Ranking several targets per user (evaluation.targets=window): each target's rank among the
candidates that are not targets of the user, and the targets' places in one list.

The metrics of those places are `metrics_from_positions` in recsys/evaluation/metrics.py, whose
docstring says what they are; this module shares its exact-tie comparison and chunking helpers.
"""

from __future__ import annotations

import torch

from recsys.evaluation.metrics import _candidate_count, _candidates, _exact_dot, _left_out, _merge_top_k


def window_target_ranks(
    scores: torch.Tensor, targets: torch.Tensor, exclude: torch.Tensor | None = None
) -> torch.Tensor:
    """(B, T) 1-based pessimistic rank of each of a row's targets among the candidates that are
    not targets of the row (padding, `exclude`d items and the row's other targets left out).

    scores: (B, num_items + 1); targets: (B, T) item indices, 0 where a row has fewer targets
    (their ranks are 0). The plain reference of `chunked_window_ranks`."""
    scores = scores.float()
    candidate = _candidates(scores, exclude)
    candidate.scatter_(1, targets, False)
    candidate[:, 0] = False
    target_score = scores.gather(1, targets)
    ranks = torch.zeros_like(targets)
    for column in range(targets.size(1)):
        score = target_score[:, column : column + 1]
        above = (scores >= score) | scores.isnan() | score.isnan()
        ranks[:, column] = 1 + (above & candidate).sum(dim=1)
    return torch.where(targets > 0, ranks, 0)


def chunked_window_ranks(
    queries: torch.Tensor,
    item_vectors: torch.Tensor,
    targets: torch.Tensor,
    exclude: torch.Tensor | None,
    k: int | None = None,
    chunk_size: int = 65536,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`window_target_ranks` for dot-product scores, a chunk of items at a time, and the top-k
    items (None when k is None; the targets are among the candidates there, as in `chunked_top_k`).

    The queries are scored once against each chunk; every (user, target) pair then counts the
    chunk's candidates at or above it, a block of at most B pairs at a time (work in proportion to
    the targets, memory as for one target per user), with `chunked_ranking`'s exact comparison of
    near ties (float64 dot products) and its float32 scores (autocast off). A target scored NaN or
    -inf ranks last among the candidates."""
    with torch.autocast(device_type=queries.device.type, enabled=False):
        queries, item_vectors = queries.float(), item_vectors.float()
        batch = queries.size(0)
        width, dim = item_vectors.shape
        pair_rows, pair_columns = (targets > 0).nonzero(as_tuple=True)
        pair_items = targets[pair_rows, pair_columns]
        exact_target = _exact_dot(queries, pair_rows, item_vectors, pair_items)
        target_score = exact_target.float()[:, None]
        bound = queries.norm(dim=1) * item_vectors.norm(dim=1).max()
        tolerance = (dim * 2.0**-23 * bound)[pair_rows, None]
        above = torch.zeros(len(pair_rows), dtype=torch.long, device=queries.device)
        k = None if k is None else min(k, width - 1)
        best_scores = best_items = None
        for begin in range(0, width, chunk_size):
            end = min(begin + chunk_size, width)
            size = end - begin
            scores = torch.cat([queries @ item_vectors[begin:end].T, queries.new_zeros(batch, 1)], 1)
            if begin == 0:
                scores[:, 0] = -torch.inf  # padding
            _left_out(scores, exclude, begin, end)
            if k is not None:  # the recommended lists: every candidate, the targets too
                best_scores, best_items = _merge_top_k(scores[:, :size], begin, k, best_scores, best_items)
            _left_out(scores, targets, begin, end)  # not counted against each other
            scores = scores[:, :size]
            for first in range(0, len(pair_rows), max(batch, 1)):
                block = slice(first, first + batch)
                rows = scores[pair_rows[block]]
                score = target_score[block]
                below = rows < score  # NaN < t is False: NaN scores count as above
                near = ((rows - score).abs() <= tolerance[block]) & rows.isfinite()
                near_pairs, near_items = near.nonzero(as_tuple=True)
                if near_pairs.numel():
                    query_rows = pair_rows[block][near_pairs]
                    exact = _exact_dot(queries, query_rows, item_vectors, begin + near_items)
                    below[near_pairs, near_items] = exact < exact_target[block][near_pairs]
                above[block] += size - below.sum(dim=1)
        ranks = 1 + above
        broken = exact_target.isnan() | (exact_target == -torch.inf)
        if bool(broken.any()):
            left_out = (
                targets if exclude is None or exclude.numel() == 0 else torch.cat([exclude, targets], 1)
            )
            nothing = torch.zeros(batch, dtype=torch.long, device=queries.device)
            last = _candidate_count(width, nothing, left_out) + 1
            ranks = torch.where(broken, last[pair_rows], ranks)
        out = torch.zeros_like(targets)
        out[pair_rows, pair_columns] = ranks
    return out, best_items


def list_positions(ranks: torch.Tensor, miss: torch.Tensor | None, num_items: int) -> torch.Tensor:
    """(B, T) the list position of each target from its rank among the non-target candidates
    (`window_target_ranks`; 0: no target): the i-th best of a row's ranked targets sits at rank +
    i - 1; a `miss` (a target that is no candidate) sits at num_items + 1, past every list."""
    ranked = ranks > 0
    if miss is not None:
        ranked &= ~miss
    key = torch.where(ranked, ranks, torch.iinfo(ranks.dtype).max // 2)
    ordered, order = key.sort(dim=1, stable=True)
    place = torch.arange(ranks.size(1), device=ranks.device)
    positions = torch.empty_like(ranks).scatter_(1, order, ordered + place)
    positions = torch.where(ranked, positions, 0)
    if miss is not None:
        positions = torch.where(miss & (ranks > 0), num_items + 1, positions)
    return positions
