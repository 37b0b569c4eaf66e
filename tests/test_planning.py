import math

import numpy as np
import pytest
from scipy import stats
from statsmodels.stats.power import TTestIndPower, TTestPower

from recsys.errors import UserInputError
from recsys.evaluation.planning import (
    ab_plan,
    cuped,
    minimum_detectable_effect,
    paired_users,
    plan_markdown,
    users_per_arm,
)


def offline_runs(n=3000, effect=0.02, seed=0, pre_correlation=0.8):
    """Per-user values of two runs on the same users, correlated through each user's difficulty,
    and a pre-period value of the same metric that predicts both."""
    rng = np.random.default_rng(seed)
    pre = rng.normal(0.3, 0.2, n)
    difficulty = (
        0.3 + pre_correlation * (pre - 0.3) + rng.normal(0, 0.2 * math.sqrt(1 - pre_correlation**2), n)
    )
    a = difficulty + rng.normal(0, 0.05, n)
    b = difficulty + effect + rng.normal(0, 0.05, n)
    return a, b, pre


def test_users_per_arm_is_the_two_sample_t_test_and_near_the_normal_formula():
    effect, sd_a, sd_b = 0.02, 0.2, 0.25
    expected = TTestIndPower().solve_power(
        effect_size=effect / math.sqrt((sd_a**2 + sd_b**2) / 2),
        alpha=0.05,
        power=0.8,
        ratio=1.0,
        alternative="two-sided",
    )
    assert users_per_arm(effect, sd_a, sd_b) == pytest.approx(expected, rel=1e-9)
    # A difference of means has variance sd_a^2 / n + sd_b^2 / n: the arms' variances add.
    z = stats.norm.ppf(0.975) + stats.norm.ppf(0.8)
    normal = z**2 * (sd_a**2 + sd_b**2) / effect**2  # about 2,000 users: t and normal nearly agree
    assert users_per_arm(effect, sd_a, sd_b) == pytest.approx(normal, rel=0.01)
    z = stats.norm.ppf(0.995) + stats.norm.ppf(0.9)
    normal = z**2 * (sd_a**2 + sd_b**2) / effect**2
    assert users_per_arm(effect, sd_a, sd_b, alpha=0.01, power=0.9) == pytest.approx(normal, rel=0.01)
    # Which run is better does not matter to a two-sided test; no difference needs every user.
    assert users_per_arm(-effect, sd_a, sd_b) == users_per_arm(effect, sd_a, sd_b)
    assert users_per_arm(0.0, sd_a, sd_b) == math.inf


def test_users_per_arm_grows_as_the_square_of_one_over_the_effect():
    n = users_per_arm(0.02, 0.2, 0.2)
    assert users_per_arm(0.01, 0.2, 0.2) / n == pytest.approx(4.0, rel=0.005)
    # Stricter alpha, more power, more spread: each needs more users.
    assert users_per_arm(0.02, 0.2, 0.2, alpha=0.01) > n
    assert users_per_arm(0.02, 0.2, 0.2, power=0.9) > n
    assert users_per_arm(0.02, 0.2, 0.3) > n


def test_extreme_effects_give_the_smallest_t_test_not_nan():
    # statsmodels' solver returns NaN for standardised effects above about 6
    assert users_per_arm(1.0, 0.0, 0.0) == 2.0
    assert users_per_arm(50.0, 1.0, 1.0) == 2.0
    assert 2.0 < users_per_arm(4.0, 1.0, 1.0) < 3.0
    assert paired_users(np.array([10.0, 10.0, 10.0])) == 2.0
    for effect_size in (6.5, 8.0, 12.0):  # where the two-sided solver fails for a paired test
        users = paired_users(np.array([effect_size - 1, effect_size + 1]) / math.sqrt(2), power=0.99)
        assert 2.0 <= users < 3.0


def test_minimum_detectable_effect_inverts_users_per_arm():
    for users in (10, 250, 40_000):
        mde = minimum_detectable_effect(users, 0.2, 0.3, alpha=0.05, power=0.8)
        assert users_per_arm(mde, 0.2, 0.3, alpha=0.05, power=0.8) == pytest.approx(users, rel=1e-6)
    users = users_per_arm(0.015, 0.2, 0.3, alpha=0.1, power=0.9)
    assert minimum_detectable_effect(users, 0.2, 0.3, alpha=0.1, power=0.9) == pytest.approx(0.015, rel=1e-6)
    # Four times the users: half the detectable effect (nearly; t quantiles shrink a little too).
    assert minimum_detectable_effect(4000, 0.2, 0.3) / minimum_detectable_effect(1000, 0.2, 0.3) == (
        pytest.approx(0.5, rel=0.005)
    )


