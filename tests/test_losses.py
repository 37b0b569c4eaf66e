import pytest
import torch
import torch.nn.functional as F

from recsys.losses import BinaryCrossEntropy, FullCrossEntropy, uniform_negatives


@pytest.mark.parametrize("tokens,chunk", [(1, 4), (37, 8), (64, 64), (100, 1000)])
def test_chunked_cross_entropy_equals_plain(tokens, chunk):
    torch.manual_seed(tokens)
    hidden = torch.randn(tokens, 16, requires_grad=True)
    table = torch.randn(41, 16, requires_grad=True)
    targets = torch.randint(1, 41, (tokens,))
    reference = F.cross_entropy(hidden @ table[1:].T, targets - 1)
    ref_grads = torch.autograd.grad(reference, (hidden, table))
    value = FullCrossEntropy(chunk_size=chunk)(hidden, targets, table)
    grads = torch.autograd.grad(value, (hidden, table))
    assert value.item() == pytest.approx(reference.item(), rel=1e-5)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert grads[1][0].abs().sum() == 0  # padding row gets no gradient


def test_plain_cross_entropy_ignores_padding_class():
    hidden = torch.zeros(2, 4)
    table = torch.randn(6, 4)
    # Equal logits over the 5 real items: loss is log 5, not log 6.
    assert FullCrossEntropy(chunk_size=None)(hidden, torch.tensor([1, 5]), table).item() == pytest.approx(
        torch.log(torch.tensor(5.0)).item()
    )


def test_bce_matches_reference_with_fixed_negatives():
    torch.manual_seed(0)
    hidden = torch.randn(10, 8)
    table = torch.randn(21, 8)
    targets = torch.randint(1, 21, (10,))
    loss_fn = BinaryCrossEntropy(num_negatives=3)
    torch.manual_seed(1)
    value = loss_fn(hidden, targets, table)
    torch.manual_seed(1)
    negatives = uniform_negatives(targets, 20, 3)
    pos = (hidden * table[targets]).sum(-1)
    neg = (hidden[:, None, :] * table[negatives]).sum(-1)
    expected = (-F.logsigmoid(pos) - F.logsigmoid(-neg).sum(-1)).mean()
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)


def test_bce_negatives_never_hit_the_positive_and_cover_the_rest():
    num_items = 5
    targets = torch.full((20000,), 3)
    negatives = uniform_negatives(targets, num_items, 1)
    assert not (negatives == 3).any()
    counts = torch.bincount(negatives.flatten(), minlength=num_items + 1)
    assert counts[0] == 0 and counts[3] == 0
    assert (counts[[1, 2, 4, 5]] > 4500).all()  # ~5000 each: uniform over the other items
