"""The synthetic generator: deterministic, valid CSR, Zipf popularity, bounded heavy-tailed lengths and
a successor structure a sequential model can learn."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from recsys.data.formats import Source, read_interactions
from recsys.data.synthetic import generate_sequences, hidden_successors, synthetic_interactions, zipf_ranks
from recsys.errors import UserInputError

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def transitions(offsets, items):
    """(previous, next) item pairs within each user's sequence."""
    within = np.ones(len(items) - 1, dtype=bool)
    within[offsets[1:-1] - 1] = False  # the step from one user's last event to the next user's first
    return items[:-1][within], items[1:][within]


def test_same_seed_same_data_other_seed_other_data():
    a = generate_sequences(300, 1000, seed=7)
    b = generate_sequences(300, 1000, seed=7)
    c = generate_sequences(300, 1000, seed=8)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], c[0]) or not np.array_equal(a[1], c[1])
    np.testing.assert_array_equal(hidden_successors(1000, seed=7), hidden_successors(1000, seed=7))


@pytest.mark.parametrize("distribution", ["lognormal", "uniform"])
def test_csr_shapes_item_range_and_length_bounds(distribution):
    offsets, items = generate_sequences(
        500, 40, min_length=3, max_length=30, length_distribution=distribution, seed=1
    )
    assert offsets.dtype == np.int64 and items.dtype == np.int64
    assert offsets.shape == (501,) and offsets[0] == 0 and offsets[-1] == len(items)
    lengths = np.diff(offsets)
    assert lengths.min() >= 3 and lengths.max() <= 30
    assert items.min() >= 1 and items.max() <= 40
    assert len(np.unique(items)) == 40  # every item shows up in a draw this size


def test_lognormal_lengths_are_heavy_tailed_with_the_requested_mean():
    offsets, _ = generate_sequences(
        20_000, 100, min_length=5, max_length=100_000, mean_length=20, follow_probability=1.0, seed=2
    )
    lengths = np.diff(offsets)
    assert lengths.mean() == pytest.approx(20, rel=0.05)
    assert np.median(lengths) < lengths.mean() - 3  # skewed: many short users, a long tail
    assert lengths.max() > 10 * np.median(lengths)
    clipped = np.diff(generate_sequences(20_000, 100, min_length=5, max_length=50, mean_length=20)[0])
    assert clipped.max() == 50 and clipped.min() == 5 and clipped.mean() < 20


def test_uniform_lengths_cover_the_range():
    offsets, _ = generate_sequences(2000, 50, min_length=5, max_length=20, length_distribution="uniform")
    lengths = np.diff(offsets)
    assert set(np.unique(lengths)) == set(range(5, 21))
    assert lengths.mean() == pytest.approx(12.5, abs=0.3)


@pytest.mark.parametrize("exponent", [0.6, 1.0, 1.4])
def test_item_popularity_follows_zipf_with_the_exponent(exponent):
    # Without following, every event is a Zipf draw; fit log(count) ~ -s log(rank) on the head.
    offsets, items = generate_sequences(
        4000,
        3000,
        min_length=50,
        max_length=50,
        popularity_exponent=exponent,
        follow_probability=0.0,
        seed=3,
    )
    counts = np.sort(np.bincount(items, minlength=3001)[1:])[::-1]
    ranks = np.arange(1, 51)
    slope = np.polyfit(np.log(ranks), np.log(counts[:50]), 1)[0]
    assert slope == pytest.approx(-exponent, abs=0.15)


def test_zipf_exponent_zero_is_uniform_and_ranks_are_shuffled():
    rng = np.random.default_rng(0)
    ranks = zipf_ranks(rng, 10, 0.0, 50_000)
    np.testing.assert_allclose(np.bincount(ranks, minlength=10) / 50_000, 0.1, atol=0.01)
    ranks = zipf_ranks(rng, 1000, 1.0, 10_000)
    assert ranks.min() >= 0 and ranks.max() < 1000
    assert not np.all(np.diff(ranks) >= 0)  # not left in the sorted order of the search


def test_popular_items_are_not_the_low_ids():
    _, items = generate_sequences(2000, 1000, min_length=20, max_length=20, follow_probability=0.0, seed=4)
    top = np.argsort(np.bincount(items, minlength=1001)[1:])[::-1][:20] + 1
    assert top.mean() > 100  # the popularity order is a random permutation of the ids


