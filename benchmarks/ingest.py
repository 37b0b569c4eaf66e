"""Data ingestion at scale: generate an interactions log, preprocess it, start a data module on it.

    python benchmarks/ingest.py --rows 10000000 [--format csv|csv.gz|parquet|parts] [--events]
        [--memory-limit 3GB] [--workdir /tmp/recsys-ingest] [--keep] [--old] [--train-step]
        [--skip-datamodule] [--results benchmarks/results/ingest.jsonl]

The log (columns user_id,item_id,ts[,event]) is written by DuckDB itself, never held in Python:
about N/20 users with geometric history lengths (mean 20), items drawn from a Zipf law (exponent
1.1) over N/50 items, unix-second times increasing within a user, event types view/cart/buy at
85/10/5%. Rows are grouped by user in time order, users in a scrambled id order (the preprocessing
sorts them by raw id), and 1% of the rows are late arrivals (an earlier time than the row before),
so that the time sort has work to do. Randomness is a hash of the row number and the seed, so the
same parameters give the same bytes at any thread count; the file is named by its parameters and
reused by later runs (delete the workdir when done; the caches are removed unless --keep).

Each stage runs in a fresh subprocess, so that its peak RSS (from wait4) is its own:
  generate     write the log (skipped when the file exists)
  fingerprint  the sha256 of the source, which every start of a data module pays again
  preprocess   load_sequence_data into an empty cache directory (DuckDB, under --memory-limit)
  datamodule   SequenceDataModule.setup() on that cache and the first training batch
  train_step   train.py for one training step on that cache (--train-step)
  old          the pandas + numpy preprocessing of commit 1f97915 (--old; csv and parquet only)
Peak RSS counts file-backed pages too: the cache arrays as preprocessing writes them, and as the
data module reads them (its RssAnon/RssFile split at the end says which is which). Other jobs on the
machine change the times a lot; the JSON line records the load average before and after.
Prints a table, then one JSON line, also appended to --results.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OLD_COMMIT = "1f97915"  # the last preprocessing in pandas + numpy
GENERATOR = "g1"  # bump when the generator changes, so that older files are not reused
MEAN_EVENTS, ITEMS_PER_ROW, ZIPF, LATE_SHARE, EVENT_SHARES = 20, 1 / 50, 1.1, 0.01, (0.85, 0.10)
EVENT_TYPES = ("view", "cart", "buy")
STATUS_KEYS = ("VmRSS", "RssAnon", "RssFile", "RssShmem")
SUFFIXES = {"csv": ".csv", "csv.gz": ".csv.gz", "parquet": ".parquet", "parts": "-parts"}


def uniform(row: str, seed: int, salt: int) -> str:
    """SQL for a uniform number in [0, 1) from a row number: 53 bits of a hash, exact in a double.
    (DuckDB's random() is not reproducible across threads.)"""
    return f"((hash({row}, {seed}, {salt}) >> 11) / 9007199254740992.0)"


def coprime(start: int, modulus: int) -> int:
    """A multiplier that makes `x * m % modulus` a permutation (scrambled ids, no lookup table)."""
    while math.gcd(start, modulus) != 1:
        start += 2
    return start


def generate(path: Path, args) -> None:
    """Write the log with DuckDB: a small table of users (length, first row, first time), then
    each user's rows unnested from it straight into COPY, so memory stays flat at any size."""
    import duckdb

    rows, seed = args.rows, args.seed
    candidates = int(rows / MEAN_EVENTS * 1.3) + 50  # their lengths sum past `rows`; the rest unused
    items = max(10, int(rows * ITEMS_PER_ROW))
    user_mul, item_mul = coprime(2246822519, candidates), coprime(2654435761, items)
    con = duckdb.connect()
    con.execute(f"SET memory_limit = '{args.memory_limit}'")
    con.execute(f"SET temp_directory = '{path.parent / '.generate-spill'}'")
    con.execute("SET preserve_insertion_order = true")
    length = f"1 + floor(ln(1 - {uniform('range', seed, 1)}) / ln(1 - 1 / {MEAN_EVENTS}))::BIGINT"
    con.execute(
        f"CREATE TABLE users AS WITH drawn AS (SELECT range AS u, {length} AS len, "
        f"1672531200 + floor({uniform('range', seed, 2)} * 31536000)::BIGINT AS t0 FROM range({candidates})), "
        f"placed AS (SELECT u, len, t0, (sum(len) OVER (ORDER BY u) - len)::BIGINT AS start FROM drawn) "
        f"SELECT u, start, least(len, {rows} - start) AS len, t0 FROM placed WHERE start < {rows} ORDER BY u"
    )
    total, users = con.execute("SELECT sum(len), count(*) FROM users").fetchone()
    assert total == rows, f"generated {total} rows, not {rows}: raise the share of candidate users"
    s = 1 - ZIPF  # inverse CDF of a Zipf (bounded Pareto) law over ranks 1..items
    rank = f"least({items}, floor(pow(1 + {uniform('r', seed, 3)} * (pow({items}, {s}) - 1), {1 / s})))::BIGINT"  # fmt: skip
    step = f"CASE WHEN {uniform('r', seed, 4)} < {LATE_SHARE} THEN floor({uniform('r', seed, 5)} * k)::BIGINT ELSE k END"
    view, cart = EVENT_SHARES
    event = f", CASE WHEN {uniform('r', seed, 7)} < {view} THEN 'view' WHEN {uniform('r', seed, 7)} < {view + cart} THEN 'cart' ELSE 'buy' END AS event"  # fmt: skip
    event = event if args.events else ""

    def select(where: str) -> str:
        return (
            f"SELECT 1 + u * {user_mul} % {candidates} AS user_id, 1 + ({rank} - 1) * {item_mul} % {items} "
            f"AS item_id, t0 + {step} * 600 + floor({uniform('r', seed, 6)} * 600)::BIGINT AS ts{event} "
            f"FROM (SELECT u, t0, k, start + k AS r FROM (SELECT u, start, t0, unnest(range(len)) AS k "
            f"FROM users WHERE {where}))"
        )

    options = {"csv": "FORMAT csv, HEADER", "csv.gz": "FORMAT csv, HEADER, COMPRESSION gzip"}
    if args.format == "parts":  # one file per ~2M rows, each user in one part, parts in name order
        path.mkdir()
        parts = max(2, math.ceil(rows / 2_000_000))
        for part in range(parts):
            low, high = users * part // parts, users * (part + 1) // parts
            con.execute(
                f"COPY ({select(f'u >= {low} AND u < {high}')}) TO '{path / f'part-{part:05d}.parquet'}' "
                "(FORMAT parquet)"
            )
    else:
        con.execute(f"COPY ({select('true')}) TO '{path}' ({options.get(args.format, 'FORMAT parquet')})")
    con.close()


def proc_status() -> dict:
    """This process's resident memory split (GB): mapped cache arrays are file-backed (RssFile),
    copies and torch's heap are anonymous (RssAnon)."""
    status = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in STATUS_KEYS:
            status[key] = round(int(value.split()[0]) / 2**20, 3)
    return status


def disk_bytes(path: Path) -> int:
    """Bytes allocated on disk under `path` (a file or a directory)."""
    files = [path] if path.is_file() else [Path(d, f) for d, _, names in os.walk(path) for f in names]
    total = 0
    for file in files:
        try:
            total += file.stat().st_blocks * 512
        except FileNotFoundError:  # a spill file removed while we looked
            pass
    return total


class PeakDisk(threading.Thread):
    """The largest size a directory reaches (DuckDB's database and spill files live in the cache
    directory while it preprocesses), sampled every half second."""

    def __init__(self, path: Path):
        super().__init__(daemon=True)
        self.path, self.peak, self.done = path, 0, threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.5):
            self.peak = max(self.peak, disk_bytes(self.path))


