"""train.py and evaluate.py run as a user runs them: subprocesses with Hydra overrides."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from tests.checks import Untouched, assert_user_error

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
    # The recommended lists are kept: a target ranked r <= K is the list's r-th item (no ties in
    # a trained model's float scores); the debiased metrics are the weighted means of the rows.
    for row in frame[frame["rank"] <= 20].itertuples():
        assert row.top_item_ids[row.rank - 1] == row.target_item_id
    assert all(len(t) == 20 for t in frame["top_item_ids"])
    weights = frame["ips_weight"] / frame["ips_weight"].sum()
    assert metrics["test/ips_ndcg@10"] == pytest.approx(float((weights * frame["ndcg@10"]).sum()))
    assert metrics["ips_gamma"] == 0.5
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


@pytest.fixture(scope="module")
def evaluated_on_other_data(trained_run):
    """evaluate.py given a checkpoint and, through its run's config, data it was not trained on."""
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
    untouched = Untouched(out, copy, run_dir, tmp / "cache", other)
    result = run(
        "evaluate.py",
        f"ckpt_path={copy}/checkpoints/best.ckpt",
        f"data_path={other}",
        f"hydra.run.dir={out}",
        *common(tmp),
        check=False,
    )
    return result, untouched, tmp / "cache"


def test_evaluate_refuses_a_checkpoint_from_other_data(evaluated_on_other_data):
    # Refused before the other data is preprocessed: not even the cache changes.
    result, untouched, _ = evaluated_on_other_data
    line = assert_user_error(result, "error: ", untouched)
    assert "was trained on other data" in line


def test_missing_data_file_is_one_line_and_writes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    untouched = Untouched(run_dir, tmp_path / "cache", tmp_path / "logs")
    result = run(
        "train.py",
        "data=sequence_file",
        f"data.path={tmp_path}/missing.txt",
        "logger=none",
        f"hydra.run.dir={run_dir}",
        *common(tmp_path),
        check=False,
    )
    assert_user_error(
        result, f"error: {tmp_path}/missing.txt: data file not found (check data.path)", untouched, exact=True
    )


def test_unknown_config_key_is_rejected(tmp_path):
    result = run(
        "train.py", "model.dropuot=0.1", f"hydra.run.dir={tmp_path}/run", *common(tmp_path), check=False
    )
    assert result.returncode != 0
    assert "dropuot" in result.stderr
    assert not (tmp_path / "run").exists()


def test_finished_run_directory_is_never_reused(trained_run):
    tmp, run_dir, _ = trained_run
    untouched = Untouched(run_dir, tmp / "cache")  # every file of the finished run, byte for byte
    result = run("train.py", *train_overrides(tmp, run_dir), check=False)
    line = assert_user_error(result, "error: hydra.run.dir: ", untouched)
    assert "already holds a finished run" in line


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
    "hstu",
    "esasrec",
]


BROWSE_BUY_PRESETS = [
    "browse_buy_purchases",
    "browse_buy_untyped",
    "browse_buy_typed",
    "browse_buy_typed_gaps",
    "browse_buy_popular",
]


# Presets for data with item attributes (tests/models/test_item_attributes.py runs them).
ATTRIBUTE_PRESETS = ["attribute_knn"]
# The network and loss of a preset trained above with sasrec_ce_ml1m's data settings, which that
# preset's run exercises; tests/test_configs.py composes them and builds their models.
ML1M_VARIANTS = ["hstu_ml1m", "esasrec_ml1m"]


def test_every_preset_is_tested():
    shipped = {p.stem for p in (ROOT / "configs" / "experiment").glob("*.yaml")}
    assert shipped == set(PRESETS) | set(BROWSE_BUY_PRESETS) | set(ATTRIBUTE_PRESETS) | set(ML1M_VARIANTS)


def train_tiny(tmp_path, run_dir, *overrides, epochs: int = 1) -> tuple[dict, list[float]]:
    """train.py for `epochs` quiet epochs into run_dir: its metrics.json and the mean training loss
    of each epoch (from the CSV logger; empty for a model without a loss)."""
    run(
        "train.py",
        *overrides,
        "logger=csv",
        f"trainer.max_epochs={epochs}",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "~callbacks.rich_progress_bar",
        f"hydra.run.dir={run_dir}",
        *common(tmp_path),
    )
    curves = pd.read_csv(run_dir / "csv" / "metrics.csv")
    losses = curves["train/loss_epoch"].dropna().tolist() if "train/loss_epoch" in curves else []
    return json.loads((run_dir / "metrics.json").read_text()), losses


def train_one_tiny_epoch(tmp_path, run_dir, *overrides) -> dict:
    """train.py for one quiet epoch into run_dir; its metrics.json."""
    return train_tiny(tmp_path, run_dir, *overrides)[0]


