"""How many users would an online A/B test need to confirm what an offline comparison found?

An offline comparison (recsys/evaluation/compare.py) scores two runs on the *same* test users, so
their difference is measured user by user and the users' own spread cancels. An online test cannot
do that: each user sees one arm, the arms are independent groups, and the per-user variances of
the two arms add. This module plans that online test from the offline per-user values of one
metric:

- the users per arm a two-sided two-sample t-test (equal arms) needs to detect the observed
  difference at a given alpha and power, and the minimum detectable effect (MDE) at a given number
  of users per arm; both from statsmodels' power solvers;
- the paired figure (a paired t-test on the offline users) beside it, for contrast: it shows how
  much of the offline certainty came from pairing and will not carry over online;
- optionally CUPED: each user's metric before the experiment (the validation window of the time
  split) is an unaffected covariate; regressing it out leaves the difference of means unchanged
  and removes the share corr(pre, metric)^2 of each arm's variance, so fewer users are needed.

The offline per-user spread stands in for the online one. Offline metrics such as NDCG@10 are
proxies: the plan says how many users are needed to see a difference of the offline size, not
that an online metric will move by that much.
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import optimize
from statsmodels.stats.power import TTestIndPower, TTestPower

# imported before any solve: its first import puts warning filters ahead of ours (see _solve_users)
from statsmodels.tools.sm_exceptions import ConvergenceWarning

from recsys.errors import UserInputError
from recsys.evaluation.compare import paired_t_pvalue

# The fewest users (per arm, or pairs) a t-test can use: with one there is no variance estimate.
MIN_USERS = 2


def _check_level(value, key: str) -> float:
    """A probability strictly between 0 and 1 (alpha, power)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 < float(value) < 1.0:
        raise UserInputError(f"{key}: must be a number strictly between 0 and 1, got {value!r}")
    return float(value)


def _check_levels(alpha, power) -> tuple[float, float]:
    alpha = _check_level(alpha, "plan_alpha")
    power = _check_level(power, "plan_power")
    # A two-sided test rejects with probability alpha even when there is no effect: a lower power
    # is reached by any sample, so no sample size answers it.
    if power <= alpha:
        raise UserInputError(f"plan_power: must exceed plan_alpha ({alpha}), got {power}")
    return alpha, power


