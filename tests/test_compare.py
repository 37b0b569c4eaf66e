import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from recsys.errors import UserInputError
from recsys.evaluation.compare import (
    compare_runs,
    comparison_markdown,
    holm,
    load_run,
    mean_interval,
    paired_bootstrap_interval,
    paired_t_pvalue,
    wilcoxon_pvalue,
)
from recsys.evaluation.metrics import metrics_from_ranks
from recsys.evaluation.seeds import average_over_seeds, seed_summary
from recsys.evaluation.tables import results_table, to_latex, to_markdown


def write_run(path, ranks, users=None, targets=None, config=None, metrics=None):
    path.mkdir(parents=True)
    ranks = np.asarray(ranks)
    users = np.arange(len(ranks)) + 100 if users is None else np.asarray(users)
    frame = pd.DataFrame(
        {"user_id": users, "target_item_id": targets if targets is not None else users * 2, "rank": ranks}
    )
    for name, values in metrics_from_ranks(torch.from_numpy(ranks), (1, 10)).items():
        frame[name] = values.numpy()
    frame.sample(frac=1.0, random_state=0).to_parquet(path / "per_user.parquet")  # any row order
    if config is not None:
        (path / "config.yaml").write_text(config)
    if metrics is not None:
        (path / "metrics.json").write_text(json.dumps(metrics))
    return path


def test_statistics_agree_with_their_definitions():
    rng = np.random.default_rng(0)
    a = rng.random(300)
    b = a + rng.normal(0.02, 0.1, 300)
    differences = b - a
    # The paired t-test is the one-sample t-test of the differences.
    assert paired_t_pvalue(a, b) == pytest.approx(stats.ttest_1samp(differences, 0.0).pvalue)
    assert wilcoxon_pvalue(a, b) == pytest.approx(stats.wilcoxon(differences).pvalue)
    mean, low, high = mean_interval(a)
    half = stats.t.ppf(0.975, 299) * a.std(ddof=1) / np.sqrt(300)
    assert (low, high) == pytest.approx((mean - half, mean + half))
    # Identical runs: nothing to find, p = 1 (scipy would give NaN or raise).
    assert paired_t_pvalue(a, a) == 1.0 and wilcoxon_pvalue(a, a) == 1.0


def test_holm_matches_a_hand_computation():
    # sorted 0.01, 0.02, 0.04 -> 3*0.01, max(0.03, 2*0.02), max(0.04, 1*0.04)
    assert holm([0.04, 0.01, 0.02]) == pytest.approx([0.04, 0.03, 0.04])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])


def test_paired_bootstrap_interval_covers_the_true_difference_at_the_stated_rate():
    rng = np.random.default_rng(1)
    true_difference, covered, trials = 0.05, 0, 300
    for trial in range(trials):
        # Skewed, paired per-user differences, as metric differences are.
        differences = rng.exponential(1.0, 200) - 1.0 + true_difference
        low, high = paired_bootstrap_interval(differences, samples=1000, seed=trial)
        covered += low <= true_difference <= high
    assert 0.91 <= covered / trials <= 0.98


def test_compare_runs_pairs_users_and_orders_the_baseline_first(tmp_path):
    rng = np.random.default_rng(0)
    base_ranks = rng.integers(1, 40, 500)
    better = np.maximum(1, base_ranks - rng.integers(0, 6, 500))
    same = base_ranks.copy()
    runs = [
        load_run(write_run(tmp_path / "a", base_ranks)),
        load_run(write_run(tmp_path / "b", better)),
        load_run(write_run(tmp_path / "c", same)),
    ]
    table = compare_runs(runs, ["ndcg@10", "hr@1"], bootstrap_samples=500)
    ndcg = table[table.metric == "ndcg@10"].set_index("run")
    assert ndcg.loc["b", "diff"] > 0 and ndcg.loc["b", "diff_ci_low"] > 0 and ndcg.loc["b", "p_ttest"] < 1e-6
    assert ndcg.loc["c", "diff"] == 0 and ndcg.loc["c", "p_ttest"] == 1.0
    assert ndcg.loc["b", "p_holm"] >= max(ndcg.loc["b", "p_ttest"], ndcg.loc["b", "p_wilcoxon"])
    assert np.isnan(ndcg.loc["a", "p_ttest"])  # the baseline is not tested against itself
    text = comparison_markdown(table)
    assert "(baseline)" in text and "| ndcg@10 | b |" in text