def test_paired_users_is_the_paired_t_test_and_pairing_needs_far_fewer_users():
    a, b, _ = offline_runs()
    differences = b - a
    expected = TTestPower().solve_power(
        effect_size=differences.mean() / differences.std(ddof=1),
        alpha=0.05,
        power=0.8,
        alternative="two-sided",
    )
    assert paired_users(differences) == pytest.approx(expected, rel=1e-9)
    # The runs share each user's difficulty (correlation about 0.9): pairing cancels it, two
    # independent arms carry it in both.
    assert np.corrcoef(a, b)[0, 1] > 0.8
    unpaired = users_per_arm(differences.mean(), a.std(ddof=1), b.std(ddof=1))
    assert paired_users(differences) < unpaired / 5
    # With independent runs there is nothing to cancel: paired and unpaired nearly agree.
    rng = np.random.default_rng(1)
    a, b = rng.normal(0, 1, 20_000), rng.normal(0.05, 1, 20_000)
    unpaired = users_per_arm(b.mean() - a.mean(), a.std(ddof=1), b.std(ddof=1))
    assert paired_users(b - a) == pytest.approx(unpaired, rel=0.05)


@pytest.mark.parametrize("missing_share", [0.0, 0.3])
def test_cuped_removes_the_share_of_variance_the_covariate_explains(missing_share):
    rng = np.random.default_rng(2)
    x = rng.normal(1.0, 2.0, 1000)
    y = 0.5 * x + rng.normal(3.0, 1.5, 1000)
    x[rng.random(1000) < missing_share] = np.nan
    result = cuped(y, x)
    missing = np.isnan(x)
    imputed = np.where(missing, np.nanmean(x), x)
    correlation = np.corrcoef(imputed, y)[0, 1]
    assert result.correlation == pytest.approx(correlation, rel=1e-9)
    assert result.reduction == pytest.approx(correlation**2, rel=1e-9)
    assert result.variance_after / result.variance_before == pytest.approx(1 - correlation**2, rel=1e-9)
    assert result.variance_before == pytest.approx(y.var(ddof=1))
    assert result.variance_after == pytest.approx(result.adjusted.var(ddof=1))
    assert result.theta == pytest.approx(np.cov(imputed, y)[0, 1] / imputed.var(ddof=1))
    assert result.adjusted.mean() == pytest.approx(y.mean(), abs=1e-12)
    assert result.missing == missing.sum() and (missing.sum() > 0) == (missing_share > 0)
    np.testing.assert_array_equal(result.adjusted[missing], y[missing])  # no pre-period: as it was
    assert 0.1 < result.reduction < 0.6


def test_cuped_reduction_follows_how_much_the_covariate_predicts():
    rng = np.random.default_rng(3)
    x = rng.random(5000)
    strong = cuped(2 * x + rng.normal(0, 0.01, 5000), x)
    assert strong.reduction > 0.99 and strong.theta == pytest.approx(2.0, rel=0.01)
    independent = cuped(rng.random(5000), x)
    assert independent.reduction < 0.005 and abs(independent.theta) < 0.1
    # A covariate with no spread explains nothing: no adjustment, rather than a theta of noise.
    flat = cuped(x, np.where(x < 0.5, 0.1, np.nan))
    assert flat.theta == 0.0 and flat.reduction == 0.0
    np.testing.assert_array_equal(flat.adjusted, x)


def test_cuped_refuses_a_pre_period_without_values():
    with pytest.raises(UserInputError, match="^plan_pre_period:"):
        cuped(np.arange(5.0), np.full(5, np.nan))
    with pytest.raises(UserInputError, match="^plan_pre_period:"):
        cuped(np.arange(5.0), np.arange(4.0))


def simulated_power(users, sd_a, sd_b, effect, experiments, rng, covariate_correlation=None):
    """Share of simulated two-arm experiments (independent users in each arm) whose two-sided
    t-test rejects at 0.05; with a covariate correlation, on CUPED-adjusted values."""
    if covariate_correlation is None:
        arm_a = rng.normal(0.0, sd_a, (experiments, users))
        arm_b = rng.normal(effect, sd_b, (experiments, users))
    else:
        rho = covariate_correlation
        pre_a, pre_b = rng.normal(0, 1, (2, experiments, users))
        arm_a = sd_a * (rho * pre_a + math.sqrt(1 - rho**2) * rng.normal(0, 1, (experiments, users)))
        arm_b = effect + sd_b * (rho * pre_b + math.sqrt(1 - rho**2) * rng.normal(0, 1, (experiments, users)))
        # Online, theta is estimated from each experiment's own users, both arms together.
        pre = np.concatenate([pre_a, pre_b], axis=1)
        values = np.concatenate([arm_a, arm_b], axis=1)
        centred = pre - pre.mean(axis=1, keepdims=True)
        theta = (centred * (values - values.mean(axis=1, keepdims=True))).sum(axis=1) / (centred**2).sum(
            axis=1
        )
        adjusted = values - theta[:, None] * centred
        arm_a, arm_b = adjusted[:, :users], adjusted[:, users:]
    return float((stats.ttest_ind(arm_a, arm_b, axis=1).pvalue < 0.05).mean())