def source_and_settings(args, log: Path):
    """The Source and PreprocessSettings of this log, from whichever `recsys` is importable (the
    old stage imports the one of commit 1f97915)."""
    from recsys.data.formats import Source
    from recsys.data.preprocess import PreprocessSettings

    # The keys of configs/data/interactions_file.yaml, unused ones null: the fingerprint hashes the
    # mapping as given, and train.py (--train-step) must find this cache.
    columns = {"user": "user_id", "item": "item_id", "timestamp": "ts", "rating": None}
    columns["event"] = "event" if args.events else None
    settings = PreprocessSettings(event_types=EVENT_TYPES if args.events else None)
    return Source(format="interactions", path=str(log), columns=columns, sep=","), settings


def stage(args, log: Path, run_dir: Path) -> dict:
    """One stage, in this (fresh) process; its figures come back as the last line of stdout."""
    if args.stage == "generate":
        started = time.perf_counter()
        generate(log.with_name(log.name + ".tmp"), args)
        log.with_name(log.name + ".tmp").rename(log)  # a killed generation is never reused
        return {"seconds": time.perf_counter() - started, "file_gb": disk_bytes(log) / 1e9}
    if args.stage == "datamodule":
        return start_datamodule(args, log, run_dir / "cache")
    import recsys
    from recsys.data.cache import load_sequence_data, source_fingerprint

    source, settings = source_and_settings(args, log)
    cache = run_dir / ("cache-old" if args.stage == "old" else "cache")
    shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir(parents=True)
    started = time.perf_counter()
    key = source_fingerprint(source, settings)
    hashed = time.perf_counter()
    watcher = PeakDisk(cache)
    watcher.start()
    options = {} if args.stage == "old" else {"memory_limit": args.memory_limit}
    data = load_sequence_data("bench", source, settings, cache, key=key, **options)
    watcher.done.set()
    return {
        "seconds": time.perf_counter() - hashed,
        "fingerprint_seconds": hashed - started,
        "cache_gb": disk_bytes(cache) / 1e9,
        "peak_disk_gb": max(watcher.peak, disk_bytes(cache)) / 1e9,
        "stats": {k: v for k, v in data.stats.items() if not isinstance(v, dict)},
        "recsys": str(Path(recsys.__file__).parent),
    }


