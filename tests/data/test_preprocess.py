from collections import Counter

import numpy as np
import pandas as pd
import pytest

from recsys.data.cache import load_sequence_data
from recsys.data.formats import Source
from recsys.data.preprocess import PreprocessSettings, preprocess
from recsys.data.sequences import SequenceData
from recsys.errors import UserInputError
from tests.data.reference_preprocess import reference_preprocess


def frame(rows):
    return pd.DataFrame(rows, columns=["user", "item", "timestamp"])


def test_stable_time_sort_keeps_file_order_on_ties():
    data = preprocess(frame([(1, 30, 5), (1, 10, 1), (1, 20, 5), (1, 40, 0)]), PreprocessSettings())
    # time 0 -> 40, time 1 -> 10, then the two time-5 events in file order: 30 before 20
    assert data.item_ids[data.history(0)].tolist() == [40, 10, 30, 20]


def test_contiguous_item_ids_with_padding_zero():
    data = preprocess(
        frame([(7, 100, 0), (7, 300, 1), (7, 200, 2), (8, 300, 0), (8, 100, 1), (8, 100, 2)]),
        PreprocessSettings(),
    )
    assert data.num_items == 3
    assert data.items.min() == 1 and data.items.max() == 3
    assert data.item_ids.tolist()[1:] == [100, 200, 300]
    assert data.user_ids.tolist() == [7, 8]


def test_short_users_dropped_and_counted():
    data = preprocess(frame([(1, 1, 0), (1, 2, 1), (2, 1, 0), (2, 2, 1), (2, 3, 2)]), PreprocessSettings())
    assert data.user_ids.tolist() == [2]
    assert data.stats["dropped_short_users"] == 1


def plain_kcore(rows, k_user, k_item, iterative=True, min_history=3):
    """The (user, item, time) rows that survive, in plain Python: items with fewer than k_item rows
    dropped, then users with fewer than k_user, repeated until nothing changes (once when not
    iterative); then the users left with fewer than min_history rows."""
    rows = list(rows)
    while True:
        item_counts = Counter(item for _, item, _ in rows)
        kept = [row for row in rows if item_counts[row[1]] >= k_item]
        user_counts = Counter(user for user, _, _ in kept)
        kept = [row for row in kept if user_counts[row[0]] >= k_user]
        if not iterative or len(kept) == len(rows):
            break
        rows = kept
    user_counts = Counter(user for user, _, _ in kept)
    return [row for row in kept if user_counts[row[0]] >= min_history]


def plain_sequences(rows):
    """{user: its items in time order, ties in file order}."""
    sequences = {}
    for user, item, _ in sorted(rows, key=lambda row: row[2]):  # sorted() is stable
        sequences.setdefault(user, []).append(item)
    return sequences


def sequences_of(data):
    return {data.user_ids[u].item(): data.item_ids[data.history(u)].tolist() for u in range(data.num_users)}


@pytest.mark.parametrize("iterative", [True, False])
@pytest.mark.parametrize("seed", range(4))
def test_kcore_keeps_the_very_rows_of_a_plain_python_kcore(seed, iterative):
    rng = np.random.default_rng(seed)
    # k_user = 2 leaves users with 2 rows, which the protocol's minimum of 3 then drops.
    k_user, k_item = (2, 3, 4, 6)[seed], int(rng.integers(2, 7))
    # 150 sparse users: dropping users drops items below k_item, so iterating changes the result;
    # times with ties, kept in file order.
    rows = [
        (int(u), int(i), int(t))
        for u, i, t in zip(rng.integers(0, 150, 800), rng.zipf(1.5, 800) % 80, rng.integers(0, 100, 800))
    ]
    expected = plain_kcore(rows, k_user, k_item, iterative)
    assert 0 < len(expected) < len(rows)  # the filter bites, and something is left
    settings = PreprocessSettings(
        min_user_interactions=k_user, min_item_interactions=k_item, kcore_iterative=iterative
    )
    data = preprocess(frame(rows), settings)
    assert sequences_of(data) == plain_sequences(expected)
    # Item ids: exactly the surviving items, sorted, after the padding entry.
    assert data.item_ids.tolist()[1:] == sorted({item for _, item, _ in expected})


def test_single_pass_item_filter():
    rows = [(1, 1, 0), (1, 2, 1), (1, 3, 2), (2, 1, 0), (2, 2, 1), (2, 4, 2), (3, 1, 0), (3, 2, 1), (3, 3, 2)]
    data = preprocess(frame(rows), PreprocessSettings(min_item_interactions=2, kcore_iterative=False))
    assert 4 not in data.item_ids.tolist()
    assert data.stats["dropped_short_users"] == 1  # user 2 has 2 items left


def test_rating_threshold():
    rows = pd.DataFrame(
        {"user": [1] * 4, "item": [1, 2, 3, 4], "timestamp": [0, 1, 2, 3], "rating": [5, 1, 4, 4]}
    )
    data = preprocess(rows, PreprocessSettings(min_rating=4))
    assert data.item_ids[data.history(0)].tolist() == [1, 3, 4]
    with pytest.raises(UserInputError, match="data.min_rating: .* has no rating column"):
        preprocess(frame([(1, 1, 0)]), PreprocessSettings(min_rating=4))


