"""The static training step (data.static_shapes): batches of a few fixed shapes, a loss that weighs
every position by a mask, and a step that compiles whole (fullgraph) to one graph per batch shape.

Held to the plain step: the same loss and gradients as gathering the target positions of the
unpadded batch, for every network and every loss, over random shapes and padding."""

from __future__ import annotations

import warnings
import zlib

import numpy as np
import pytest
import torch

from recsys.data.datamodule import SequenceDataModule
from recsys.data.datasets import MIN_STATIC_WIDTH, pad_rows, window_batch_width
from recsys.errors import UserInputError
from recsys.losses import (
    BinaryCrossEntropy,
    FullCrossEntropy,
    GeneralisedBinaryCrossEntropy,
    NegativeSampler,
    SampledSoftmax,
)
from recsys.models.bert4rec import BERT4Rec
from recsys.models.gru4rec import GRU4Rec
from recsys.models.hstu import HSTU
from recsys.models.network import DataInfo
from recsys.models.sasrec import SASRec
from recsys.training import hardware
from recsys.training.module import SequentialRecommender

NUM_ITEMS = 40
NETWORKS = [SASRec, BERT4Rec, HSTU, GRU4Rec]
COUNTS = torch.arange(NUM_ITEMS + 1, dtype=torch.float32)

warnings.filterwarnings("ignore", message="You are trying to `self.log")


class TargetDerivedNegatives(NegativeSampler):
    """Negatives that depend on the target alone, so that the gathered and the padded step draw
    the same ones for the same positions."""

    def forward(self, targets, num_items, num_negatives, static=False):
        return (targets[:, None] * 7 + torch.arange(num_negatives)) % num_items + 1


def losses():
    yield "ce token chunks", FullCrossEntropy(chunk_size=3)
    yield "ce plain", FullCrossEntropy(chunk_size=None)
    yield "ce item chunks", FullCrossEntropy(item_chunk_size=7)
    yield "sampled uniform", SampledSoftmax(num_negatives=5, sampler="uniform", item_counts=COUNTS)
    yield "sampled popularity", SampledSoftmax(num_negatives=5, sampler="popularity", item_counts=COUNTS)
    yield "in_batch", SampledSoftmax(sampler="in_batch", item_counts=COUNTS)
    yield "mixed", SampledSoftmax(num_negatives=6, sampler="mixed", item_counts=COUNTS)
    yield "bce", BinaryCrossEntropy(num_negatives=3)
    yield "gbce", GeneralisedBinaryCrossEntropy(num_negatives=5)


def deterministic(loss, monkeypatch):
    """The loss with its random draws made functions of the batch alone."""
    sampler = getattr(loss, "sampler", None)
    if sampler is not None and not getattr(loss, "in_batch", False):
        loss.sampler = TargetDerivedNegatives(sampler.distribution, 0, sampler.item_counts)
    if getattr(loss, "mixed", False):
        drawn = torch.tensor([3, 9, 9, 17, 2, 31])
        monkeypatch.setattr(loss, "_uniform_items", lambda num_items, device, static: drawn)
    return loss


def random_batch(generator: torch.Generator, rows: int, width: int) -> dict[str, torch.Tensor]:
    """Right-padded training windows (inputs and next-item targets) of random lengths >= 2."""
    lengths = torch.randint(2, width + 2, (rows,), generator=generator)
    windows = torch.randint(1, NUM_ITEMS + 1, (rows, width + 1), generator=generator)
    windows = windows * (torch.arange(width + 1) < lengths[:, None])
    targets = windows[:, 1:]
    return {"input_ids": windows[:, :-1] * (targets != 0), "target_ids": targets}


def padded(batch: dict[str, torch.Tensor], rows: int, columns: int) -> dict[str, torch.Tensor]:
    batch = {key: torch.nn.functional.pad(value, (0, columns)) for key, value in batch.items()}
    return pad_rows(batch, batch["input_ids"].size(0) + rows)


def cloze_by_item(sequences, maskable=None):
    """BERT4Rec's positions to hide as a function of the items (not of random draws or of the batch
    shape): every third item value, and each row's last item."""
    real = sequences != 0
    last = real.size(1) - 1 - real.flip(1).int().argmax(dim=1)
    masked = (sequences % 3 == 0) & real
    masked[torch.arange(len(sequences)), last] = True
    return masked & real


def loss_and_gradients(model: SequentialRecommender, batch, static: bool):
    model.zero_grad()
    model.static_step = static
    loss = model.training_step(batch, 0)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def network_and_loss_cases():
    """Every loss with SASRec; each other network with a full and a sampled softmax (the networks
    differ in what they return, the losses in how they weigh it: the two meet in the module)."""
    for name, loss in losses():
        yield pytest.param(SASRec, name, loss, id=f"SASRec-{name}")
    for network_class in NETWORKS:
        for name, loss in losses():
            if network_class is not SASRec and name in ("ce token chunks", "mixed"):
                yield pytest.param(network_class, name, loss, id=f"{network_class.__name__}-{name}")


