"""HSTU (recsys/models/hstu.py): its attention against the plain reference, every loss, the
chunked ranking, and a tiny end-to-end run. Causality and padding: tests/models/test_models.py."""

import json

import pytest
import torch

from recsys.losses import BinaryCrossEntropy, FullCrossEntropy, GeneralisedBinaryCrossEntropy, SampledSoftmax
from recsys.models.hstu import HSTU, pointwise_attention, pointwise_attention_reference
from recsys.models.network import DataInfo
from tests.builders import module
from tests.models.test_models import right_padded


def test_pointwise_attention_equals_the_reference_over_random_shapes():
    generator = torch.Generator().manual_seed(0)
    for _ in range(25):
        b, h, length, a, e = (int(torch.randint(1, n, (1,), generator=generator)) for n in (4, 4, 12, 9, 9))
        q, k = (torch.randn(b, h, length, a, generator=generator) for _ in range(2))
        v = torch.randn(b, h, length, e, generator=generator)
        bias = torch.randn(h, length, length, generator=generator)
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
    from tests.test_entrypoints import train_tiny

    metrics, losses = train_tiny(
        tmp_path, tmp_path / "run", "model=hstu", "data=synthetic", "model.dim=32", epochs=3
    )
    assert losses[-1] < losses[0]
    # The synthetic data's hidden item cycle: chance is about 0.06 NDCG@10 over 50 items.
    assert metrics["test/ndcg@10"] > 0.2
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["epochs"] == 3
