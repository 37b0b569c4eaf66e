"""Several processes (Lightning DDP, gloo on the CPU): the same metrics and per-user results as one.

The end-to-end tests train with 2 processes and evaluate its checkpoint with 1 and with 2; the unit
tests check how the data module deals batches to ranks and the one-line errors for trainer options.
"""

import json
import re
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from hydra.utils import instantiate

from recsys.data.batching import LengthBucketBatchSampler, RankBatches, deal_batches
from recsys.data.datamodule import SequenceDataModule
from recsys.errors import UserInputError
from recsys.training.distributed import check_trainer_options, trainer_errors
from tests.checks import Untouched, assert_user_error
from tests.test_entrypoints import common, run, train_overrides

DDP_CPU = ["strategy=ddp", "devices=2", "accelerator=cpu"]


# --- dealing batches to ranks -------------------------------------------------------------------


def _fake_trainer(rank, world_size, use_distributed_sampler=False):
    return SimpleNamespace(
        global_rank=rank,
        world_size=world_size,
        current_epoch=0,
        strategy=SimpleNamespace(root_device=torch.device("cpu")),
        _accelerator_connector=SimpleNamespace(use_distributed_sampler=use_distributed_sampler),
    )


def _datamodule(tmp_path, **options):
    synthetic = {"num_users": 53, "num_items": 30, "min_length": 4, "max_length": 12, "seed": 0}
    settings = {"batch_size": 4, "eval_batch_size": 8, "device_batches": False, **options}
    return SequenceDataModule(
        name="synthetic", format="synthetic", synthetic=synthetic, cache_dir=str(tmp_path), **settings
    )


@pytest.mark.parametrize("world_size", [2, 3, 8])
def test_every_user_is_evaluated_exactly_once_in_the_one_process_batches(tmp_path, world_size):
    dm = _datamodule(tmp_path, seen_items="keep")  # every one of the 53 users, repeat targets too
    alone = [batch["user"].tolist() for batch in dm.eval_dataloader("test")]  # 7 batches, last of 5
    assert len(alone) == 7 and sorted(sum(alone, [])) == list(range(53))
    seen = []
    for rank in range(world_size):
        dm.trainer = _fake_trainer(rank, world_size)
        loader = dm.eval_dataloader("test")
        shard = [batch["user"].tolist() for batch in loader]
        assert len(shard) == len(loader) >= 1  # never an empty loader: Lightning refuses one
        real = [batch for batch in shard if batch]
        assert real == alone[rank::world_size]  # the very batches of one process, none padded
        if not real:
            assert shard == [[]]  # a rank left without users gets one empty batch
        seen += sum(real, [])
    assert sorted(seen) == list(range(53))  # each user once