def _solve_users(solver, effect_size: float, alpha: float, power: float, **design) -> float:
    """Users (per arm, or pairs) for a standardised effect; inf for no effect."""
    effect_size = abs(effect_size)
    if effect_size == 0.0:
        return math.inf
    if math.isinf(effect_size):  # no spread at all: any sample a t-test can use shows the difference
        return float(MIN_USERS)
    # For large effects (standardised above about 6) scipy's noncentral t returns NaN and the
    # two-sided solver with it. The two-sided test's power is at least the one-sided power at
    # alpha / 2 (its far tail alone), and at such effects the other tail adds nothing visible:
    # the one-sided figures decide the floor and stand in where the two-sided solver fails.
    one_sided = {"alpha": alpha / 2, "alternative": "larger", **design}
    smallest = "nobs1" if isinstance(solver, TTestIndPower) else "nobs"
    if solver.power(effect_size=effect_size, **{smallest: MIN_USERS}, **one_sided) >= power:
        return float(MIN_USERS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # a failure returns NaN, handled below
        users = float(
            np.squeeze(
                solver.solve_power(
                    effect_size=effect_size, alpha=alpha, power=power, alternative="two-sided", **design
                )
            )
        )
        if not math.isfinite(users):
            users = float(np.squeeze(solver.solve_power(effect_size=effect_size, power=power, **one_sided)))
    return users


def _pooled_sd(sd_a: float, sd_b: float) -> float:
    """The standard deviation whose variance is the mean of the arms' variances (equal arms)."""
    if not (sd_a >= 0.0 and sd_b >= 0.0):  # also refuses NaN
        raise UserInputError(
            f"plan: standard deviations must be non-negative numbers, got {sd_a!r} and {sd_b!r}"
        )
    return math.sqrt((sd_a**2 + sd_b**2) / 2.0)


def users_per_arm(effect: float, sd_a: float, sd_b: float, alpha: float = 0.05, power: float = 0.8) -> float:
    """Users needed in each of two equal arms for a two-sided two-sample t-test to detect a
    difference of means `effect` with probability `power`; not rounded up.

    inf when the effect is 0; the t-test's floor of 2 when the arms have no spread at all."""
    alpha, power = _check_levels(alpha, power)
    pooled = _pooled_sd(sd_a, sd_b)
    effect_size = math.inf if pooled == 0.0 and effect != 0.0 else (0.0 if effect == 0.0 else effect / pooled)
    return _solve_users(TTestIndPower(), effect_size, alpha, power, ratio=1.0)


# ab_plan's argument `users_per_arm` (the config key's name) hides the function of that name there.
_needed_per_arm = users_per_arm


def minimum_detectable_effect(
    users: float, sd_a: float, sd_b: float, alpha: float = 0.05, power: float = 0.8
) -> float:
    """The smallest |difference of means| a two-sided two-sample t-test with `users` in each arm
    detects with probability `power`."""
    alpha, power = _check_levels(alpha, power)
    if not users >= MIN_USERS:
        raise UserInputError(
            f"plan_users_per_arm: a t-test needs at least {MIN_USERS} users per arm, got {users!r}"
        )
    pooled = _pooled_sd(sd_a, sd_b)
    if math.isinf(users):
        return 0.0
    solver = TTestIndPower()
    design = {"nobs1": users, "alpha": alpha, "ratio": 1.0, "alternative": "two-sided"}
    # Two-sided power is symmetric in the effect's sign: the solver may land on the negative root.
    effect_size = abs(float(np.squeeze(solver.solve_power(power=power, **design))))

    # solve_power stops where the power is within about 1e-4 of the target, which at large
    # samples leaves the effect off by 1e-4 relative; a bracketed root around it polishes it so
    # that users_per_arm(mde) gives the users back.
    def shortfall(size: float) -> float:
        return float(np.squeeze(solver.power(effect_size=size, **design))) - power

    low, high = 0.95 * effect_size, 1.05 * effect_size
    if shortfall(low) < 0.0 < shortfall(high):
        effect_size = optimize.brentq(shortfall, low, high, xtol=1e-15, rtol=1e-13)
    return effect_size * pooled


def paired_users(differences: np.ndarray, alpha: float = 0.05, power: float = 0.8) -> float:
    """Users a paired t-test needs to detect the mean of these per-user differences (B - A): the
    offline design, where every user is scored by both runs. Not rounded up."""
    alpha, power = _check_levels(alpha, power)
    differences = np.asarray(differences, dtype=np.float64)
    if len(differences) < 2:
        raise UserInputError(f"plan: needs at least 2 users, got {len(differences)}")
    mean, sd = float(differences.mean()), float(differences.std(ddof=1))
    effect_size = math.inf if sd == 0.0 and mean != 0.0 else (0.0 if mean == 0.0 else mean / sd)
    return _solve_users(TTestPower(), effect_size, alpha, power)


@dataclass
class CupedResult:
    """CUPED adjustment of one arm's per-user values by a pre-period covariate."""

    theta: float  # slope of y on the covariate: cov(x, y) / var(x)
    adjusted: np.ndarray  # y - theta * (x - mean x); same mean as y
    variance_before: float
    variance_after: float
    reduction: float  # 1 - variance_after / variance_before, = correlation**2
    correlation: float  # corr(x, y) on the imputed covariate; 0 where either has no spread
    missing: int  # users without a pre-period value (imputed with the mean: not adjusted)


def cuped(y: np.ndarray, x: np.ndarray) -> CupedResult:
    """Regress the pre-period covariate `x` out of `y` (CUPED).

    A user without a pre-period value (NaN) gets the mean of the observed ones, so their value is
    left as it is. The imputation looks at x alone, never at y or the arm, so the covariate stays a
    pre-treatment quantity and the adjusted mean stays the mean of y."""
    y = np.asarray(y, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    if y.ndim != 1 or x.shape != y.shape:
        raise UserInputError(f"plan_pre_period: needs one value per user ({len(y)}), got shape {x.shape}")
    if len(y) < 2 or not np.isfinite(y).all():
        raise UserInputError("plan: the metric needs finite values for at least 2 users")
    observed = ~np.isnan(x)
    if not observed.any():
        raise UserInputError("plan_pre_period: no user has a pre-period value (all NaN)")
    if np.isinf(x[observed]).any():
        raise UserInputError("plan_pre_period: has infinite values")
    # Centred on the observed mean, a user without a pre-period is exactly 0: left exactly as is.
    centred = np.where(observed, x - x[observed].mean(), 0.0)
    variance_before = float(y.var(ddof=1))
    # A covariate that is the same for every observed user explains nothing; its computed variance
    # would be rounding noise, and dividing by it an arbitrary theta.
    if np.ptp(x[observed]) == 0.0 or variance_before == 0.0:
        theta = correlation = 0.0
    else:
        covariance = float(np.cov(centred, y, ddof=1)[0, 1])
        variance_x = float(centred.var(ddof=1))
        theta = covariance / variance_x
        correlation = covariance / math.sqrt(variance_x * variance_before)
    adjusted = y - theta * centred  # centred sums to 0: the mean of y is kept
    variance_after = float(adjusted.var(ddof=1))
    reduction = 1.0 - variance_after / variance_before if variance_before > 0.0 else 0.0
    return CupedResult(
        theta=theta,
        adjusted=adjusted,
        variance_before=variance_before,
        variance_after=variance_after,
        reduction=reduction,
        correlation=correlation,
        missing=int((~observed).sum()),
    )


@dataclass
class CupedPlan:
    """The plan's figures with the pre-period covariate regressed out of both arms."""

    theta_a: float
    theta_b: float
    reduction_a: float
    reduction_b: float
    users_per_arm: float  # rounded up
    users_saved: float  # per arm, against the plan without CUPED
    users_saved_share: float
    mde: float  # at the plan's planned_users_per_arm
    missing: int  # users without a pre-period value


@dataclass
class ABPlan:
    """Sample sizes for an online A/B test of B against A, from offline per-user values of one metric.

    User counts are rounded up to whole users; inf where the observed effect is 0."""

    alpha: float
    power: float
    users: int  # offline users, scored by both runs
    mean_a: float
    mean_b: float
    effect: float  # mean B - mean A
    relative_effect: float  # effect / mean A
    sd_a: float
    sd_b: float
    users_per_arm: float  # two independent arms, to detect the observed effect
    total_users: float
    planned_users_per_arm: int  # what the MDE is computed for
    mde: float
    mde_relative: float  # mde / mean A
    correlation_ab: float  # of A and B over users: what pairing gains from
    paired_users: float
    paired_p: float  # paired t-test of B against A on the offline users
    cuped: CupedPlan | None = None

    def table(self) -> pd.DataFrame:
        """Two columns to read (quantity, value) and a description: one row per figure, the same
        rows in plan.csv and plan.md; the CUPED rows only when a pre-period was given."""
        rows = [(name, getattr(self, name), description) for name, description, _ in _ROWS]
        if self.cuped is not None:
            rows += [
                (name, getattr(self.cuped, name.removeprefix("cuped_")), text)
                for name, text, _ in _CUPED_ROWS
            ]
        # Counts as whole numbers in plan.csv (1000, not 1000.0); inf and NaN stay floats.
        rows = [
            (name, int(value) if _FORMATS[name] == "count" and math.isfinite(value) else value, text)
            for name, value, text in rows
        ]
        table = pd.DataFrame(rows, columns=["quantity", "value", "description"])
        table["value"] = pd.Series(
            [value for _, value, _ in rows], dtype=object
        )  # pandas would cast to float
        return table


# (quantity, description, format): the order of the table's rows.
_ROWS = [
    ("users", "users scored offline by both runs", "count"),
    ("mean_a", "mean of A (baseline)", "number"),
    ("mean_b", "mean of B (challenger)", "number"),
    ("effect", "observed effect, B - A", "signed"),
    ("relative_effect", "observed effect relative to A", "signed_share"),
    ("sd_a", "per-user standard deviation of A", "number"),
    ("sd_b", "per-user standard deviation of B", "number"),
    ("users_per_arm", "users per arm to detect the observed effect (online, two independent arms)", "count"),
    ("total_users", "users in both arms together", "count"),
    ("planned_users_per_arm", "users per arm the minimum detectable effect is computed for", "count"),
    ("mde", "minimum detectable effect at that many users per arm", "number"),
    ("mde_relative", "minimum detectable effect relative to A", "share"),
    ("correlation_ab", "correlation of A and B over users", "number"),
    (
        "paired_users",
        "users to detect the observed effect paired (offline: both runs on every user)",
        "count",
    ),
    ("paired_p", "paired t-test p-value on the offline users", "p"),
]
_CUPED_ROWS = [
    ("cuped_missing", "users without a pre-period value (left unadjusted)", "count"),
    ("cuped_theta_a", "CUPED theta, arm A", "number"),
    ("cuped_theta_b", "CUPED theta, arm B", "number"),
    ("cuped_reduction_a", "CUPED variance reduction, arm A", "share"),
    ("cuped_reduction_b", "CUPED variance reduction, arm B", "share"),
    ("cuped_users_per_arm", "users per arm to detect the observed effect with CUPED", "count"),
    ("cuped_users_saved", "users saved per arm by CUPED", "count"),
    ("cuped_users_saved_share", "share of users saved by CUPED", "share"),
    ("cuped_mde", "minimum detectable effect with CUPED at the planned users per arm", "number"),
]
_FORMATS = {name: kind for name, _, kind in _ROWS + _CUPED_ROWS}


def _round_up(users: float) -> float:
    """Whole users; the solver's last digits do not add a user (63.0000000001 is 63)."""
    return users if not math.isfinite(users) else float(math.ceil(round(users, 6)))


def _check_users_per_arm(value) -> int:
    whole = isinstance(value, numbers.Integral) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not whole or value < MIN_USERS:
        raise UserInputError(
            f"plan_users_per_arm: must be a whole number of users, at least {MIN_USERS}, got {value!r}"
        )
    return int(value)


def ab_plan(
    a: np.ndarray,
    b: np.ndarray,
    alpha: float = 0.05,
    power: float = 0.8,
    users_per_arm: int | None = None,
    pre: np.ndarray | None = None,
) -> ABPlan:
    """Plan the online test of B against A from their per-user values on the same offline users
    (`a[i]`, `b[i]` and `pre[i]` are user i's). `users_per_arm` is what the MDE is computed for
    (default: as many as there are offline users); `pre` is each user's metric before the
    experiment, NaN where the user had none, the covariate of both arms' CUPED adjustment."""
    alpha, power = _check_levels(alpha, power)
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.ndim != 1 or b.shape != a.shape or len(a) < 2:
        raise UserInputError(
            f"plan: needs the two runs' values on the same users, at least 2; got {a.shape} and {b.shape}"
        )
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise UserInputError("plan: the runs' per-user values must be finite (no NaN or inf)")
    planned = len(a) if users_per_arm is None else _check_users_per_arm(users_per_arm)
    if pre is not None:
        pre = np.asarray(pre, dtype=np.float64)
        if pre.shape != a.shape:
            raise UserInputError(
                f"plan_pre_period: needs one value per user ({len(a)}), got shape {pre.shape}"
            )

    mean_a, mean_b = float(a.mean()), float(b.mean())
    effect = mean_b - mean_a
    sd_a, sd_b = float(a.std(ddof=1)), float(b.std(ddof=1))
    per_arm = _round_up(_needed_per_arm(effect, sd_a, sd_b, alpha, power))
    mde = minimum_detectable_effect(planned, sd_a, sd_b, alpha, power)
    spread = sd_a > 0.0 and sd_b > 0.0
    plan = ABPlan(
        alpha=alpha,
        power=power,
        users=len(a),
        mean_a=mean_a,
        mean_b=mean_b,
        effect=effect,
        relative_effect=effect / abs(mean_a) if mean_a != 0.0 else math.nan,
        sd_a=sd_a,
        sd_b=sd_b,
        users_per_arm=per_arm,
        total_users=2 * per_arm,
        planned_users_per_arm=planned,
        mde=mde,
        mde_relative=mde / abs(mean_a) if mean_a != 0.0 else math.nan,
        correlation_ab=float(np.corrcoef(a, b)[0, 1]) if spread else math.nan,
        paired_users=_round_up(paired_users(b - a, alpha, power)),
        paired_p=paired_t_pvalue(a, b),
    )
    if pre is not None:
        # The same covariate for both arms: measured before treatment, it cannot differ by arm.
        adjusted_a, adjusted_b = cuped(a, pre), cuped(b, pre)
        sd_a_cuped, sd_b_cuped = math.sqrt(adjusted_a.variance_after), math.sqrt(adjusted_b.variance_after)
        per_arm_cuped = _round_up(_needed_per_arm(effect, sd_a_cuped, sd_b_cuped, alpha, power))
        saved = per_arm - per_arm_cuped if math.isfinite(per_arm) else math.nan
        plan.cuped = CupedPlan(
            theta_a=adjusted_a.theta,
            theta_b=adjusted_b.theta,
            reduction_a=adjusted_a.reduction,
            reduction_b=adjusted_b.reduction,
            users_per_arm=per_arm_cuped,
            users_saved=saved,
            users_saved_share=saved / per_arm if math.isfinite(per_arm) else math.nan,
            mde=minimum_detectable_effect(planned, sd_a_cuped, sd_b_cuped, alpha, power),
            missing=adjusted_a.missing,
        )
    return plan


def _format(value, kind: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if kind == "count":
        return "∞ (no observed effect)" if math.isinf(value) else f"{int(value):,}"
    if kind == "p":
        return f"{value:.2e}" if value < 1e-3 else f"{value:.3f}"
    if kind == "share":
        return f"{value:.1%}"
    if kind == "signed_share":
        return f"{value:+.2%}"
    if kind == "signed":
        return f"{value:+.4g}"
    return f"{value:.4g}"


def plan_markdown(plan: ABPlan, metric_name: str, run_a: str, run_b: str) -> str:
    """A short report: what was computed, the table, and what CUPED saves when it was applied."""
    lines = [
        f"Online A/B test of `{run_b}` (B) against `{run_a}` (A) on per-user {metric_name}: users "
        f"per arm for a two-sided two-sample t-test at alpha = {plan.alpha:g} and power = {plan.power:g}, "
        "users split into two equal, independent arms (unpaired: the arms' variances add). The paired "
        f"figure (both runs scored on each of the {plan.users:,} offline users) is shown for contrast; "
        "an online test cannot pair users.",
        "",
        "| quantity | value |",
        "|---|---|",
    ]
    for row in plan.table().itertuples(index=False):
        lines.append(f"| {row.description} | {_format(row.value, _FORMATS[row.quantity])} |")
    lines += [
        "",
        f"At {plan.planned_users_per_arm:,} users per arm the test detects a difference of "
        f"{plan.mde:.4g} or more; the observed difference is {plan.effect:+.4g}.",
    ]
    if plan.cuped is not None:
        c = plan.cuped
        if math.isfinite(plan.users_per_arm):
            saving = (
                f"{_format(c.users_per_arm, 'count')} users per arm instead of "
                f"{_format(plan.users_per_arm, 'count')} ({_format(c.users_saved, 'count')} fewer per arm, "
                f"{c.users_saved_share:.1%})"
            )
        else:
            saving = f"a minimum detectable effect of {c.mde:.4g} instead of {plan.mde:.4g}"
        lines.append(
            f"CUPED, with each user's pre-period {metric_name} as covariate, reduces the variance by "
            f"{c.reduction_a:.1%} (A) and {c.reduction_b:.1%} (B): {saving}; "
            f"{c.missing:,} users without a pre-period are left unadjusted."
        )
    return "\n".join(lines) + "\n"
