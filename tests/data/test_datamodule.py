from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from recsys.data import batching
from recsys.data.batching import DeviceTrainBatches, LengthBucketBatchSampler
from recsys.data.datamodule import SequenceDataModule
from recsys.data.datasets import gather_windows
from recsys.errors import UserInputError
from recsys.models.network import DataInfo


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
        dm.eval_dataloader("train")


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


VARIED = "".join(
    f"{u} " + " ".join(str((u * 7 + i) % 40 + 1) for i in range(3 + u % 13)) + "\n" for u in range(1, 60)
)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"length_bucketing": False},
        {"sliding_window_step": 2},
        {"width_multiple": 4},
        {"static_shapes": True},
    ],
)
def test_device_batches_equal_the_dataloader_batches(tmp_path, options):
    plain = make_datamodule(
        tmp_path, VARIED, seed=5, batch_size=4, max_len=6, device_batches=False, **options
    )
    device = make_datamodule(
        tmp_path, VARIED, seed=5, batch_size=4, max_len=6, device_batches=True, **options
    )
    loader, batches = plain.train_dataloader(), device.train_dataloader()
    assert isinstance(loader, DataLoader) and isinstance(batches, DeviceTrainBatches)
    assert len(batches) == len(loader)
    for epoch in (0, 1):
        loader.sampler.set_epoch(epoch)  # as Lightning's fit loop does on both
        batches.sampler.set_epoch(epoch)
        expected, got = all_batches(loader), all_batches(batches)
        assert len(got) == len(expected)
        for a, b in zip(expected, got):
            assert a.keys() == b.keys()
            for key in a:
                assert b[key].dtype == torch.int64 and b[key].is_contiguous()
                assert torch.equal(a[key], b[key])
    assert not torch.equal(expected[0]["input_ids"], all_batches(plain.train_dataloader())[0]["input_ids"])


def test_device_batches_auto_is_the_dataloader_on_cpu_and_checks_the_budget(tmp_path, monkeypatch):
    dm = make_datamodule(tmp_path, VARIED)
    assert dm.device_batches == "auto"
    assert isinstance(dm.train_dataloader(), DataLoader)  # no trainer: CPU
    # A CUDA trainer (faked: only the device choice is asked, nothing is moved).
    dm.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cuda", 0)))
    assert dm._train_batch_device(dm.train_windows()) == torch.device("cuda", 0)
    monkeypatch.setattr(batching, "DEVICE_BATCHES_MAX_BYTES", 100)
    assert dm._train_batch_device(dm.train_windows()) is None
    dm.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cpu")))
    assert dm._train_batch_device(dm.train_windows()) is None


def test_device_batches_setting_is_checked(tmp_path):
    for bad in ("maybe", 1, None):
        with pytest.raises(UserInputError, match="data.device_batches: must be auto, true or false"):
            make_datamodule(tmp_path, VARIED, device_batches=bad)
    assert make_datamodule(tmp_path, VARIED, device_batches="True").device_batches is True
    assert make_datamodule(tmp_path, VARIED, device_batches="false").device_batches is False