def test_training_batches_are_dealt_evenly_and_padded_from_the_start(tmp_path):
    dm = _datamodule(tmp_path, batch_size=5)
    whole = [batch["target_ids"] for batch in dm.train_dataloader()]
    assert len(whole) % 2 == 1  # so that the last round is padded
    shards = []
    for rank in range(2):
        dm.trainer = _fake_trainer(rank, 2)
        loader = dm.train_dataloader()
        shards.append([batch["target_ids"] for batch in loader])
        assert len(shards[-1]) == len(loader) == (len(whole) + 1) // 2  # same steps on every rank
    padded = whole + whole[:1]
    for i, targets in enumerate(padded):
        assert torch.equal(shards[i % 2][i // 2], targets)


def test_rank_batches_pass_set_epoch_on():
    sampler = LengthBucketBatchSampler(np.arange(40) % 7, 4, seed=3)
    shard = RankBatches(sampler, rank=1, world_size=2, pad=True)
    shard.set_epoch(5)
    assert sampler.epoch == 5
    first = [b.tolist() for b in shard]
    shard.set_epoch(5)
    assert [b.tolist() for b in shard] == first
    shard.set_epoch(6)
    assert [b.tolist() for b in shard] != first
    assert deal_batches([np.arange(2)], 0, 1, pad=False)[0].tolist() == [0, 1]


def test_lightnings_own_distributed_sampler_is_refused(tmp_path):
    dm = _datamodule(tmp_path)
    dm.trainer = _fake_trainer(0, 2, use_distributed_sampler=True)
    with pytest.raises(UserInputError, match=r"^trainer.use_distributed_sampler: must be false with 2"):
        dm.eval_dataloader("val")


# --- trainer options ----------------------------------------------------------------------------


def test_unknown_strategy_and_missing_gpus_are_one_line_errors(monkeypatch):
    with pytest.raises(
        UserInputError, match=r"^trainer.strategy: 'nope' is not a Lightning strategy; use one of auto, ddp"
    ):
        check_trainer_options({"strategy": "nope"})
    # CPU devices are processes: any number of them is there.
    check_trainer_options(
        {"strategy": "DDP", "accelerator": "cpu", "devices": 64, "use_distributed_sampler": False}
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(UserInputError, match=r"^accelerator: 'gpu' asks for a GPU, but torch sees no CUDA"):
        check_trainer_options({"accelerator": "gpu", "devices": 2}, prefix="")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    two_gpus = {"accelerator": "gpu", "use_distributed_sampler": False}
    check_trainer_options({**two_gpus, "devices": 2})
    check_trainer_options({**two_gpus, "accelerator": "cuda", "devices": "auto"})
    for devices, asked in ((3, [0, 1, 2]), ([1, 2], [1, 2]), ("0,4", [0, 4])):
        message = f"trainer.devices: {devices!r} asks for GPUs {asked}, but this machine has 2 ([0, 1])"
        with pytest.raises(UserInputError, match="^" + re.escape(message)):
            check_trainer_options({**two_gpus, "devices": devices})


def test_several_processes_need_the_data_modules_own_sharding(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for options, processes in (({"devices": 2}, 2), ({"devices": 1, "num_nodes": 3}, 3)):
        message = f"^trainer.use_distributed_sampler: must be false with {processes} processes"
        with pytest.raises(UserInputError, match=message):
            check_trainer_options({"strategy": "ddp", "accelerator": "cpu", **options})
        check_trainer_options({"accelerator": "cpu", **options, "use_distributed_sampler": False})
    check_trainer_options({"accelerator": "cpu", "devices": 1})  # one process: Lightning's default is fine


def test_lightnings_own_errors_name_the_key():
    import pytorch_lightning as pl

    with pytest.raises(
        UserInputError, match=r"^trainer.devices: `Trainer\(devices=0\)` value is not a valid"
    ):
        with trainer_errors({"accelerator": "cpu", "devices": 0}):
            pl.Trainer(accelerator="cpu", devices=0, logger=False)
    config = {"_target_": "pytorch_lightning.Trainer", "accelerator": "cpu", "num_nodes": 0, "logger": False}
    with pytest.raises(UserInputError, match=r"^trainer.num_nodes: `num_nodes` must be a positive integer"):
        with trainer_errors(config):
            instantiate(config)  # Hydra wraps the error in an InstantiationException
    with pytest.raises(RuntimeError, match="not about options"):
        with trainer_errors({}):
            raise RuntimeError("not about options")


# --- end to end: train.py and evaluate.py with 2 processes ---------------------------------------


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    run_dir = tmp / "run"
    # eval_batch_size 256 > 200 users: validation and test are one batch, so the second process
    # holds only an empty batch and must still reach the epoch-end reduction (no hang).
    overrides = train_overrides(tmp, run_dir, "trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu")
    result = run("train.py", *overrides, "trainer.max_epochs=1", "data.eval_batch_size=256")
    return tmp, run_dir, result


def _equal_metrics(a, b):
    keys = [k for k in a if k.startswith(("test/", "val/"))]
    assert keys
    for key in keys:
        assert b[key] == pytest.approx(a[key], rel=1e-9, abs=1e-12), key


def test_two_process_training_writes_one_run_directory(ddp_run):
    tmp, run_dir, result = ddp_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["epochs"] == 1 and metrics["test/ndcg@10"] > 0.0
    frame = pd.read_parquet(run_dir / "per_user.parquet")
    # Every evaluated user once, from both processes (repeat targets left out, seen_items=exclude).
    assert len(frame) == metrics["test/users"] > 150 and frame["user_id"].is_unique
    assert frame["ndcg@10"].mean() == pytest.approx(metrics["test/ndcg@10"])
    assert (run_dir / "checkpoints" / "best.ckpt").is_file()
    assert (run_dir / "train_ddp_process_1.log").is_file()  # the second process ran in the same dir
    assert result.stdout.count("test metrics") == 1  # printed by rank 0 only


def test_evaluate_gives_the_same_results_with_one_and_two_processes(ddp_run):
    tmp, run_dir, _ = ddp_run
    ckpt = f"ckpt_path={run_dir}/checkpoints/best.ckpt"
    sampled = "evaluation.sampled={num_negatives: 20, sampler: popularity}"
    outputs = {}
    # Batches of 80 users: 3 batches, dealt 2 and 1 to the two processes.
    for name, extra in (("one", []), ("two", DDP_CPU)):
        outputs[name] = tmp / f"eval_{name}"
        run(
            "evaluate.py",
            ckpt,
            "batch_size=80",
            sampled,
            *extra,
            f"hydra.run.dir={outputs[name]}",
            *common(tmp),
        )
    one, two = (json.loads((outputs[n] / "metrics.json").read_text()) for n in ("one", "two"))
    assert "test/sampled_popularity_20/ndcg@10" in one
    _equal_metrics(one, two)
    frames = [pd.read_parquet(outputs[n] / "per_user.parquet") for n in ("one", "two")]
    assert len(frames[1]) == one["test/users"] > 150 and frames[1]["user_id"].is_unique
    pd.testing.assert_frame_equal(frames[0], frames[1])
    # train.py tested the same checkpoint with 2 processes (one holding an empty batch).
    trained = json.loads((run_dir / "metrics.json").read_text())
    _equal_metrics({k: v for k, v in trained.items() if k.startswith("test/")}, one)
    pd.testing.assert_frame_equal(frames[0], pd.read_parquet(run_dir / "per_user.parquet"))


@pytest.fixture(scope="module")
def unknown_strategy(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("strategy")
    run_dir = tmp / "run"
    untouched = Untouched(run_dir, tmp / "cache", tmp / "logs")
    result = run(
        "train.py", *train_overrides(tmp, run_dir, "trainer=ddp", "trainer.strategy=nope"), check=False
    )
    return result, untouched, tmp / "cache"


STRATEGY_MESSAGE = "error: trainer.strategy: 'nope' is not a Lightning strategy"


def test_train_refuses_an_unknown_strategy_in_one_line_writing_nothing(unknown_strategy):
    result, untouched, _ = unknown_strategy
    assert_user_error(result, STRATEGY_MESSAGE, untouched)


# --- one training step: 2 processes against one -------------------------------------------------


def _training_batch(lengths, width, seed, num_items=30):
    """A right-padded training batch of rows with `lengths` targets each."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), width + 1, dtype=torch.long)
    for row, length in enumerate(lengths):
        ids[row, : length + 1] = torch.randint(1, num_items + 1, (length + 1,), generator=generator)
    return {"input_ids": ids[:, :-1].clone(), "target_ids": ids[:, 1:].clone()}


def _one_step_updates(batches, devices, static=False):
    """What one SGD step of the training module changes in each weight, with `devices` CPU
    processes (DDP over gloo: process r trains on batches[r]) or one process (batches[0])."""
    import functools

    import pytorch_lightning as pl
    from torch.utils.data import DataLoader

    from recsys.models.network import DataInfo
    from recsys.models.sasrec import SASRec
    from tests.builders import module

    torch.manual_seed(0)
    model = module(
        SASRec(DataInfo(30), max_len=8, dim=16, dropout=0.0),
        optimizer=functools.partial(torch.optim.SGD, lr=1.0),  # the update is the gradient
        static_step=static,  # data.static_shapes: the masked step, target counts kept on the device
    )
    before = {name: value.clone() for name, value in model.state_dict().items()}
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp_spawn" if devices > 1 else "auto",
        max_steps=1,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    # Lightning's distributed sampler deals the list's batches out, one per process, in order.
    trainer.fit(model, train_dataloaders=DataLoader(batches, batch_size=None))
    return {name: value - before[name] for name, value in model.state_dict().items()}


@pytest.mark.parametrize(
    "lengths",
    [
        pytest.param(([5, 3, 7], [6, 4, 5]), id="equal_target_counts"),
        pytest.param(
            ([8, 8, 8], [1, 2, 1]),
            id="unequal_target_counts",
        ),
    ],
)
@pytest.mark.parametrize("static", [False, True], ids=["gathered", "static"])
def test_one_step_on_two_processes_equals_one_process_on_the_combined_batch(lengths, static):
    halves = [_training_batch(lengths[0], 8, seed=1), _training_batch(lengths[1], 8, seed=2)]
    combined = {key: torch.cat([half[key] for half in halves]) for key in halves[0]}
    two = _one_step_updates(halves, devices=2, static=static)
    one = _one_step_updates([combined], devices=1, static=static)
    assert sum(float(update.abs().sum()) for update in one.values()) > 1.0  # the step did move
    for name, update in one.items():
        torch.testing.assert_close(two[name], update, rtol=1e-4, atol=1e-6, msg=name)