@pytest.mark.parametrize(("network_class", "name", "loss"), list(network_and_loss_cases()))
def test_the_padded_step_gives_the_loss_and_gradients_of_the_gathered_one(
    network_class, name, loss, monkeypatch
):
    # A seed per case that is the same in every process (str hashes are salted per process).
    generator = torch.Generator().manual_seed(zlib.crc32(f"{network_class.__name__} {name}".encode()))
    torch.manual_seed(0)
    network = network_class(DataInfo(NUM_ITEMS), max_len=12, dim=16, dropout=0.0)
    if network_class is BERT4Rec:
        monkeypatch.setattr(network, "cloze_mask", cloze_by_item)
    model = SequentialRecommender(network, loss=deterministic(loss, monkeypatch))
    for rows, width, extra_rows, extra_columns in ((3, 5, 2, 3), (1, 8, 4, 0), (6, 3, 0, 5)):
        batch = random_batch(generator, rows, width)
        model._targets_seen, model._batches_seen = 0, 0
        gathered, gathered_gradients = loss_and_gradients(model, batch, static=False)
        model._targets_seen, model._batches_seen = 0, 0
        masked, masked_gradients = loss_and_gradients(
            model, padded(batch, extra_rows, extra_columns), static=True
        )
        # The cross-entropy's value comes through a correction of log(items) per padding position,
        # subtracted from a float32 sum over all positions: a few float32 steps of that sum apart.
        torch.testing.assert_close(masked, gathered, rtol=2e-5, atol=2e-5)
        assert masked_gradients.keys() == gathered_gradients.keys()
        for key, gradient in gathered_gradients.items():
            torch.testing.assert_close(masked_gradients[key], gradient, rtol=1e-5, atol=1e-7, msg=key)


def test_hstu_time_bias_gives_the_same_padded_step():
    """The timestamps (input_times) are padded with the items: the time bias reads them alike."""
    generator = torch.Generator().manual_seed(3)
    torch.manual_seed(0)
    network = HSTU(DataInfo(NUM_ITEMS), max_len=12, dim=16, dropout=0.0, time_bias=True)
    with torch.no_grad():
        for block in network.blocks:
            block.time_bias.normal_()
    model = SequentialRecommender(network, loss=FullCrossEntropy(chunk_size=None))
    batch = random_batch(generator, 4, 6)
    gaps = torch.randint(0, 10**5, batch["input_ids"].shape, generator=generator)
    batch["input_times"] = gaps.cumsum(dim=1) * (batch["input_ids"] != 0)
    gathered, gathered_gradients = loss_and_gradients(model, batch, static=False)
    model._targets_seen, model._batches_seen = 0, 0
    masked, masked_gradients = loss_and_gradients(model, padded(batch, 3, 4), static=True)
    torch.testing.assert_close(masked, gathered, rtol=2e-5, atol=2e-5)
    assert gathered_gradients["network.blocks.0.time_bias"].abs().sum() > 0
    for key, gradient in gathered_gradients.items():
        torch.testing.assert_close(masked_gradients[key], gradient, rtol=1e-5, atol=1e-7, msg=key)


def test_the_static_batch_weights_follow_the_running_mean_of_targets():
    model = SequentialRecommender(
        SASRec(DataInfo(NUM_ITEMS), max_len=8, dim=8, dropout=0.0), FullCrossEntropy()
    )
    generator = torch.Generator().manual_seed(3)
    batches = [random_batch(generator, rows, 5) for rows in (2, 7, 4)]
    weights = {}
    for static in (False, True):
        model.static_step, model._targets_seen, model._batches_seen = static, 0, 0
        weights[static] = [float(model.training_step(padded(b, 3, 2) if static else b, 0)) for b in batches]
    np.testing.assert_allclose(weights[True], weights[False], rtol=1e-5)


def test_an_empty_row_hides_nothing_in_bert4rec():
    network = BERT4Rec(DataInfo(NUM_ITEMS), max_len=6, dim=8, mask_last=True, last_only_prob=0.5)
    sequences = torch.tensor([[3, 4, 5, 0], [0, 0, 0, 0]])
    for _ in range(20):
        masked = network.cloze_mask(sequences)
        assert not masked[1].any() and masked[0, 2]


@pytest.mark.parametrize(
    ("longest", "widest", "columns"),
    [
        (2, 51, 9),
        (9, 51, 9),
        (10, 51, 17),
        (33, 51, 33),
        (34, 51, 51),
        (51, 51, 51),
        (3, 5, 5),
        (130, 201, 201),
        (100, 201, 129),
    ],
)
def test_static_widths_are_powers_of_two_from_8_up_to_the_widest(longest, widest, columns):
    assert window_batch_width(longest, 1, widest, static=True) == columns


