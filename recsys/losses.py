"""Training losses as plain modules, chosen by the `loss` config group (`loss=ce|sampled_softmax|bce|gbce`).

Every loss takes the hidden states at the positions that have a target, the targets, and the item
embedding table (row 0 is padding), and returns a scalar:

    loss(hidden (T, d), targets (T,) in 1..num_items, item_embeddings (num_items + 1, d)) -> ()

or, under `data.static_shapes` (recsys/training/module.py), the hidden states of every position of
a padded batch and `mask=` (T,) bool, True where a position has a target (the others' targets may be
0): the loss is then the mean over the masked positions, with the same value and gradients as over
those positions alone, computed without a shape or a host sync that depends on the data.

Losses that draw negatives own a seeded `NegativeSampler`, so the negatives of a run depend only on
the loss's seed, not on how many random numbers the model's dropout used before them. A loss class
that declares `uses_item_counts = True` is given the training set's item counts as `item_counts`
(popularity sampling and logQ correction need them).
"""

from __future__ import annotations

import contextlib
import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from recsys.errors import UserInputError
from recsys.fused_cross_entropy import fused_cross_entropy
from recsys.fused_cross_entropy import unavailable_reason as fused_unavailable_reason

log = logging.getLogger(__name__)

# Logits the loss may hold at once, in bytes, when item_chunk_size is left to choose itself.
LOGITS_BUDGET_BYTES = 1 << 30
# Redraws of popularity negatives that hit their positive, in a step without host syncs.
STATIC_REDRAWS = 2


