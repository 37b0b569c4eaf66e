"""Offline team-draft interleaving: which of two runs would users prefer, and how many users does it take?

Team-draft interleaving (Radlinski, Kurup and Joachims, CIKM 2008) shows a user one list mixed
from two rankers' lists, each item labelled with the team (ranker) that drafted it, and credits a
click to that team. Offline, the clicks are the user's held-out target item(s): each test user
casts one vote, for run B if B's team drafted more of the targets, for run A if A's did, and no
vote (a tie) otherwise. The share of decided votes that go to B, with a sign test against 0.5,
says which run users prefer.

Interleaving is known online for needing far fewer users than comparing a metric between two
groups; `users_needed` asks the same offline question, against the paired t-test on a per-user
metric (e.g. NDCG@10 of B minus A on the same users): for a grid of user counts, how often each
test rejects at `alpha` on users resampled with replacement from those evaluated. That is the
power at the effect observed in this sample, so it reads as "how many users would have sufficed
here", not as a power analysis for an effect size chosen in advance.

The two runs must have been evaluated on the same users with the same targets, and must have
recorded each user's top-K list (`top_item_ids` in per_user.parquet).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

import numpy as np
import pandas as pd
from scipy import stats
from statsmodels.stats.proportion import proportion_confint

from recsys.errors import UserInputError

TOP_ITEMS_COLUMN = "top_item_ids"
TEAM_A, TEAM_B = 0, 1

# A block of sampled user indices in `users_needed` holds at most this many entries (16 MB of int64).
_BLOCK_ENTRIES = 2_000_000


def _flip_count(length: int) -> int:
    # A coin is flipped only when both teams have drafted equally often, which happens before
    # picks 1, 3, 5, ...: at most ceil(length / 2) times.
    return (length + 1) // 2


def _draft(list_a: Sequence, list_b: Sequence, length: int, flips: Sequence[int]) -> tuple[list, list[int]]:
    """Team-draft with the coin flips given up front (flips[j]: the team that picks first in round j)."""
    chosen: list = []
    teams: list[int] = []
    seen: set = set()
    next_a = next_b = 0  # each team's highest-ranked item that may still be free
    size_a, size_b = len(list_a), len(list_b)
    picks_a = picks_b = 0
    flip = 0
    while len(chosen) < length:
        while next_a < size_a and list_a[next_a] in seen:
            next_a += 1
        while next_b < size_b and list_b[next_b] in seen:
            next_b += 1
        a_left, b_left = next_a < size_a, next_b < size_b
        if a_left and b_left:
            if picks_a != picks_b:
                team = TEAM_A if picks_a < picks_b else TEAM_B
            else:
                team = int(flips[flip])
                flip += 1
        elif a_left:
            team = TEAM_A
        elif b_left:
            team = TEAM_B
        else:
            break
        if team == TEAM_A:
            item = list_a[next_a]
            next_a += 1
            picks_a += 1
        else:
            item = list_b[next_b]
            next_b += 1
            picks_b += 1
        seen.add(item)
        chosen.append(item)
        teams.append(team)
    return chosen, teams


def team_draft(
    list_a: Sequence[Hashable], list_b: Sequence[Hashable], length: int, rng: np.random.Generator
) -> tuple[list, np.ndarray]:
    """Interleave two ranked lists (best first): the mixed list and, per position, its team (0 = A, 1 = B).

    The team with fewer picks so far picks next, a coin flip deciding when both have as many; a
    team picks its highest-ranked item not yet in the list. When one team has nothing left to add
    the other goes on alone. The list stops at `length` items or when both are exhausted.
    `rng.integers(0, 2, size=ceil(length / 2))` draws all coin flips up front (some may go unused).
    """
    if length < 0:
        raise UserInputError(f"interleave: the interleaved list's length must be >= 0, got {length}")
    flips = rng.integers(0, 2, size=_flip_count(length))
    chosen, teams = _draft(_as_list(list_a), _as_list(list_b), length, flips)
    return chosen, np.asarray(teams, dtype=np.int8)


def _as_list(values) -> list:
    # Plain Python values hash and compare much faster than numpy scalars in the drafting loop.
    return values.tolist() if hasattr(values, "tolist") else list(values)


def _target_set(targets) -> set:
    if isinstance(targets, (str, bytes)) or np.isscalar(targets):
        return {targets.item() if hasattr(targets, "item") else targets}
    return set(_as_list(targets))


def interleave_credit(
    top_a: Sequence[Sequence[Hashable]],
    top_b: Sequence[Sequence[Hashable]],
    targets: Sequence,
    length: int | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Per user, the interleaving vote: +1 if B's team drafted more of the targets, -1 if A's, 0 if tied.

    `top_a[i]`, `top_b[i]`: user i's ranked lists; `targets[i]`: the user's target item, or its
    list of targets under window targets. `length` defaults per user to the shorter of the two
    lists: longer would let one run fill the tail alone. All coin flips come from one
    `np.random.default_rng(seed)`, drawn as one block in user order, so a result is reproducible.
    """
    targets = list(targets)  # by position, whatever a Series' index
    users = len(targets)
    if length is not None and length < 0:
        raise UserInputError(f"interleave: the interleaved list's length must be >= 0, got {length}")
    if len(top_a) != users or len(top_b) != users:
        raise UserInputError(
            f"interleave: {len(top_a)} and {len(top_b)} top-K lists for {users} users; need one per user each"
        )
    lists_a = [_as_list(items) for items in top_a]
    lists_b = [_as_list(items) for items in top_b]
    lengths = [
        min(len(a), len(b)) if length is None else length for a, b in zip(lists_a, lists_b, strict=True)
    ]
    rounds = _flip_count(max(lengths, default=0))
    flips = np.random.default_rng(seed).integers(0, 2, size=(users, rounds), dtype=np.int8).tolist()
    credit = np.zeros(users, dtype=np.int8)
    for i in range(users):
        chosen, teams = _draft(lists_a[i], lists_b[i], lengths[i], flips[i])
        clicked = _target_set(targets[i])
        # A click adds +1 for B and -1 for A: the sign of the sum is the vote.
        balance = sum(2 * team - 1 for item, team in zip(chosen, teams) if item in clicked)
        credit[i] = (balance > 0) - (balance < 0)
    return credit


