"""Softmax cross-entropy over the whole catalogue (`loss=ce`): the reference and the chunked paths
(the fused Triton kernels are in recsys/fused_cross_entropy.py)."""

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


def float32_logits(hidden: torch.Tensor) -> contextlib.AbstractContextManager:
    """Autocast off, for logits computed from float32 operands: under bf16 autocast a matmul would
    run in bf16 (three significant digits), and close scores would tie or swap."""
    return torch.autocast(device_type=hidden.device.type, enabled=False)


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
