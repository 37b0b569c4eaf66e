"""evaluation.cold_items_share: a seeded share of the items held out of training entirely."""

import json

import numpy as np
import pandas as pd
import pytest

from recsys.data import SequenceDataModule
from recsys.errors import UserInputError
from recsys.models.from_config import data_info
from tests.test_entrypoints import run, train_overrides


def datamodule(tmp_path, **options) -> SequenceDataModule:
    synthetic = {"num_users": 60, "num_items": 40, "min_length": 4, "max_length": 14, "seed": 0}
    return SequenceDataModule(
        name="synthetic",
        format="synthetic",
        synthetic=synthetic,
        cache_dir=str(tmp_path),
        device_batches=False,
        **options,
    )


def test_held_out_items_never_reach_training(tmp_path):
    dm = datamodule(tmp_path, cold_items_share=0.2, sliding_window_step=2)
    dm.setup()
    data, split = dm.data, dm.split
    held_out = dm.cold_item_mask()
    assert held_out.sum() == 8 and not held_out[0]
    windows = dm.train_windows()
    trained = np.concatenate([windows.items[s:e] for s, e in zip(windows.starts, windows.ends)])
    assert not held_out[trained].any()
    # Each user's training part is the original one, held-out items removed, order kept.
    part = dm._training
    for user in range(data.num_users):
        original = data.items[data.offsets[user] : split.train_end[user]]
        kept = part.data.items[part.data.offsets[user] : part.train_end[user]]
        assert kept.tolist() == [i for i in original.tolist() if not held_out[i]]
    assert (dm.train_item_counts().numpy()[held_out] == 0).all()
    assert not data_info(dm).trained_items[held_out].any()  # no class of the training loss


def test_evaluation_keeps_every_target_and_ranks_the_held_out_items(tmp_path):
    plain = datamodule(tmp_path)
    held = datamodule(tmp_path, cold_items_share=0.2)
    for split in ("val", "test"):
        users, positions = held.evaluated_users(split)
        assert np.array_equal(users, plain.evaluated_users(split)[0])
        assert np.array_equal(positions, plain.evaluated_users(split)[1])
        mask = held.cold_item_mask()
        expected = int(mask[held.data.items[positions]].sum())
        assert held.evaluation_counts(split)[f"{split}/cold_targets"] == expected > 0
    batch = next(iter(held.eval_dataloader("test")))
    assert batch["exclude"].shape == next(iter(plain.eval_dataloader("test")))["exclude"].shape
    assert "held out of training" in held.protocol()


def test_the_same_seed_holds_out_the_same_items(tmp_path):
    first = datamodule(tmp_path, cold_items_share=0.25)
    second = datamodule(tmp_path, cold_items_share=0.25)
    other = datamodule(tmp_path, cold_items_share=0.25, seed=1)
    assert np.array_equal(first.cold_item_mask(), second.cold_item_mask())
    assert not np.array_equal(first.cold_item_mask(), other.cold_item_mask())


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"cold_items_share": 1.5}, r"^evaluation.cold_items_share: must be a share in \(0, 1\)"),
        (
            {"cold_items_share": 0.1, "split": "time", "test_window": "7D"},
            r"^evaluation.cold_items_share: a time split",
        ),
    ],
)
def test_bad_shares_are_one_line_errors(tmp_path, options, message):
    with pytest.raises(UserInputError, match=message):
        datamodule(tmp_path, **options)


def test_a_run_with_held_out_items_reports_cold_targets(tmp_path):
    run_dir = tmp_path / "run"
    run(
        "train.py",
        *train_overrides(tmp_path, run_dir, "evaluation.cold_items_share=0.2", "trainer.max_epochs=1"),
    )
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["test/cold_targets"] > 0
    per_user = pd.read_parquet(run_dir / "per_user.parquet")
    assert per_user["cold_target"].sum() == metrics["test/cold_targets"]
    slices = pd.read_csv(run_dir / "slices.csv")
    assert set(slices.loc[slices["slice"] == "cold_target", "bucket"]) == {"warm", "cold"}
