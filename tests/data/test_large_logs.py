"""What makes a retailer's log workable: parquet parts, the engine's memory limit, the mapped cache,
the chunked counts, a seeded evaluation sample and prepare.py (issue 27). Small generated data;
the sizes and times at scale are in benchmarks/ingest.py and BENCHMARKS.md."""

import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from recsys.data import SequenceDataModule
from recsys.data.cache import load_sequence_data
from recsys.data.engine import Engine, memory_limit_bytes
from recsys.data.features import gap_bucket, time_gap_buckets
from recsys.data.formats import Source
from recsys.data.preprocess import PreprocessSettings, preprocess
from recsys.data.sequences import SequenceData
from recsys.data.split import EventSplit, training_item_counts
from recsys.errors import UserInputError
from tests.checks import Untouched, assert_user_error
from tests.test_entrypoints import common, run

COLUMNS = {"user": "visitor", "item": "product", "timestamp": "ts", "event": "kind"}


def log_frame(rows: int = 600, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "visitor": rng.integers(0, 40, rows),
            "product": rng.zipf(1.5, rows) % 70,
            "ts": rng.integers(0, 50, rows),  # many ties: file order decides
            "kind": rng.choice(["view", "cart", "buy"], rows, p=[0.8, 0.15, 0.05]),
        }
    )


def write_parts(frame: pd.DataFrame, directory: Path, parts: int) -> Path:
    """The frame as `parts` parquet files whose name order is the row order (one in a subdirectory,
    as Hive-style writers nest them)."""
    bounds = np.linspace(0, len(frame), parts + 1).astype(int)
    for number, (begin, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        sub = directory / ("z=1" if number == parts - 1 else "")
        sub.mkdir(parents=True, exist_ok=True)
        frame.iloc[begin:end].to_parquet(sub / f"part-{number:05d}.parquet", index=False)
    return directory


def load(path, tmp_path, **settings) -> SequenceData:
    return load_sequence_data(
        "log",
        Source("interactions", str(path), columns=COLUMNS),
        PreprocessSettings(event_types=("view", "cart", "buy"), min_history=2, **settings),
        tmp_path / "cache",
    )


def same_data(a: SequenceData, b: SequenceData) -> bool:
    return all(
        np.array_equal(getattr(a, name), getattr(b, name))
        for name in ("offsets", "items", "user_ids", "item_ids", "events", "timestamps")
    )


def test_csv_parquet_and_parts_give_the_same_sequences(tmp_path):
    frame = log_frame()
    frame.to_csv(tmp_path / "log.csv.gz", index=False)
    frame.to_parquet(tmp_path / "log.parquet", index=False)
    from_csv = load(tmp_path / "log.csv.gz", tmp_path)
    from_parquet = load(tmp_path / "log.parquet", tmp_path)
    from_parts = load(write_parts(frame, tmp_path / "parts", 3), tmp_path)
    assert same_data(from_csv, from_parquet) and same_data(from_csv, from_parts)
    assert from_csv.items.dtype == np.int32 and from_csv.has_time
    # Three caches, no scratch left behind, each mapped read-only.
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "cache").iterdir()) == ["log"] * 3
    assert isinstance(from_parts.items, np.memmap) and not from_parts.items.flags.writeable


def test_mapped_arrays_travel_to_other_processes_as_their_path(tmp_path):
    data = load(write_parts(log_frame(), tmp_path / "parts", 2), tmp_path)
    sent = pickle.dumps(data.items)  # what a DataLoader worker started by spawn receives
    assert len(sent) < 1000 < data.items.nbytes
    received = pickle.loads(sent)
    assert received.filename == data.items.filename and np.array_equal(received, data.items)
    part = pickle.loads(pickle.dumps(data.items[5:9]))  # a slice is sent as its values
    assert part.tolist() == data.items[5:9].tolist()


