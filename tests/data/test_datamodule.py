import numpy as np
import pytest
import torch

from recsys.data.datamodule import EvalUsers, LengthBucketBatchSampler, SequenceDataModule, gather_windows
from recsys.errors import UserInputError


def make_datamodule(tmp_path, text, **kwargs):
    path = tmp_path / "seq.txt"
    path.write_text(text)
    options = {"batch_size": 2, "eval_batch_size": 2, "cache_dir": str(tmp_path / "cache")}
    options.update(kwargs)
    return SequenceDataModule(name="toy", path=str(path), format="sequence", **options)


def all_batches(loader):
    return list(iter(loader))


def test_gather_windows_right_pads():
    items = np.array([5, 6, 7, 8, 9])
    out = gather_windows(items, np.array([0, 3]), np.array([3, 4]))
    assert out.tolist() == [[5, 6, 7], [8, 0, 0]]


def test_leave_one_out_split_has_no_leakage(tmp_path):
    dm = make_datamodule(tmp_path, "1 1 2 3 4 5\n2 6 7 8\n3 9 10 11 12\n", max_len=50)
    dm.setup()
    data = dm.data
    train_targets, train_inputs = {}, {}
    for batch in all_batches(dm.train_dataloader()):
        for inp, tgt in zip(batch["input_ids"], batch["target_ids"]):
            real = tgt != 0
            first_item = int(inp[0])
            train_inputs[first_item] = inp[real].tolist()  # inputs that have a target
            train_targets[first_item] = tgt[real].tolist()
    # Training sees everything but the last two events of each user.
    assert train_inputs[1] == [1, 2] and train_targets[1] == [2, 3]
    assert 6 not in train_inputs  # 3 events: one training item, no (input, target) pair
    assert train_inputs[9] == [9] and train_targets[9] == [10]
    for split, offset in (("val", 2), ("test", 1)):
        for batch in all_batches(dm.eval_dataloader(split)):
            for user, history, target, exclude in zip(
                batch["user"], batch["history"], batch["target"], batch["exclude"]
            ):
                events = data.history(int(user)).tolist()
                assert int(target) == events[-offset]
                assert history[history != 0].tolist() == events[:-offset]
                assert exclude[exclude != 0].tolist() == events[:-offset]
                assert int(target) not in events[:-offset]


def test_max_len_keeps_the_most_recent_items(tmp_path):
    dm = make_datamodule(tmp_path, "1 " + " ".join(str(i) for i in range(1, 21)) + "\n", max_len=4)
    batch = all_batches(dm.train_dataloader())[0]
    # training part is items 1..18; the window is the last 5 of them
    assert batch["input_ids"].tolist() == [[14, 15, 16, 17]]
    assert batch["target_ids"].tolist() == [[15, 16, 17, 18]]
    test = all_batches(dm.test_dataloader())[0]
    assert test["history"].tolist() == [[16, 17, 18, 19]]
    assert test["exclude"][0].tolist() == list(range(1, 20))


def test_sliding_windows_cover_every_training_target(tmp_path):
    dm = make_datamodule(
        tmp_path, "1 " + " ".join(str(i) for i in range(1, 21)) + "\n", max_len=4, sliding_window_step=4
    )
    targets = []
    for batch in all_batches(dm.train_dataloader()):
        targets += batch["target_ids"][batch["target_ids"] != 0].tolist()
    assert sorted(targets) == list(range(2, 19))  # every training item after the first, once


def test_batches_are_trimmed_to_their_longest_sequence(tmp_path):
    dm = make_datamodule(tmp_path, "1 1 2 3 4\n2 4 5 6 7\n3 1 2 3 4 5 6 7 8 9\n", max_len=50, batch_size=1)
    widths = sorted(b["input_ids"].shape[1] for b in all_batches(dm.train_dataloader()))
    assert widths == [1, 1, 6]


