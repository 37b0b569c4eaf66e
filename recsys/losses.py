"""Training losses as plain modules, chosen by config (`model.loss._target_`).

Every loss takes the hidden states at the positions that have a target, the targets, and the item
embedding table (row 0 is padding), and returns a scalar:

    loss(hidden (T, d), targets (T,) in 1..num_items, item_embeddings (num_items + 1, d)) -> ()
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FullCrossEntropy(nn.Module):
    """Softmax cross-entropy over the whole catalogue ("SASRec+", Klenitskiy & Vasilev 2023).

    With `chunk_size` (tokens per chunk), `_ChunkedSoftmaxCrossEntropy` computes the same value and
    gradients chunk by chunk, keeping one float32 tokens x items table of probabilities (half of
    what `F.cross_entropy` keeps) and making fewer passes over it: on a 2-core CPU an epoch of
    Beauty takes about half the loss time. `chunk_size: null` uses `F.cross_entropy`, the reference
    the tests hold the chunked path to.
    """

    def __init__(self, chunk_size: int | None = 256):
        super().__init__()
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"model.loss.chunk_size: must be >= 1 or null, got {chunk_size}")
        self.chunk_size = chunk_size

    def forward(
        self, hidden: torch.Tensor, targets: torch.Tensor, item_embeddings: torch.Tensor
    ) -> torch.Tensor:
        catalogue = item_embeddings[1:]  # padding is never a class
        if self.chunk_size is None:
            return F.cross_entropy((hidden @ catalogue.T).float(), targets - 1)
        return _ChunkedSoftmaxCrossEntropy.apply(hidden, catalogue, targets - 1, self.chunk_size)


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


class BinaryCrossEntropy(nn.Module):
    """Binary cross-entropy with uniformly drawn negatives; one negative is the original SASRec.

    Negatives are drawn by `uniform_negatives`, never equal to the positive.
    """

    def __init__(self, num_negatives: int = 1):
        super().__init__()
        if num_negatives < 1:
            raise ValueError(f"model.loss.num_negatives: must be >= 1, got {num_negatives}")
        self.num_negatives = num_negatives

    def forward(
        self, hidden: torch.Tensor, targets: torch.Tensor, item_embeddings: torch.Tensor
    ) -> torch.Tensor:
        negatives = uniform_negatives(targets, item_embeddings.size(0) - 1, self.num_negatives)
        positive_logits = (hidden * item_embeddings[targets]).sum(-1).float()
        negative_logits = torch.einsum("td,tnd->tn", hidden, item_embeddings[negatives]).float()
        # -log sigmoid(pos) - sum over negatives of log(1 - sigmoid(neg)), averaged over tokens
        return (-F.logsigmoid(positive_logits) - F.logsigmoid(-negative_logits).sum(-1)).mean()


def uniform_negatives(targets: torch.Tensor, num_items: int, num_negatives: int) -> torch.Tensor:
    """(T, num_negatives) items drawn uniformly from 1..num_items without the target.

    Drawing from num_items - 1 values and shifting those at or above the target up by one keeps
    the draw uniform over the other items and never yields the target.
    """
    negatives = torch.randint(1, num_items, (targets.size(0), num_negatives), device=targets.device)
    return negatives + (negatives >= targets[:, None]).long()