# The presets' tiny runs: synthetic data with a learnable item cycle, 300 items (room for the
# presets' 256 negatives). Popularity is about as good as chance there (NDCG@10 ~0.02).
PRESET_DATA = ["data=synthetic", "data.synthetic.num_items=300"]
# Presets that, in two epochs, rank far above popularity (SASRec's reach NDCG@10 0.2-0.7).
BEAT_POPULARITY_IN_TWO_EPOCHS = {
    "sasrec_ce",
    "sasrec_ce_ml1m",
    "sasrec_original",
    "sasrec_sampled",
    "gsasrec",
    "hstu",
    "esasrec",
}
# BERT4Rec's cloze training and GRU4Rec at their presets' learning rates need many more epochs on
# these data to rank well; in six their training loss falls by 0.9-2.7% (by at most 0.3% either
# way with a learning rate of 0, from dropout and masking alone).
SLOW_LEARNERS = {"bert4rec", "bert4rec_ml1m", "gru4rec"}


@pytest.fixture(scope="module")
def popularity(tmp_path_factory):
    """The `popular` preset on the presets' data: (tmp, run_dir, metrics), run once."""
    tmp = tmp_path_factory.mktemp("popular")
    metrics, losses = train_tiny(tmp, tmp / "run", "experiment=popular", *PRESET_DATA)
    assert metrics["epochs"] == 1 and losses == []  # nothing to train
    return tmp, tmp / "run", metrics


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_trains_and_learns_on_tiny_data(tmp_path, preset, popularity):
    baseline = popularity[2]["test/ndcg@10"]
    assert 0.0 < baseline < 0.05
    if preset == "popular":
        tmp, run_dir, metrics = popularity
    else:
        assert preset in BEAT_POPULARITY_IN_TWO_EPOCHS | SLOW_LEARNERS
        epochs = 6 if preset in SLOW_LEARNERS else 2
        tmp, run_dir = tmp_path, tmp_path / "run"
        metrics, losses = train_tiny(tmp, run_dir, f"experiment={preset}", *PRESET_DATA, epochs=epochs)
        assert metrics["epochs"] == epochs and len(losses) == epochs
        if preset in SLOW_LEARNERS:
            assert losses[-1] < 0.995 * losses[0], losses  # it learns, slowly
        else:
            assert losses[1] < losses[0], losses
            assert metrics["test/ndcg@10"] > 5 * baseline, (metrics["test/ndcg@10"], baseline)
    if preset not in ("bert4rec", "popular", "sasrec_sampled"):
        return  # the models and losses built from data (item counts, [MASK]) are the ones to re-check
    # The checkpoint reads back through evaluate.py with the same numbers.
    out = tmp_path / "eval"
    run("evaluate.py", f"ckpt_path={run_dir}/checkpoints/best.ckpt", f"hydra.run.dir={out}", *common(tmp))
    assert json.loads((out / "metrics.json").read_text())["test/ndcg@10"] == metrics["test/ndcg@10"]


def test_static_shapes_train_and_learn(tmp_path, popularity):
    # data.static_shapes: full-height batches of power-of-two widths and the masked step.
    metrics, losses = train_tiny(
        tmp_path, tmp_path / "run", "experiment=sasrec_ce", *PRESET_DATA, "data.static_shapes=true", epochs=2
    )
    assert losses[1] < losses[0], losses
    assert metrics["test/ndcg@10"] > 5 * popularity[2]["test/ndcg@10"]


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
        (
            ["model=hstu", "model.time_gaps=true"],
            "error: model.time_gaps: the data has no event types; set data.event_types (e.g. data=retailrocket)",
        ),
        (
            ["compile=reduce-overhead"],
            "error: compile: reduce-overhead (CUDA graphs) needs training batches of fixed shapes; "
            "set data.static_shapes=true",
        ),
    ],
)
def test_bad_model_and_loss_options_fail_before_the_data_is_read(tmp_path, overrides, message):
    # The data file does not exist: failing on the option instead shows it was checked first.
    untouched = Untouched(tmp_path / "run", tmp_path / "cache", tmp_path / "logs")
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
    assert_user_error(result, message, untouched)


@pytest.fixture(scope="module")
def more_negatives_than_items(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("negatives")
    untouched = Untouched(tmp / "run", tmp / "cache", tmp / "logs")
    result = run(
        "train.py",
        "data=synthetic",
        "loss=sampled_softmax",  # 256 negatives, 50 items
        "logger=none",
        f"hydra.run.dir={tmp}/run",
        *common(tmp),
        check=False,
    )
    return result, untouched, tmp / "cache"


NEGATIVES_MESSAGE = "error: loss.num_negatives: 256 negatives asked for, but the catalogue has only 50 items"


def test_more_negatives_than_items_is_one_line(more_negatives_than_items):
    # Only the data show the catalogue's size: the cache of the data read (valid, reused by the
    # next run) may stay; the run directory and the logs do not.
    result, untouched, cache = more_negatives_than_items
    assert_user_error(result, NEGATIVES_MESSAGE, untouched, tolerate=[cache])


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
    (tmp_path / "a" / "metrics.json").write_text("{}\n")
    untouched = Untouched(tmp_path / "a", tmp_path / "out", tmp_path / "cache", tmp_path / "logs")
    result = run(
        "evaluate.py",
        f"compare=[{tmp_path}/a,{tmp_path}/a]",
        f"hydra.run.dir={tmp_path}/out",
        *common(tmp_path),
        check=False,
    )
    assert_user_error(
        result,
        f"error: compare: {tmp_path}/a has no per_user.parquet (train.py and evaluate.py write it)",
        untouched,
        exact=True,
    )
