import numpy as np
import pandas as pd
import pytest
from scipy import stats
from statsmodels.stats.proportion import proportion_confint

from recsys.errors import UserInputError
from recsys.evaluation.interleaving import (
    TEAM_A,
    TEAM_B,
    check_has_top_items,
    interleave_credit,
    one_sample_t_pvalues,
    preference_summary,
    sign_test_pvalues,
    smallest_sufficient,
    team_draft,
    users_needed,
)

A, B = TEAM_A, TEAM_B


class Coins:
    """A stand-in for np.random.Generator whose coin flips (the team that picks first) are given."""

    def __init__(self, *flips):
        self.flips = list(flips)

    def integers(self, low, high, size):
        assert (low, high) == (0, 2)
        assert size >= len(self.flips), "more flips given than the draft can use"
        return np.array(self.flips + [0] * (size - len(self.flips)))


def test_team_draft_with_overlapping_lists():
    # A = [1, 2, 3, 4], B = [2, 5, 1, 6], length 4, coin flips B then A:
    # pick 1: 0 picks each, flip -> B picks its best, 2
    # pick 2: A has fewer picks  -> A picks its best free item, 1
    # pick 3: 1 pick each, flip  -> A: 2 is taken, so 3
    # pick 4: B has fewer picks  -> B: 2 is taken, so 5
    items, teams = team_draft([1, 2, 3, 4], [2, 5, 1, 6], 4, Coins(B, A))
    assert items == [2, 1, 3, 5]
    assert teams.tolist() == [B, A, A, B]
    # Flips A then B: A takes 1, B takes 2, B (flip) takes 5, A takes 3 (2 is taken).
    items, teams = team_draft([1, 2, 3, 4], [2, 5, 1, 6], 4, Coins(A, B))
    assert items == [1, 2, 5, 3]
    assert teams.tolist() == [A, B, B, A]


def test_team_draft_when_a_team_runs_out():
    # A = [1, 2] is exhausted after pick 3; B goes on alone: 1(A) 3(B) 2(A) 4(B) 5(B).
    items, teams = team_draft([1, 2], [3, 4, 5, 6], 5, Coins(A, A, A))
    assert items == [1, 3, 2, 4, 5]
    assert teams.tolist() == [A, B, A, B, B]
    # B = [1] has nothing left once A took 1: A fills the list.
    items, teams = team_draft([1, 2, 3], [1], 3, Coins(A, A))
    assert items == [1, 2, 3]
    assert teams.tolist() == [A, A, A]
    # Both exhausted before the length: the list is the union, shorter than asked.
    items, teams = team_draft(["x", "y"], ["y", "x"], 4, Coins(B, A))
    assert items == ["y", "x"]
    assert teams.tolist() == [B, A]
    items, teams = team_draft([], [], 3, Coins())
    assert items == [] and teams.tolist() == []


def test_an_item_both_rank_first_goes_to_the_team_that_picks_first():
    items, teams = team_draft([7, 8], [7, 9], 2, Coins(A))
    assert items == [7, 9] and teams.tolist() == [A, B]
    items, teams = team_draft([7, 8], [7, 9], 2, Coins(B))
    assert items == [7, 8] and teams.tolist() == [B, A]


def test_team_draft_invariants_on_random_lists():
    rng = np.random.default_rng(0)
    for _ in range(300):
        list_a = rng.choice(15, size=rng.integers(0, 11), replace=False).tolist()
        list_b = rng.choice(15, size=rng.integers(0, 11), replace=False).tolist()
        length = int(rng.integers(0, 21))
        items, teams = team_draft(list_a, list_b, length, rng)
        assert len(items) == len(teams) == min(length, len(set(list_a) | set(list_b)))
        assert len(set(items)) == len(items)
        own = {A: list_a, B: list_b}
        for p, (item, team) in enumerate(zip(items, teams)):
            taken = set(items[:p])
            free = {t: [i for i in own[t] if i not in taken] for t in (A, B)}
            # The team picks its highest-ranked free item: every item comes from a list, and each
            # team's items follow the order of its own list.
            assert item == free[team][0]
            if free[A] and free[B]:
                picks = np.bincount(teams[: p + 1], minlength=2)
                assert abs(picks[A] - picks[B]) <= 1


def test_credit_counts_each_teams_clicks():
    top_a = [[1, 2], [1, 2], [1, 2], [7, 8], ["u", "v"]]
    top_b = [[3, 4], [3, 4], [3, 4], [9, 7], ["w", "v"]]
    targets = [
        [1, 3],  # window targets, one drafted by each team: a tie
        [1, 2],  # only A's 1 makes the length-2 list: A
        [99],  # no target in the list: a tie
        np.int64(7),  # both lists hold 7, but A always drafts it (B takes 9 first or second): A
        "w",  # string ids; B's best item always makes the list: B
    ]
    for seed in range(5):  # whatever the coin flips
        credit = interleave_credit(top_a, top_b, targets, seed=seed)
        assert credit.tolist() == [0, -1, 0, -1, 1]