def test_a_part_with_a_bad_row_is_named(tmp_path):
    frame = log_frame(60)
    parts = write_parts(frame, tmp_path / "parts", 2)
    bad = frame.iloc[30:].astype({"ts": str}).copy()
    bad.iloc[4, bad.columns.get_loc("ts")] = ""
    bad.to_parquet(parts / "z=1" / "part-00001.parquet", index=False)
    with pytest.raises(
        UserInputError, match=r"part-00001\.parquet \(row 4\): malformed row: no value in column 'ts'"
    ):
        load(parts, tmp_path)
    (parts / "part-00000.parquet").write_bytes(b"not parquet")
    with pytest.raises(UserInputError, match=r"part-00000\.parquet: cannot be read as parquet"):
        load(parts, tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserInputError, match=r"empty: no parquet parts \(\*\.parquet\) in this directory"):
        load(tmp_path / "empty", tmp_path)
    frame.drop(columns="kind").to_parquet(tmp_path / "nokind.parquet")
    with pytest.raises(
        UserInputError, match=r"nokind\.parquet: missing column 'kind' \(data\.columns\.event\)"
    ):
        load(tmp_path / "nokind.parquet", tmp_path)
    # Nothing partial: no cache directory, no scratch.
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_non_integer_values_and_unparsable_times_name_their_line(write_file, tmp_path):
    ratings = write_file("r.csv", "u,i,rating\n1,2,4\n1,3,4.5\n1,4,five\n")
    with pytest.raises(
        UserInputError, match=r"r\.csv:4: malformed row: column 'rating' is 'five', expected a number"
    ):
        load_sequence_data(
            "r",
            Source("interactions", str(ratings), columns={"user": "u", "item": "i", "rating": "rating"}),
            PreprocessSettings(min_rating=4.0),
            None,
        )
    times = write_file("t.csv.gz", "u,i,ts\n1,2,2024-01-01T10:00:00\n1,3,2024-01-01 11:00\n1,4,yesterday\n")
    with pytest.raises(UserInputError, match=r"t\.csv\.gz:4: malformed row: column 'ts' is 'yesterday'"):
        load_sequence_data(
            "t",
            Source("interactions", str(times), columns={"user": "u", "item": "i", "timestamp": "ts"}),
            PreprocessSettings(),
            None,
        )


def test_date_times_become_nanoseconds_in_utc(write_file):
    path = write_file(
        "d.csv", "u,i,ts\n1,2,2024-01-01T00:00:01Z\n1,3,2024-01-01 02:00:00+02:00\n1,4,2024-01-02\n"
    )
    data = load_sequence_data(
        "d",
        Source("interactions", str(path), columns={"user": "u", "item": "i", "timestamp": "ts"}),
        PreprocessSettings(),
        None,
    )
    day = pd.Timestamp("2024-01-01", tz="UTC").value
    assert data.timestamps.tolist() == [day, day + 10**9, day + 86400 * 10**9]  # +02:00 is midnight UTC


def test_memory_limit_is_checked_and_running_out_names_the_key():
    assert memory_limit_bytes("2GB") == 2 * 10**9 and memory_limit_bytes("512MiB") == 512 * 2**20
    assert memory_limit_bytes("auto") >= 10**9
    for bad in ("lots", "1MB", True):
        with pytest.raises(UserInputError, match=r"^data\.memory_limit: "):
            memory_limit_bytes(bad)
    with (
        Engine("64MB") as engine,
        pytest.raises(UserInputError, match=r"^data\.memory_limit: '64MB' .* too small"),
    ):
        # A list aggregate cannot spill to disk: it must fit in the limit.
        engine.execute("SELECT list(range) FROM range(40000000)").fetchall()
    assert not Path(engine.scratch).exists()


def test_prepare_builds_the_cache_that_training_then_maps(tmp_path):
    result = run("prepare.py", "data=synthetic", *common(tmp_path))
    (cache,) = (tmp_path / "cache").iterdir()
    assert f"cache: {cache}" in result.stdout and '"users": 200' in result.stdout
    before = (cache / "items.npy").stat().st_mtime_ns
    run("prepare.py", "data=synthetic", *common(tmp_path))  # a second time: mapped, not rebuilt
    assert (cache / "items.npy").stat().st_mtime_ns == before
    untouched = Untouched(tmp_path / "cache")
    refused = run("prepare.py", "data=synthetic", "data.memory_limit=lots", *common(tmp_path), check=False)
    assert_user_error(refused, "error: data.memory_limit: expected a size", untouched)


