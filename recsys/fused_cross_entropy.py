"""Full softmax cross-entropy over the catalogue in Triton kernels that never write the logits out.

The loss is mean_t [logsumexp_j(h_t . w_j) - h_t . w_{y_t}] over T tokens and N items. Its
PyTorch paths in `recsys.losses` write each tokens x items logit to GPU memory and read it back
several times (forward, softmax, two backward products); with d = 64 every logit costs 128 flops
but 4 bytes per pass, so they run at the speed of memory, far below the tensor cores. Here each
logit lives only in registers, as scores do in flash attention:

- forward: one program per (block of tokens, range of items) runs an online logsumexp over its
  items; the ranges' partial results are combined in PyTorch (T values per range);
- backward, d hidden: the same blocks recompute their logits and add softmax x w_j for their items;
- backward, d weight: one program per (block of items, range of tokens) recomputes the logits and
  adds softmax^T x h_t for its tokens.

The one-hot part of both gradients (a gather and an index_add) and the target logits are plain
PyTorch. Memory is O((T + N) d) at any catalogue size. Splitting the items (or tokens) into ranges
keeps every streaming multiprocessor busy when the other dimension is short (4,096 tokens are only
32 blocks of 128). `recsys.losses.FullCrossEntropy(fused=...)` decides when this path is used;
its torch paths stay the reference the tests hold this one to.

Precision: operands are bfloat16 under a CUDA bf16 autocast (or when the hidden states already are
bf16), else float32 (TF32 products on a GPU); accumulation, softmax and gradients are float32.
"""

from __future__ import annotations

import math
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs: the torch paths of recsys.losses are used instead
    triton = None
    tl = None

# Tile sizes for a GPU: 128 x 128 logits per block product, fp32 accumulators in registers.
BLOCK_TOKENS = 128
BLOCK_ITEMS = 128
NUM_WARPS = 8
# Aim for a few programs per streaming multiprocessor when splitting the long dimension.
PROGRAMS_PER_SM = 4


def unavailable_reason(device: torch.device) -> str | None:
    """Why the fused kernels cannot run on `device`, or None when they can."""
    if triton is None:
        return "triton is not installed"
    if _interpreted():
        return None
    if device.type != "cuda" or not torch.cuda.is_available():
        return f"the tensors are on {device.type}, the kernels need a CUDA GPU"
    return None


def _interpreted() -> bool:
    # TRITON_INTERPRET=1 runs the kernels on CPU tensors (numpy): the CPU tests use it.
    return os.environ.get("TRITON_INTERPRET") == "1"