def start_datamodule(args, log: Path, cache: Path) -> dict:
    """What every training run pays before its first step: hash the source, map the cache, split,
    build the first batch. The RSS split says how much is mapped cache (file) vs copies (anon)."""
    import numpy as np
    import torch

    from recsys.data import SequenceDataModule

    source, _ = source_and_settings(args, log)
    before = proc_status()
    events = list(EVENT_TYPES) if args.events else None
    module = SequenceDataModule(name="bench", path=str(log), format="interactions", columns=source.columns,
                                cache_dir=str(cache), event_types=events, memory_limit=args.memory_limit)  # fmt: skip
    started = time.perf_counter()
    module.source_fingerprint()
    hashed = time.perf_counter()
    module.setup("fit")
    ready = time.perf_counter()
    batch = next(iter(module.train_dataloader()))
    done = time.perf_counter()
    after = proc_status()
    return {
        "seconds": done - started,
        "fingerprint_seconds": hashed - started,
        "setup_seconds": ready - hashed,
        "first_batch_seconds": done - ready,
        "mapped": isinstance(module.data.items, np.memmap),
        "caches": len(list(cache.iterdir())),
        "batch": {key: list(value.shape) for key, value in batch.items()},
        "rss_before_gb": before,
        "rss_after_gb": after,
        "rss_anon_growth_gb": round(after["RssAnon"] - before["RssAnon"], 3),
        "torch": torch.__version__,
    }


