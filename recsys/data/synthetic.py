"""Synthetic interaction sequences for scale tests: fast, deterministic, and learnable.

`generate_sequences` draws item sequences for any number of users and items (10M items and 1M
users take seconds) in the CSR layout the rest of the package uses (`offsets`, `items`). The data
look like real implicit-feedback logs in the two ways that matter for speed and memory, and carry a
known sequential signal, so that a scale test can check quality as well as speed:

* Popularity. Every sequence starts at an item drawn from a Zipf law over a hidden popularity
  order (the item of popularity rank r, counting from 1, is drawn with probability proportional to
  r ** -popularity_exponent; 0 = uniform); the popularity order is a random permutation of the
  ids, so id and popularity are unrelated. Sampled by inverse CDF: `np.searchsorted` of sorted
  uniform draws on the float64 cumulative weights (80 MB for 10M items), see `zipf_ranks`.
* Length. Per-user sequence lengths are heavy-tailed: `min_length` plus a rounded log-normal
  excess whose mean is `mean_length - min_length` and whose log has standard deviation
  `length_sigma`, clipped at `max_length` (so the realised mean is a little below `mean_length`
  when the clip bites). Real logs look like this: many short users, a long tail of heavy users
  (MovieLens-1M: min 20, median 96, mean 165, i.e. sigma about 1.1). `length_distribution="uniform"`
  draws lengths uniformly from [min_length, max_length] instead.
* Sequential structure. The items lie on a hidden random cycle (a random permutation). Each next
  item is the cycle successor of the previous one with `follow_probability`, otherwise a "jump" to
  a fresh item drawn from the same Zipf law. A sequential model can learn the successor map (the
  best possible next-item HR@1 is about `follow_probability`); a popularity model cannot. The map
  is `hidden_successors(num_items, seed)`.

* Repeats. With `repeat_probability` > 0, each event after a user's first is, with that
  probability, a re-consumption: its item is replaced by the item of one of the same user's earlier
  events, drawn uniformly (so often-used items come back more often), as re-purchases and re-views
  do in a retailer's log. The cycle walk underneath goes on as if the repeat were not there. Default
  0: no repeat is planted (the cycle can still bring an item back, on short cycles or by jumps).

Because followed items inherit traffic from their predecessors, the overall item frequencies are
the Zipf law of the jumps smoothed along the cycle: the successors of the most popular items are
popular too, and the head of the rank-frequency curve is flatter than `popularity_exponent` when
`follow_probability` is high. With `follow_probability=0` the frequencies are exactly Zipf.

No Python loop runs per user or per event: the follow/jump decisions are one Bernoulli draw per
event, and since following k times from cycle position c lands on position (c + k) mod num_items,
each event's item is `cycle[(position of its run's jump + steps since that jump) % num_items]`.
Cost: 10M items and 1M users of mean length 20 (20M events) take about 3-4 s and 0.44 GB peak
memory (the 160 MB result included); the largest temporaries are two 10M-item permutations and
the 10M cumulative weights (80 MB each) and two int64 arrays per event.

The result depends only on the arguments (including `seed`) and the numpy version (numpy keeps its
random streams stable across releases for most, not all, methods), not on the platform or threads.

`synthetic_interactions` is the `data.format: synthetic` reader: the same sequences as the canonical
interactions table of recsys/data/interactions.py. Bad arguments raise `UserInputError` naming the config
key `data.synthetic.<argument>` (the `format: synthetic` data configs pass these arguments from that
key).
"""

from __future__ import annotations

import inspect
import math
import numbers

import numpy as np
import pandas as pd

from recsys.errors import UserInputError

LENGTH_DISTRIBUTIONS = ("lognormal", "uniform")
KEY = "data.synthetic"


