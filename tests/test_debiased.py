import math

import numpy as np
import pandas as pd
import pytest
import torch

from recsys.errors import UserInputError
from recsys.evaluation.compare import compare_runs, comparison_markdown, load_run
from recsys.evaluation.debiased import (
    check_gamma,
    debiased_metrics,
    ips_bootstrap_interval,
    ips_mean,
    ips_paired_pvalue,
    propensity_weights,
)
from recsys.evaluation.metrics import metrics_from_ranks
from recsys.evaluation.results import per_user_frame
from tests.test_results import toy_data


def test_weights_are_inverse_propensities_and_gamma_zero_is_the_plain_mean():
    counts = np.array([0, 3, 8, 99])
    np.testing.assert_allclose(propensity_weights(counts, 0.5), [1.0, 0.5, 1 / 3, 0.1])
    values = np.array([1.0, 0.0, 0.5, 0.25])
    assert ips_mean(values, propensity_weights(counts, 0.0))[0] == pytest.approx(values.mean())


def test_ips_mean_equals_a_brute_force_weighted_mean():
    rng = np.random.default_rng(3)
    counts = rng.integers(0, 500, 300)
    values = rng.random(300)
    weights = propensity_weights(counts, 0.7)
    brute = sum(w * v for w, v in zip(weights, values)) / sum(weights)
    estimate, low, high = ips_mean(values, weights)
    assert estimate == pytest.approx(brute, rel=1e-12)
    assert low < estimate < high
    # The same estimate whatever constant the propensities are scaled by (self-normalised).
    assert ips_mean(values, weights * 37.0)[0] == pytest.approx(estimate, rel=1e-12)


def test_gamma_must_be_a_non_negative_number():
    assert check_gamma(None) is None
    assert check_gamma(1) == 1.0
    with pytest.raises(UserInputError, match=r"evaluation.ips_gamma: must be >= 0"):
        check_gamma(-0.5)
    with pytest.raises(UserInputError, match=r"evaluation.ips_gamma: must be a number"):
        check_gamma("high")


def exposure_biased_sample(seed: int, users: int = 3000, gamma: float = 0.8):
    """Test targets observed through a known exposure bias, with the unbiased truth.

    400 items with power-law training counts; a user's true next item is drawn from a preference
    distribution unrelated to popularity, but is observed only if it was exposed, with probability
    proportional to (count + 1) ** gamma. The model ranks items by popularity (rank = popularity
    rank, jittered per user by -3..3): popular targets score high, so the plain mean over observed
    targets flatters it. The truth is the expected metric over the preference distribution."""
    rng = np.random.default_rng(seed)
    n_items = 400
    counts = np.floor(2000.0 / np.arange(1, n_items + 1) ** 1.2).astype(
        np.int64
    )  # item i = popularity rank i+1
    preference = np.random.default_rng(0).uniform(0.5, 1.5, n_items)  # fixed across repetitions
    preference /= preference.sum()
    exposure = (counts + 1.0) ** gamma
    observed = preference * exposure / (preference * exposure).sum()
    jitter = np.arange(-3, 4)

    def ndcg10(ranks):
        return np.where(ranks <= 10, 1.0 / np.log2(ranks + 1.0), 0.0)

    popularity_rank = np.arange(1, n_items + 1)
    expected = ndcg10(np.maximum(1, popularity_rank[:, None] + jitter[None, :])).mean(axis=1)
    truth = float((preference * expected).sum())
    targets = rng.choice(n_items, users, p=observed)
    ranks = np.maximum(1, popularity_rank[targets] + rng.choice(jitter, users))
    return ndcg10(ranks), counts[targets], truth


def test_the_debiased_estimate_recovers_the_unbiased_truth_and_the_plain_one_does_not():
    gamma = 0.8
    debiased_hits = plain_hits = 0
    for seed in range(50):
        values, counts, truth = exposure_biased_sample(seed, gamma=gamma)
        _, low, high = ips_mean(values, propensity_weights(counts, gamma))
        debiased_hits += low <= truth <= high
        n = len(values)
        half = 1.96 * values.std(ddof=1) / math.sqrt(n)
        plain_hits += values.mean() - half <= truth <= values.mean() + half
    assert debiased_hits >= 45  # at least 90% of 50 repetitions
    assert plain_hits <= 5


def test_paired_ips_statistics():
    rng = np.random.default_rng(1)
    weights = propensity_weights(rng.integers(0, 100, 400), 0.5)
    differences = rng.normal(0.02, 0.1, 400)
    low, high = ips_bootstrap_interval(differences, weights, samples=2000)
    estimate = (weights * differences).sum() / weights.sum()
    assert low < estimate < high
    assert ips_paired_pvalue(differences, weights) < 0.05
    assert ips_paired_pvalue(np.zeros(400), weights) == 1.0
    assert ips_paired_pvalue(np.full(400, 0.1), weights) == 0.0
    # With equal weights the test is the paired t-test.
    from scipy import stats

    assert ips_paired_pvalue(differences, np.ones(400)) == pytest.approx(
        stats.ttest_1samp(differences, 0.0).pvalue, rel=1e-9
    )


