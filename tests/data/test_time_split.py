"""data.split=time (issue 28): global cuts, the first event in the window as the target, nothing at
or after the validation cut in training, cold users and items counted. The pairs a run evaluates are
checked against the protocol computed from the raw file alone."""

import numpy as np
import pandas as pd
import pytest
import torch

from recsys.data import SequenceDataModule
from recsys.data.split import TimeSplit
from recsys.errors import UserInputError
from recsys.evaluation.results import per_user_frame, slice_metrics
from recsys.models.from_config import data_info
from recsys.models.network import DataInfo
from recsys.models.popular import MostPopular
from recsys.models.sasrec import SASRec
from tests.builders import module
from tests.checks import Untouched, assert_user_error
from tests.test_ddp import _fake_trainer
from tests.test_entrypoints import common, run

DAY = 86400
START = 1_700_000_000  # 2023-11-14, unix seconds
PLANTED = 999  # an item that exists only after the validation cut


def write_log(path, seed=0, users=80) -> pd.DataFrame:
    """Users with events spread over 60 days (ties on a day kept in file order), and the planted item,
    whose only events are in the test window."""
    rng = np.random.default_rng(seed)
    rows = []
    for user in range(users):
        day = int(rng.integers(0, 50))
        for _ in range(int(rng.integers(2, 12))):
            rows.append((user, int(rng.integers(1, 40)), START + day * DAY))
            day = min(day + int(rng.integers(0, 6)), 59)
    # User 1000's test target, and an event of user 1001's test window: the planted item.
    rows += [(1000, 1, START + 10 * DAY), (1000, 2, START + 20 * DAY), (1000, PLANTED, START + 59 * DAY)]
    rows += [(1001, 3, START + 5 * DAY), (1001, 4, START + 56 * DAY), (1001, PLANTED, START + 57 * DAY)]
    frame = pd.DataFrame(rows, columns=["user", "item", "ts"])
    frame.to_csv(path, index=False)
    return frame


def log_run_data(tmp_path) -> list[str]:
    """train.py's data overrides for the log at tmp_path/log.csv under a 7-day time split, without
    k-core (the protocol's pairs the tests compute assume none)."""
    return [
        "data=interactions_file",
        f"data.path={tmp_path / 'log.csv'}",
        "data.columns.user=user",
        "data.columns.item=item",
        "data.columns.timestamp=ts",
        "data.split=time",
        "data.test_window=7D",
        "data.min_user_interactions=0",
        "data.min_item_interactions=0",
    ]


def datamodule(path, **keys) -> SequenceDataModule:
    keys = {"split": "time", "test_window": "7D", **keys}
    return SequenceDataModule(
        name="log",
        path=str(path),
        format="interactions",
        columns={"user": "user", "item": "item", "timestamp": "ts"},
        cache_dir=None,
        **keys,
    )


def expected_pairs(raw: pd.DataFrame, window_days: int, split: str) -> set[tuple[int, int]]:
    """The (user, target item) pairs of the protocol, from the raw rows and the cut dates alone: the
    first event at or after the split's cut (before the test cut, for validation), with an event
    before it, whose item is not one of the user's earlier items (seen items excluded) and has an
    event before the validation cut (else a cold item, dropped). Users with fewer than 3 events are
    dropped by preprocessing."""
    raw = raw.assign(order=np.arange(len(raw)))
    raw = raw[raw.groupby("user")["item"].transform("size") >= 3]
    test_cut = raw["ts"].max() - window_days * DAY
    val_cut = test_cut - window_days * DAY
    trained = set(raw.loc[raw["ts"] < val_cut, "item"])
    begin, end = (val_cut, test_cut) if split == "val" else (test_cut, np.inf)
    pairs = set()
    for user, rows in raw.sort_values(["user", "ts", "order"]).groupby("user"):
        inside = rows[(rows["ts"] >= begin) & (rows["ts"] < end)]
        if inside.empty:
            continue
        first = inside.iloc[0]
        before = rows.iloc[: list(rows.index).index(first.name)]
        if before.empty or first["item"] in set(before["item"]) or first["item"] not in trained:
            continue
        pairs.add((int(user), int(first["item"])))
    return pairs