def test_compare_refuses_what_it_cannot_pair(tmp_path):
    a = load_run(write_run(tmp_path / "a", [1, 2, 3]))
    other_users = load_run(write_run(tmp_path / "b", [1, 2, 3], users=[100, 101, 999]))
    other_targets = load_run(write_run(tmp_path / "c", [1, 2, 3], targets=[0, 0, 0]))
    for run in (other_users, other_targets):
        with pytest.raises(
            UserInputError, match=f"compare: {run.path} was evaluated on other users or targets"
        ):
            compare_runs([a, run])
    with pytest.raises(UserInputError, match="compare.metrics: no metric 'ndcg@50'"):
        compare_runs([a, a], ["ndcg@50"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserInputError, match="empty has no per_user.parquet"):
        load_run(tmp_path / "empty")


def test_runs_differing_only_in_seed_are_summarised_over_seeds(tmp_path):
    config = "seed: {seed}\nmodel:\n  dim: 64\nloss:\n  seed: {seed}\npaths:\n  log_dir: /somewhere/{seed}\n"
    runs = [
        load_run(write_run(tmp_path / f"s{seed}", np.full(50, rank), config=config.format(seed=seed)))
        for seed, rank in ((1, 1), (2, 3), (3, 7))
    ]
    runs.append(
        load_run(write_run(tmp_path / "other", np.full(50, 2), config="seed: 1\nmodel:\n  dim: 32\n"))
    )
    summary = seed_summary(runs, ["hr@1", "ndcg@10"])
    assert list(summary.seeds) == [3, 3] and summary.runs.iloc[0] == "s1, s2, s3"
    ndcg = summary[summary.metric == "ndcg@10"].iloc[0]
    per_seed = 1 / np.log2(np.array([1, 3, 7]) + 1)
    assert ndcg["mean"] == pytest.approx(per_seed.mean())
    assert ndcg["ci_high"] - ndcg["mean"] == pytest.approx(
        stats.t.ppf(0.975, 2) * per_seed.std(ddof=1) / np.sqrt(3)
    )


def test_results_table_in_three_formats(tmp_path):
    config = "seed: 3\ndata:\n  name: beauty\nmodel:\n  _target_: recsys.models.sasrec.SASRec\nloss:\n  _target_: recsys.losses.FullCrossEntropy\n"
    metrics = {
        "test/hr@10": 0.08,
        "test/ndcg@10": 0.05,
        "test/mrr@10": 0.04,
        "val/ndcg@10": 0.06,
        "best_epoch": 4,
    }
    run = write_run(tmp_path / "r1", [1], config=config, metrics=metrics)
    table = results_table([run])
    row = table.iloc[0]
    assert (row["model"], row["loss"], row["data"], row["seed"]) == (
        "SASRec",
        "FullCrossEntropy",
        "beauty",
        3,
    )
    assert "| r1 | beauty | SASRec | FullCrossEntropy | 3 | 0.0800 |" in to_markdown(table)
    assert "test/ndcg@10".replace("_", "\\_") in to_latex(table) and "\\bottomrule" in to_latex(table)
    with pytest.raises(UserInputError, match="table_metrics: .* has no 'test/map@10'"):
        results_table([run], ["test/map@10"])
    with pytest.raises(UserInputError, match="table: .* has no metrics.json"):
        results_table([tmp_path])


def test_variants_are_compared_on_each_users_metrics_averaged_over_seeds(tmp_path):
    # As train.py writes them: resolved, with the run's own directory in several keys.
    config = "seed: {seed}\nmodel:\n  dim: {dim}\ntrainer:\n  default_root_dir: {run}\nlogger:\n  csv:\n    save_dir: {run}/csv\n"
    rng = np.random.default_rng(0)
    base_ranks = rng.integers(1, 30, (3, 80))
    better_ranks = np.maximum(1, base_ranks - rng.integers(0, 5, (3, 80)))
    runs = []
    for dim, ranks in ((64, base_ranks), (32, better_ranks)):
        for seed in range(3):
            run_dir = tmp_path / f"d{dim}_s{seed}"
            text = config.format(seed=seed, dim=dim, run=run_dir.resolve())
            path = write_run(run_dir, ranks[seed], config=text)
            if seed == 0:
                (path / "overrides.yaml").write_text(f"- model.dim={dim}\n- seed={seed}\n")
            runs.append(load_run(path))
    variants = average_over_seeds(runs)
    assert [v.name for v in variants] == ["model.dim=64 (3 seeds)", "model.dim=32 (3 seeds)"]
    ndcg = 1 / np.log2(base_ranks + 1) * (base_ranks <= 10)
    assert variants[0].per_user["ndcg@10"].to_numpy() == pytest.approx(ndcg.mean(axis=0))
    table = compare_runs(variants, ["ndcg@10"])
    challenger = table.iloc[1]
    better = 1 / np.log2(better_ranks + 1) * (better_ranks <= 10)
    assert challenger["diff"] == pytest.approx((better.mean(axis=0) - ndcg.mean(axis=0)).mean())
    assert challenger["p_ttest"] == pytest.approx(
        stats.ttest_rel(better.mean(axis=0), ndcg.mean(axis=0)).pvalue
    )


def test_seed_groups_ignore_null_keys_and_where_a_run_was(tmp_path):
    from recsys.evaluation.compare import _config_key

    configs = {
        "a": "seed: 1\nmodel: {dim: 64}\ntrainer: {default_root_dir: /elsewhere/a}\n",
        "b": "seed: 2\nmodel: {dim: 64}\nevaluation: {cold_items_share: null}\ntrainer: {default_root_dir: /x/b}\n",
        "c": "seed: 3\nmodel: {dim: 32}\n",
    }
    keys = {}
    for name, text in configs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.yaml").write_text(text)
        keys[name] = _config_key(tmp_path / name)
    assert keys["a"] == keys["b"] != keys["c"]


def test_seed_groups_give_keys_added_later_the_value_older_runs_had(tmp_path):
    from recsys.evaluation.compare import _config_key

    configs = {
        "before": "seed: 1\nmodel: {dim: 64}\nevaluation: {k: 1}\ndata: {name: x}\n",
        "after": "seed: 2\nmodel: {dim: 64, block: transformer, id_dropout: 0.0}\n"
        "evaluation: {k: 1, ips_gamma: 0.5}\ndata: {name: x, static_shapes: false}\n",
        "changed": "seed: 3\nmodel: {dim: 64, block: ligr, id_dropout: 0.0}\nevaluation: {k: 1, ips_gamma: 0.5}\n"
        "data: {name: x, static_shapes: false}\n",
    }
    keys = {}
    for name, text in configs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.yaml").write_text(text)
        keys[name] = _config_key(tmp_path / name)
    assert keys["before"] == keys["after"] != keys["changed"]


def test_seed_groups_name_data_by_fingerprint_not_by_where_its_files_were(tmp_path):
    from recsys.evaluation.compare import _config_key

    runs = {  # the same data read in two checkouts, then other data, then no fingerprint recorded
        "here": ("/work/a/data/x.txt", "../shared/x_attributes.json", "f1"),
        "there": ("/cluster/b/data/x.txt", "/cluster/shared/x_attributes.json", "f1"),
        "other": ("/work/a/data/x.txt", "../shared/x_attributes.json", "f2"),
        "unrecorded": ("/work/a/data/x.txt", "../shared/x_attributes.json", None),
    }
    keys = {}
    for name, (path, features, fingerprint) in runs.items():
        (tmp_path / name).mkdir()
        text = f"seed: 1\nmodel: {{dim: 64}}\ndata: {{name: x, path: {path}, item_features: {features}}}\n"
        (tmp_path / name / "config.yaml").write_text(text)
        if fingerprint:
            (tmp_path / name / "metrics.json").write_text(json.dumps({"data_fingerprint": fingerprint}))
        keys[name] = _config_key(tmp_path / name)
    assert keys["here"] == keys["there"]
    assert len({keys["here"], keys["other"], keys["unrecorded"]}) == 3


def test_compare_slice_keeps_the_users_of_one_kind_of_target(tmp_path):
    from recsys.evaluation.results import restrict_to_slice

    ranks = np.arange(1, 41)
    a, b = write_run(tmp_path / "a", ranks), write_run(tmp_path / "b", ranks[::-1].copy())
    for path in (a, b):  # users 100..139; every fourth one's target is a cold item
        frame = pd.read_parquet(path / "per_user.parquet")
        frame["cold_target"] = (frame["user_id"] - 100) % 4 == 0
        frame.to_parquet(path / "per_user.parquet")
    runs = [load_run(a), load_run(b)]
    warm, cold = restrict_to_slice(runs, "warm"), restrict_to_slice(runs, "cold")
    assert [len(r.per_user) for r in warm] == [30, 30] and [len(r.per_user) for r in cold] == [10, 10]
    assert list(cold[1].per_user["user_id"]) == list(range(100, 140, 4))
    table = compare_runs(cold, ["ndcg@10"], bootstrap_samples=200)
    assert set(table["users"]) == {10}
    assert restrict_to_slice(runs, None) == runs
    with pytest.raises(
        UserInputError, match=r"^compare_slice: 'hot' is not one of \['warm', 'cold', 'new', 'repeat'\]"
    ):
        restrict_to_slice(runs, "hot")
    with pytest.raises(
        UserInputError, match=r"^compare_slice: .*per_user.parquet has no repeat_target column"
    ):
        restrict_to_slice(runs, "repeat")


def test_a_slice_whose_users_differ_by_seed_is_averaged_over_the_seeds_each_user_is_in(tmp_path):
    from recsys.evaluation.results import restrict_to_slice

    # Two variants, two seeds; each seed holds out its own items, so a user's target is cold in
    # seed 0 when user % 4 == 0 and in seed 1 when user % 4 == 1 (the same for both variants).
    rng = np.random.default_rng(1)
    users = np.arange(100, 140)
    ranks = {(dim, seed): rng.integers(1, 25, 40) for dim in (64, 32) for seed in (0, 1)}
    runs = []
    for (dim, seed), rank in ranks.items():
        path = write_run(tmp_path / f"d{dim}_s{seed}", rank, config=f"seed: {seed}\nmodel:\n  dim: {dim}\n")
        frame = pd.read_parquet(path / "per_user.parquet")
        frame["cold_target"] = (frame["user_id"] - 100) % 4 == seed
        frame.to_parquet(path / "per_user.parquet")
        runs.append(load_run(path))
    with pytest.raises(UserInputError, match=r"^compare_slice: .*d64_s1 and .*d64_s0 have warm targets for "):
        restrict_to_slice(runs, "warm")
    warm = restrict_to_slice(runs, "warm", same_users=False)
    assert [len(r.per_user) for r in warm] == [30] * 4
    variants = average_over_seeds(warm, partial_users=True)
    assert list(variants[0].per_user["user_id"]) == list(users)  # every user is warm in some seed

    def averaged(dim):  # each user's NDCG@10 over the seeds where its target is warm
        ndcg = {s: 1 / np.log2(ranks[dim, s] + 1) * (ranks[dim, s] <= 10) for s in (0, 1)}
        warm_in = {s: (users - 100) % 4 != s for s in (0, 1)}
        total = sum(np.where(warm_in[s], ndcg[s], 0.0) for s in (0, 1))
        return total / (warm_in[0].astype(int) + warm_in[1])

    for variant, dim in zip(variants, (64, 32)):
        assert variant.per_user["ndcg@10"].to_numpy() == pytest.approx(averaged(dim))
    table = compare_runs(variants, ["ndcg@10"], bootstrap_samples=200)
    assert table.iloc[1]["diff"] == pytest.approx((averaged(32) - averaged(64)).mean())
    # A user whose target differs between seeds cannot be averaged (user 102 is warm in both).
    frame = warm[1].per_user.copy()
    frame.loc[frame["user_id"] == 102, "target_item_id"] = -1
    warm[1] = dataclasses.replace(warm[1], per_user=frame)
    with pytest.raises(UserInputError, match=r"^compare: user 102 has other targets in some of the runs"):
        average_over_seeds(warm, partial_users=True)
