"""evaluation.targets=window (issue 28): every new item of a user's window is a target. The targets a
run ranks are checked against the protocol computed from the raw file and the cut dates alone."""

import numpy as np
import pandas as pd
import pytest

from recsys.data.datamodule import SequenceDataModule
from recsys.errors import UserInputError
from recsys.evaluation.metrics import metrics_from_positions
from recsys.models.network import DataInfo
from recsys.models.popular import MostPopular
from tests.builders import module
from tests.data.test_time_split import DAY, PLANTED, datamodule, log_run_data, write_log
from tests.test_ddp import DDP_CPU
from tests.test_entrypoints import common, run


def expected_windows(raw: pd.DataFrame, window_days: int, split: str, seen: str = "exclude") -> dict:
    """{user: set of target items} of the protocol, from the raw rows and the cut dates alone: the
    distinct items of the user's events in the window, if the user did anything before it, less
    the items of those earlier events (seen_items=exclude) and the items with no event before the
    validation cut (cold, dropped); users left with none are not ranked. Users with fewer than 3
    events are dropped by preprocessing."""
    raw = raw[raw.groupby("user")["item"].transform("size") >= 3]
    test_cut = raw["ts"].max() - window_days * DAY
    val_cut = test_cut - window_days * DAY
    trained = set(raw.loc[raw["ts"] < val_cut, "item"])
    begin, end = (val_cut, test_cut) if split == "val" else (test_cut, np.inf)
    targets = {}
    for user, rows in raw.groupby("user"):
        before = set(rows.loc[rows["ts"] < begin, "item"])
        inside = set(rows.loc[(rows["ts"] >= begin) & (rows["ts"] < end), "item"])
        if not before:
            continue
        kept = {i for i in inside if i in trained and (seen == "keep" or i not in before)}
        if kept:
            targets[int(user)] = kept
    return targets


def window_of(dm: SequenceDataModule, split: str) -> dict:
    evaluated = dm.evaluated(split)
    windows = evaluated.windows
    return {
        int(dm.data.user_ids[u]): {
            int(i) for i in dm.data.item_ids[windows.items[windows.offsets[n] : windows.offsets[n + 1]]]
        }
        for n, u in enumerate(evaluated.users)
    }


@pytest.mark.parametrize("split", ["val", "test"])
@pytest.mark.parametrize("seen", ["exclude", "keep"])
def test_the_window_targets_are_the_protocols(tmp_path, split, seen):
    raw = write_log(tmp_path / "log.csv")
    dm = datamodule(tmp_path / "log.csv", targets="window", seen_items=seen)
    dm.setup()
    got = window_of(dm, split)
    assert got == expected_windows(raw, 7, split, seen)
    assert len(got) > 5 and max(len(t) for t in got.values()) > 1  # several targets per user
    counts = dm.evaluation_counts(split)
    assert counts[f"{split}/users"] == len(got)
    assert counts[f"{split}/targets"] == sum(len(t) for t in got.values())
    # The first event in the window is one of the targets whenever it is new (same history).
    users, positions = dm.evaluated_users(split)
    assert len(users) == len(got)


def test_the_history_ends_where_the_window_begins(tmp_path):
    write_log(tmp_path / "log.csv")
    dm = datamodule(tmp_path / "log.csv", targets="window", seen_items="keep")
    dm.setup()
    data, cut = dm.data, dm.split.cuts.test_cut
    for batch in dm.eval_dataloader("test"):
        for user, history in zip(batch["user"].tolist(), batch["history"].tolist()):
            start, end = data.offsets[user], data.offsets[user + 1]
            before = data.items[start:end][data.timestamps[start:end] < cut]
            assert [i for i in history if i] == before[-dm.max_len :].tolist()


def test_cold_items_in_the_window_are_dropped_or_kept_as_misses(tmp_path):
    write_log(tmp_path / "log.csv")
    dropped = datamodule(tmp_path / "log.csv", targets="window")
    dropped.setup()
    # User 1000's window holds only the planted item: left out; user 1001 keeps item 4 only.
    targets = window_of(dropped, "test")
    assert 1000 not in targets and targets[1001] == {4}
    assert dropped.evaluation_counts("test")["test/cold_targets"] == 2
    kept = datamodule(tmp_path / "log.csv", targets="window", cold_items="keep")
    kept.setup()
    assert window_of(kept, "test")[1000] == {PLANTED}
    user = int(np.flatnonzero(kept.data.user_ids == 1001)[0])
    batch = next(b for b in kept.eval_dataloader("test") if user in b["user"])
    row = int(np.flatnonzero(batch["user"].numpy() == user)[0])
    planted = int(np.flatnonzero(kept.data.item_ids == PLANTED)[0])
    assert batch["miss"][row][batch["target"][row] == planted].all()
    model = module(
        MostPopular(DataInfo(num_items=kept.num_items, train_item_counts=kept.train_item_counts()))
    )
    model.configure_evaluation(targets="window")
    positions, _, _ = model._rank(batch, None)
    assert positions[row][batch["target"][row] == planted].item() == kept.num_items + 1
    values = metrics_from_positions(positions[row : row + 1], ks=(kept.num_items,))
    assert values[f"recall@{kept.num_items}"].item() == pytest.approx(0.5)  # the miss counts


