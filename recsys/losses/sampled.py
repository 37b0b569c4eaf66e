"""Losses over sampled negatives (`loss=sampled_softmax|bce|gbce`) and the seeded negative sampler."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from recsys.errors import UserInputError
from recsys.losses.cross_entropy import float32_logits

# Redraws of popularity negatives that hit their positive, in a step without host syncs.
STATIC_REDRAWS = 2


class NegativeSampler(nn.Module):
    """Seeded draws of negative items, never equal to the positive they are drawn for.

    `uniform`: every other item equally likely. `popularity`: items in proportion to their training
    counts (plus one, so that no item is impossible), the positive's mass removed by redrawing the
    few draws that hit it. The generator is created on the first call, on the targets' device, from
    `seed`, so a run's negatives are reproducible. A module, so that the counts (a buffer, not in
    the state dict) move to the loss's device with it.
    """

    def __init__(self, distribution: str = "uniform", seed: int = 0, item_counts: torch.Tensor | None = None):
        super().__init__()
        if distribution not in ("uniform", "popularity"):
            raise UserInputError(
                f"loss.sampler: {distribution!r} is not one of ['uniform', 'popularity', 'in_batch', 'mixed']"
            )
        self.distribution = distribution
        self.seed = seed
        counts = None if item_counts is None else torch.as_tensor(item_counts).to(torch.float32)
        self.register_buffer("item_counts", counts, persistent=False)
        # q of the whole catalogue the counts describe, built once: a buffer moves with the loss and,
        # unlike a cache filled on the first call, is no state that a compiled step guards on.
        table = None if counts is None or len(counts) < 2 else self._popularity(counts, len(counts) - 1)
        self.register_buffer("popularity", table, persistent=False)
        self._generator: torch.Generator | None = None

    def _rng(self, device: torch.device) -> torch.Generator:
        if self._generator is None or self._generator.device != device:
            # Under DDP each process draws its own negatives (same seed on every rank would repeat them).
            distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
            rank = torch.distributed.get_rank() if distributed else 0
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self.seed + 1_000_003 * rank)
        return self._generator

    def probabilities(self, num_items: int, device: torch.device) -> torch.Tensor:
        """q(item) for items 0..num_items (0 = padding, probability 0), ignoring the exclusion."""
        if self.distribution == "uniform":
            q = torch.full((num_items + 1,), 1.0 / num_items, device=device)
            q[0] = 0.0
            return q
        if self.item_counts is None:
            raise UserInputError(
                "loss.item_counts: popularity sampling and logQ need the training item counts"
            )
        if self.popularity is not None and len(self.popularity) == num_items + 1:
            return self.popularity.to(device)
        return self._popularity(self.item_counts.to(device), num_items)

    def probability_of(self, items: torch.Tensor, num_items: int) -> torch.Tensor:
        """q of each of `items` (any shape, ids 1..num_items), without building the uniform table."""
        if self.distribution == "uniform":
            return torch.full_like(items, 1.0 / num_items, dtype=torch.float32)
        return self.probabilities(num_items, items.device)[items]

    @staticmethod
    def _popularity(counts: torch.Tensor, num_items: int) -> torch.Tensor:
        q = counts[: num_items + 1] + 1.0
        q = q / q[1:].sum()
        q[0] = 0.0
        return q

    def forward(
        self, targets: torch.Tensor, num_items: int, num_negatives: int, static: bool = False
    ) -> torch.Tensor:
        """(T, num_negatives) negatives in 1..num_items, none equal to its row's target.

        `static`: no host sync, no generator (for a compiled, graph-replayed step: a graph cannot
        take a torch.Generator, so draws come from torch's global generator, which the run's seed
        sets and checkpoints restore). Popularity draws that hit their positive are redrawn a
        fixed STATIC_REDRAWS times, then drawn uniformly: exact but for a share
        q(positive) ** (STATIC_REDRAWS + 1) of the draws, under 1e-6 for an item with 1% of the
        interactions."""
        generator = None if static else self._rng(targets.device)
        if self.distribution == "uniform":
            return uniform_negatives(targets, num_items, num_negatives, generator)
        q = self.probabilities(num_items, targets.device)

        def draw() -> torch.Tensor:
            drawn = torch.multinomial(
                q, targets.numel() * num_negatives, replacement=True, generator=generator
            )
            return drawn.view(targets.numel(), num_negatives)

        negatives = draw()
        if static:
            for _ in range(STATIC_REDRAWS):
                negatives = torch.where(negatives == targets[:, None], draw(), negatives)
            uniform = uniform_negatives(targets, num_items, num_negatives, generator)
            return torch.where(negatives == targets[:, None], uniform, negatives)
        # Redraw the draws that hit their positive: exact sampling from q without the positive.
        # Each round keeps a hit with probability q(positive) (a few percent at most).
        for _ in range(100):
            hits = negatives == targets[:, None]
            count = int(hits.sum())
            if count == 0:
                return negatives
            negatives[hits] = torch.multinomial(q, count, replacement=True, generator=generator)
        # Only a catalogue dominated by one item gets here: fall back to uniform for the rest.
        hits = negatives == targets[:, None]
        rows = hits.nonzero()[:, 0]
        negatives[hits] = uniform_negatives(targets[rows], num_items, 1, generator)[:, 0]
        return negatives


def uniform_negatives(
    targets: torch.Tensor, num_items: int, num_negatives: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(T, num_negatives) items drawn uniformly from 1..num_items without the target.

    Drawing from num_items - 1 values and shifting those at or above the target up by one keeps
    the draw uniform over the other items and never yields the target.
    """
    negatives = torch.randint(
        1, num_items, (targets.size(0), num_negatives), device=targets.device, generator=generator
    )
    return negatives + (negatives >= targets[:, None]).long()