def generate_sequences(
    num_users: int,
    num_items: int,
    min_length: int = 5,
    max_length: int = 200,
    mean_length: float | None = None,
    length_sigma: float = 1.0,
    length_distribution: str = "lognormal",
    popularity_exponent: float = 1.0,
    follow_probability: float = 0.8,
    seed: int = 0,
    repeat_probability: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Item sequences of `num_users` users over items 1..num_items, in CSR form.

    Returns `(offsets, items)`, both int64: user u's sequence (in time order) is
    `items[offsets[u]:offsets[u + 1]]`, `offsets` has num_users + 1 entries starting at 0, and every
    length lies in [min_length, max_length]. `mean_length` (log-normal lengths only; default the
    geometric mean of min_length and max_length) is the mean length before the clip at max_length.
    See the module docstring for the model; the same arguments always give the same arrays.
    """
    num_users = _integer("num_users", num_users, minimum=1)
    num_items = _integer("num_items", num_items, minimum=2)
    min_length = _integer("min_length", min_length, minimum=1)
    max_length = _integer("max_length", max_length, minimum=1)
    if max_length < min_length:
        raise UserInputError(f"{KEY}.max_length: {max_length} is below min_length={min_length}")
    seed = _integer("seed", seed, minimum=0)
    follow_probability = _real("follow_probability", follow_probability, 0.0, 1.0)
    repeat_probability = _real("repeat_probability", repeat_probability, 0.0, 1.0)
    popularity_exponent = _real("popularity_exponent", popularity_exponent, 0.0, math.inf)
    if length_distribution not in LENGTH_DISTRIBUTIONS:
        raise UserInputError(
            f"{KEY}.length_distribution: {length_distribution!r} is not one of {list(LENGTH_DISTRIBUTIONS)}"
        )
    length_sigma = _real("length_sigma", length_sigma, 0.0, math.inf)
    if mean_length is not None:
        if length_distribution != "lognormal":
            raise UserInputError(
                f"{KEY}.mean_length: only for length_distribution=lognormal "
                f"(uniform lengths have mean (min_length + max_length) / 2); set it to null"
            )
        mean_length = _real("mean_length", mean_length, min_length, max_length)

    rng = np.random.default_rng(seed)
    cycle = _cycle(rng, num_items)  # cycle position -> item - 1; drawn first (see hidden_successors)
    lengths = _lengths(rng, num_users, min_length, max_length, mean_length, length_sigma, length_distribution)
    offsets = np.zeros(num_users + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    del lengths
    num_events = int(offsets[-1])

    # Runs: each starts with a jump (every user's first event, and each event whose follow draw
    # fails) and then follows the cycle. Draws in float32 (4 bytes per event); P(u < p) is exact to
    # 2 ** -24.
    jump = rng.random(num_events, dtype=np.float32) >= np.float32(follow_probability)
    jump[offsets[:-1]] = True
    jump_at = np.flatnonzero(jump)
    del jump
    run_lengths = np.diff(jump_at, append=num_events)

    # Cycle position of each jump's item: a Zipf-ranked draw, the ranks laid on the cycle at random.
    if popularity_exponent == 0.0:
        start = rng.integers(0, num_items, size=len(jump_at), dtype=np.int64)
    else:
        rank_position = _permutation(rng, num_items)  # popularity rank - 1 -> cycle position
        ranks = zipf_ranks(rng, num_items, popularity_exponent, len(jump_at))
        start = rank_position[ranks]
        del rank_position, ranks

    # Position of event e = start of its run + (e - index of the run's jump), modulo num_items.
    start -= jump_at
    del jump_at
    position = np.repeat(start, run_lengths)
    del start, run_lengths
    position += np.arange(num_events, dtype=np.int64)
    np.remainder(position, num_items, out=position)
    items = cycle[position]
    del position, cycle
    items += 1
    if repeat_probability > 0.0:  # no draw at 0: the arrays stay those of earlier releases
        items = items[_repeat_sources(rng, offsets, repeat_probability)]
    return offsets, items


def synthetic_interactions(
    num_users: int = 200,
    num_items: int = 50,
    min_length: int = 5,
    max_length: int = 20,
    follow_probability: float = 0.8,
    seed: int = 0,
    popularity_exponent: float = 0.0,
    length_distribution: str = "uniform",
    mean_length: float | None = None,
    length_sigma: float = 1.0,
    repeat_probability: float = 0.0,
    **unknown,
) -> pd.DataFrame:
    """Generated data with sequential structure a model can learn (`data.format: synthetic`).

    Items lie on a hidden random cycle; each next item is the successor of the previous one on that
    cycle with `follow_probability`, otherwise a random item. A sequential model can learn the
    cycle, a popularity model cannot, so tests can check that training helps. The defaults are the
    small test set (uniform lengths and popularity); `configs/data/synthetic_large.yaml` sets Zipf
    popularity and log-normal lengths. See `recsys.data.synthetic.generate_sequences` for the
    arguments. Users are 1..num_users, items 1..num_items, timestamps the positions 0..len-1.
    """
    if unknown:
        raise UserInputError(
            f"data.synthetic.{sorted(unknown)[0]}: unknown key; allowed keys are "
            f"{sorted(set(inspect.signature(synthetic_interactions).parameters) - {'unknown'})}"
        )
    offsets, items = generate_sequences(
        num_users=num_users,
        num_items=num_items,
        min_length=min_length,
        max_length=max_length,
        mean_length=mean_length,
        length_sigma=length_sigma,
        length_distribution=length_distribution,
        popularity_exponent=popularity_exponent,
        follow_probability=follow_probability,
        repeat_probability=repeat_probability,
        seed=seed,
    )
    lengths = np.diff(offsets)
    return pd.DataFrame(
        {
            "user": np.repeat(np.arange(1, len(lengths) + 1, dtype=np.int64), lengths),
            "item": items,
            "timestamp": np.arange(len(items), dtype=np.int64) - np.repeat(offsets[:-1], lengths),
        }
    )


def _repeat_sources(rng: np.random.Generator, offsets: np.ndarray, probability: float) -> np.ndarray:
    """(num_events,) the event whose item each event takes: itself, or, for a repeat, an earlier
    event of the same user that is not a repeat itself (so the item really was seen before)."""
    num_events = int(offsets[-1])
    repeat = rng.random(num_events, dtype=np.float32) < np.float32(probability)
    repeat[offsets[:-1][np.diff(offsets) > 0]] = False  # a user's first event has nothing to repeat
    at = np.flatnonzero(repeat)
    del repeat
    start = offsets[np.searchsorted(offsets, at, side="right") - 1]
    source = np.arange(num_events, dtype=np.int64)
    source[at] = start + np.floor(rng.random(len(at)) * (at - start)).astype(np.int64)
    # A repeat of a repeat takes what that one took: follow the pointers (each step doubles the
    # distance jumped, so about log2(length) passes) until every source is an original event.
    while True:
        followed = source[source]
        if np.array_equal(followed, source):
            return source
        source = followed


def hidden_successors(num_items: int, seed: int = 0) -> np.ndarray:
    """The successor map behind `generate_sequences(..., num_items, seed=seed)`: an int64 array of
    num_items + 1 entries where entry i is the item that follows item i on the hidden cycle (entry
    0, the padding index, is 0). It depends only on num_items and seed."""
    num_items = _integer("num_items", num_items, minimum=2)
    seed = _integer("seed", seed, minimum=0)
    cycle = _cycle(np.random.default_rng(seed), num_items) + 1
    successors = np.zeros(num_items + 1, dtype=np.int64)
    successors[cycle] = np.roll(cycle, -1)
    return successors


def zipf_ranks(rng: np.random.Generator, num_items: int, exponent: float, size: int) -> np.ndarray:
    """`size` independent 0-based ranks r in [0, num_items), each drawn with probability proportional
    to (r + 1) ** -exponent, by inverse CDF on the float64 cumulative weights.

    The uniform draws are sorted before the search (a sorted search walks the cumulative array once
    instead of missing the cache at every step: about 6x faster for 10M items) and the ranks are
    shuffled afterwards, which gives the same distribution as searching the draws in their order.
    """
    cumulative = np.arange(1, num_items + 1, dtype=np.float64)
    np.power(cumulative, -exponent, out=cumulative)
    np.cumsum(cumulative, out=cumulative)
    draws = rng.random(size)
    draws *= cumulative[-1]
    draws.sort()
    ranks = np.searchsorted(cumulative, draws, side="right")
    del draws, cumulative
    np.minimum(ranks, num_items - 1, out=ranks)  # a draw that rounds up to the total
    rng.shuffle(ranks)
    return ranks


def _lengths(rng, num_users, min_length, max_length, mean_length, sigma, distribution) -> np.ndarray:
    if distribution == "uniform":
        return rng.integers(min_length, max_length + 1, size=num_users, dtype=np.int64)
    if mean_length is None:
        mean_length = math.sqrt(min_length * max_length)
    excess = mean_length - min_length
    if excess <= 0 or min_length == max_length:
        return np.full(num_users, min_length, dtype=np.int64)
    # A log-normal with parameters (mu, sigma) has mean exp(mu + sigma^2 / 2).
    mu = math.log(excess) - sigma * sigma / 2
    lengths = rng.lognormal(mu, sigma, size=num_users)
    np.rint(lengths, out=lengths)
    lengths += min_length
    np.minimum(lengths, max_length, out=lengths)
    return lengths.astype(np.int64)


def _cycle(rng: np.random.Generator, num_items: int) -> np.ndarray:
    return _permutation(rng, num_items)


def _permutation(rng: np.random.Generator, n: int) -> np.ndarray:
    """A random permutation of 0..n-1 (int64: numpy shuffles 8-byte items faster than 4-byte ones)."""
    return rng.permutation(n)


def _integer(name: str, value, minimum: int) -> int:
    """An integer argument (an integral float such as a command line's 1e6 is accepted)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise UserInputError(f"{KEY}.{name}: expected an integer, got {value!r}")
    if not isinstance(value, numbers.Integral):
        if not math.isfinite(value) or value != int(value):
            raise UserInputError(f"{KEY}.{name}: expected an integer, got {value!r}")
    value = int(value)
    if value < minimum:
        raise UserInputError(f"{KEY}.{name}: must be at least {minimum}, got {value}")
    return value


def _real(name: str, value, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
        raise UserInputError(f"{KEY}.{name}: expected a number, got {value!r}")
    value = float(value)
    if not low <= value <= high or math.isinf(value):
        bound = f">= {low:g}" if math.isinf(high) else f"between {low:g} and {high:g}"
        raise UserInputError(f"{KEY}.{name}: must be a finite number {bound}, got {value:g}")
    return value
