"""data.batch_times (HSTU's model.time_bias): each position's timestamp beside its item, in training
and evaluation batches, under leave-one-out and the time split, trimmed and compacted with the items."""

import numpy as np
import pandas as pd
import pytest

from recsys.data import SequenceDataModule
from recsys.errors import UserInputError
from recsys.models.from_config import check_model_config
from tests.data.test_time_split import datamodule as log_datamodule

# Each event's time is 1000 * user + 10 * item, so a batch's times say which (user, item) they belong to.
ROWS = [(user, item, 1000 * user + 10 * item) for user in range(1, 7) for item in range(1, 4 + user)]


def datamodule(tmp_path, rows=ROWS, **keys) -> SequenceDataModule:
    """ROWS as a CSV log, read with timestamps in the batches (leave-one-out unless `keys` say)."""
    path = tmp_path / "log.csv"
    pd.DataFrame(rows, columns=["user", "item", "ts"]).to_csv(path, index=False)
    options = dict(split="leave_one_out", test_window=None, batch_size=4, eval_batch_size=4, max_len=4)
    return log_datamodule(path, **{**options, "batch_times": True, **keys})


def time_of(dm: SequenceDataModule, user_index: int, item_index: np.ndarray) -> np.ndarray:
    """The time ROWS give the events of a user (index) and items (indices), 0 at padding."""
    user = int(dm.data.user_ids[user_index])
    items = dm.data.item_ids[item_index].astype(np.int64)
    return np.where(item_index != 0, 1000 * user + 10 * items, 0)


@pytest.mark.parametrize("split", ["leave_one_out", "time"])
def test_every_batch_carries_the_times_of_its_positions(tmp_path, split):
    keys = {"split": "time", "test_share": 0.2} if split == "time" else {}
    dm = datamodule(tmp_path, **keys)
    dm.setup()
    for batch in dm.train_dataloader():
        assert batch["input_times"].shape == batch["input_ids"].shape
        inputs = batch["input_ids"].numpy()
        times = batch["input_times"].numpy()
        first_item = dm.data.item_ids[inputs[:, 0]].astype(np.int64)
        users = (times[:, 0] - 10 * first_item) // 1000  # the row's user, from its first event
        expected = np.where(inputs != 0, 1000 * users[:, None] + 10 * dm.data.item_ids[inputs], 0)
        np.testing.assert_array_equal(times, expected)
    for part in ("val", "test"):
        for batch in dm.eval_dataloader(part):
            assert batch["history_times"].shape == batch["history"].shape
            for row, user in enumerate(batch["user"].numpy()):
                history = batch["history"][row].numpy()
                np.testing.assert_array_equal(batch["history_times"][row].numpy(), time_of(dm, user, history))


def test_the_history_times_follow_the_items_when_they_are_trimmed_or_hidden(tmp_path, write_file):
    # User 1 bought item 14 and had viewed it long before: hide_target_item drops the view, and
    # with it its time; max_len 2 keeps the last two of the rest.
    events = "user_id,item_id,behavior,timestamp\n" + "".join(
        f"1,{item},{kind},{ts}\n"
        for item, kind, ts in [(14, "view", 100), (10, "view", 1000), (11, "view", 1100)]
    )
    events += "1,12,view,1150\n1,14,buy,1200\n"
    dm = SequenceDataModule(
        name="rr",
        path=str(write_file("h/events.csv", events)),
        test_path=str(write_file("h/test.csv", "user_id,item_id\n1,13\n")),
        format="retailrocket",
        event_types=["view", "cart", "buy"],
        target_events=["buy"],
        hide_target_item=True,
        max_len=2,
        batch_times=True,
        cache_dir=None,
    )
    val = next(iter(dm.eval_dataloader("val")))
    assert dm.data.item_ids[val["history"][0].numpy()].tolist() == [11, 12]
    assert val["history_times"][0].tolist() == [1100, 1150]


def test_times_are_asked_for_by_the_model_and_need_data_with_times(tmp_path):
    from tests.test_configs import compose_train

    cfg = compose_train("model=hstu", "model.time_bias=true", "data=amazon_beauty_time")
    assert cfg.data.batch_times is True  # data/common.yaml's batch_times follows the model
    check_model_config(cfg)
    assert compose_train("model=hstu").data.batch_times is False
    cfg = compose_train("model=hstu", "model.time_bias=true", "data.batch_times=false")
    with pytest.raises(UserInputError, match=r"^model\.time_bias: the batches carry no timestamps"):
        check_model_config(cfg)
    sequences = tmp_path / "seq.txt"
    sequences.write_text("1 1 2 3 4\n2 5 6 7\n")
    no_times = SequenceDataModule(name="s", path=str(sequences), batch_times=True, cache_dir=None)
    with pytest.raises(
        UserInputError, match=r"^data\.batch_times \(model\.time_bias\): data s has no event times"
    ):
        no_times.setup()
    with pytest.raises(UserInputError, match=r"^data\.batch_times: must be true or false"):
        datamodule(tmp_path, batch_times="yes")
