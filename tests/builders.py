"""Building models in tests: a network inside the one training module."""

from recsys.losses import FullCrossEntropy
from recsys.training.module import SequentialRecommender


def module(network, loss=None, **options) -> SequentialRecommender:
    """The training module around `network`; a trainable network gets the full softmax loss unless
    `loss` says otherwise (train.py always passes the configured one)."""
    if loss is None and network.trainable:
        loss = FullCrossEntropy()
    return SequentialRecommender(network, loss=loss, **options)