def preference_summary(credit: np.ndarray, confidence: float = 0.95) -> dict:
    """Votes per run, B's share of the decided votes with its Wilson interval, and the sign-test p-value."""
    credit = np.asarray(credit)
    wins_a = int((credit < 0).sum())
    wins_b = int((credit > 0).sum())
    decided = wins_a + wins_b
    if decided:
        share = wins_b / decided
        low, high = proportion_confint(wins_b, decided, alpha=1.0 - confidence, method="wilson")
        pvalue = float(stats.binomtest(wins_b, decided, 0.5).pvalue)
    else:
        share, low, high, pvalue = math.nan, math.nan, math.nan, 1.0
    return {
        "users": len(credit),
        "wins_a": wins_a,
        "wins_b": wins_b,
        "ties": len(credit) - decided,
        "share_b": share,
        "share_b_low": float(low),
        "share_b_high": float(high),
        "pvalue": pvalue,
    }


def sign_test_pvalues(wins_b: np.ndarray, decided: np.ndarray) -> np.ndarray:
    """Two-sided sign-test p-values, `binomtest(wins_b, decided, 0.5).pvalue`; 1 where none decided."""
    wins_b = np.asarray(wins_b, dtype=np.int64)
    decided = np.asarray(decided, dtype=np.int64)
    # Binomial(n, 1/2) is symmetric: the outcomes at most as likely as k are the two tails beyond
    # min(k, n - k) and its mirror image, each of probability cdf(min(k, n - k)).
    smaller = np.minimum(wins_b, decided - wins_b)
    pvalues = np.minimum(1.0, 2.0 * stats.binom.cdf(smaller, decided, 0.5))
    return np.where(decided > 0, pvalues, 1.0)