class FullCrossEntropy(nn.Module):
    """Softmax cross-entropy over the whole catalogue ("SASRec+", Klenitskiy & Vasilev 2023).

    Three ways to the same value and gradients; the tests hold each to `F.cross_entropy`:

    - `chunk_size: null`: plain `F.cross_entropy` on the whole tokens x items logits (the reference).
    - Token chunks (`chunk_size` tokens each on a CPU, all tokens at once on a GPU), used while the whole float32 tokens x items table fits
      `LOGITS_BUDGET_BYTES`: `_ChunkedSoftmaxCrossEntropy` keeps the softmax probabilities for
      backward (half of what `F.cross_entropy` keeps, fewer passes); on a 2-core CPU an epoch of
      Beauty spends about half the time in the loss that `F.cross_entropy` does.
    - Item chunks (`item_chunk_size` items each), used when the table would not fit, or always when
      `item_chunk_size` is set: `_ItemChunkedCrossEntropy` keeps only each token's logsumexp and
      recomputes a chunk's logits in backward, so memory is tokens x item_chunk_size whatever the
      catalogue (one extra matrix product: the price of catalogues of millions of items).

    On a CUDA GPU with Triton, `fused` (true, or auto) uses the kernels of
    `recsys.fused_cross_entropy` instead: the logits never leave the GPU's registers, so the loss
    runs at tensor-core speed at any catalogue size. Their operands are bf16 under a bf16 autocast
    (the torch paths here compute in float32). `fused: true` where they cannot run (no GPU, no
    Triton) falls back to the torch paths with one warning.
    """

    def __init__(
        self, chunk_size: int | None = 256, item_chunk_size: int | None = None, fused: bool | str = False
    ):
        super().__init__()
        if fused not in (True, False, "auto"):
            raise UserInputError(f"loss.fused: must be true, false or auto, got {fused!r}")
        self.fused = fused
        self._fallback_warned = False
        if chunk_size is not None and chunk_size < 1:
            raise UserInputError(f"loss.chunk_size: must be >= 1 or null, got {chunk_size}")
        if item_chunk_size is not None and item_chunk_size < 1:
            raise UserInputError(f"loss.item_chunk_size: must be >= 1 or null, got {item_chunk_size}")
        self.chunk_size = chunk_size
        self.item_chunk_size = item_chunk_size

    def check_catalogue(self, num_items: int) -> None:
        if self.item_chunk_size is not None and self.item_chunk_size > num_items:
            raise UserInputError(
                f"loss.item_chunk_size: {self.item_chunk_size} is larger than the catalogue "
                f"({num_items} items); use null or a value in 1..{num_items}"
            )

    def forward(
        self,
        hidden: torch.Tensor,
        targets: torch.Tensor,
        item_embeddings: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if mask is None:
            return self._mean(hidden, targets, item_embeddings[1:])  # padding is never a class
        # A position without a target gets a zero query: its logits are all 0, so it adds exactly
        # log(items) to the summed loss and nothing to any gradient (the gradient of an item vector
        # is a sum of queries). Every path below, the fused kernels included, then serves as is.
        catalogue = item_embeddings[1:]
        tokens, count = mask.numel(), mask.sum()
        mean = self._mean(hidden * mask[:, None].to(hidden.dtype), targets.clamp(min=1), catalogue)
        return (mean * tokens - (tokens - count) * math.log(catalogue.size(0))) / count.clamp(min=1)

    def _mean(self, hidden: torch.Tensor, targets: torch.Tensor, catalogue: torch.Tensor) -> torch.Tensor:
        if self.fused and self._fused_can_run(hidden.device):
            return fused_cross_entropy(hidden, catalogue, targets - 1)
        if self.chunk_size is None:
            with float32_logits(hidden):
                return F.cross_entropy(hidden.float() @ catalogue.float().T, targets - 1)
        tokens, items = hidden.size(0), catalogue.size(0)
        item_chunk = self.item_chunk_size
        if item_chunk is None and tokens * items * 4 > LOGITS_BUDGET_BYTES:
            item_chunk = max(1, LOGITS_BUDGET_BYTES // (4 * max(tokens, 1)))
        if item_chunk is None or item_chunk >= items:
            # Token chunks pay off on a CPU (see above); a GPU's caching allocator reuses memory
            # anyway, and there each chunk costs kernel launches: one chunk of all the tokens.
            token_chunk = self.chunk_size if hidden.device.type == "cpu" else max(tokens, 1)
            return _ChunkedSoftmaxCrossEntropy.apply(hidden, catalogue, targets - 1, token_chunk)
        return _ItemChunkedCrossEntropy.apply(hidden, catalogue, targets - 1, item_chunk)

    def _fused_can_run(self, device: torch.device) -> bool:
        reason = fused_unavailable_reason(device)
        if reason is not None and self.fused is True and not self._fallback_warned:
            self._fallback_warned = True
            log.warning(
                "loss.fused: the fused kernels cannot run (%s); using the PyTorch loss instead", reason
            )
        return reason is None


class _ChunkedSoftmaxCrossEntropy(torch.autograd.Function):
    """mean_t [logsumexp_j(h_t . w_j) - h_t . w_{y_t}], in float32, over chunks of tokens.

    Forward turns each chunk's logits into softmax probabilities in place and keeps them for
    backward, where d loss / d logits = (softmax - onehot) / T. Chunks of a few hundred tokens stay
    below glibc's mmap threshold, so their memory is reused from step to step instead of being
    page-faulted in afresh, which on a CPU costs as much as the matrix product itself.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int):
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            h, w = hidden.float(), weight.float()
            total = hidden.new_zeros((), dtype=torch.float32)
            probabilities = []
            for begin in range(0, h.size(0), chunk_size):
                chunk = slice(begin, begin + chunk_size)
                logits = h[chunk] @ w.T
                rows = torch.arange(logits.size(0), device=h.device)
                target_logits = logits[rows, targets[chunk]]
                peak = logits.amax(dim=1, keepdim=True)
                sums = logits.sub_(peak).exp_().sum(dim=1, keepdim=True)
                total += (peak + sums.log()).sum() - target_logits.sum()
                probabilities.append(logits.div_(sums))
        ctx.save_for_backward(hidden, weight, targets)
        ctx.probabilities = probabilities
        ctx.chunk_size = chunk_size
        return total / h.size(0)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        hidden, weight, targets = ctx.saved_tensors
        if ctx.probabilities is None:
            raise RuntimeError("FullCrossEntropy: backward through the chunked loss can run only once")
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            h, w = hidden.float(), weight.float()
            scale = grad_output.float() / h.size(0)
            grad_h = torch.empty_like(h)
            # Accumulated as (d, items): h^T @ probs runs faster than probs^T @ h on CPU BLAS.
            grad_w_t = torch.zeros(w.size(1), w.size(0), device=w.device)
            for index, probs in enumerate(ctx.probabilities):
                chunk = slice(index * ctx.chunk_size, index * ctx.chunk_size + probs.size(0))
                rows = torch.arange(probs.size(0), device=h.device)
                probs[rows, targets[chunk]] -= 1.0  # softmax - onehot, in place
                probs.mul_(scale)
                torch.mm(probs, w, out=grad_h[chunk])
                grad_w_t.addmm_(h[chunk].T, probs)
        ctx.probabilities = None  # frees the memory now
        return grad_h.to(hidden.dtype), grad_w_t.T.to(weight.dtype), None, None


class _ItemChunkedCrossEntropy(torch.autograd.Function):
    """The same loss over chunks of items, never holding more than tokens x item_chunk logits.

    Forward runs an online logsumexp over the item chunks (running maximum and rescaled sum, as
    flash attention does over keys) and saves only the (T,) logsumexp. Backward recomputes each
    chunk's logits, turns them into (softmax - onehot) / T with the saved logsumexp, and adds the
    chunk's share to d hidden and writes d weight for the chunk's rows.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, item_chunk: int):
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            h, w = hidden.float(), weight.float()
            peak = torch.full((h.size(0),), -torch.inf, device=h.device)
            sums = torch.zeros(h.size(0), device=h.device)
            for begin in range(0, w.size(0), item_chunk):
                logits = h @ w[begin : begin + item_chunk].T
                new_peak = torch.maximum(peak, logits.amax(dim=1))
                sums = sums * (peak - new_peak).exp() + logits.sub_(new_peak[:, None]).exp_().sum(dim=1)
                peak = new_peak
            logsumexp = peak + sums.log()
            target_logits = (h * w[targets]).sum(dim=1)
        ctx.save_for_backward(hidden, weight, targets, logsumexp)
        ctx.item_chunk = item_chunk
        return (logsumexp - target_logits).mean()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        hidden, weight, targets, logsumexp = ctx.saved_tensors
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            h, w = hidden.float(), weight.float()
            scale = grad_output.float() / h.size(0)
            grad_h = torch.zeros_like(h)
            grad_w = torch.empty_like(w)
            rows = torch.arange(h.size(0), device=h.device)
            for begin in range(0, w.size(0), ctx.item_chunk):
                chunk_w = w[begin : begin + ctx.item_chunk]
                probs = (h @ chunk_w.T).sub_(logsumexp[:, None]).exp_()
                here = (targets >= begin) & (targets < begin + chunk_w.size(0))
                probs[rows[here], targets[here] - begin] -= 1.0
                probs.mul_(scale)
                grad_h.addmm_(probs, chunk_w)
                torch.mm(probs.T, h, out=grad_w[begin : begin + chunk_w.size(0)])
        return grad_h.to(hidden.dtype), grad_w.to(weight.dtype), None, None


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
        """q(item) for items 0..num_items (0 = padding, probability 0), ignoring the exclusion.

        Computed at each call (a few microseconds): a cache would be state a compiled step guards
        on, compiling again when it fills."""
        if self.distribution == "uniform":
            q = torch.full((num_items + 1,), 1.0 / num_items, device=device)
        else:
            if self.item_counts is None:
                raise UserInputError(
                    "loss.item_counts: popularity sampling and logQ need the training item counts"
                )
            q = self.item_counts.to(device)[: num_items + 1] + 1.0
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


def float32_logits(hidden: torch.Tensor) -> contextlib.AbstractContextManager:
    """Autocast off, for logits computed from float32 operands: under bf16 autocast a matmul would
    run in bf16 (three significant digits), and close scores would tie or swap."""
    return torch.autocast(device_type=hidden.device.type, enabled=False)


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
    """Float32 logits of each token's positive (T,) and of its own negatives (T, N)."""
    with float32_logits(hidden):
        hidden, item_embeddings = hidden.float(), item_embeddings.float()
        positive = (hidden * item_embeddings[targets]).sum(-1)
        negative = torch.einsum("td,tnd->tn", hidden, item_embeddings[negatives])
    return positive, negative


class SampledSoftmax(nn.Module):
    """Softmax cross-entropy over the positive and sampled negatives, with optional logQ correction.

    sampler `uniform` / `popularity`: `num_negatives` fresh negatives per token. With
    `logq_correction` their logits get - log(N q(item)), which makes the positive-plus-negatives
    softmax an importance-sampled estimate of the full one (Bengio & Senecal 2008); without it the
    loss overrates a positive against N items rather than the whole catalogue.

    sampler `in_batch`: the candidates are the distinct targets of the batch (each token's positive
    is among them exactly once). They were drawn in proportion to popularity, so with
    `logq_correction` every candidate's logit gets - log q(item) (Yi et al., RecSys 2019).
    `num_negatives` is then unused.

    sampler `mixed` (mixed negative sampling, Yang et al., WWW 2020; eSASRec's loss): the batch's
    distinct targets as above plus `num_negatives` items drawn uniformly, shared by every token of
    the batch. In-batch candidates are rare in the tail, uniform ones reach it. Each part gets its
    own correction: - log q(item) for the in-batch candidates (popularity), - log(N / num_items)
    for the uniform ones. A uniform draw equal to a token's own positive is left out of that
    token's softmax (the positive is already there, once, among the in-batch candidates).
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
                logits = self._in_batch_logits(hidden, candidates, item_embeddings)
            else:
                logits, positive_column = self._static_in_batch_logits(hidden, targets, item_embeddings, mask)
            if self.mixed:
                uniform = self._uniform_logits(hidden, targets, item_embeddings, static=mask is not None)
                logits = torch.cat([logits, uniform], dim=1)
            return _cross_entropy(logits, positive_column, mask)
        negatives = self.sampler(targets, num_items, self.num_negatives, static=mask is not None)
        positive, negative = _positive_and_negative_logits(hidden, targets, item_embeddings, negatives)
        if self.logq_correction:
            q = self.sampler.probabilities(num_items, hidden.device)[negatives]
            negative = negative - (self.num_negatives * q).log()
        logits = torch.cat([positive[:, None], negative], dim=1)
        return _cross_entropy(logits, torch.zeros_like(targets), mask)

    def _in_batch_logits(
        self, hidden: torch.Tensor, candidates: torch.Tensor, item_embeddings: torch.Tensor
    ) -> torch.Tensor:
        """(T, C) logits of the candidate items, each less log q(item) with logq_correction."""
        with float32_logits(hidden):
            logits = hidden.float() @ item_embeddings[candidates].float().T
        if self.logq_correction:
            q = self.sampler.probabilities(item_embeddings.size(0) - 1, hidden.device)
            logits = logits - q[candidates].log()
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
        logits = self._in_batch_logits(hidden, targets.clamp(min=1), item_embeddings)
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


def check_catalogue(loss: nn.Module | None, num_items: int) -> None:
    """A loss that draws N distinct-from-the-positive negatives needs N < num_items; a loss with
    options of its own that depend on the catalogue checks them in its `check_catalogue(num_items)`."""
    if hasattr(loss, "check_catalogue"):
        loss.check_catalogue(num_items)
    wanted = getattr(loss, "num_negatives", None)
    if wanted is not None and not getattr(loss, "in_batch", False) and wanted > num_items - 1:
        raise UserInputError(
            f"loss.num_negatives: {wanted} negatives asked for, but the catalogue has only "
            f"{num_items} items ({num_items - 1} besides the positive)"
        )
