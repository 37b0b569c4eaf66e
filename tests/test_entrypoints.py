"""train.py and evaluate.py run as a user runs them: subprocesses with Hydra overrides."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def run(script, *overrides, check=True):
    env = dict(os.environ, WANDB_MODE="disabled", HYDRA_FULL_ERROR="0")
    result = subprocess.run(
        [sys.executable, str(ROOT / script), *overrides],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{script} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def common(tmp):
    return [f"paths.log_dir={tmp}/logs", f"paths.cache_dir={tmp}/cache"]


def train_overrides(tmp, run_dir, *extra):
    return [
        "data=synthetic",
        "logger=csv",
        "trainer.max_epochs=4",
        "trainer.enable_progress_bar=false",
        "~callbacks.rich_progress_bar",
        "model.dim=32",
        "model.optimizer.lr=0.01",
        f"hydra.run.dir={run_dir}",
        *common(tmp),
        *extra,
    ]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    run_dir = tmp / "run"
    result = run("train.py", *train_overrides(tmp, run_dir))
    return tmp, run_dir, result


def test_train_writes_the_run_directory(trained_run):
    tmp, run_dir, result = trained_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in (
        "val/ndcg@10",
        "test/ndcg@10",
        "test/hr@10",
        "test/mrr@10",
        "test/hr@1",
        "test/ndcg@20",
        "best_epoch",
        "epochs",
        "train_seconds",
        "epoch_seconds",
    ):
        assert key in metrics, key
    assert metrics["epochs"] == 4
    assert 0 <= metrics["best_epoch"] < 4
    assert (run_dir / "config.yaml").is_file()
    assert (run_dir / "checkpoints" / "best.ckpt").is_file()
    frame = pd.read_parquet(run_dir / "per_user.parquet")
    assert {"user_id", "target_item_id", "rank", "ndcg@10", "repeat_target"} <= set(frame.columns)
    assert frame["ndcg@10"].mean() == pytest.approx(metrics["test/ndcg@10"])
    # The synthetic data have repeat targets: left out under the default seen_items=exclude, counted.
    assert metrics["seen_items"] == "exclude" and not frame["repeat_target"].any()
    assert metrics["test/users"] == len(frame) and metrics["test/users_left_out"] > 0
    assert metrics["test/users"] + metrics["test/users_left_out"] == 200
    # The synthetic data follow a hidden item cycle: a model that learned anything beats chance
    # (about 0.06 NDCG@10 for a random ranking of 50 items) by far.
    assert metrics["test/ndcg@10"] > 0.3
    assert "test metrics" in result.stdout


def test_checkpoint_loads_with_weights_only(trained_run):
    _, run_dir, _ = trained_run
    checkpoint = torch.load(run_dir / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["num_items"] == 50 and len(checkpoint["data_fingerprint"]) == 64


def test_evaluate_reproduces_the_test_numbers_exactly(trained_run):
    tmp, run_dir, _ = trained_run
    out = tmp / "eval"
    result = run(
        "evaluate.py", f"ckpt_path={run_dir}/checkpoints/best.ckpt", f"hydra.run.dir={out}", *common(tmp)
    )
    trained = json.loads((run_dir / "metrics.json").read_text())
    evaluated = json.loads((out / "metrics.json").read_text())
    test_keys = [k for k in trained if k.startswith("test/")]
    assert test_keys and all(evaluated[k] == trained[k] for k in test_keys)
    pd.testing.assert_frame_equal(
        pd.read_parquet(out / "per_user.parquet"), pd.read_parquet(run_dir / "per_user.parquet")
    )
    assert "ndcg" in result.stdout.lower()


def test_evaluate_refuses_a_checkpoint_from_other_data(trained_run):
    tmp, run_dir, _ = trained_run
    other = tmp / "other.txt"
    other.write_text("".join(f"{u} " + " ".join(str(i) for i in range(1, 8)) + "\n" for u in range(1, 20)))
    out = tmp / "eval_other"
    # Point the run at another data set by rewriting a copy of its config.
    copy = tmp / "copied_run"
    (copy / "checkpoints").mkdir(parents=True)
    (copy / "checkpoints" / "best.ckpt").write_bytes((run_dir / "checkpoints" / "best.ckpt").read_bytes())
    config = (run_dir / "config.yaml").read_text().replace("format: synthetic", "format: sequence")
    (copy / "config.yaml").write_text(config)
    result = run(
        "evaluate.py",
        f"ckpt_path={copy}/checkpoints/best.ckpt",
        f"data_path={other}",
        f"hydra.run.dir={out}",
        *common(tmp),
        check=False,
    )
    assert result.returncode == 2
    assert "was trained on other data" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_missing_data_file_is_one_line_and_writes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    result = run(
        "train.py",
        "data=sequence_file",
        f"data.path={tmp_path}/missing.txt",
        "logger=none",
        f"hydra.run.dir={run_dir}",
        *common(tmp_path),
        check=False,
    )
    assert result.returncode == 2
    assert (
        result.stderr.strip().splitlines()[-1]
        == f"error: {tmp_path}/missing.txt: data file not found (check data.path)"
    )
    assert not run_dir.exists()
    assert not (tmp_path / "cache").exists()


def test_unknown_config_key_is_rejected(tmp_path):
    result = run(
        "train.py", "model.dropuot=0.1", f"hydra.run.dir={tmp_path}/run", *common(tmp_path), check=False
    )
    assert result.returncode != 0
    assert "dropuot" in result.stderr
    assert not (tmp_path / "run").exists()


def test_finished_run_directory_is_never_reused(trained_run):
    tmp, run_dir, _ = trained_run
    before = (run_dir / "metrics.json").read_text()
    result = run("train.py", *train_overrides(tmp, run_dir), check=False)
    assert result.returncode == 2
    assert "already holds a finished run" in result.stderr
    assert (run_dir / "metrics.json").read_text() == before


PRESETS = [
    "sasrec_ce",
    "sasrec_ce_ml1m",
    "sasrec_original",
    "sasrec_sampled",
    "gsasrec",
    "bert4rec",
    "bert4rec_ml1m",
    "gru4rec",
    "popular",
]


BROWSE_BUY_PRESETS = [
    "browse_buy_purchases",
    "browse_buy_untyped",
    "browse_buy_typed",
    "browse_buy_typed_gaps",
    "browse_buy_popular",
]


def test_every_preset_is_tested():
    shipped = {p.stem for p in (ROOT / "configs" / "experiment").glob("*.yaml")}
    assert shipped == set(PRESETS) | set(BROWSE_BUY_PRESETS)


def train_one_tiny_epoch(tmp_path, run_dir, *overrides) -> dict:
    """train.py for one quiet epoch into run_dir; its metrics.json."""
    run(
        "train.py",
        *overrides,
        "logger=none",
        "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "~callbacks.rich_progress_bar",
        f"hydra.run.dir={run_dir}",
        *common(tmp_path),
    )
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_runs_one_tiny_epoch(tmp_path, preset):
    run_dir = tmp_path / "run"
    metrics = train_one_tiny_epoch(
        tmp_path,
        run_dir,
        f"experiment={preset}",
        "data=synthetic",
        "data.synthetic.num_items=300",  # room for the presets' 256 negatives
    )
    assert metrics["epochs"] == 1 and 0.0 <= metrics["test/ndcg@10"] <= 1.0
    if preset not in ("bert4rec", "popular", "sasrec_sampled"):
        return  # the models and losses built from data (item counts, [MASK]) are the ones to re-check
    # The checkpoint reads back through evaluate.py with the same numbers.
    out = tmp_path / "eval"
    run(
        "evaluate.py", f"ckpt_path={run_dir}/checkpoints/best.ckpt", f"hydra.run.dir={out}", *common(tmp_path)
    )
    assert json.loads((out / "metrics.json").read_text())["test/ndcg@10"] == metrics["test/ndcg@10"]


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            ["model=bert4rec", "model.mask_prob=1.0"],
            "error: model.mask_prob: the masking probability must lie in (0, 1)",
        ),
        (
            ["model=popular"],
            "error: loss: MostPopular has nothing to train and cannot use a loss; set loss=none",
        ),
        (
            ["evaluation.seen_items=new"],
            "error: evaluation.seen_items: 'new' is not one of ['exclude', 'keep', 'exclude_but_target']",
        ),
    ],
)
def test_bad_model_and_loss_options_fail_before_the_data_is_read(tmp_path, overrides, message):
    # The data file does not exist: failing on the option instead shows it was checked first.
    result = run(
        "train.py",
        "data=sequence_file",
        f"data.path={tmp_path}/missing.txt",
        "logger=none",
        *overrides,
        f"hydra.run.dir={tmp_path}/run",
        *common(tmp_path),
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(message)
    assert not (tmp_path / "run").exists()


def test_more_negatives_than_items_is_one_line(tmp_path):
    result = run(
        "train.py",
        "data=synthetic",
        "loss=sampled_softmax",  # 256 negatives, 50 items
        "logger=none",
        f"hydra.run.dir={tmp_path}/run",
        *common(tmp_path),
        check=False,
    )
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(
        "error: loss.num_negatives: 256 negatives asked for, but the catalogue has only 50 items"
    )
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("group,option,valid", [("loss", "focal", "gbce"), ("model", "sasrec2", "bert4rec")])
def test_unknown_loss_or_model_lists_the_valid_ones(tmp_path, group, option, valid):
    result = run(
        "train.py", f"{group}={option}", f"hydra.run.dir={tmp_path}/run", *common(tmp_path), check=False
    )
    assert result.returncode != 0
    assert f"Could not find '{group}/{option}'" in result.stderr and valid in result.stderr
    assert not (tmp_path / "run").exists()


def test_compare_and_table_of_runs(trained_run):
    tmp, run_dir, _ = trained_run
    # evaluate.py's output of the same checkpoint: the same users, identical ranks.
    evaluated = tmp / "eval_for_compare"
    run(
        "evaluate.py",
        f"ckpt_path={run_dir}/checkpoints/best.ckpt",
        f"hydra.run.dir={evaluated}",
        *common(tmp),
    )
    out = tmp / "compare"
    result = run(
        "evaluate.py", f"compare=[{run_dir},{evaluated}]", "bootstrap_samples=200", f"hydra.run.dir={out}"
    )
    table = pd.read_csv(out / "comparison.csv")
    assert set(table.metric) == {"ndcg@10", "hr@10", "mrr@10"}
    assert (table["diff"].dropna() == 0).all() and (table["p_ttest"].dropna() == 1).all()
    assert "Paired comparison" in (out / "comparison.md").read_text() and "(baseline)" in result.stdout
    out = tmp / "table"
    run("evaluate.py", f"table=[{run_dir}]", f"hydra.run.dir={out}")
    assert {"results.md", "results.csv", "results.tex"} <= {p.name for p in out.iterdir()}
    assert "SASRec" in (out / "results.md").read_text()


def test_compare_without_per_user_results_is_one_line(tmp_path):
    (tmp_path / "a").mkdir()
    result = run(
        "evaluate.py", f"compare=[{tmp_path}/a,{tmp_path}/a]", f"hydra.run.dir={tmp_path}/out", check=False
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: compare: {tmp_path}/a has no per_user.parquet (train.py and evaluate.py write it)"
    )
    assert not (tmp_path / "out").exists()
