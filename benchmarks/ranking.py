"""Full-ranking evaluation throughput and peak memory; prints one JSON line.

    python benchmarks/ranking.py --items 1000000 --users 10000 --dim 64 [--impl chunked|full]

Ranks U users over N items as the test step does: each user's target rank (seen items excluded,
pessimistic ties) and top-20 list. --impl chunked (what the models use) scores `--chunk-size`
items at a time with a running top-k; --impl full builds the whole batch x items score table.
User and item vectors are random (the model's forward pass is not part of this figure); each user
has `--history` seen items.
"""

from __future__ import annotations

import argparse
import time

import torch
from report import emit, peak_memory, pick_device, reset_peak_memory, synchronize

from recsys.evaluation.metrics import chunked_ranking, target_ranks, top_k_items


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--history", type=int, default=50)
    parser.add_argument("--chunk-size", type=int, default=65536)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--impl", choices=["chunked", "full"], default="chunked")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    torch.set_float32_matmul_precision("high")  # TF32 on a GPU, as train.py sets it (matmul_precision)
    device = pick_device(args.device)

    generator = torch.Generator(device=device).manual_seed(0)
    items = torch.randn(args.items + 1, args.dim, device=device, generator=generator)

    def batches():
        for begin in range(0, args.users, args.batch_size):
            size = min(args.batch_size, args.users - begin)
            queries = torch.randn(size, args.dim, device=device, generator=generator)
            target = torch.randint(1, args.items + 1, (size,), device=device, generator=generator)
            seen = torch.randint(1, args.items + 1, (size, args.history), device=device, generator=generator)
            yield queries, target, seen

    def rank(queries, target, seen):
        if args.impl == "chunked":
            return chunked_ranking(queries, items, target, seen, args.k, args.chunk_size)
        scores = queries @ items.T
        return target_ranks(scores, target, seen), top_k_items(scores, seen, args.k)

    rank(*next(batches()))  # warm-up
    reset_peak_memory(device)
    synchronize(device)
    started = time.perf_counter()
    checksum = 0
    for batch in batches():
        ranks, _ = rank(*batch)
        checksum += int(ranks.sum())
    synchronize(device)
    seconds = time.perf_counter() - started
    emit(
        "full_ranking",
        device,
        vars(args),
        seconds=round(seconds, 3),
        users_per_second=round(args.users / seconds, 1),
        items_table_mb=round(items.numel() * 4 / 2**20, 1),
        mean_rank=round(checksum / args.users, 1),
        **peak_memory(device),
    )


if __name__ == "__main__":
    main()