@pytest.mark.parametrize("split", ["val", "test"])
def test_the_evaluated_pairs_are_the_protocols(tmp_path, split):
    raw = write_log(tmp_path / "log.csv")
    dm = datamodule(tmp_path / "log.csv")
    dm.setup()
    users, positions = dm.evaluated_users(split)
    got = {
        (int(dm.data.user_ids[u]), int(dm.data.item_ids[dm.data.items[p]])) for u, p in zip(users, positions)
    }
    assert got == expected_pairs(raw, 7, split) and len(got) > 5


def test_nothing_at_or_after_the_validation_cut_is_trained_on_or_counted(tmp_path):
    write_log(tmp_path / "log.csv")
    dm = datamodule(tmp_path / "log.csv")
    dm.setup()
    data, split = dm.data, dm.split
    assert isinstance(split, TimeSplit)
    windows = dm.train_windows()
    # The last item of every window (a target too) is before the validation cut.
    assert (data.timestamps[windows.ends - 1] < split.cuts.val_cut).all()
    planted = int(np.flatnonzero(data.item_ids == PLANTED)[0])
    trained_targets = np.concatenate([data.items[s + 1 : e] for s, e in zip(windows.starts, windows.ends)])
    assert planted not in trained_targets
    assert dm.train_item_counts()[planted] == 0  # popularity never sees it
    assert dm.cold_item_mask()[planted]
    batch = next(iter(dm.eval_dataloader("test")))
    assert (batch["exclude"] == planted).any(dim=1).all()  # no user is recommended it
    # User 1000's test target is the planted item: cold, so left out (drop) and counted.
    assert dm.evaluation_counts("test")["test/cold_targets"] == 1
    assert int(np.flatnonzero(data.user_ids == 1000)[0]) not in dm.evaluated_users("test")[0]


def test_cold_targets_kept_are_misses(tmp_path):
    write_log(tmp_path / "log.csv")
    dm = datamodule(tmp_path / "log.csv", cold_items="keep")
    dm.setup()
    user = int(np.flatnonzero(dm.data.user_ids == 1000)[0])
    users, _ = dm.evaluated_users("test")
    assert user in users
    batch = next(b for b in dm.eval_dataloader("test") if user in b["user"])
    assert batch["miss"][batch["user"] == user].all() and batch["miss"].sum() == 1
    model = module(MostPopular(DataInfo(num_items=dm.num_items, train_item_counts=dm.train_item_counts())))
    ranks, _, _ = model._rank(batch, None)
    assert ranks[batch["user"] == user].item() == dm.num_items + 1
    assert (ranks[~batch["miss"]] <= dm.num_items).all()


def test_a_run_with_a_time_split_writes_its_protocol(tmp_path):
    raw = write_log(tmp_path / "log.csv")
    run_dir = tmp_path / "run"
    run(
        "train.py",
        *log_run_data(tmp_path),
        "model=popular",
        "model.window_days=14",  # recency popularity: the pairs below do not depend on the model
        "loss=none",
        "logger=csv",
        "trainer.max_epochs=1",
        f"hydra.run.dir={run_dir}",
        *common(tmp_path),
    )
    per_user = pd.read_parquet(run_dir / "per_user.parquet")
    assert set(zip(per_user["user_id"], per_user["target_item_id"])) == expected_pairs(raw, 7, "test")
    metrics = pd.read_json(run_dir / "metrics.json", typ="series")
    assert metrics["protocol"].startswith(
        "time split (validation from 2023-12-29T22:13:20+00:00, test from 2024-01-05"
    )
    assert metrics["test/cold_targets"] >= 1 and "test/cold_users" in metrics
    # Served from the checkpoint: recommendations from whole histories; the split's queries are
    # evaluate.py's.
    checkpoint = f"ckpt_path={run_dir / 'checkpoints' / 'best.ckpt'}"
    run(
        "predict.py", checkpoint, "split=next", "k=3", f"hydra.run.dir={tmp_path / 'next'}", *common(tmp_path)
    )
    assert len(pd.read_parquet(tmp_path / "next" / "recommendations.parquet")) > 0
    untouched = Untouched(tmp_path / "test")
    refused = run(
        "predict.py",
        checkpoint,
        "split=test",
        f"hydra.run.dir={tmp_path / 'test'}",
        *common(tmp_path),
        check=False,
    )
    assert_user_error(
        refused, "error: split: 'test' of a run with data.split='time' is evaluate.py's", untouched
    )