def plain_item_counts(data: SequenceData, split) -> np.ndarray:
    counts = np.zeros(data.num_items + 1, dtype=np.int64)
    for user in range(data.num_users):
        for position in range(data.offsets[user], split.train_end[user]):
            if split.is_target is None or split.is_target[position]:
                counts[data.items[position]] += 1
    return counts


@pytest.mark.parametrize("seed", range(5))
def test_chunked_counts_and_gaps_match_plain_loops(seed, monkeypatch):
    rng = np.random.default_rng(seed)
    frame = log_frame(int(rng.integers(50, 400)), seed)
    data = preprocess(
        frame.rename(columns={"visitor": "user", "product": "item", "ts": "timestamp", "kind": "event"}),
        PreprocessSettings(event_types=("view", "cart", "buy"), min_history=2),
    )
    monkeypatch.setattr("recsys.data.split._CHUNK_EVENTS", int(rng.integers(1, 50)))
    for codes in (None, [3]):
        split = EventSplit(data, codes)
        assert (
            training_item_counts(data, split.train_end, split.is_target).tolist()
            == plain_item_counts(data, split).tolist()
        )
    chunk = int(rng.integers(1, 50))
    plain = gap_bucket(np.diff(data.timestamps.astype(np.float64), prepend=0.0))
    plain[data.offsets[:-1][np.diff(data.offsets) > 0]] = 1
    assert time_gap_buckets(data.offsets, data.timestamps, chunk=chunk).tolist() == plain.tolist()


def test_max_users_ranks_a_seeded_sample_and_says_so(tmp_path):
    def datamodule(max_users):
        dm = SequenceDataModule(
            name="s",
            format="synthetic",
            synthetic={"num_users": 300},
            cache_dir=str(tmp_path),
            max_users=max_users,
        )
        dm.setup()
        return dm

    full, sampled, again = datamodule(None), datamodule(50), datamodule(50)
    users, _ = sampled.evaluated_users("test")
    assert len(users) == 50 and np.array_equal(users, again.evaluated_users("test")[0])
    assert set(users) <= set(full.evaluated_users("test")[0].tolist())
    counts = sampled.evaluation_counts("test")
    evaluable = len(full.evaluated_users("test")[0])
    assert counts["test/users"] == evaluable > 50 and counts["test/users_ranked"] == 50
    assert counts["test/users_sample"].startswith(f"seeded sample of 50 of {evaluable} users")
    assert "test/users_ranked" not in full.evaluation_counts("test")
    assert sum(len(b["user"]) for b in sampled.eval_dataloader("test")) == 50
    with pytest.raises(
        UserInputError, match=r"^evaluation\.max_users: must be an integer >= 1 or null, got 0$"
    ):
        SequenceDataModule(name="s", format="synthetic", max_users=0)


def test_a_killed_runs_scratch_is_removed_by_the_next_engine(tmp_path):
    import socket
    import subprocess

    dead = subprocess.Popen(["true"])  # a pid that has exited
    dead.wait()
    host = socket.gethostname()
    abandoned = tmp_path / f".ingest-{host}-{dead.pid}-abc"
    live = tmp_path / f".ingest-{host}-{1}-def"  # pid 1 runs
    elsewhere = tmp_path / f".ingest-another-host-{dead.pid}-ghi"
    for scratch in (abandoned, live, elsewhere):
        (scratch / "spill").mkdir(parents=True)
    with Engine("1GB", scratch_parent=tmp_path) as engine:
        assert engine.scalar("SELECT 42") == 42
    assert not abandoned.exists() and live.exists() and elsewhere.exists()
    assert not engine.scratch.exists()