def one_sample_t_pvalues(samples: np.ndarray) -> np.ndarray:
    """Two-sided one-sample t-test of mean 0, one p-value per row of `samples`.

    A row with no spread gives 1 if its mean is 0 (nothing to detect) and 0 otherwise (a constant
    shift), where the t statistic is undefined; a row of one value gives 1.
    """
    samples = np.asarray(samples, dtype=np.float64)
    n = samples.shape[1]
    if n < 2:
        return np.ones(samples.shape[0])
    means = samples.mean(axis=1)
    variances = samples.var(axis=1, ddof=1)
    # Equal values, not a zero variance: the mean of equal values can round off them, leaving a
    # variance of 1e-35 and a huge t where there is no spread at all.
    spread = (samples != samples[:, :1]).any(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = means / np.sqrt(variances / n)
    pvalues = 2.0 * stats.t.sf(np.abs(t), n - 1)
    return np.where(spread, pvalues, np.where(means == 0, 1.0, 0.0))


def _default_sizes(users: int) -> np.ndarray:
    smallest = min(20, users)
    return np.unique(np.round(np.geomspace(smallest, users, 12)).astype(np.int64))


def users_needed(
    credit: np.ndarray,
    paired_differences: np.ndarray,
    alpha: float = 0.05,
    sizes: Sequence[int] | None = None,
    repetitions: int = 200,
    seed: int = 0,
) -> pd.DataFrame:
    """For each number of users n, how often the interleaving sign test and the paired t-test reject.

    `credit`: the per-user votes of `interleave_credit`; `paired_differences`: per user, a metric
    of B minus A, in the same user order. For each n in `sizes` (default: about 12 sizes spaced
    geometrically from 20 to all users) `repetitions` samples of n users are drawn with
    replacement, the same users for both tests, and the share of samples whose two-sided p-value
    is at most `alpha` is each test's power at this sample's effect; `smallest_sufficient` reads
    off the smallest n that reaches a given power.
    """
    credit = np.asarray(credit)
    differences = np.asarray(paired_differences, dtype=np.float64)
    users = len(credit)
    if users == 0:
        raise UserInputError("interleave: no users to subsample")
    if len(differences) != users:
        raise UserInputError(
            f"interleave: {len(differences)} paired differences for {users} interleaving votes; "
            "need one per user"
        )
    if not 0.0 < alpha < 1.0:
        raise UserInputError(f"interleave: alpha must be in (0, 1), got {alpha}")
    grid = _default_sizes(users) if sizes is None else np.asarray(sizes, dtype=np.int64)
    if len(grid) == 0 or (grid < 1).any():
        raise UserInputError(f"interleave: sizes must be positive user counts, got {list(grid)}")
    votes_b = (credit > 0).astype(np.int64)
    votes_a = (credit < 0).astype(np.int64)
    rng = np.random.default_rng(seed)
    rows = []
    for n in grid.tolist():
        rejected_sign = rejected_t = 0
        block = max(1, _BLOCK_ENTRIES // n)
        for begin in range(0, repetitions, block):
            count = min(block, repetitions - begin)
            sample = rng.integers(0, users, size=(count, n))
            wins_b = votes_b[sample].sum(axis=1)
            decided = wins_b + votes_a[sample].sum(axis=1)
            rejected_sign += int((sign_test_pvalues(wins_b, decided) <= alpha).sum())
            rejected_t += int((one_sample_t_pvalues(differences[sample]) <= alpha).sum())
        rows.append((n, rejected_sign / repetitions, rejected_t / repetitions))
    return pd.DataFrame(rows, columns=["users", "power_interleaving", "power_paired"])


def smallest_sufficient(table: pd.DataFrame, power: float = 0.8) -> dict[str, int | None]:
    """Per test, the smallest user count of a `users_needed` table with at least `power` (None if none).

    The powers are estimates from a finite number of samples and need not grow strictly with n:
    this is the first size of the grid that reaches `power`, not a guarantee for larger ones.
    """
    found: dict[str, int | None] = {}
    for method in ("interleaving", "paired"):
        enough = table.loc[table[f"power_{method}"] >= power, "users"]
        found[method] = int(enough.min()) if len(enough) else None
    return found


def check_has_top_items(columns: Sequence[str], path) -> None:
    """Refuse a run whose per-user results hold no top-K lists to interleave."""
    if TOP_ITEMS_COLUMN not in columns:
        raise UserInputError(
            f"interleave: {path} has no {TOP_ITEMS_COLUMN} column (the run recorded no top-K lists; "
            "evaluate its checkpoint again with evaluate.py)"
        )


def interleaving_markdown(
    summary: dict,
    table: pd.DataFrame,
    sufficient: dict[str, int | None],
    run_a: str,
    run_b: str,
    metric: str,
    paired: dict,
    power: float,
    alpha: float,
    confidence: float = 0.95,
) -> str:
    """The report of `evaluate.py interleave=[A,B]`: B's preference share, and how many users
    each test needs at this sample's effect. `paired`: the paired test's mean difference of
    `metric` (B - A) and its p-value on all users."""
    level = f"{round(confidence * 100)}%"

    def needed(method: str) -> str:
        n = sufficient[method]
        return f"{n:,}" if n is not None else f"more than {int(table['users'].max()):,}"

    share = summary["share_b"]
    lines = [
        f"Offline team-draft interleaving of `{run_a}` (A) and `{run_b}` (B) over {summary['users']:,} "
        "test users: each user's target(s) credited to the run that drafted them into the interleaved list.",
        "",
        f"- Votes: B {summary['wins_b']:,}, A {summary['wins_a']:,}, no preference {summary['ties']:,}.",
        f"- B's share of the decided votes: {share:.3f} [{summary['share_b_low']:.3f}, "
        f"{summary['share_b_high']:.3f}] ({level} Wilson); sign test p = {summary['pvalue']:.3g}.",
        f"- Paired {metric}, B - A: {paired['diff']:+.4f} (paired t p = {paired['pvalue']:.3g}).",
        f"- Users needed for power {power} at two-sided alpha {alpha}, at this sample's effect (users "
        f"resampled with replacement): interleaving {needed('interleaving')}, paired {metric} {needed('paired')}.",
        "",
        f"| users | power (interleaving) | power (paired {metric}) |",
        "|---|---|---|",
    ]
    for row in table.itertuples(index=False):
        lines.append(f"| {row.users:,} | {row.power_interleaving:.3f} | {row.power_paired:.3f} |")
    return "\n".join(lines) + "\n"
