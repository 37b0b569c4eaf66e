"""The one training module: evaluation settings reach the ranking."""

import pytest
import torch

from recsys.errors import UserInputError
from recsys.models.network import DataInfo
from recsys.models.sasrec import SASRec
from recsys.training import evaluation_steps as module_file
from tests.builders import module


def ranks_with_chunk(monkeypatch, chunk):
    seen = []
    real = module_file.chunked_ranking

    def spy(*args):
        seen.append(args[-1])  # the chunk size, passed last
        return real(*args)

    monkeypatch.setattr(module_file, "chunked_ranking", spy)
    torch.manual_seed(0)
    model = module(SASRec(DataInfo(50), max_len=6, dim=8)).eval()
    model.configure_evaluation(item_chunk_size=chunk)
    history = torch.tensor([[1, 2, 3, 0], [4, 5, 6, 7]])
    batch = {"history": history, "target": torch.tensor([9, 10]), "exclude": history}
    with torch.no_grad():
        ranks = model._rank(batch, None)[0]
    return ranks, seen


def test_evaluation_item_chunk_size_is_the_ranking_chunk(monkeypatch):
    small, seen = ranks_with_chunk(monkeypatch, 7)
    assert seen == [7]
    whole, seen = ranks_with_chunk(monkeypatch, None)
    assert seen == [module_file.DEFAULT_ITEM_CHUNK_SIZE]
    torch.testing.assert_close(small, whole)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_a_bad_item_chunk_size_names_the_key(bad):
    model = module(SASRec(DataInfo(50), max_len=6, dim=8))
    with pytest.raises(UserInputError, match=r"^evaluation.item_chunk_size: must be an integer >= 1"):
        model.configure_evaluation(item_chunk_size=bad)