def test_a_window_run_writes_one_row_per_user_and_compares_paired(tmp_path):
    raw = write_log(tmp_path / "log.csv")
    runs = []
    for name, window_days in (("all", None), ("recent", 14)):
        run_dir = tmp_path / name
        run(
            "train.py",
            *log_run_data(tmp_path),
            "evaluation.targets=window",
            "model=popular",
            *([f"model.window_days={window_days}"] if window_days else []),
            "loss=none",
            "logger=csv",
            "trainer.max_epochs=1",
            f"hydra.run.dir={run_dir}",
            *common(tmp_path),
        )
        runs.append(run_dir)
    per_user = pd.read_parquet(runs[0] / "per_user.parquet")
    expected = expected_windows(raw, 7, "test")
    assert {u: set(t) for u, t in zip(per_user["user_id"], per_user["target_item_ids"])} == expected
    assert (per_user["targets"] == per_user["target_item_ids"].map(len)).all()
    assert (per_user["rank"] == per_user["ranks"].map(min)).all()
    metrics = pd.read_json(runs[0] / "metrics.json", typ="series")
    assert metrics["targets"] == "window" and "every distinct item of the window" in metrics["protocol"]
    assert metrics["test/ndcg@10"] == pytest.approx(per_user["ndcg@10"].mean())
    assert metrics["test/recall@10"] == pytest.approx(per_user["recall@10"].mean())
    # evaluate.py on the checkpoint, on two processes with small batches dealt between them: the
    # same rows, targets and positions, the same numbers; next targets from the same checkpoint.
    checkpoint = f"ckpt_path={runs[0] / 'checkpoints' / 'best.ckpt'}"
    two = tmp_path / "two"
    run("evaluate.py", checkpoint, "batch_size=4", *DDP_CPU, f"hydra.run.dir={two}", *common(tmp_path))
    pd.testing.assert_frame_equal(pd.read_parquet(two / "per_user.parquet"), per_user)
    assert pd.read_json(two / "metrics.json", typ="series")["test/ndcg@10"] == pytest.approx(
        metrics["test/ndcg@10"], abs=1e-12
    )
    run(
        "evaluate.py",
        checkpoint,
        "evaluation.targets=next",
        f"hydra.run.dir={tmp_path / 'next'}",
        *common(tmp_path),
    )
    assert "target_item_id" in pd.read_parquet(tmp_path / "next" / "per_user.parquet").columns
    run(
        "evaluate.py",
        f"compare=[{runs[0]},{runs[1]}]",
        "compare_metrics=[ndcg@10,recall@10]",
        f"hydra.run.dir={tmp_path / 'compare'}",
        *common(tmp_path),
    )
    table = pd.read_csv(tmp_path / "compare" / "comparison.csv")
    assert set(table["metric"]) == {"ndcg@10", "recall@10"}


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"split": "leave_one_out"}, "evaluation.targets: 'window' needs data.split=time"),
        ({"seen_items": "exclude_but_target"}, "evaluation.seen_items: 'exclude_but_target'"),
        ({"hide_target_item": True}, "data.hide_target_item:"),
        ({"targets": "all"}, "evaluation.targets: 'all' is not one of ['next', 'window']"),
    ],
)
def test_window_targets_refuse_what_cannot_work(tmp_path, keys, message):
    write_log(tmp_path / "log.csv")
    with pytest.raises(UserInputError, match=message.replace("[", r"\[").replace("(", r"\(")):
        datamodule(tmp_path / "log.csv", **{"targets": "window", **keys})


def test_cold_items_ranked_in_the_window_are_targets_and_candidates(tmp_path):
    write_log(tmp_path / "log.csv")
    dm = datamodule(tmp_path / "log.csv", targets="window", cold_items="rank")
    dm.setup()
    assert window_of(dm, "test")[1001] == {4, PLANTED}
    planted = int(np.flatnonzero(dm.data.item_ids == PLANTED)[0])
    for batch in dm.eval_dataloader("test"):
        assert not batch["miss"].any() and not (batch["exclude"] == planted).any()


def test_sampled_metrics_refuse_window_targets():
    model = module(MostPopular(DataInfo(num_items=30, train_item_counts=None)), ks=(1, 5))
    with pytest.raises(UserInputError, match=r"^evaluation.sampled: .* not with evaluation.targets=window"):
        model.configure_evaluation(sampled={"num_negatives": 10}, targets="window")