def test_bad_time_split_settings_are_one_line_errors(tmp_path, write_file):
    write_log(tmp_path / "log.csv")
    for keys, message in (
        ({"test_window": "70D"}, r"^data\.test_window: the validation and test windows cover the whole data"),
        (
            {"test_window": None, "test_start": "2030-01-01", "val_window": "7D"},
            r"^data\.test_start: the test window starts after",
        ),
        (
            {"test_window": "7D", "test_share": 0.1},
            r"^data\.split: 'time' needs exactly one of .*\['test_window', 'test_share'\]",
        ),
        ({"test_window": "a week"}, r"^data\.test_window: 'a week' is not a duration"),
        (
            {"test_window": None, "test_start": "2024-01-01"},
            r"^data\.val_window: required with data\.test_start",
        ),
        ({"test_window": None, "test_share": 1.5}, r"^data\.test_share: must be a number between 0 and 1"),
    ):
        with pytest.raises(UserInputError, match=message):
            datamodule(tmp_path / "log.csv", **keys).setup()
    for keys, message in (
        ({"split": "future"}, r"^data\.split: 'future' is not one of"),
        ({"time_unit": "days"}, r"^data\.time_unit: 'days' is not one of"),
        ({"cold_items": "ignore"}, r"^evaluation\.cold_items: 'ignore' is not one of"),
    ):
        with pytest.raises(UserInputError, match=message):
            datamodule(tmp_path / "log.csv", **keys)
    sequences = write_file("s.txt", "1 5 6 7 8\n2 5 7 8 9\n")
    no_times = SequenceDataModule(name="s", path=str(sequences), split="time", test_window="1D")
    with pytest.raises(
        UserInputError, match=r"^data\.split: 'time' needs the events' times, and data s has none"
    ):
        no_times.setup()


def test_test_share_and_test_start_cut_where_they_say(tmp_path):
    raw = write_log(tmp_path / "log.csv")
    by_share = datamodule(tmp_path / "log.csv", test_window=None, test_share=0.2)
    by_share.setup()
    share = (raw["ts"] >= by_share.split.cuts.test_cut).mean()
    assert 0.2 <= share < 0.35  # at least the share: ties at the cut go to the test window
    by_date = datamodule(tmp_path / "log.csv", test_window=None, test_start="2024-01-05", val_window="10D")
    by_date.setup()
    cut = pd.Timestamp("2024-01-05", tz="UTC").timestamp()
    assert (by_date.split.cuts.test_cut, by_date.split.cuts.val_cut) == (cut, cut - 10 * DAY)
    assert torch.is_tensor(by_date.train_item_counts())