@pytest.mark.parametrize("follow", [0.3, 0.8, 1.0])
@pytest.mark.parametrize("exponent", [0.0, 1.0])
def test_next_item_is_the_hidden_successor_with_follow_probability(follow, exponent):
    num_items = 2000
    offsets, items = generate_sequences(
        3000, num_items, popularity_exponent=exponent, follow_probability=follow, max_length=50, seed=5
    )
    successor = hidden_successors(num_items, seed=5)
    assert sorted(successor[1:]) == list(range(1, num_items + 1))  # a permutation ...
    seen, item = set(), 1
    while item not in seen:
        seen.add(item)
        item = successor[item]
    assert len(seen) == num_items  # ... that is one cycle through all items
    previous, following = transitions(offsets, items)
    rate = np.mean(successor[previous] == following)
    assert rate == pytest.approx(follow, abs=0.02)


def test_wrapper_builds_the_interactions_frame():
    frame = synthetic_interactions(num_users=30, num_items=12, seed=9)
    offsets, items = generate_sequences(
        30,
        12,
        min_length=5,
        max_length=20,
        length_distribution="uniform",
        popularity_exponent=0.0,
        seed=9,
    )
    assert list(frame.columns) == ["user", "item", "timestamp"]
    np.testing.assert_array_equal(frame["item"].to_numpy(), items)
    lengths = np.diff(offsets)
    np.testing.assert_array_equal(frame["user"].to_numpy(), np.repeat(np.arange(1, 31), lengths))
    assert frame.groupby("user")["timestamp"].apply(list).tolist() == [list(range(n)) for n in lengths]
    # The new keys pass through.
    zipf = synthetic_interactions(
        num_users=30, num_items=12, popularity_exponent=1.0, length_distribution="lognormal"
    )
    assert zipf["item"].between(1, 12).all()


def test_synthetic_is_deterministic_and_learnable():
    a = synthetic_interactions(num_users=20, num_items=10, seed=3)
    b = synthetic_interactions(num_users=20, num_items=10, seed=3)
    pd.testing.assert_frame_equal(a, b)
    assert a["item"].between(1, 10).all()


def test_large_config_keys_are_accepted():
    keys = OmegaConf.to_container(OmegaConf.load(CONFIGS / "data" / "synthetic_large.yaml").synthetic)
    assert keys["num_items"] == 100_000 and keys["popularity_exponent"] == 1.0
    frame = synthetic_interactions(**{**keys, "num_users": 50})
    assert frame["user"].nunique() == 50 and frame["item"].between(1, 100_000).all()


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"num_users": 0}, r"data\.synthetic\.num_users: must be at least 1, got 0"),
        ({"num_items": 1}, r"data\.synthetic\.num_items: must be at least 2, got 1"),
        ({"num_items": 2.5}, r"data\.synthetic\.num_items: expected an integer, got 2\.5"),
        ({"num_items": "many"}, r"data\.synthetic\.num_items: expected an integer, got 'many'"),
        ({"min_length": 0}, r"data\.synthetic\.min_length: must be at least 1"),
        ({"min_length": 9, "max_length": 8}, r"data\.synthetic\.max_length: 8 is below min_length=9"),
        ({"follow_probability": 1.5}, r"data\.synthetic\.follow_probability: .*between 0 and 1, got 1\.5"),
        ({"popularity_exponent": -1}, r"data\.synthetic\.popularity_exponent: .*>= 0, got -1"),
        ({"length_distribution": "pareto"}, r"data\.synthetic\.length_distribution: 'pareto' is not one"),
        ({"mean_length": 100}, r"data\.synthetic\.mean_length: .*between 5 and 20, got 100"),
        (
            {"mean_length": 10, "length_distribution": "uniform"},
            r"data\.synthetic\.mean_length: only for length_distribution=lognormal",
        ),
        ({"seed": -1}, r"data\.synthetic\.seed: must be at least 0"),
        ({"num_itmes": 10}, r"data\.synthetic\.num_itmes: unknown key; allowed keys are \[.*'num_items'"),
    ],
)
def test_bad_parameters_name_the_key(bad, message):
    with pytest.raises(UserInputError, match=message) as caught:
        read_interactions(Source("synthetic", synthetic={"length_distribution": "lognormal", **bad}))
    assert "\n" not in str(caught.value)


def test_integral_floats_from_the_command_line_are_accepted():
    offsets, _ = generate_sequences(1e2, 50.0, seed=0)
    assert len(offsets) == 101