def test_static_batches_are_full_height_and_cover_the_same_targets(tmp_path):
    text = "".join(
        f"{u} " + " ".join(str((u * 5 + i) % 30 + 1) for i in range(3 + u % 17)) + "\n" for u in range(1, 41)
    )
    path = tmp_path / "seq.txt"
    path.write_text(text)
    targets = {}
    for static in (False, True):
        dm = SequenceDataModule(
            name="toy", path=str(path), format="sequence", batch_size=6, max_len=12,
            cache_dir=str(tmp_path / "cache"), seed=1, static_shapes=static,
        )  # fmt: skip
        batches = list(dm.train_dataloader())
        if static:
            assert {tuple(b["input_ids"].shape)[0] for b in batches} == {6}
            widths = {b["input_ids"].size(1) for b in batches}
            assert widths <= {MIN_STATIC_WIDTH, 12}
        targets[static] = sorted(int(t) for b in batches for t in b["target_ids"].flatten() if t != 0)
    assert targets[True] == targets[False]


def counting_backend(counter: list[int]):
    """A torch.compile backend that runs the captured graph as is and counts the captures."""

    def backend(graph_module, example_inputs):
        counter.append(1)
        return graph_module.forward

    return backend


@pytest.mark.skipif(hardware.compile_problem("cpu") is not None, reason="torch.compile cannot run here")
@pytest.mark.parametrize("network_class", [SASRec, BERT4Rec, HSTU])
def test_an_epoch_compiles_once_per_batch_shape_in_one_graph(tmp_path, network_class):
    torch._dynamo.reset()
    text = "".join(
        f"{u} " + " ".join(str((u * 3 + i) % 25 + 1) for i in range(2 + u % 23)) + "\n" for u in range(1, 61)
    )
    path = tmp_path / "seq.txt"
    path.write_text(text)
    dm = SequenceDataModule(
        name="toy", path=str(path), format="sequence", batch_size=8, max_len=20,
        cache_dir=str(tmp_path / "cache"), seed=2, static_shapes=True,
    )  # fmt: skip
    captures: list[int] = []
    model = SequentialRecommender(
        network_class(DataInfo(25), max_len=20, dim=16), FullCrossEntropy(), static_step=True
    )
    model.compile_step(backend=counting_backend(captures))  # fullgraph: a graph break fails
    shapes = set()
    for epoch in range(2):
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        for batch in loader:
            shapes.add(tuple(batch["input_ids"].shape))
            model.training_step(batch, 0).backward()
    assert len(shapes) >= 2
    assert len(captures) <= len(shapes)


@pytest.mark.skipif(hardware.compile_problem("cpu") is not None, reason="torch.compile cannot run here")
def test_the_compiled_step_equals_the_eager_one():
    # aot_eager: Dynamo's graphs and AOTAutograd's forward and backward, without code generation.
    torch._dynamo.reset()
    generator = torch.Generator().manual_seed(4)
    batch = padded(random_batch(generator, 5, 7), 3, 1)
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        network = SASRec(DataInfo(NUM_ITEMS), max_len=8, dim=16, dropout=0.0)
        model = SequentialRecommender(network, FullCrossEntropy(), static_step=True)
        if compiled:
            assert hardware.compile_training(model, True, "cpu", backend="aot_eager")
        results.append(loss_and_gradients(model, batch, static=True))
    (eager, eager_gradients), (compiled, compiled_gradients) = results
    torch.testing.assert_close(compiled, eager)
    for key, gradient in eager_gradients.items():
        torch.testing.assert_close(compiled_gradients[key], gradient, rtol=1e-5, atol=1e-7, msg=key)


def test_compile_settings_are_checked_before_the_data():
    hardware.check_compile(False, False)
    hardware.check_compile("reduce-overhead", True)
    with pytest.raises(UserInputError, match=r"^compile: reduce-overhead .*data.static_shapes=true"):
        hardware.check_compile("reduce-overhead", False)
    with pytest.raises(UserInputError, match=r"^compile: must be false, true or reduce-overhead, got 'max'"):
        hardware.check_compile("max", True)
    with pytest.raises(UserInputError, match=r"^data.static_shapes: must be true or false"):
        SequenceDataModule(name="toy", path="x", format="sequence", static_shapes="yes")


def test_a_loss_without_a_mask_is_refused_for_static_shapes():
    class NoMask(torch.nn.Module):
        def forward(self, hidden, targets, item_embeddings):
            return hidden.sum()

    network = SASRec(DataInfo(NUM_ITEMS), max_len=8, dim=8)
    SequentialRecommender(network, NoMask())  # the plain step needs no mask
    with pytest.raises(UserInputError, match=r"^data.static_shapes: the loss NoMask takes no mask="):
        SequentialRecommender(network, NoMask(), static_step=True)