def test_credit_length_defaults_to_the_shorter_list():
    # Length 2 holds 1 and 5 only; length 4 also A's 2 (and B's 6).
    assert interleave_credit([[1, 2, 3, 4]], [[5, 6]], [[2]]).tolist() == [0]
    assert interleave_credit([[1, 2, 3, 4]], [[5, 6]], [[2]], length=4).tolist() == [-1]


def test_credit_is_reproducible_and_takes_numpy_rows():
    rng = np.random.default_rng(1)
    top_a = rng.integers(0, 30, size=(200, 10))
    top_b = rng.integers(0, 30, size=(200, 10))
    targets = rng.integers(0, 30, size=200)
    first = interleave_credit(top_a, top_b, targets, seed=3)
    assert (interleave_credit(list(top_a), list(top_b), targets.tolist(), seed=3) == first).all()
    assert not (interleave_credit(top_a, top_b, targets, seed=4) == first).all()


def test_credit_refuses_lists_for_other_users():
    with pytest.raises(UserInputError, match="interleave:"):
        interleave_credit([[1]], [[1], [2]], [1, 2])


def test_identical_runs_split_the_votes_evenly():
    # Same lists: a click goes to whichever team the coin let draft the item, so B's share is 1/2.
    # The targets lean to the top of the list, as real ones do, where a team that always picked
    # first on a tie would take more of them.
    rng = np.random.default_rng(2)
    top = [rng.choice(100, size=10, replace=False) for _ in range(4000)]
    position_odds = 1.0 / np.arange(1, 11)
    positions = rng.choice(10, size=len(top), p=position_odds / position_odds.sum())
    targets = [row[p] for row, p in zip(top, positions)]  # always in the list: every user votes
    summary = preference_summary(interleave_credit(top, top, targets, seed=0))
    assert summary["ties"] == 0
    assert summary["share_b_low"] <= 0.5 <= summary["share_b_high"]
    assert 0.45 < summary["share_b"] < 0.55


def test_preference_summary_matches_a_direct_computation():
    credit = np.random.default_rng(3).choice([-1, 0, 1], size=500, p=[0.3, 0.3, 0.4])
    wins_a, wins_b = int((credit == -1).sum()), int((credit == 1).sum())
    summary = preference_summary(credit, confidence=0.9)
    low, high = proportion_confint(wins_b, wins_a + wins_b, alpha=0.1, method="wilson")
    assert summary["users"] == 500
    assert (summary["wins_a"], summary["wins_b"], summary["ties"]) == (wins_a, wins_b, 500 - wins_a - wins_b)
    assert summary["share_b"] == pytest.approx(wins_b / (wins_a + wins_b))
    assert (summary["share_b_low"], summary["share_b_high"]) == pytest.approx((low, high))
    assert summary["pvalue"] == pytest.approx(stats.binomtest(wins_b, wins_a + wins_b, 0.5).pvalue)
    # No decided user: no share, nothing to reject.
    empty = preference_summary(np.zeros(10, dtype=int))
    assert np.isnan(empty["share_b"]) and empty["pvalue"] == 1.0 and empty["ties"] == 10


def test_vectorised_pvalues_equal_scipy():
    rng = np.random.default_rng(4)
    decided = np.concatenate([[1, 2, 10, 10, 10, 301], rng.integers(1, 400, size=30)])
    wins = np.concatenate([[0, 1, 5, 0, 7, 150], rng.integers(0, decided[6:] + 1)])
    expected = [stats.binomtest(int(k), int(n), 0.5).pvalue for k, n in zip(wins, decided)]
    assert sign_test_pvalues(wins, decided) == pytest.approx(expected, rel=1e-9)
    assert sign_test_pvalues([0], [0]).tolist() == [1.0]

    samples = rng.normal(0.05, 1.0, size=(20, 37))
    expected = [stats.ttest_1samp(row, 0.0).pvalue for row in samples]
    assert one_sample_t_pvalues(samples) == pytest.approx(expected, rel=1e-9)
    # No spread: nothing to detect when all are 0, a sure shift otherwise.
    assert one_sample_t_pvalues(np.array([[0.0, 0.0, 0.0], [0.2, 0.2, 0.2]])).tolist() == [1.0, 0.0]


