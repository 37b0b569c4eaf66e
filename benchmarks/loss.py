"""One training step (forward + backward) of the full cross-entropy loss; prints one JSON line.

    python benchmarks/loss.py --items 1000000 --tokens 4096 --dim 64 --impl chunked [--device auto]

--impl full: `F.cross_entropy` on the whole tokens x items logits (what most libraries do).
--impl chunked: `recsys.losses.FullCrossEntropy` as train.py uses it (token chunks while the
logits fit 1 GiB, item chunks with recomputation beyond). A `full` run that would not fit the
memory available is skipped with the estimate instead of being killed.
--impl fused: the Triton kernels of `recsys.fused_cross_entropy` (a CUDA GPU with Triton only).
--precision bf16 runs the step under a bf16 autocast, as trainer=gpu trains (only the fused
kernels change: the torch paths compute in float32 either way).
"""

from __future__ import annotations

import argparse
import statistics

import torch
from report import available_memory_bytes, emit, peak_memory, pick_device, reset_peak_memory, timed

from recsys.fused_cross_entropy import unavailable_reason as fused_unavailable_reason
from recsys.losses import FullCrossEntropy


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--impl", choices=["full", "chunked", "fused"], default="chunked")
    parser.add_argument("--precision", choices=["32", "bf16"], default="32")
    parser.add_argument("--item-chunk-size", type=int, default=None, help="chunked only; default: automatic")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    torch.set_float32_matmul_precision("high")  # TF32 on a GPU, as train.py sets it (matmul_precision)
    device = pick_device(args.device)
    config = vars(args)

    # F.cross_entropy keeps the logits, their log-softmax and, in backward, their gradient.
    full_bytes = 3 * 4 * args.tokens * args.items
    if args.impl == "full" and full_bytes > 0.9 * available_memory_bytes(device):
        emit(
            "loss_step",
            device,
            config,
            skipped=True,
            reason=f"needs about {full_bytes / 2**30:.1f} GiB, {available_memory_bytes(device) / 2**30:.1f} GiB available",
        )
        return

    generator = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(args.tokens, args.dim, device=device, generator=generator).requires_grad_()
    table = (0.1 * torch.randn(args.items + 1, args.dim, device=device, generator=generator)).requires_grad_()
    targets = torch.randint(1, args.items + 1, (args.tokens,), device=device, generator=generator)
    loss = FullCrossEntropy(
        chunk_size=None if args.impl == "full" else 256,
        item_chunk_size=args.item_chunk_size,
        fused=args.impl == "fused",
    )
    if args.impl == "fused" and fused_unavailable_reason(device) is not None:
        emit("loss_step", device, config, skipped=True, reason=fused_unavailable_reason(device))
        return
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")

    def step() -> None:
        hidden.grad = table.grad = None
        with autocast:
            value = loss(hidden, targets, table)
        value.backward()

    reset_peak_memory(device)
    times = timed(step, device, args.repeats)
    seconds = statistics.median(times)
    # Three tokens x items x dim products (logits, d hidden, d table), 2 FLOPs per multiply-add.
    flops = 3 * 2 * args.tokens * args.items * args.dim
    emit(
        "loss_step",
        device,
        config,
        seconds_median=round(seconds, 4),
        seconds=[round(t, 4) for t in times],
        tokens_per_second=round(args.tokens / seconds, 1),
        matmul_tflops_per_second=round(flops / seconds / 1e12, 2),
        inputs_mb=round((hidden.numel() + table.numel()) * 4 / 2**20, 1),
        **peak_memory(device),
    )


if __name__ == "__main__":
    main()
