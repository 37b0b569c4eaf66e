"""Runs written before the networks were split from the training module still evaluate and serve.

The fixture `tests/fixtures/run_before_networks/` is a run of commit 2800669 (SASRec, d=8, one
block, two epochs on `data=synthetic`): its config.yaml has the old `model` node (with
`num_event_types`), its checkpoint the network's weights at the top level of the state dict.
"""

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from recsys.serving.recommend import Recommender
from recsys.training.module import upgrade_state_dict
from tests.test_entrypoints import common, run

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "run_before_networks"


@pytest.fixture
def old_run(tmp_path):
    run_dir = tmp_path / "old_run"
    shutil.copytree(FIXTURE, run_dir)
    return run_dir


def test_the_state_dict_is_moved_under_the_network():
    state = torch.load(FIXTURE / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)[
        "state_dict"
    ]
    assert "item_embedding.weight" in state  # the old layout
    upgraded = upgrade_state_dict(state)
    assert set(upgraded) == {f"network.{key}" for key in state}
    assert upgrade_state_dict(upgraded) == upgraded  # new checkpoints pass unchanged


def test_evaluate_reproduces_the_old_runs_test_metrics(old_run, tmp_path):
    out = tmp_path / "eval"
    run(
        "evaluate.py", f"ckpt_path={old_run}/checkpoints/best.ckpt", f"hydra.run.dir={out}", *common(tmp_path)
    )
    before = json.loads((FIXTURE / "metrics.json").read_text())
    after = json.loads((out / "metrics.json").read_text())
    test_keys = [key for key in before if key.startswith("test/")]
    assert test_keys and {key: after[key] for key in test_keys} == {key: before[key] for key in test_keys}
    # Every column the old run wrote, the same; columns added since (top_item_ids, ips_weight) beside.
    old_frame = pd.read_parquet(FIXTURE / "per_user.parquet")
    pd.testing.assert_frame_equal(pd.read_parquet(out / "per_user.parquet")[old_frame.columns], old_frame)


def test_predict_serves_the_old_checkpoint(old_run, tmp_path):
    out = tmp_path / "predict"
    run(
        "predict.py",
        f"ckpt_path={old_run}/checkpoints/best.ckpt",
        "k=5",
        "split=next",
        f"hydra.run.dir={out}",
        *common(tmp_path),
    )
    recs = pd.read_parquet(out / "recommendations.parquet")
    assert len(recs) == 200 * 5
    recommender = Recommender.from_checkpoint(old_run / "checkpoints" / "best.ckpt")
    assert len(recommender.recommend([["1", "2"]], k=3)) == 3