def test_recency_popularity_counts_the_last_days_before_the_validation_cut(tmp_path):
    raw = write_log(tmp_path / "log.csv")
    dm = datamodule(tmp_path / "log.csv")
    dm.setup()
    val_cut = dm.split.cuts.val_cut
    kept = raw[raw.groupby("user")["item"].transform("size") >= 3]
    recent = kept[(kept["ts"] >= val_cut - 10 * DAY) & (kept["ts"] < val_cut)]
    expected = recent["item"].value_counts()
    counts = dm.recent_item_counts(10)
    got = {int(dm.data.item_ids[i]): int(c) for i, c in enumerate(counts.tolist()) if i and c}
    assert got == expected.to_dict() and sum(got.values()) < int(dm.train_item_counts().sum())
    info = data_info(dm)
    model = MostPopular(info, window_days=10)
    assert model.item_counts[1:].tolist() == counts[1:].float().tolist()
    with pytest.raises(UserInputError, match=r"^model\.window_days: must be a number of days > 0"):
        MostPopular(info, window_days=0)
    loo = SequenceDataModule(name="s", format="synthetic", cache_dir=None)
    loo.setup()
    with pytest.raises(UserInputError, match=r"^model\.window_days: counts the days before a time split's"):
        MostPopular(data_info(loo), window_days=7)


def test_two_processes_get_the_one_process_batches_with_their_misses(tmp_path):
    write_log(tmp_path / "log.csv")
    dm = datamodule(tmp_path / "log.csv", cold_items="keep", eval_batch_size=8)

    def batches():
        return [
            (b["user"].tolist(), b["miss"].tolist(), b["exclude"].tolist())
            for b in dm.eval_dataloader("test")
            if len(b["user"])
        ]

    alone = batches()
    assert len(alone) > 2 and any(any(miss) for _, miss, _ in alone)
    for rank in (0, 1):
        dm.trainer = _fake_trainer(rank, 2)
        assert batches() == alone[rank::2]


def test_items_of_the_future_are_no_class_of_the_training_loss(tmp_path):
    write_log(tmp_path / "log.csv")
    dm = datamodule(tmp_path / "log.csv", device_batches=False)
    dm.setup()
    info = data_info(dm)
    planted = int(np.flatnonzero(dm.data.item_ids == PLANTED)[0])
    assert not info.trained_items[planted] and info.trained_items[1:].sum() < dm.num_items
    model = module(SASRec(info, max_len=dm.max_len, dim=8), data=info, ks=(1, 5))
    batch = next(iter(dm.train_dataloader()))
    model.training_step(batch, 0).backward()
    gradient = model.network.item_embedding.weight.grad
    assert gradient[planted].abs().sum() == 0  # not even pushed down as a negative
    assert gradient[info.trained_items].abs().sum() > 0
    # Leave-one-out: every item is a class, nothing is renumbered.
    loo = datamodule(tmp_path / "log.csv", split="leave_one_out", test_window=None)
    assert data_info(loo).trained_items is None


def test_cold_items_ranked_are_candidates_and_sliced_apart(tmp_path):
    write_log(tmp_path / "log.csv")
    dm = datamodule(tmp_path / "log.csv", cold_items="rank")
    dm.setup()
    planted = int(np.flatnonzero(dm.data.item_ids == PLANTED)[0])
    user = int(np.flatnonzero(dm.data.user_ids == 1000)[0])
    assert user in dm.evaluated_users("test")[0]  # its cold target is ranked, not dropped
    assert dm.evaluation_counts("test")["test/cold_targets"] == 1
    batches = list(dm.eval_dataloader("test"))
    assert not any((b["exclude"] == planted).any() for b in batches)  # a candidate like any item
    assert not any(b["miss"].any() for b in batches)
    model = module(MostPopular(DataInfo(num_items=dm.num_items, train_item_counts=dm.train_item_counts())))
    users, ranks = [], []
    for batch in batches:
        users.append(batch["user"])
        ranks.append(model._rank(batch, None)[0])
    frame = per_user_frame(
        dm.data,
        "test",
        torch.cat(users),
        torch.cat(ranks),
        (1, 5),
        target_positions=dm.split.test_pos,
        cold_items=dm.cold_item_mask(),
    )
    assert frame.loc[frame["user_id"] == 1000, "cold_target"].item()
    assert frame["cold_target"].sum() == 1
    slices = slice_metrics(frame)
    assert set(slices.loc[slices["slice"] == "cold_target", "bucket"]) == {"warm", "cold"}