def test_empty_after_filtering_is_an_error():
    with pytest.raises(UserInputError, match="no interactions left after filtering"):
        preprocess(frame([(1, 1, 0), (1, 2, 1), (1, 3, 2)]), PreprocessSettings(min_item_interactions=2))


def test_cache_roundtrip_atomic_and_keyed_by_content(tmp_path, write_file):
    source = write_file("seq.txt", "1 1 2 3 4\n2 2 3 4 5\n")
    raw_bytes = source.read_bytes()
    cache = tmp_path / "cache"
    first = load_sequence_data("toy", Source("sequence", str(source)), PreprocessSettings(), cache)
    (cached,) = cache.iterdir()  # no temporary (nor the engine's scratch) left behind
    assert cached.is_dir() and sorted(p.name for p in cached.iterdir()) == [
        "item_ids.npy",
        "items.npy",
        "meta.json",
        "offsets.npy",
        "timestamps.npy",
        "user_ids.npy",
    ]
    assert isinstance(first.items, np.memmap) and not first.items.flags.writeable  # mapped, read-only
    second = load_sequence_data("toy", Source("sequence", str(source)), PreprocessSettings(), cache)
    assert second.fingerprint == first.fingerprint
    np.testing.assert_array_equal(second.items, first.items)
    assert source.read_bytes() == raw_bytes  # raw data is never modified

    other = load_sequence_data(
        "toy", Source("sequence", str(source)), PreprocessSettings(min_item_interactions=2), cache
    )
    assert other.fingerprint != first.fingerprint
    source.write_text("1 1 2 3 4\n2 2 3 4 6\n")
    changed = load_sequence_data("toy", Source("sequence", str(source)), PreprocessSettings(), cache)
    assert changed.fingerprint != first.fingerprint


def test_string_ids_survive_the_cache(tmp_path):
    data = preprocess(frame([("a", "x", 0), ("a", "y", 1), ("a", "z", 2)]), PreprocessSettings())
    data.fingerprint = "f"
    data.save(tmp_path / "d")
    loaded = SequenceData.load(tmp_path / "d")
    assert loaded.item_ids.tolist() == ["", "x", "y", "z"]
    assert loaded.user_ids.tolist() == ["a"]


def test_shipped_beauty_statistics():
    from pathlib import Path

    path = Path(__file__).parents[2] / "data" / "amazon_beauty" / "Beauty.txt.gz"
    data = load_sequence_data("beauty", Source("sequence", str(path)), PreprocessSettings(), None)
    assert (data.num_users, data.num_items, len(data.items)) == (22363, 12101, 198502)


def random_interactions(rng: np.random.Generator) -> tuple[pd.DataFrame, PreprocessSettings]:
    """A small random canonical table (ties in time, rows out of order, string or integer ids,
    float or integer times, ratings, event types) and random settings to preprocess it with."""
    rows = int(rng.integers(20, 400))
    users = rng.integers(0, int(rng.integers(1, 40)), rows)
    items = rng.integers(0, int(rng.integers(1, 60)), rows)
    frame = pd.DataFrame(
        {
            "user": users.astype(str) if rng.random() < 0.3 else users * 7 - 50,
            "item": np.char.add("i", items.astype(str)) if rng.random() < 0.3 else items,
            "timestamp": rng.integers(0, 30, rows) * (1.5 if rng.random() < 0.3 else 1),
            "rating": rng.integers(1, 6, rows).astype(float),
            "event": rng.choice(["view", "cart", "buy", "like"], rows),
        }
    )
    typed = rng.random() < 0.5
    settings = PreprocessSettings(
        min_rating=float(rng.integers(1, 4)) if rng.random() < 0.3 else None,
        min_user_interactions=int(rng.choice([0, 0, 2, 4])),
        min_item_interactions=int(rng.choice([0, 0, 2, 3])),
        kcore_iterative=bool(rng.random() < 0.7),
        min_history=int(rng.choice([2, 3, 5])),
        event_types=("view", "cart", "buy") if typed else None,
        event_map=(("like", "cart"),) if typed else (),
        keep_events=("buy", "cart") if typed and rng.random() < 0.4 else None,
    )
    return frame, settings


def outcome(run):
    try:
        return run()
    except UserInputError as err:
        return str(err)


@pytest.mark.parametrize("seed", range(40))
def test_the_engine_preprocesses_as_the_plain_reference(seed):
    frame, settings = random_interactions(np.random.default_rng(seed))
    expected = outcome(lambda: reference_preprocess(frame, settings, source="data"))
    got = outcome(lambda: preprocess(frame, settings, source="data"))
    if isinstance(expected, str):
        assert got == expected
        return
    assert not isinstance(got, str), got
    for name in ("offsets", "items", "user_ids", "item_ids", "events", "event_names"):
        want, have = getattr(expected, name), getattr(got, name)
        assert (want is None) == (have is None), name
        if want is not None:
            assert have.tolist() == want.tolist(), name
    if expected.events is not None:
        assert got.timestamps.tolist() == expected.timestamps.tolist()
    assert got.stats == expected.stats
