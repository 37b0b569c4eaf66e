import numpy as np
import pandas as pd
import torch

from recsys.data.sequences import SequenceData
from recsys.evaluation.results import per_user_frame, slice_metrics


def toy_data():
    # users 'a' (items 1 2 3 1), 'b' (2 3 4 5 2 3); item 0 is padding
    items = np.array([1, 2, 3, 1, 2, 3, 4, 5, 2, 3])
    offsets = np.array([0, 4, 10])
    return SequenceData(
        items=items,
        offsets=offsets,
        user_ids=np.array(["a", "b"]),
        item_ids=np.array(["<pad>", "i1", "i2", "i3", "i4", "i5"]),
        fingerprint="x",
    )


def test_per_user_frame_has_ids_rank_metrics_and_slice_columns():
    counts = torch.tensor([0, 1, 2, 2, 1, 1])
    frame = per_user_frame(toy_data(), "test", torch.tensor([1, 0]), torch.tensor([3, 1]), (1, 10), counts)
    assert frame["user_id"].tolist() == ["a", "b"]  # sorted by user, whatever the batch order
    assert frame["target_item_id"].tolist() == ["i1", "i3"]
    assert frame["rank"].tolist() == [1, 3]
    assert frame["history_length"].tolist() == [3, 5]
    assert frame["target_train_count"].tolist() == [1, 2]
    assert frame["hr@1"].tolist() == [1.0, 0.0]


def test_slices_group_users_into_buckets():
    frame = pd.DataFrame(
        {
            "history_length": [1, 2, 4, 30, 300],
            "target_train_count": [0, 0, 3, 50, 1000],
            "ndcg@10": [1.0, 0.0, 0.5, 0.25, 0.0],
        }
    )
    table = slice_metrics(frame, ["ndcg@10"]).set_index(["slice", "bucket"])
    assert table.loc[("history_length", "1-2"), "users"] == 2
    assert table.loc[("history_length", "1-2"), "ndcg@10"] == 0.5
    assert table.loc[("history_length", "200+"), "users"] == 1
    assert table.loc[("target_train_count", "0"), "ndcg@10"] == 0.5
    assert table.loc[("target_train_count", "500+"), "users"] == 1
    assert table["users"].groupby(level=0).sum().tolist() == [5, 5]


def test_repeat_targets_are_flagged_and_sliced(tmp_path):
    from recsys.data.datamodule import SequenceDataModule

    # Both users' test items repeat a seen item (a: 1, b: 3); under keep both are ranked.
    path = tmp_path / "seq.txt"
    path.write_text("a 1 2 3 1\nb 2 3 4 5 2 3\n")
    dm = SequenceDataModule(
        name="toy", path=str(path), format="sequence", cache_dir=str(tmp_path), seen_items="keep"
    )
    dm.setup()
    users, positions = dm.evaluated_users("test")
    frame = per_user_frame(
        dm.data,
        "test",
        torch.from_numpy(users),
        torch.tensor([1, 7]),
        (1, 10),
        None,
        dm.split.test_pos,
        dm.repeat_targets("test"),
    )
    assert frame["repeat_target"].tolist() == [True, True]
    assert dm.seen_targets(*dm.evaluated_users("val")).tolist() == [False, True]  # a: 3 new, b: 2 seen
    table = slice_metrics(frame, ["hr@1"]).set_index(["slice", "bucket"])
    assert table.loc[("repeat_target", "repeat"), "users"] == 2
    assert table.loc[("repeat_target", "repeat"), "hr@1"] == 0.5
    assert ("repeat_target", "new item") not in table.index