if triton is not None:

    @triton.jit
    def _load_rows(ptr, rows, row_ok, dims, dim):
        """Rows `rows` of a row-major (n, dim) matrix, dims padded to the tile; 0 where not row_ok."""
        return tl.load(
            ptr + rows[:, None].to(tl.int64) * dim + dims[None, :],
            mask=row_ok[:, None] & (dims[None, :] < dim),
            other=0.0,
        )

    @triton.jit
    def _store_rows(ptr, rows, row_ok, dims, dim, values):
        """Write the tile `values` to rows `rows` of a row-major (n, dim) matrix, where row_ok."""
        tl.store(
            ptr + rows[:, None].to(tl.int64) * dim + dims[None, :],
            values,
            mask=row_ok[:, None] & (dims[None, :] < dim),
        )

    @triton.jit
    def _partial_logsumexp_kernel(
        h_ptr, w_ptr, out_ptr, num_tokens, num_items, dim, items_per_range,
        BLOCK_T: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        """out[range, t] = logsumexp over this range's items of h_t . w_j."""
        tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        item_range = tl.program_id(1)
        dims = tl.arange(0, BLOCK_D)
        h = _load_rows(h_ptr, tokens, tokens < num_tokens, dims, dim)
        first = item_range * items_per_range
        last = tl.minimum(first + items_per_range, num_items)
        peak = tl.full([BLOCK_T], float("-inf"), tl.float32)
        total = tl.zeros([BLOCK_T], tl.float32)
        # Counted from 0: the last range may run past `last`, and those items are masked.
        for block in range(0, items_per_range // BLOCK_I):
            items = first + block * BLOCK_I + tl.arange(0, BLOCK_I)
            w = _load_rows(w_ptr, items, items < last, dims, dim)
            logits = tl.dot(h, tl.trans(w))
            logits = tl.where(items[None, :] < last, logits, float("-inf"))
            new_peak = tl.maximum(peak, tl.max(logits, axis=1))
            total = total * tl.exp(peak - new_peak) + tl.sum(tl.exp(logits - new_peak[:, None]), axis=1)
            peak = new_peak
        tl.store(out_ptr + item_range * num_tokens + tokens, peak + tl.log(total), mask=tokens < num_tokens)

    @triton.jit
    def _softmax_times_items_kernel(
        h_ptr, w_ptr, lse_ptr, out_ptr, num_tokens, num_items, dim, items_per_range,
        BLOCK_T: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        """out[range, t] = sum over this range's items of softmax_tj w_j (float32)."""
        tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        item_range = tl.program_id(1)
        dims = tl.arange(0, BLOCK_D)
        token_ok = tokens < num_tokens
        h = _load_rows(h_ptr, tokens, token_ok, dims, dim)
        lse = tl.load(lse_ptr + tokens, mask=token_ok, other=0.0)
        first = item_range * items_per_range
        last = tl.minimum(first + items_per_range, num_items)
        acc = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
        # Counted from 0: the last range may run past `last`, and those items are masked.
        for block in range(0, items_per_range // BLOCK_I):
            items = first + block * BLOCK_I + tl.arange(0, BLOCK_I)
            w = _load_rows(w_ptr, items, items < last, dims, dim)
            probs = tl.exp(tl.dot(h, tl.trans(w)) - lse[:, None])
            probs = tl.where(items[None, :] < last, probs, 0.0)
            acc += tl.dot(probs.to(w.dtype), w)
        _store_rows(out_ptr, item_range.to(tl.int64) * num_tokens + tokens, token_ok, dims, dim, acc)

    @triton.jit
    def _softmax_times_tokens_kernel(
        h_ptr, w_ptr, lse_ptr, out_ptr, num_tokens, num_items, dim, tokens_per_range,
        BLOCK_T: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        """out[range, j] = sum over this range's tokens of softmax_tj h_t (float32)."""
        items = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
        token_range = tl.program_id(1)
        dims = tl.arange(0, BLOCK_D)
        item_ok = items < num_items
        w = _load_rows(w_ptr, items, item_ok, dims, dim)
        first = token_range * tokens_per_range
        last = tl.minimum(first + tokens_per_range, num_tokens)
        acc = tl.zeros([BLOCK_I, BLOCK_D], tl.float32)
        for block in range(0, tokens_per_range // BLOCK_T):
            tokens = first + block * BLOCK_T + tl.arange(0, BLOCK_T)
            h = _load_rows(h_ptr, tokens, tokens < last, dims, dim)
            # +inf for tokens past the range: their softmax weight is exp(-inf) = 0.
            lse = tl.load(lse_ptr + tokens, mask=tokens < last, other=float("inf"))
            probs = tl.exp(tl.dot(w, tl.trans(h)) - lse[None, :])
            acc += tl.dot(probs.to(h.dtype), h)
        _store_rows(out_ptr, token_range.to(tl.int64) * num_items + items, item_ok, dims, dim, acc)


def _ranges(blocks: int, other_blocks: int, programs_wanted: int) -> tuple[int, int]:
    """Split `blocks` blocks into ranges so that ranges x other_blocks reaches programs_wanted.

    Returns (number of ranges, blocks per range)."""
    ranges = max(1, min(blocks, math.ceil(programs_wanted / max(other_blocks, 1))))
    per_range = math.ceil(blocks / ranges)
    return math.ceil(blocks / per_range), per_range


def _programs_wanted(device: torch.device) -> int:
    if device.type == "cuda":
        return PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _operand_dtype(hidden: torch.Tensor) -> torch.dtype:
    if hidden.dtype == torch.bfloat16:
        return torch.bfloat16
    if hidden.device.type == "cuda" and torch.is_autocast_enabled("cuda"):
        if torch.get_autocast_dtype("cuda") == torch.bfloat16:
            return torch.bfloat16
    return torch.float32


class FusedCrossEntropy(torch.autograd.Function):
    """mean_t [logsumexp_j(h_t . w_j) - h_t . w_{y_t}]; hidden (T, d), weight (N, d), targets in 0..N-1."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, block_tokens=BLOCK_TOKENS, block_items=BLOCK_ITEMS):
        dtype = _operand_dtype(hidden)
        h = hidden.detach().to(dtype).contiguous()
        w = weight.detach().to(dtype).contiguous()
        (num_tokens, dim), num_items = h.shape, w.size(0)
        block_dim = max(16, triton.next_power_of_2(dim))
        token_blocks = triton.cdiv(num_tokens, block_tokens)
        item_blocks = triton.cdiv(num_items, block_items)
        wanted = _programs_wanted(h.device)
        item_ranges, blocks_per_range = _ranges(item_blocks, token_blocks, wanted)
        partial = torch.empty(item_ranges, num_tokens, device=h.device, dtype=torch.float32)
        _partial_logsumexp_kernel[(token_blocks, item_ranges)](
            h, w, partial, num_tokens, num_items, dim, blocks_per_range * block_items,
            BLOCK_T=block_tokens, BLOCK_I=block_items, BLOCK_D=block_dim, num_warps=NUM_WARPS,
        )  # fmt: skip
        logsumexp = torch.logsumexp(partial, dim=0)
        target_logits = (h.float() * w[targets].float()).sum(dim=1)
        ctx.save_for_backward(h, w, targets, logsumexp)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        ctx.blocks = (block_tokens, block_items, block_dim, wanted)
        return (logsumexp - target_logits).mean()

    @staticmethod
    def backward(ctx, grad_output):
        h, w, targets, logsumexp = ctx.saved_tensors
        block_tokens, block_items, block_dim, wanted = ctx.blocks
        (num_tokens, dim), num_items = h.shape, w.size(0)
        token_blocks = triton.cdiv(num_tokens, block_tokens)
        item_blocks = triton.cdiv(num_items, block_items)
        scale = grad_output.float() / num_tokens

        grad_h = grad_w = None
        hidden_dtype, weight_dtype = ctx.dtypes
        if ctx.needs_input_grad[0]:
            item_ranges, blocks_per_range = _ranges(item_blocks, token_blocks, wanted)
            partial_h = torch.empty(item_ranges, num_tokens, dim, device=h.device, dtype=torch.float32)
            _softmax_times_items_kernel[(token_blocks, item_ranges)](
                h, w, logsumexp, partial_h, num_tokens, num_items, dim, blocks_per_range * block_items,
                BLOCK_T=block_tokens, BLOCK_I=block_items, BLOCK_D=block_dim, num_warps=NUM_WARPS,
            )  # fmt: skip
            grad_h = partial_h.sum(dim=0) if item_ranges > 1 else partial_h[0]
            grad_h = ((grad_h - w[targets].float()) * scale).to(hidden_dtype)
        if ctx.needs_input_grad[1]:  # not for a frozen item table
            token_ranges, blocks_per_range = _ranges(token_blocks, item_blocks, wanted)
            partial_w = torch.empty(token_ranges, num_items, dim, device=h.device, dtype=torch.float32)
            _softmax_times_tokens_kernel[(item_blocks, token_ranges)](
                h, w, logsumexp, partial_w, num_tokens, num_items, dim, blocks_per_range * block_tokens,
                BLOCK_T=block_tokens, BLOCK_I=block_items, BLOCK_D=block_dim, num_warps=NUM_WARPS,
            )  # fmt: skip
            grad_w = partial_w.sum(dim=0) if token_ranges > 1 else partial_w[0]
            grad_w.index_add_(0, targets, h.float(), alpha=-1.0)
            grad_w = grad_w.mul_(scale).to(weight_dtype)
        return grad_h, grad_w, None, None, None


def fused_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    block_tokens: int = BLOCK_TOKENS,
    block_items: int = BLOCK_ITEMS,
) -> torch.Tensor:
    """The loss through the Triton kernels; weight excludes the padding row, targets are 0-based."""
    return FusedCrossEntropy.apply(hidden, weight, targets, block_tokens, block_items)