def synthetic_runs(users, hit_a, hit_b, seed):
    """Top-10 lists where A's list holds the target with probability hit_a and B's with hit_b."""
    rng = np.random.default_rng(seed)
    targets = rng.integers(1000, 2000, size=users)
    top_a = rng.integers(0, 1000, size=(users, 10))
    top_b = rng.integers(0, 1000, size=(users, 10))
    in_a, in_b = rng.random(users) < hit_a, rng.random(users) < hit_b
    top_a[in_a, rng.integers(0, 10, size=in_a.sum())] = targets[in_a]
    top_b[in_b, rng.integers(0, 10, size=in_b.sum())] = targets[in_b]
    hit_difference = in_b.astype(float) - in_a.astype(float)
    return interleave_credit(top_a, top_b, targets, seed=seed), hit_difference


def test_users_needed_with_a_strong_effect():
    credit, differences = synthetic_runs(2000, hit_a=0.2, hit_b=0.5, seed=5)
    table = users_needed(credit, differences, repetitions=200, seed=0)
    assert list(table.columns) == ["users", "power_interleaving", "power_paired"]
    assert table["users"].iloc[0] == 20 and table["users"].iloc[-1] == 2000
    assert 10 <= len(table) <= 12 and table["users"].is_monotonic_increasing
    for column in ("power_interleaving", "power_paired"):
        assert (np.diff(table[column]) > -0.1).all()  # increasing in n, up to sampling noise
        assert table[column].iloc[-1] == 1.0
    needed = smallest_sufficient(table, 0.8)
    assert needed["interleaving"] is not None and needed["interleaving"] <= 300
    assert needed["paired"] is not None and needed["paired"] <= 300


def test_users_needed_without_an_effect_rejects_about_alpha():
    # Exactly as many votes for A as for B and differences symmetric about 0: no effect at all.
    rng = np.random.default_rng(6)
    credit = np.repeat([1, -1, 0], [300, 300, 400])
    half = rng.normal(0.0, 0.3, size=500)
    differences = np.concatenate([half, -half])
    table = users_needed(credit, differences, alpha=0.05, repetitions=200, seed=1)
    assert (table["power_interleaving"] <= 0.15).all()
    assert (table["power_paired"] <= 0.15).all()
    assert smallest_sufficient(table, 0.8) == {"interleaving": None, "paired": None}


def test_users_needed_samples_the_same_users_for_both_tests(monkeypatch):
    # Each user's paired difference is its own index, so the t-test's samples say which users
    # were drawn; the sign test must have counted the votes of exactly those users.
    from recsys.evaluation import interleaving

    credit = np.random.default_rng(7).choice([-1, 0, 1], size=300)
    seen = {}
    real_sign, real_t = interleaving.sign_test_pvalues, interleaving.one_sample_t_pvalues

    def sign_spy(wins_b, decided):
        seen["wins_b"], seen["decided"] = wins_b, decided
        return real_sign(wins_b, decided)

    def t_spy(samples):
        drawn = samples.astype(np.int64)
        assert (seen["wins_b"] == (credit[drawn] == 1).sum(axis=1)).all()
        assert (seen["decided"] == (credit[drawn] != 0).sum(axis=1)).all()
        seen["checked"] = seen.get("checked", 0) + len(drawn)
        return real_t(samples)

    monkeypatch.setattr(interleaving, "sign_test_pvalues", sign_spy)
    monkeypatch.setattr(interleaving, "one_sample_t_pvalues", t_spy)
    table = users_needed(credit, np.arange(300.0), sizes=[30, 60, 120], repetitions=50, seed=2)
    assert table["users"].tolist() == [30, 60, 120]
    assert seen["checked"] == 3 * 50


def test_users_needed_refuses_bad_input():
    with pytest.raises(UserInputError, match="interleave:"):
        users_needed(np.zeros(5), np.zeros(4))
    with pytest.raises(UserInputError, match="interleave:"):
        users_needed(np.zeros(5), np.zeros(5), sizes=[0, 3])


def test_smallest_sufficient_reads_the_table():
    table = pd.DataFrame(
        {"users": [20, 40, 80], "power_interleaving": [0.5, 0.85, 0.79], "power_paired": [0.1, 0.3, 0.7]}
    )
    assert smallest_sufficient(table, 0.8) == {"interleaving": 40, "paired": None}
    assert smallest_sufficient(table, 0.5) == {"interleaving": 20, "paired": 80}


def test_check_has_top_items():
    check_has_top_items(["user_id", "top_item_ids"], "runs/a")
    with pytest.raises(UserInputError, match="interleave: runs/b has no top_item_ids column"):
        check_has_top_items(["user_id", "rank"], "runs/b")
