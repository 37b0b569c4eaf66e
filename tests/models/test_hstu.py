"""HSTU (recsys/models/hstu.py): its attention against the plain reference, every loss, the
chunked ranking, and a tiny end-to-end run. Causality and padding: tests/models/test_models.py."""

import json

import pytest
import torch

from recsys.errors import UserInputError
from recsys.losses import BinaryCrossEntropy, FullCrossEntropy, GeneralisedBinaryCrossEntropy, SampledSoftmax
from recsys.models.hstu import (
    HSTU,
    NUM_TIME_BUCKETS,
    pointwise_attention,
    pointwise_attention_reference,
    time_buckets,
)
from recsys.models.network import DataInfo
from tests.builders import module
from tests.models.test_models import right_padded


def test_pointwise_attention_equals_the_reference_over_random_shapes():
    generator = torch.Generator().manual_seed(0)
    for _ in range(25):
        b, h, length, a, e = (int(torch.randint(1, n, (1,), generator=generator)) for n in (4, 4, 12, 9, 9))
        q, k = (torch.randn(b, h, length, a, generator=generator) for _ in range(2))
        v = torch.randn(b, h, length, e, generator=generator)
        # The position bias alone (H, L, L), or with a time bias, one per row (B, H, L, L).
        for bias in (torch.randn(h, length, length, generator=generator), torch.randn(b, h, length, length)):
            torch.testing.assert_close(
                pointwise_attention(q, k, v, bias, 0.1), pointwise_attention_reference(q, k, v, bias, 0.1)
            )


def test_relative_bias_depends_on_distance_only():
    model = HSTU(DataInfo(10), max_len=6, dim=8, num_blocks=1)
    block = model.blocks[0]
    with torch.no_grad():
        block.position_bias.copy_(torch.arange(12, dtype=torch.float).view(2, 6))
    bias = block.relative_bias(4)
    assert bias.shape == (2, 4, 4)
    assert bias[1, 3, 1] == bias[1, 2, 0] == 6 + 2  # head 1, two positions back
    assert bias[0, 2, 2] == 0  # itself


def test_time_buckets_are_log2_of_the_time_between_positions():
    times = torch.tensor([[0, 1, 3, 86_400, 2**62]])
    buckets = time_buckets(times)
    assert buckets.shape == (1, 5, 5)
    assert buckets[0, 1, 0] == 1  # log2(1 + 1)
    assert buckets[0, 2, 0] == 2 and buckets[0, 2, 1] == 1  # log2(1 + 3), log2(1 + 2) floored
    assert buckets[0, 3, 0] == 16  # a day in seconds
    assert buckets[0, 4, 0] == 62 and buckets.max() < NUM_TIME_BUCKETS
    assert (buckets.diagonal(dim1=1, dim2=2) == 0).all()  # itself
    assert buckets[0, 0, 4] == 0  # a later key (masked by causality anyway)


def time_bias_model() -> HSTU:
    torch.manual_seed(0)
    model = HSTU(DataInfo(20), max_len=6, dim=8, time_bias=True).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.time_bias.normal_()
    return model


def test_time_bias_reads_the_time_between_events_not_the_date():
    model = time_bias_model()
    items = right_padded([[1, 2, 3, 4], [5, 6]], 4)
    times = right_padded([[10, 20, 400, 5000], [7, 7_000_000]], 4)
    with torch.no_grad():
        hidden = model(items, times=times)
        # Every time shifted by the same amount (later dates, same gaps): the same outputs.
        torch.testing.assert_close(model(items, times=(times + 123_456) * (items != 0)), hidden)
        # Other gaps: other outputs after the first event.
        other = model(items, times=times * 1000)
    real = items != 0
    assert not torch.allclose(other[real][1:], hidden[real][1:])
    with pytest.raises(UserInputError, match="model.time_bias"):
        model(items)


@pytest.mark.filterwarnings("ignore:You are trying to")
@pytest.mark.parametrize(
    "loss",
    [
        FullCrossEntropy(),
        SampledSoftmax(num_negatives=5, item_counts=torch.ones(21)),
        BinaryCrossEntropy(num_negatives=2),
        GeneralisedBinaryCrossEntropy(num_negatives=5),
    ],
    ids=["ce", "sampled_softmax", "bce", "gbce"],
)
def test_hstu_trains_with_every_loss(loss):
    torch.manual_seed(0)
    model = module(HSTU(DataInfo(20), max_len=6, dim=8), loss=loss)
    batch = {
        "input_ids": right_padded([[1, 2, 3, 4, 5], [6, 7]], 6),
        "target_ids": right_padded([[2, 3, 4, 5, 6], [7, 9]], 6),
    }
    value = model.training_step(batch, 0)
    value.backward()
    assert torch.isfinite(value)
    for block in model.network.blocks:  # the relative position bias and the gate learn
        assert block.position_bias.grad.abs().sum() > 0
        assert block.uvqk.weight.grad.abs().sum() > 0


@pytest.mark.filterwarnings("ignore:You are trying to")
def test_hstu_time_bias_learns_from_the_batch_times():
    torch.manual_seed(0)
    model = module(HSTU(DataInfo(20), max_len=6, dim=8, time_bias=True))
    batch = {
        "input_ids": right_padded([[1, 2, 3, 4, 5], [6, 7]], 6),
        "target_ids": right_padded([[2, 3, 4, 5, 6], [7, 9]], 6),
        "input_times": right_padded([[0, 5, 90, 3000, 3001], [100, 10**7]], 6),
    }
    model.training_step(batch, 0).backward()
    for block in model.network.blocks:
        assert block.time_bias.grad.abs().sum() > 0


def test_chunked_ranking_equals_the_full_scores():
    torch.manual_seed(0)
    network = HSTU(DataInfo(40), max_len=8, dim=16).eval()
    recommender = module(network)
    recommender.ranking_chunk_size = 7  # several chunks
    history = right_padded([[1, 2, 3], [7], [5, 6, 7, 8, 9, 10]], 8)
    target = torch.tensor([5, 9, 11])
    with torch.no_grad():
        ranks = recommender._rank({"history": history, "target": target, "exclude": history}, None)[0]
        scores = network.score(history)
    excluded = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, history, True)
    excluded[:, 0] = True
    better = (scores >= scores.gather(1, target[:, None])) & ~excluded
    torch.testing.assert_close(ranks, better.sum(dim=1))  # pessimistic ties: the target counts itself


def test_train_py_trains_hstu_on_tiny_data(tmp_path):
    """With the time bias: the batches carry the (synthetic data's) timestamps, in training and
    in evaluation."""
    from tests.test_entrypoints import train_tiny

    metrics, losses = train_tiny(
        tmp_path,
        tmp_path / "run",
        "model=hstu",
        "model.time_bias=true",
        "data=synthetic",
        "model.dim=32",
        epochs=3,
    )
    assert losses[-1] < losses[0]
    # The synthetic data's hidden item cycle: chance is about 0.06 NDCG@10 over 50 items.
    assert metrics["test/ndcg@10"] > 0.2
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["epochs"] == 3


def test_serving_and_export_refuse_a_model_that_reads_timestamps():
    from recsys.serving.export import TopKScorer

    with pytest.raises(UserInputError, match="export: this HSTU reads event types, time gaps or timestamps"):
        TopKScorer(HSTU(DataInfo(30), max_len=8, dim=16, time_bias=True), k=5)