def run(command: list[str], out: Path, env: dict | None = None, cwd: Path = ROOT) -> dict:
    """Run a command to its end; its wall time, and its own peak RSS from wait4 (not the maximum
    over every child so far, which RUSAGE_CHILDREN would give)."""
    started = time.perf_counter()
    with open(out, "w") as stdout:
        process = subprocess.Popen(command, stdout=stdout, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    lines = out.read_text().splitlines()
    figures = {"wall_seconds": time.perf_counter() - started, "peak_rss_gb": usage.ru_maxrss / 2**20}
    if process.returncode != 0:
        figures["error"] = f"exit {process.returncode}: " + " | ".join(lines[-6:])
    elif lines and lines[-1].startswith("{"):
        figures.update(json.loads(lines[-1]))
    return figures


def train_step_command(args, log: Path, run_dir: Path) -> list[str]:
    """train.py for one step on the benchmark's cache: the same name, columns and settings, so
    that it maps the cache instead of preprocessing again; one batch of validation and of test
    (train.py always runs both, and a full test pass ranks every user)."""
    events = ["data.columns.event=event", f"data.event_types=[{','.join(EVENT_TYPES)}]"] * args.events
    return [
        sys.executable, "train.py", "data=interactions_file", "data.name=bench", f"data.path={log}",
        "data.columns.user=user_id", "data.columns.item=item_id", "data.columns.timestamp=ts",
        *events,
        "data.min_user_interactions=0", "data.min_item_interactions=0", f"data.cache_dir={run_dir / 'cache'}",
        f"data.memory_limit={args.memory_limit}", "data.max_len=20", "data.val_users=256", "model=sasrec",
        "trainer=cpu", "trainer.max_epochs=1", "trainer.limit_train_batches=1", "trainer.limit_val_batches=1",
        "+trainer.limit_test_batches=1", "trainer.enable_progress_bar=false", "callbacks.rich_progress_bar=null",
        "logger=none", f"hydra.run.dir={run_dir / 'train-run'}",
    ]  # fmt: skip


def old_tree(workdir: Path) -> Path:
    """The `recsys` package of commit 1f97915, extracted once (a read-only use of git)."""
    tree = workdir / f"recsys-{OLD_COMMIT}"
    if not (tree / "recsys").is_dir():
        tree.mkdir(parents=True, exist_ok=True)
        command = ["git", f"--git-dir={ROOT / '.git'}", "archive", OLD_COMMIT, "recsys"]
        archive = subprocess.Popen(command, stdout=subprocess.PIPE)
        subprocess.run(["tar", "-x", "-C", str(tree)], stdin=archive.stdout, check=True)
        if archive.wait() != 0:
            raise SystemExit(f"git archive {OLD_COMMIT} failed")
    return tree


def table(args, stages: dict) -> str:
    """Rows, format, stage, seconds, peak RSS, cache size: one line per stage, and notes."""
    lines = [f"{'rows':>12} {'format':8} {'stage':11} {'seconds':>8} {'peak RSS GB':>11} {'cache GB':>8}  notes"]  # fmt: skip
    for name, got in stages.items():
        notes = [f"wall {got['wall_seconds']:.1f} s"] if "wall_seconds" in got else []
        if "error" in got:
            notes = [got["error"][-400:]]
        elif name == "generate":
            notes.append(f"{'reused ' * got.get('reused', False)}{got['file_gb']:.2f} GB file")
        elif name == "fingerprint":
            notes.append("sha256 of the source, timed in the preprocess process")
        elif name == "datamodule":
            notes.append(
                f"hash {got['fingerprint_seconds']:.1f} s, setup {got['setup_seconds']:.1f} s, batch "
                f"{got['first_batch_seconds']:.1f} s; at the end RssAnon {got['rss_after_gb']['RssAnon']:.2f} GB "
                f"(+{got['rss_anon_growth_gb']:.2f} in setup), RssFile {got['rss_after_gb']['RssFile']:.2f} GB"
            )
        elif "peak_disk_gb" in got:
            notes.append(f"peak disk {got['peak_disk_gb']:.2f} GB (the cache dir while it ran)")
        cells = [("-" if got.get(k) is None else f"{got[k]:.{d}f}") for k, d in (("seconds", 1), ("peak_rss_gb", 2), ("cache_gb", 2))]  # fmt: skip
        lines.append(f"{args.rows:>12,} {args.format:8} {name:11} {cells[0]:>8} {cells[1]:>11} {cells[2]:>8}  {'; '.join(notes)}")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--rows", type=int, required=True)
    parser.add_argument("--format", default="csv", choices=list(SUFFIXES))
    parser.add_argument("--events", action="store_true", help="an event column (view/cart/buy)")
    parser.add_argument("--memory-limit", default="3GB", help="data.memory_limit of the engine")
    parser.add_argument("--workdir", default="/tmp/recsys-ingest")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep the caches (the logs are always kept)")
    parser.add_argument("--old", action="store_true", help=f"also the preprocessing of commit {OLD_COMMIT}")
    parser.add_argument("--train-step", action="store_true", help="also train.py for one step")
    parser.add_argument("--skip-datamodule", action="store_true", help="preprocess only (a quick look)")
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "ingest.jsonl"))
    parser.add_argument("--stage", help=argparse.SUPPRESS)  # internal: run one stage in this process
    args = parser.parse_args()
    workdir = Path(args.workdir).resolve()
    kind = "events" if args.events else "plain"
    log = workdir / f"interactions-{GENERATOR}-{args.rows}rows-{kind}-seed{args.seed}{SUFFIXES[args.format]}"
    run_dir = workdir / f"run-{log.name}"
    if args.stage:
        print(json.dumps(stage(args, log, run_dir)), flush=True)
        return
    if args.old and args.format == "parts":
        parser.error(f"--old: the preprocessing of {OLD_COMMIT} reads csv and parquet files, not parts")
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    load_before = os.getloadavg()[0]

    def child(name: str, env: dict | None = None) -> dict:
        command = [sys.executable, __file__, "--stage", name, "--rows", str(args.rows), "--format", args.format,
                   "--memory-limit", args.memory_limit, "--workdir", str(workdir), "--seed", str(args.seed)]  # fmt: skip
        return run(command + ["--events"] * args.events, run_dir / f"{name}.log", env)

    if log.exists():
        stages = {"generate": {"seconds": 0.0, "reused": True, "file_gb": disk_bytes(log) / 1e9}}
    else:
        stages = {"generate": child("generate")}
    if "error" not in stages["generate"]:
        preprocess = child("preprocess")
        stages["fingerprint"] = {"seconds": preprocess.get("fingerprint_seconds")}
        stages["preprocess"] = preprocess
        if "error" not in preprocess and not args.skip_datamodule:
            stages["datamodule"] = child("datamodule")
        if args.train_step and "error" not in preprocess:
            stages["train_step"] = run(train_step_command(args, log, run_dir), run_dir / "train.log")
            stages["train_step"]["seconds"] = stages["train_step"]["wall_seconds"]
            stages["train_step"]["caches"] = len(list((run_dir / "cache").iterdir()))  # 1: it mapped ours
        if args.old:
            stages["old"] = child("old", {**os.environ, "PYTHONPATH": str(old_tree(workdir))})
    print(table(args, stages))
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    record = {
        "benchmark": "ingest",
        "device": f"cpu ({platform.machine()}, {os.cpu_count()} cores, {memory:.0f} GiB)",
        "rows": args.rows,
        "format": args.format,
        "stages": stages,
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],  # other jobs beside us
        "config": {k: v for k, v in vars(args).items() if k not in ("stage", "results")} | {"log": str(log)},
        "date": time.strftime("%Y-%m-%d"),
    }
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    with open(args.results, "a") as results:
        results.write(json.dumps(record) + "\n")
    failed = any("error" in figures for figures in stages.values())
    if not args.keep and not failed:  # a failed run keeps its stage logs
        shutil.rmtree(run_dir, ignore_errors=True)
    print(json.dumps(record), flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
