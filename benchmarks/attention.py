"""Plain-matmul attention against `scaled_dot_product_attention`, forward + backward; one JSON line.

    python benchmarks/attention.py [--batch 128 --length 50 --dim 64 --heads 1] [--causal | --padding]

The Amazon settings are the defaults: batch 128, 50 positions, d = 64. --causal is SASRec's
attention (no mask, is_causal); --padding is BERT4Rec's (a key padding mask, bidirectional).
"plain" is `recsys.models.transformer.reference_attention`: scores, mask, softmax, weights @ v,
written out as most reference implementations do. Under --precision bf16 both run in autocast.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F
from report import emit, pick_device, timed

from recsys.models.transformer import reference_attention


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--length", type=int, default=50)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--heads", type=int, default=1)
    parser.add_argument("--padding", action="store_true", help="bidirectional with a padding mask")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = pick_device(args.device)

    generator = torch.Generator(device=device).manual_seed(0)
    shape = (args.batch, args.heads, args.length, args.dim // args.heads)
    q, k, v = (torch.randn(shape, device=device, generator=generator).requires_grad_() for _ in range(3))
    lengths = torch.randint(1, args.length + 1, (args.batch,), device=device, generator=generator)
    real = torch.arange(args.length, device=device)[None, :] < lengths[:, None]
    causal = not args.padding

    def fused():
        mask = None
        if args.padding:  # as SelfAttention builds it
            mask = real[:, None, None, :] | torch.eye(args.length, dtype=torch.bool, device=device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)

    def plain():
        return reference_attention(q, k, v, is_causal=causal, key_padding_mask=real if args.padding else None)

    figures = {}
    for name, attention in (("plain", plain), ("sdpa", fused)):

        def step(attention=attention):
            q.grad = k.grad = v.grad = None
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
                out = attention()
            out.float().sum().backward()

        times = timed(step, device, args.repeats, warmup=5)
        figures[f"{name}_ms"] = round(1000 * statistics.median(times), 3)
    figures["sdpa_speedup"] = round(figures["plain_ms"] / figures["sdpa_ms"], 2)
    emit("attention_fwd_bwd", device, vars(args), **figures)


if __name__ == "__main__":
    main()
