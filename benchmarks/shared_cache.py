"""Do N processes that map one data cache hold one copy of it? (The processes of a DDP run on one
machine each map the cache; issue 27 asks that they add no second copy.)

    python benchmarks/shared_cache.py CACHE_DIR [--processes 2]

CACHE_DIR is a data set's cache directory (`prepare.py` prints it). Each process maps the arrays
(`SequenceData.load`), reads every page of them (a sum over each), then waits while the parent reads
its /proc/<pid>/smaps_rollup: Rss counts every page the process maps, Pss splits each shared page
among the processes that map it, Private_* are the pages no other process shares. One shared copy
shows as Pss = Rss / N and no private pages for the cache's mappings (`cache_mappings_gb`, from
/proc/<pid>/smaps). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time
from pathlib import Path

from recsys.data.sequences import SequenceData


def smaps_rollup(pid: int) -> dict[str, float]:
    """The process's memory in GB, from /proc/<pid>/smaps_rollup (Linux)."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, value = line.split(":", 1)
        fields[name] = int(value.split()[0]) * 1024 / 1e9
    return {k: round(fields[k], 3) for k in ("Rss", "Pss", "Shared_Clean", "Private_Clean", "Private_Dirty")}


def cache_pages(pid: int, cache: Path) -> dict[str, float]:
    """Rss, Pss and private pages (GB) of the process's mappings of files in `cache`, from
    /proc/<pid>/smaps."""
    totals = {"Rss": 0, "Pss": 0, "Private_Clean": 0, "Private_Dirty": 0}
    inside = False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5:  # a mapping's header line
            inside = len(head) >= 6 and head[5].startswith(str(cache))
        elif inside and head and head[0].rstrip(":") in totals:
            totals[head[0].rstrip(":")] += int(head[1]) * 1024
    return {k: round(v / 1e9, 3) for k, v in totals.items()}


def touch(cache: str, ready, done) -> None:
    data = SequenceData.load(Path(cache))
    for name in ("offsets", "items", "timestamps", "events"):
        values = getattr(data, name)
        if values is not None:
            values.sum()  # reads every page of the array
    ready.set()
    done.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cache", help="a data cache directory (prepare.py prints it)")
    parser.add_argument("--processes", type=int, default=2)
    args = parser.parse_args()
    cache = Path(args.cache)
    mapped_gb = sum(p.stat().st_size for p in cache.glob("*.npy")) / 1e9
    context = mp.get_context("spawn")  # as a DDP launcher starts its processes
    done = context.Event()
    workers = []
    for _ in range(args.processes):
        ready = context.Event()
        process = context.Process(target=touch, args=(str(cache), ready, done))
        process.start()
        workers.append((process, ready))
    for _, ready in workers:
        ready.wait()
    time.sleep(0.5)
    memory = [smaps_rollup(process.pid) for process, _ in workers]
    mapped = [cache_pages(process.pid, cache.resolve()) for process, _ in workers]
    done.set()
    for process, _ in workers:
        process.join()
    print(
        json.dumps(
            {
                "benchmark": "shared_cache",
                "cache": str(cache),
                "cache_gb": round(mapped_gb, 3),
                "processes": args.processes,
                "process_memory_gb": memory,
                "cache_mappings_gb": mapped,
                "date": time.strftime("%Y-%m-%d"),
            }
        )
    )


if __name__ == "__main__":
    main()