def test_per_user_frame_weights_each_target_and_keeps_the_top_lists():
    counts = torch.tensor([0, 1, 2, 2, 1, 1])
    top = torch.tensor([[3, 4], [1, 5]])  # in the order of the users given: b, a
    frame = per_user_frame(
        toy_data(),
        "test",
        torch.tensor([1, 0]),
        torch.tensor([3, 1]),
        (1, 2),
        counts,
        top_items=top,
        ips_gamma=1.0,
    )
    assert frame["user_id"].tolist() == ["a", "b"]
    np.testing.assert_allclose(frame["ips_weight"], [1 / 2, 1 / 3])  # targets i1 (count 1), i3 (count 2)
    assert [list(t) for t in frame["top_item_ids"]] == [["i1", "i5"], ["i3", "i4"]]
    metrics = debiased_metrics(frame, "test")
    assert metrics["test/ips_hr@1"] == pytest.approx((1 / 2 * 1.0 + 1 / 3 * 0.0) / (1 / 2 + 1 / 3))
    assert set(metrics) == {f"test/ips_{c}" for c in frame.columns if "@" in c}
    assert {"test/ips_ndcg@2", "test/ips_mrr@1"} <= set(metrics)


def write_weighted_run(path, ranks, weights):
    path.mkdir(parents=True)
    frame = pd.DataFrame({"user_id": np.arange(len(ranks)), "target_item_id": 7, "rank": ranks})
    for name, values in metrics_from_ranks(torch.as_tensor(ranks), (10,)).items():
        frame[name] = values.numpy()
    if weights is not None:
        frame["ips_weight"] = weights
    frame.to_parquet(path / "per_user.parquet")
    return path


def test_compare_reports_the_debiased_difference(tmp_path):
    rng = np.random.default_rng(0)
    weights = propensity_weights(rng.integers(0, 50, 300), 0.5)
    a = write_weighted_run(tmp_path / "a", rng.integers(1, 30, 300), weights)
    b = write_weighted_run(tmp_path / "b", rng.integers(1, 20, 300), weights)
    runs = [load_run(a), load_run(b)]
    table = compare_runs(runs, ["ndcg@10", "ips_ndcg@10"], bootstrap_samples=500)
    row = table[(table.metric == "ips_ndcg@10") & (table.run == "b")].iloc[0]
    na, nb = (r.per_user["ndcg@10"].to_numpy() for r in runs)
    assert row["diff"] == pytest.approx((weights * (nb - na)).sum() / weights.sum())
    assert row["mean"] == pytest.approx((weights * nb).sum() / weights.sum())
    assert math.isnan(row["p_wilcoxon"]) and 0 <= row["p_ttest"] <= 1
    assert "ips_ndcg@10" in comparison_markdown(table)


def test_compare_refuses_debiased_metrics_without_or_with_different_weights(tmp_path):
    ranks = np.arange(1, 11)
    a = write_weighted_run(tmp_path / "a", ranks, np.ones(10))
    b = write_weighted_run(tmp_path / "b", ranks, np.full(10, 0.5))
    c = write_weighted_run(tmp_path / "c", ranks, None)
    with pytest.raises(UserInputError, match=r"other ips_weights"):
        compare_runs([load_run(a), load_run(b)], ["ips_ndcg@10"])
    with pytest.raises(UserInputError, match=r"needs ips_weight .* lacks"):
        compare_runs([load_run(a), load_run(c)], ["ips_ndcg@10"])


def test_window_rows_weigh_a_user_by_the_mean_of_their_targets_weights():
    from recsys.data.evaluated import WindowTargets
    from recsys.evaluation.results import window_per_user_frame

    # User a (index 0): targets i2, i3; user b (index 1): target i5. Counts 0..5 per item index.
    windows = WindowTargets(
        history_end=np.array([2, 7]),
        offsets=np.array([0, 2, 3]),
        items=np.array([2, 3, 5]),
        miss=np.zeros(3, dtype=bool),
    )
    results = {
        "user": torch.tensor([0, 1]),
        "targets": torch.tensor([2, 1]),
        "ranks": torch.tensor([1, 4, 2]),
        "rank": torch.tensor([1, 2]),
        "top": torch.tensor([[2, 1], [4, 5]]),
    }
    counts = torch.tensor([0, 1, 2, 3, 4, 5])
    frame = window_per_user_frame(toy_data(), results, (2,), np.array([0, 1]), windows, None, counts, 1.0)
    np.testing.assert_allclose(frame["ips_weight"], [(1 / 3 + 1 / 4) / 2, 1 / 6])
    assert [list(t) for t in frame["top_item_ids"]] == [["i2", "i1"], ["i4", "i5"]]