def test_device_batches_are_dealt_out_by_rank(tmp_path):
    dm = make_datamodule(tmp_path, VARIED, seed=2, batch_size=4, device_batches=True)
    whole = dm.train_dataloader()
    order = [b["target_ids"] for b in all_batches(whole)]
    assert len(order) % 3 != 0  # so that the last round is padded
    shards = []
    for rank in range(3):
        shard = DeviceTrainBatches(
            whole.matrix, whole.lengths, LengthBucketBatchSampler(**_sampler_args(dm)), rank, 3
        )
        shards.append([b["target_ids"] for b in all_batches(shard)])
        assert len(shards[-1]) == len(shard) == -(-len(order) // 3)
    padded = order + order[: 3 * len(shards[0]) - len(order)]
    for i, targets in enumerate(padded):
        assert torch.equal(shards[i % 3][i // 3], targets)
    # More ranks than batches: each rank still gets one.
    many = len(order) + 2
    for rank in (0, many - 1):
        shard = DeviceTrainBatches(
            whole.matrix, whole.lengths, LengthBucketBatchSampler(**_sampler_args(dm)), rank, many
        )
        (batch,) = all_batches(shard)
        assert torch.equal(batch["target_ids"], order[rank % len(order)])


def _sampler_args(dm):
    return {"lengths": dm.train_windows().lengths, "batch_size": dm.batch_size, "seed": dm.seed}


def _fit_recording_batches(tmp_path, device_batches):
    import pytorch_lightning as pl

    from recsys.models.sasrec import SASRec
    from tests.builders import module

    class Record(pl.Callback):
        def __init__(self):
            self.batches = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.batches.append({key: value.clone() for key, value in batch.items()})

    synthetic = {"num_users": 40, "num_items": 30, "min_length": 4, "max_length": 12, "seed": 0}
    dm = SequenceDataModule(
        name="synthetic",
        format="synthetic",
        synthetic=synthetic,
        max_len=8,
        batch_size=8,
        eval_batch_size=16,
        cache_dir=str(tmp_path / "cache"),
        device_batches=device_batches,
    )
    torch.manual_seed(0)
    model = module(SASRec(DataInfo(dm.num_items), max_len=8, dim=16, num_blocks=1))
    record = Record()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=2,
        limit_train_batches=2,
        limit_val_batches=1,
        callbacks=[record],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    before = [p.detach().clone() for p in model.parameters()]
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 4
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    return trainer, record.batches


def test_a_model_trains_on_device_batches_as_on_the_dataloader(tmp_path):
    trainer, batches = _fit_recording_batches(tmp_path, device_batches=True)
    assert isinstance(trainer.train_dataloader, DeviceTrainBatches)
    plain_trainer, expected = _fit_recording_batches(tmp_path, device_batches=False)
    assert isinstance(plain_trainer.train_dataloader, DataLoader)
    assert len(batches) == len(expected) == 4  # 2 epochs of 2 batches: the epochs' orders differ
    assert not torch.equal(batches[0]["input_ids"], batches[2]["input_ids"])
    for a, b in zip(expected, batches):
        assert all(torch.equal(a[key], b[key]) for key in a)


@pytest.mark.filterwarnings("ignore:You are trying to")
@pytest.mark.parametrize("device_batches", [False, True])
def test_width_multiple_pads_batches_without_changing_them(tmp_path, device_batches):
    from recsys.models.sasrec import SASRec
    from tests.builders import module

    batches, evaluated = {}, {}
    for multiple in (1, 4):
        dm = make_datamodule(
            tmp_path,
            VARIED,
            seed=5,
            batch_size=4,
            max_len=10,
            device_batches=device_batches,
            width_multiple=multiple,
        )
        batches[multiple] = all_batches(dm.train_dataloader())
        evaluated[multiple] = all_batches(dm.eval_dataloader("test"))
    model = module(SASRec(DataInfo(40), max_len=10, dim=8, dropout=0.0), weight_batches_by_targets=False)
    widths = set()
    for exact, rounded in zip(batches[1], batches[4]):
        width = rounded["input_ids"].size(1)
        widths.add(width)
        # Inputs rounded up to a multiple of 4, but never past the longest window's 10.
        assert width == min(-(-exact["input_ids"].size(1) // 4) * 4, 10)
        for key in exact:
            extra = rounded[key][:, exact[key].size(1) :]
            assert torch.equal(rounded[key][:, : exact[key].size(1)], exact[key]) and not extra.any()
        # The extra columns are padding: the same loss.
        torch.testing.assert_close(model.training_step(rounded, 0), model.training_step(exact, 0))
    assert widths - {10} and widths <= {4, 8, 10}
    for exact, rounded in zip(evaluated[1], evaluated[4]):
        width = rounded["history"].size(1)
        assert width == min(-(-exact["history"].size(1) // 4) * 4, 10)
        assert torch.equal(rounded["history"][:, : exact["history"].size(1)], exact["history"])
        torch.testing.assert_close(
            model.network.score(rounded["history"]), model.network.score(exact["history"])
        )


def test_width_multiple_is_checked(tmp_path):
    for bad in (0, 2.5, "8"):
        with pytest.raises(UserInputError, match="data.width_multiple: must be an integer >= 1"):
            make_datamodule(tmp_path, VARIED, width_multiple=bad)
