"""Resuming an interrupted run: a run killed mid-training and resumed ends exactly where an
uninterrupted one ends; half-written checkpoints are never used; bad resume directories are
one-line errors."""

import json
import logging
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from recsys.errors import UserInputError
from recsys.training.resume import (
    AtomicCheckpointIO,
    CSVLogger,
    config_differences,
    newest_checkpoint,
    plan_resume,
)
from tests.checks import Untouched, assert_user_error
from tests.pause_callback import PAUSE_FILE, pause_overrides
from tests.test_entrypoints import ROOT, train_overrides

ENV = dict(os.environ, WANDB_MODE="disabled", HYDRA_FULL_ERROR="0")


def start(tmp, run_dir, *extra, env=ENV):
    return subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *train_overrides(tmp, run_dir, *extra)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process, check=True):
    stdout, stderr = process.communicate(timeout=600)
    if check and process.returncode != 0:
        raise AssertionError(f"train.py failed:\n{stdout[-3000:]}\n{stderr[-3000:]}")
    return process.returncode, stdout, stderr


# Every run of the `runs` fixture carries the callback that lets B be killed mid-epoch: one config.
PAUSE = pause_overrides(epoch=1, batch=3)  # the 4th of the 7 training batches of the 2nd epoch


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A: 4 epochs uninterrupted. B: the same run, SIGKILLed in the middle of its second epoch
    (at the start of its 4th of 7 batches, after its first checkpoint), then resumed. C: a copy of
    the killed B (another directory) whose last.ckpt is cut in half, as a crash while writing it
    without atomic saves would leave it, then resumed."""
    tmp = tmp_path_factory.mktemp("resume")
    a, b, c = tmp / "A", tmp / "B", tmp / "C"
    uninterrupted = start(tmp, a, *PAUSE)
    paused = tmp / "paused.json"
    killed = start(tmp, b, *PAUSE, env={**ENV, PAUSE_FILE: str(paused)})
    while not paused.exists() or not paused.read_text():
        assert killed.poll() is None, finish(killed, check=False)
        time.sleep(0.01)
    killed.send_signal(signal.SIGKILL)
    killed.communicate()
    assert not (b / "metrics.json").exists()
    where = json.loads(paused.read_text())
    assert (where["epoch"], where["batch"]) == (1, 3)
    # Killed mid-epoch: 3 steps beyond its newest checkpoint, the end of the first epoch.
    assert load(b / "checkpoints" / "last.ckpt")["global_step"] == where["global_step"] - 3 == 7
    shutil.copytree(b, c)
    last = c / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    resumed, resumed_copy = start(tmp, b, *PAUSE), start(tmp, c, *PAUSE)
    outputs = {"B": finish(resumed), "C": finish(resumed_copy)}
    finish(uninterrupted)
    return tmp, outputs


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_a_killed_run_resumes_to_the_same_results(runs):
    tmp, outputs = runs
    a = json.loads((tmp / "A" / "metrics.json").read_text())
    b = json.loads((tmp / "B" / "metrics.json").read_text())
    assert b["resumed_from"] == "checkpoints/last.ckpt" and a["resumed_from"] is None
    assert "Restored all states from the checkpoint" in outputs["B"][2]
    keys = [k for k in a if k.startswith(("val/", "test/"))]
    assert keys and all(b[k] == pytest.approx(a[k], abs=1e-6) for k in keys)
    assert (b["epochs"], b["best_epoch"]) == (a["epochs"], a["best_epoch"]) == (4, a["best_epoch"])
    # The last checkpoints agree bit for bit in weights and optimizer state, and in the state of
    # early stopping and the best-checkpoint record, which the resumed run restored.
    last_a, last_b = load(tmp / "A/checkpoints/last.ckpt"), load(tmp / "B/checkpoints/last.ckpt")
    for name, tensor in last_a["state_dict"].items():
        assert torch.equal(tensor, last_b["state_dict"][name]), name
    for state_a, state_b in zip(
        last_a["optimizer_states"][0]["state"].values(), last_b["optimizer_states"][0]["state"].values()
    ):
        assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert last_a["lr_schedulers"] == last_b["lr_schedulers"]
    callbacks_a, callbacks_b = last_a["callbacks"], last_b["callbacks"]
    stopping = next(k for k in callbacks_a if k.startswith("EarlyStopping"))
    for key in ("wait_count", "best_score", "patience", "stopped_epoch"):
        assert callbacks_a[stopping][key] == callbacks_b[stopping][key], key
    checkpoint = next(k for k in callbacks_a if k.startswith("ModelCheckpoint"))
    assert callbacks_a[checkpoint]["best_model_score"] == callbacks_b[checkpoint]["best_model_score"]
    assert Path(callbacks_b[checkpoint]["best_model_path"]) == tmp / "B/checkpoints/best.ckpt"
    assert len(load(tmp / "B/checkpoints/best.ckpt")["callbacks"]["TrainingState"]["rng"]["torch"]) > 0


def test_last_checkpoint_holds_the_final_epoch_after_the_best_one(tmp_path):
    """last.ckpt, what a resumption starts from, is rewritten every epoch, not only at a new best:
    with a learning rate of 0 the first epoch stays the best and last.ckpt must still move on."""
    run_dir = tmp_path / "run"
    finish(start(tmp_path, run_dir, "trainer.max_epochs=3", "model.optimizer.lr=0", "model.scheduler=null"))
    assert json.loads((run_dir / "metrics.json").read_text())["best_epoch"] == 0
    assert load(run_dir / "checkpoints" / "best.ckpt")["epoch"] == 0
    assert load(run_dir / "checkpoints" / "last.ckpt")["epoch"] == 2
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]


def test_a_truncated_checkpoint_is_never_used(runs):
    tmp, outputs = runs
    c = tmp / "C"
    a = json.loads((tmp / "A" / "metrics.json").read_text())
    resumed = json.loads((c / "metrics.json").read_text())
    log = outputs["C"][1] + outputs["C"][2]
    assert "skipping" in log and "last.ckpt: it does not load" in log
    assert (c / "checkpoints" / "last.ckpt.unreadable").is_file()
    # It fell back to best.ckpt, saved at the same epoch; the copy was resumed in its new directory.
    assert resumed["resumed_from"] == "checkpoints/best.ckpt"
    assert resumed["best_checkpoint"] == "checkpoints/best.ckpt"
    keys = [k for k in a if k.startswith(("val/", "test/"))]
    assert all(resumed[k] == pytest.approx(a[k], abs=1e-6) for k in keys)


def test_a_different_config_is_refused_naming_the_keys(runs):
    tmp, _ = runs
    other = tmp / "other"
    (other / "checkpoints").mkdir(parents=True)
    shutil.copy(tmp / "A" / "config.yaml", other / "config.yaml")
    shutil.copy(tmp / "A/checkpoints/last.ckpt", other / "checkpoints" / "last.ckpt")
    shutil.copy(tmp / "A" / "train.log", other / "train.log")  # an interrupted run has its log
    untouched = Untouched(other, tmp / "cache")
    code, stdout, stderr = finish(start(tmp, other, "model.dropout=0.1", "seed=7", *PAUSE), check=False)
    assert_user_error(
        subprocess.CompletedProcess("train.py", code, stdout, stderr),
        f"error: hydra.run.dir: {other} holds an interrupted run with another config "
        "(data.seed: 42 -> 7, model.dropout: 0.4 -> 0.1, seed: 42 -> 7); resume it with the overrides "
        "it was started with (see its config.yaml) or choose a new directory",
        untouched,
        exact=True,
    )
    assert (other / "config.yaml").read_text() == (tmp / "A" / "config.yaml").read_text()


@pytest.mark.parametrize("checkpoint", [None, "truncated"])
def test_an_interrupted_run_without_a_complete_checkpoint_starts_over(runs, tmp_path, checkpoint, caplog):
    tmp, _ = runs
    cfg = OmegaConf.load(tmp / "A" / "config.yaml")  # the run's own config: only the checkpoint is missing
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "config.yaml").write_text((tmp / "A" / "config.yaml").read_text())
    if checkpoint:
        (tmp_path / "checkpoints" / "last.ckpt").write_bytes(
            (tmp / "A/checkpoints/last.ckpt").read_bytes()[:1000]
        )
    # Stopped in its first epoch (e.g. preempted and requeued): same config, nothing to resume.
    with caplog.at_level(logging.WARNING):
        assert plan_resume(tmp_path, cfg) is None
    assert "no complete checkpoint; starting it over" in caplog.text
    with pytest.raises(UserInputError, match="already holds a finished run"):
        plan_resume(tmp / "A", cfg)


# --- in-process units ------------------------------------------------------------------------


def fake_checkpoint(path: Path, step: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": step // 10, "global_step": step, "loops": {}, "optimizer_states": []}, path)


def test_the_newest_complete_checkpoint_is_picked(tmp_path):
    fake_checkpoint(tmp_path / "checkpoints" / "last.ckpt", 10)
    fake_checkpoint(tmp_path / "checkpoints" / "best.ckpt", 5)
    fake_checkpoint(tmp_path / "hpc_ckpt_1.ckpt", 20)  # a SLURM requeue's checkpoint, newer
    fake_checkpoint(tmp_path / "hpc_ckpt_2.ckpt", 30)
    newest = tmp_path / "hpc_ckpt_2.ckpt"
    newest.write_bytes(newest.read_bytes()[:-100])  # half-written
    torch.save({"state_dict": {}}, tmp_path / "checkpoints" / "weights.ckpt")  # not resumable
    (tmp_path / "checkpoints" / ".last.ckpt.k2j4.tmp").write_bytes(b"\0" * 10)  # a killed save's
    resume = newest_checkpoint(tmp_path)
    assert resume.checkpoint == tmp_path / "hpc_ckpt_1.ckpt" and resume.global_step == 20
    assert (tmp_path / "hpc_ckpt_2.ckpt.unreadable").exists() and not newest.exists()
    assert not list((tmp_path / "checkpoints").glob(".*.tmp"))


def test_config_differences_ignore_only_what_does_not_change_results():
    saved = OmegaConf.create({"seed": 1, "paths": {"log_dir": "/a"}, "data": {"path": "/a/x", "max_len": 5}})
    new = OmegaConf.create(
        {"seed": 2, "paths": {"log_dir": "/b"}, "data": {"path": "/b/x", "max_len": 5, "k": 1}}
    )
    assert config_differences(saved, new) == ["data.k: (absent) -> 1", "seed: 1 -> 2"]


def test_a_run_from_before_last_checkpoint_resumes():
    """Runs started when last.ckpt came from model_checkpoint.save_last still resume."""
    saved = OmegaConf.create({"callbacks": {"model_checkpoint": {"save_last": True, "monitor": "v"}}})
    new = OmegaConf.create(
        {"callbacks": {"model_checkpoint": {"monitor": "v"}, "last_checkpoint": {"filename": "last"}}}
    )
    assert config_differences(saved, new) == []


def test_plan_resume_starts_a_new_run_in_a_new_or_log_only_directory(tmp_path):
    cfg = OmegaConf.create({"seed": 1})
    assert plan_resume(tmp_path / "new", cfg) is None
    (tmp_path / "train.log").write_text("")
    assert plan_resume(tmp_path, cfg) is None
    fake_checkpoint(tmp_path / "checkpoints" / "last.ckpt", 10)
    with pytest.raises(UserInputError, match="holds checkpoints but no config.yaml"):
        plan_resume(tmp_path, cfg)


def test_atomic_checkpoint_io_leaves_the_old_file_when_saving_fails(tmp_path):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1}, path)
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        io.save_checkpoint({"step": 2, "bad": lambda: None}, path)  # cannot be pickled
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_csv_logger_keeps_the_rows_up_to_the_resumed_step(tmp_path):
    log_dir = tmp_path / "csv"
    log_dir.mkdir()
    (log_dir / "metrics.csv").write_text("epoch,step,val/ndcg@10\n0,7,0.5\n1,14,0.6\n2,21,0.7\n")
    logger = CSVLogger(save_dir=tmp_path, name="csv", version="", keep_until_step=14)
    logger.log_metrics({"val/ndcg@10": 0.65, "epoch": 2}, step=21)
    logger.save()
    lines = (log_dir / "metrics.csv").read_text().splitlines()
    assert lines == ["epoch,step,val/ndcg@10", "0,7,0.5", "1,14,0.6", "2,21,0.65"]


def test_csv_logger_leaves_out_rows_longer_than_the_header(tmp_path):
    # An interrupted save can append a row with a column the header does not have yet.
    log_dir = tmp_path / "csv"
    log_dir.mkdir()
    (log_dir / "metrics.csv").write_text("epoch,step,val/ndcg@10\n0,7,0.5\n1,14,0.6,0.9\n")
    logger = CSVLogger(save_dir=tmp_path, name="csv", version="", keep_until_step=14)
    logger.log_metrics({"val/ndcg@10": 0.65, "epoch": 2}, step=21)
    logger.save()
    lines = (log_dir / "metrics.csv").read_text().splitlines()
    assert lines == ["epoch,step,val/ndcg@10", "0,7,0.5", "2,21,0.65"]