def test_planned_users_reach_the_planned_power_in_simulated_experiments():
    rng = np.random.default_rng(4)
    sd_a, sd_b, effect = 1.0, 1.5, 0.3
    users = math.ceil(users_per_arm(effect, sd_a, sd_b, alpha=0.05, power=0.8))  # 284
    # 2,000 experiments: the empirical power's standard error is about 0.009.
    assert simulated_power(users, sd_a, sd_b, effect, 2000, rng) == pytest.approx(0.8, abs=0.04)
    # The paired count would be far too few for two independent arms.
    assert simulated_power(users // 2, sd_a, sd_b, effect, 2000, rng) < 0.6


def test_cuped_plan_reaches_the_planned_power_with_adjusted_experiments():
    a, b, pre = offline_runs(n=20_000, effect=0.03, seed=5, pre_correlation=0.8)
    plan = ab_plan(a, b, pre=pre)
    assert plan.cuped.users_per_arm < plan.users_per_arm / 2
    # Simulate online experiments with the offline spreads and the covariate's correlation.
    rng = np.random.default_rng(6)
    users = int(plan.cuped.users_per_arm)
    rho = math.sqrt((plan.cuped.reduction_a + plan.cuped.reduction_b) / 2)
    power = simulated_power(users, plan.sd_a, plan.sd_b, plan.effect, 1500, rng, covariate_correlation=rho)
    assert power == pytest.approx(0.8, abs=0.05)
    # The same users without the adjustment fall well short.
    assert simulated_power(users, plan.sd_a, plan.sd_b, plan.effect, 1500, rng) < 0.5


def test_ab_plan_figures_are_the_functions_figures():
    a, b, pre = offline_runs(n=2000)
    plan = ab_plan(a, b, alpha=0.05, power=0.8)
    effect, sd_a, sd_b = b.mean() - a.mean(), a.std(ddof=1), b.std(ddof=1)
    assert plan.users == 2000 and plan.effect == pytest.approx(effect)
    assert plan.relative_effect == pytest.approx(effect / a.mean())
    assert plan.users_per_arm == math.ceil(users_per_arm(effect, sd_a, sd_b))
    assert plan.total_users == 2 * plan.users_per_arm
    assert plan.planned_users_per_arm == 2000  # by default, as many as were evaluated offline
    assert plan.mde == pytest.approx(minimum_detectable_effect(2000, sd_a, sd_b))
    assert plan.paired_users == math.ceil(paired_users(b - a))
    assert plan.paired_p == pytest.approx(stats.ttest_rel(b, a).pvalue)
    assert plan.cuped is None
    table = plan.table()
    assert list(table.columns) == ["quantity", "value", "description"]
    assert not table["quantity"].str.startswith("cuped_").any()
    assert table.set_index("quantity").loc["users_per_arm", "value"] == plan.users_per_arm
    assert "\nusers,2000," in table.to_csv(index=False)  # counts are whole numbers in plan.csv

    bigger = ab_plan(a, b, users_per_arm=8000, pre=pre)
    assert bigger.planned_users_per_arm == 8000
    assert bigger.mde == pytest.approx(minimum_detectable_effect(8000, sd_a, sd_b))
    c = bigger.cuped
    assert c.theta_a == pytest.approx(cuped(a, pre).theta) and c.reduction_b == pytest.approx(
        cuped(b, pre).reduction
    )
    sd_a_cuped, sd_b_cuped = math.sqrt(cuped(a, pre).variance_after), math.sqrt(cuped(b, pre).variance_after)
    assert c.users_per_arm == math.ceil(users_per_arm(effect, sd_a_cuped, sd_b_cuped))
    assert c.users_saved == bigger.users_per_arm - c.users_per_arm > 0
    assert c.users_saved_share == pytest.approx(c.users_saved / bigger.users_per_arm)
    assert (
        c.mde == pytest.approx(minimum_detectable_effect(8000, sd_a_cuped, sd_b_cuped)) and c.mde < bigger.mde
    )
    assert c.missing == 0
    quantities = bigger.table()["quantity"].tolist()
    assert quantities[: len(table)] == table["quantity"].tolist()
    assert {
        "cuped_theta_a",
        "cuped_reduction_b",
        "cuped_users_per_arm",
        "cuped_users_saved",
        "cuped_missing",
    } <= set(quantities)


def test_ab_plan_counts_users_without_a_pre_period():
    a, b, pre = offline_runs(n=1000)
    pre[::4] = np.nan
    plan = ab_plan(a, b, pre=pre)
    assert plan.cuped.missing == 250
    assert plan.cuped.reduction_a == pytest.approx(cuped(a, pre).reduction)


BAD_INPUTS = [
    ({"alpha": 0.0}, "plan_alpha"),
    ({"alpha": 1.0}, "plan_alpha"),
    ({"alpha": "0.05"}, "plan_alpha"),
    ({"alpha": True}, "plan_alpha"),
    ({"power": 1.2}, "plan_power"),
    ({"power": 0.0}, "plan_power"),
    ({"power": 0.04}, "plan_power"),  # below alpha: every sample reaches it
    ({"users_per_arm": 0}, "plan_users_per_arm"),
    ({"users_per_arm": 1}, "plan_users_per_arm"),
    ({"users_per_arm": -5}, "plan_users_per_arm"),
    ({"users_per_arm": 100.5}, "plan_users_per_arm"),
    ({"users_per_arm": True}, "plan_users_per_arm"),
    ({"pre": np.zeros(9)}, "plan_pre_period"),
    ({"pre": np.full(10, np.nan)}, "plan_pre_period"),
]


@pytest.mark.parametrize(("kwargs", "key"), BAD_INPUTS)
def test_ab_plan_names_the_key_of_a_bad_setting(kwargs, key):
    rng = np.random.default_rng(7)
    with pytest.raises(UserInputError, match=f"^{key}:"):
        ab_plan(rng.random(10), rng.random(10), **kwargs)


def test_ab_plan_refuses_runs_that_are_not_paired_values():
    rng = np.random.default_rng(8)
    for a, b in [
        (rng.random(10), rng.random(9)),
        (rng.random(1), rng.random(1)),
        (np.r_[rng.random(9), np.nan], rng.random(10)),
    ]:
        with pytest.raises(UserInputError, match="^plan:"):
            ab_plan(a, b)
    assert ab_plan(rng.random(10), rng.random(10), users_per_arm=np.int64(50)).planned_users_per_arm == 50


def test_plan_markdown_reports_the_figures():
    a, b, pre = offline_runs(n=2000)
    plan = ab_plan(a, b, users_per_arm=5000)
    text = plan_markdown(plan, "ndcg@10", "sasrec", "bert4rec")
    assert "`bert4rec` (B) against `sasrec` (A)" in text and "ndcg@10" in text
    assert "alpha = 0.05" in text and "power = 0.8" in text and "unpaired" in text
    assert f"| {int(plan.users_per_arm):,} |" in text and f"| {int(plan.paired_users):,} |" in text
    assert f"| {plan.mde:.4g} |" in text and "5,000 users per arm" in text
    assert "CUPED" not in text

    plan = ab_plan(a, b, users_per_arm=5000, pre=pre)
    text = plan_markdown(plan, "ndcg@10", "sasrec", "bert4rec")
    c = plan.cuped
    assert f"{c.reduction_a:.1%} (A)" in text and f"{c.reduction_b:.1%} (B)" in text
    assert f"{int(c.users_per_arm):,} users per arm instead of {int(plan.users_per_arm):,}" in text
    assert f"{int(c.users_saved):,} fewer per arm" in text


def test_no_observed_difference_needs_every_user_and_still_reports():
    a, _, pre = offline_runs(n=500)
    plan = ab_plan(a, a.copy(), pre=pre)
    assert plan.users_per_arm == math.inf and plan.paired_users == math.inf and plan.paired_p == 1.0
    assert math.isnan(plan.cuped.users_saved) and plan.cuped.mde < plan.mde
    text = plan_markdown(plan, "hr@10", "a", "b")
    assert "∞" in text and "minimum detectable effect" in text


def test_minimum_detectable_effect_is_positive_and_falls_with_users():
    # statsmodels' two-sided solve can return the negative root (it did at 2,953 users per arm).
    users = np.geomspace(100, 24_500, 40)
    effects = [minimum_detectable_effect(n, 0.1279, 0.121) for n in users]
    assert all(e > 0 for e in effects)
    assert all(later < earlier for earlier, later in zip(effects, effects[1:]))
