"""evaluate.py interleave=[A,B] and plan=[A,B] as a user runs them, on two runs trained on the
synthetic data: popularity (A) and SASRec (B), which learns the data's hidden item cycle."""

import json

import numpy as np
import pandas as pd
import pytest

import evaluate
from recsys.errors import UserInputError
from recsys.evaluation.planning import users_per_arm
from tests.test_entrypoints import ROOT, common, run, train_overrides, train_tiny


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("offline_online")
    popular, sasrec = tmp / "popular", tmp / "sasrec"
    train_tiny(tmp, popular, "experiment=popular", "data=synthetic")
    run("train.py", *train_overrides(tmp, sasrec, "trainer.max_epochs=2"))
    # The pre-period covariate: the baseline's per-user results on the validation targets.
    popular_val = tmp / "popular_val"
    run(
        "evaluate.py",
        f"ckpt_path={popular}/checkpoints/best.ckpt",
        "split=val",
        f"hydra.run.dir={popular_val}",
        *common(tmp),
    )
    return tmp, popular, sasrec, popular_val


def test_interleaving_prefers_the_model_that_learned(runs):
    tmp, popular, sasrec, _ = runs
    out = tmp / "interleave"
    result = run(
        "evaluate.py", f"interleave=[{popular},{sasrec}]", "interleave_repetitions=50", f"hydra.run.dir={out}"
    )
    summary = json.loads((out / "interleave.json").read_text())
    users = len(pd.read_parquet(sasrec / "per_user.parquet"))
    assert summary["users"] == users == summary["wins_a"] + summary["wins_b"] + summary["ties"]
    assert summary["share_b"] > 0.7 and summary["pvalue"] < 0.01
    table = pd.read_csv(out / "interleave.csv")
    assert list(table.columns) == ["users", "power_interleaving", "power_paired"]
    assert table["users"].max() == 4 * users  # resampled up to four times the test users
    assert table["power_interleaving"].iloc[-1] == 1.0
    assert "Offline team-draft interleaving" in (out / "interleave.md").read_text()
    assert "B's share of the decided votes" in result.stdout


def test_plan_sizes_the_online_test_and_applies_cuped(runs):
    tmp, popular, sasrec, popular_val = runs
    out = tmp / "plan"
    run(
        "evaluate.py",
        f"plan=[{popular},{sasrec}]",
        "plan_cuped=true",
        f"plan_pre_period={popular_val}",
        f"hydra.run.dir={out}",
    )
    table = pd.read_csv(out / "plan.csv").set_index("quantity")["value"]
    a, b = (pd.read_parquet(r / "per_user.parquet")["ndcg@10"].to_numpy() for r in (popular, sasrec))
    assert float(table["effect"]) == pytest.approx(b.mean() - a.mean())
    expected = np.ceil(users_per_arm(b.mean() - a.mean(), a.std(ddof=1), b.std(ddof=1)))
    assert float(table["users_per_arm"]) == pytest.approx(expected)
    assert 0 <= float(table["cuped_reduction_a"]) <= 1
    assert "CUPED" in (out / "plan.md").read_text()


def options(**keys):
    """evaluate.py's config (configs/evaluate.yaml) with `keys` set, for calling its modes in process."""
    from omegaconf import OmegaConf

    config = OmegaConf.load(ROOT / "configs" / "evaluate.yaml")
    config.pop("defaults")
    config.pop("hydra")
    return OmegaConf.merge(config, keys)


def test_plan_with_cuped_but_no_pre_period_is_refused(runs, tmp_path):
    _, popular, sasrec, _ = runs
    with pytest.raises(UserInputError, match=r"^plan_pre_period: plan_cuped=true needs"):
        evaluate.plan(options(plan=[str(popular), str(sasrec)], plan_cuped=True), tmp_path)
    assert not list(tmp_path.iterdir())


def test_interleaving_refuses_runs_on_other_users_or_without_lists(runs, tmp_path):
    _, popular, sasrec, _ = runs
    fewer = tmp_path / "fewer"
    fewer.mkdir()
    frame = pd.read_parquet(sasrec / "per_user.parquet")
    frame.iloc[1:].to_parquet(fewer / "per_user.parquet")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(
        UserInputError, match=rf"^interleave: {fewer} was evaluated on other users or targets than {popular}"
    ):
        evaluate.interleave(options(interleave=[str(popular), str(fewer)]), out)
    bare = tmp_path / "bare"
    bare.mkdir()
    frame.drop(columns="top_item_ids").to_parquet(bare / "per_user.parquet")
    with pytest.raises(UserInputError, match=rf"^interleave: {bare} has no top_item_ids column"):
        evaluate.interleave(options(interleave=[str(popular), str(bare)]), out)
    assert not list(out.iterdir())