def _check_num_negatives(num_negatives: int) -> None:
    if not isinstance(num_negatives, int) or num_negatives < 1:
        raise UserInputError(f"loss.num_negatives: must be an integer >= 1, got {num_negatives!r}")


def masked_mean(per_token: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The mean of per-token losses (T,) over the positions of `mask` (all of them if None)."""
    if mask is None:
        return per_token.mean()
    return torch.where(mask, per_token, 0.0).sum() / mask.sum().clamp(min=1)


def _cross_entropy(logits: torch.Tensor, columns: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return F.cross_entropy(logits, columns)
    return masked_mean(F.cross_entropy(logits, columns, reduction="none"), mask)


def _positive_and_negative_logits(
    hidden: torch.Tensor, targets: torch.Tensor, item_embeddings: torch.Tensor, negatives: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 logits of each token's positive (T,) and of its own negatives (T, N).

    Two routes to the same numbers. Gathering each token's N negative vectors holds (T, N, dim)
    floats; scoring every item with one matrix product holds (T, items). The product is taken
    whenever it is no larger, a catalogue of at most N * dim rows (ML-1M's 3,417 against 256 * 64):
    there it is a dense GEMM instead of a gather and its scatter-add backward, which makes a whole
    esasrec_ml1m training step 1.7x faster on the CPU (RESULTS.md, "ML-1M presets on the CPU").
    Larger catalogues gather, so memory stays bounded by the negatives, not the catalogue."""
    with float32_logits(hidden):
        hidden, item_embeddings = hidden.float(), item_embeddings.float()
        if item_embeddings.size(0) <= negatives.size(1) * hidden.size(1):
            return _logits_from_every_score(hidden, targets, item_embeddings, negatives)
        return _logits_from_gathered_vectors(hidden, targets, item_embeddings, negatives)


def _logits_from_every_score(
    hidden: torch.Tensor, targets: torch.Tensor, item_embeddings: torch.Tensor, negatives: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    scores = hidden @ item_embeddings.T
    return scores.gather(1, targets[:, None]).squeeze(1), scores.gather(1, negatives)


def _logits_from_gathered_vectors(
    hidden: torch.Tensor, targets: torch.Tensor, item_embeddings: torch.Tensor, negatives: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    positive = (hidden * item_embeddings[targets]).sum(-1)
    return positive, torch.einsum("td,tnd->tn", hidden, item_embeddings[negatives])


class SampledSoftmax(nn.Module):
    """Softmax cross-entropy over the positive and sampled negatives, with optional logQ correction.

    sampler `uniform` / `popularity`: `num_negatives` fresh negatives per token. With
    `logq_correction` their logits get - log(N q(item)), which makes the positive-plus-negatives
    softmax an importance-sampled estimate of the full one (Bengio & Senecal 2008); without it the
    loss overrates a positive against N items rather than the whole catalogue.

    sampler `in_batch`: the candidates are the distinct targets of the batch (each token's positive
    is among them exactly once). The batch's T targets were drawn in proportion to popularity, so
    with `logq_correction` every candidate's logit gets - log(T q(item)), its expected count among
    them (Yi et al., RecSys 2019). `num_negatives` is then unused.

    sampler `mixed` (mixed negative sampling, Yang et al., WWW 2020; eSASRec's loss): the batch's
    distinct targets as above plus `num_negatives` items drawn uniformly, shared by every token of
    the batch. In-batch candidates are rare in the tail, uniform ones reach it. Each part gets its
    own correction, each the log of an expected count: - log(T q(item)) for the in-batch candidates,
    - log(N / num_items) for the uniform ones. The counts put the two parts on one scale; alone,
    in-batch candidates could drop the factor T (a shift of every logit, which changes no
    softmax), but beside uniform draws it is what weighs the parts: without it the uniform part
    counts T times (256 to 5,650 on Beauty, median 384) too little and `mixed` is in-batch alone. A uniform
    draw equal to a token's own positive is left out of that token's softmax (the positive is
    already there, once, among the in-batch candidates).
    """

    uses_item_counts = True  # recsys/models/from_config.py passes the training counts

    def __init__(
        self,
        num_negatives: int = 256,
        sampler: str = "uniform",
        logq_correction: bool = True,
        seed: int = 0,
        item_counts: torch.Tensor | None = None,
    ):
        super().__init__()
        _check_num_negatives(num_negatives)
        self.num_negatives = num_negatives
        self.in_batch = sampler in ("in_batch", "mixed")
        self.mixed = sampler == "mixed"
        self.sampler = NegativeSampler("popularity" if self.in_batch else sampler, seed, item_counts)
        # mixed: the uniform part's draws, from their own seeded generator.
        self.uniform = NegativeSampler("uniform", seed) if self.mixed else None
        self.logq_correction = logq_correction

    def forward(
        self,
        hidden: torch.Tensor,
        targets: torch.Tensor,
        item_embeddings: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        num_items = item_embeddings.size(0) - 1
        if self.in_batch:
            if mask is None:
                candidates, positive_column = torch.unique(targets, return_inverse=True)
                logits = self._in_batch_logits(hidden, candidates, item_embeddings, targets.numel())
            else:
                logits, positive_column = self._static_in_batch_logits(hidden, targets, item_embeddings, mask)
            if self.mixed:
                uniform = self._uniform_logits(hidden, targets, item_embeddings, static=mask is not None)
                logits = torch.cat([logits, uniform], dim=1)
            return _cross_entropy(logits, positive_column, mask)
        negatives = self.sampler(targets, num_items, self.num_negatives, static=mask is not None)
        positive, negative = _positive_and_negative_logits(hidden, targets, item_embeddings, negatives)
        if self.logq_correction:
            q = self.sampler.probability_of(negatives, num_items)
            negative = negative - (self.num_negatives * q).log()
        logits = torch.cat([positive[:, None], negative], dim=1)
        return _cross_entropy(logits, torch.zeros_like(targets), mask)

    def _in_batch_logits(
        self,
        hidden: torch.Tensor,
        candidates: torch.Tensor,
        item_embeddings: torch.Tensor,
        num_targets: int | torch.Tensor,
    ) -> torch.Tensor:
        """(T, C) logits of the candidate items, each less log(num_targets q(item)) with
        logq_correction (num_targets: the batch's target count, a tensor in the static step)."""
        with float32_logits(hidden):
            logits = hidden.float() @ item_embeddings[candidates].float().T
        if self.logq_correction:
            q = self.sampler.probabilities(item_embeddings.size(0) - 1, hidden.device)
            logits = logits - (num_targets * q[candidates]).log()
        return logits

    def _static_in_batch_logits(
        self, hidden: torch.Tensor, targets: torch.Tensor, item_embeddings: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The in-batch candidates without torch.unique (whose size depends on the data): one
        column per position, the positive's column its item's first position among those with a
        target; later positions of the same item and positions without a target are no candidates.
        The same softmax as over the distinct targets. Returns the (T, T) logits and each
        position's positive column."""
        positions = torch.arange(targets.size(0), device=targets.device)
        first = ((targets[:, None] == targets[None, :]) & mask[None, :]).int().argmax(dim=1)
        candidate = mask & (first == positions)
        # A position without a target (item 0, probability 0) scores item 1 instead: it is no candidate.
        logits = self._in_batch_logits(hidden, targets.clamp(min=1), item_embeddings, mask.sum())
        # Positions without a target keep every column, so that their (unused) loss stays finite.
        logits = logits.masked_fill(~candidate[None, :] & mask[:, None], -torch.inf)
        return logits, first

    def _uniform_logits(
        self, hidden: torch.Tensor, targets: torch.Tensor, item_embeddings: torch.Tensor, static: bool = False
    ) -> torch.Tensor:
        """(T, N) logits of `num_negatives` items drawn uniformly (with replacement) for the whole
        batch, logQ-corrected, each token's own positive masked out (`static`: see NegativeSampler)."""
        num_items = item_embeddings.size(0) - 1
        drawn = self._uniform_items(num_items, targets.device, static)
        with float32_logits(hidden):
            logits = hidden.float() @ item_embeddings[drawn].float().T
        if self.logq_correction:
            logits = logits - math.log(self.num_negatives / num_items)
        return logits.masked_fill(drawn[None, :] == targets[:, None], -torch.inf)

    def _uniform_items(self, num_items: int, device: torch.device, static: bool) -> torch.Tensor:
        """The `num_negatives` uniform draws of sampler `mixed` (`static`: see NegativeSampler)."""
        generator = None if static else self.uniform._rng(device)
        return torch.randint(1, num_items + 1, (self.num_negatives,), device=device, generator=generator)


class BinaryCrossEntropy(nn.Module):
    """Binary cross-entropy, positive against N uniformly drawn negatives; N = 1 is the original SASRec.

    Per token: -log sigmoid(s+) - sum over negatives of log(1 - sigmoid(s-)), averaged over tokens.
    """

    def __init__(self, num_negatives: int = 1, seed: int = 0, logit_bias: bool = False):
        super().__init__()
        _check_num_negatives(num_negatives)
        self.num_negatives = num_negatives
        self.sampler = NegativeSampler("uniform", seed)
        # A learned constant added to every logit, starting from the best constant score
        # log(beta / N) (where beta sigmoid(-b) = N sigmoid(b)). With many negatives the loss first
        # wants every score far below zero; without the constant the model gets there by giving all
        # item embeddings a shared component, which (embeddings being tied) wipes out item identity
        # in the inputs: gBCE with 256 negatives stalled at val NDCG@10 0.009 on Beauty, the items'
        # shared component 3x their own. A constant changes no ranking, so scoring ignores it.
        self.logit_bias = nn.Parameter(torch.zeros(())) if logit_bias else None

    def positive_weight(self, num_items: int) -> float:
        return 1.0

    def forward(
        self,
        hidden: torch.Tensor,
        targets: torch.Tensor,
        item_embeddings: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        num_items = item_embeddings.size(0) - 1
        negatives = self.sampler(targets, num_items, self.num_negatives, static=mask is not None)
        positive, negative = _positive_and_negative_logits(hidden, targets, item_embeddings, negatives)
        beta = self.positive_weight(num_items)
        if self.logit_bias is not None:
            constant = self.logit_bias + math.log(beta / self.num_negatives)
            positive, negative = positive + constant, negative + constant
        return masked_mean(-beta * F.logsigmoid(positive) - F.logsigmoid(-negative).sum(-1), mask)


class GeneralisedBinaryCrossEntropy(BinaryCrossEntropy):
    """gBCE (gSASRec, Petrov & Macdonald, RecSys 2023): BCE whose positive term is raised to beta.

    Sampling N of the num_items - 1 other items (rate alpha = N / (num_items - 1)) makes BCE's
    predicted probabilities overconfident; -log(sigmoid(s+) ** beta) with
    beta = alpha * (t * (1 - 1/alpha) + 1/alpha) calibrates them: t = 0 is plain BCE (beta = 1),
    t = 1 gives beta = alpha, the fully calibrated case.
    """

    def __init__(self, num_negatives: int = 256, t: float = 0.75, seed: int = 0, logit_bias: bool = True):
        super().__init__(num_negatives, seed, logit_bias)
        if not 0.0 <= t <= 1.0:
            raise UserInputError(f"loss.t: the calibration parameter must lie in [0, 1], got {t}")
        self.t = t

    def positive_weight(self, num_items: int) -> float:
        alpha = self.num_negatives / max(num_items - 1, 1)
        return alpha * (self.t * (1.0 - 1.0 / alpha) + 1.0 / alpha)