def test_sampler_is_deterministic_per_seed_and_epoch_and_buckets_lengths():
    lengths = np.random.default_rng(0).integers(1, 50, 1000)
    a = LengthBucketBatchSampler(lengths, 32, seed=1)
    b = LengthBucketBatchSampler(lengths, 32, seed=1)
    a.set_epoch(3)
    b.set_epoch(3)
    batches_a, batches_b = list(a), list(b)
    assert all(np.array_equal(x, y) for x, y in zip(batches_a, batches_b))
    assert sorted(np.concatenate(batches_a).tolist()) == list(range(1000))
    a.set_epoch(4)
    assert not all(np.array_equal(x, y) for x, y in zip(list(a), batches_b))
    spread = np.mean([np.ptp(lengths[batch]) for batch in batches_a])
    unbucketed = LengthBucketBatchSampler(lengths, 32, seed=1, bucketing=False)
    assert spread < 0.5 * np.mean([np.ptp(lengths[batch]) for batch in unbucketed])


def test_bad_settings_name_the_key(tmp_path):
    with pytest.raises(UserInputError, match="data.max_len"):
        make_datamodule(tmp_path, "1 1 2 3\n", max_len=0)
    with pytest.raises(UserInputError, match="data.batch_size"):
        LengthBucketBatchSampler(np.ones(3), 0)
    dm = make_datamodule(tmp_path, "1 1 2 3\n")
    dm.setup()
    with pytest.raises(UserInputError, match="split: 'train' is not one of"):
        EvalUsers(dm.data, "train", 5)


def test_workers_give_the_same_batches(tmp_path):
    text = "".join(
        f"{u} " + " ".join(str((u * 7 + i) % 40 + 1) for i in range(3 + u % 9)) + "\n" for u in range(1, 60)
    )
    plain = make_datamodule(tmp_path, text, seed=5)
    workers = make_datamodule(tmp_path, text, seed=5, num_workers=2)
    for a, b in zip(all_batches(plain.train_dataloader()), all_batches(workers.train_dataloader())):
        assert torch.equal(a["input_ids"], b["input_ids"])


def test_training_inputs_are_exactly_the_positions_with_a_target(tmp_path):
    text = "1 1 2 3 4 5 6 7\n2 8 9 10 11\n3 1 5 9 2 6\n"
    dm = make_datamodule(tmp_path, text, batch_size=3)
    for batch in all_batches(dm.train_dataloader()):
        assert torch.equal(batch["input_ids"] != 0, batch["target_ids"] != 0)


def test_train_item_counts_leave_out_validation_and_test_items(tmp_path):
    # Raw items map to ids in order of first appearance; user 1's 4 and 5, user 2's 8 and 1 are held out.
    dm = make_datamodule(tmp_path, "1 1 2 2 3 4 5\n2 6 7 8 1\n")
    counts = dm.train_item_counts()
    data = dm.data
    expected = {1: 1, 2: 2, 3: 1, 6: 1, 7: 1}
    by_raw = {int(data.item_ids[i]): int(c) for i, c in enumerate(counts.tolist()) if i > 0 and c}
    assert by_raw == expected and counts[0] == 0 and counts.sum() == 6


def test_validation_can_use_a_fixed_subset_but_test_uses_everyone(tmp_path):
    text = "".join(f"{u} " + " ".join(str(u * 10 + i) for i in range(4)) + "\n" for u in range(1, 41))
    dm = make_datamodule(tmp_path, text, val_users=7, seed=3)
    val_users = np.concatenate([b["user"].numpy() for b in dm.eval_dataloader("val")])
    again = np.concatenate(
        [
            b["user"].numpy()
            for b in make_datamodule(tmp_path, text, val_users=7, seed=3).eval_dataloader("val")
        ]
    )
    assert len(val_users) == 7 and np.array_equal(val_users, again)
    assert len(np.concatenate([b["user"].numpy() for b in dm.eval_dataloader("test")])) == 40
    assert len(np.concatenate([b["user"].numpy() for b in dm.eval_dataloader("val", all_users=True)])) == 40
    with pytest.raises(UserInputError, match="data.val_users"):
        make_datamodule(tmp_path, text, val_users=0)
