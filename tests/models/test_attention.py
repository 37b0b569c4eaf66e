import pytest
import torch

from recsys.models.sasrec import SASRec
from recsys.models.transformer import SelfAttention, reference_attention


def right_padded_batch(lengths, num_items=30, width=None, seed=0):
    generator = torch.Generator().manual_seed(seed)
    width = width or max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        ids[row, :length] = torch.randint(1, num_items + 1, (length,), generator=generator)
    return ids


@pytest.mark.parametrize("heads", [1, 2])
def test_fused_attention_matches_reference(heads):
    torch.manual_seed(0)
    attention = SelfAttention(dim=16, num_heads=heads, dropout=0.0).eval()
    x = torch.randn(3, 7, 16)
    q, k, v = attention.qkv(x).view(3, 7, 3, heads, 16 // heads).permute(2, 0, 3, 1, 4)
    expected = reference_attention(q, k, v, is_causal=True)
    expected = attention.proj(expected.transpose(1, 2).reshape(3, 7, 16))
    torch.testing.assert_close(attention(x, is_causal=True), expected, rtol=1e-5, atol=1e-6)

    mask = torch.tensor([[True] * 7, [True] * 3 + [False] * 4, [True] + [False] * 6])
    expected = reference_attention(q, k, v, key_padding_mask=mask)
    expected = attention.proj(expected.transpose(1, 2).reshape(3, 7, 16))
    got = attention(x, is_causal=False, key_padding_mask=mask)
    # Real queries match the reference; padding queries' outputs are never used.
    torch.testing.assert_close(got[mask], expected[mask], rtol=1e-5, atol=1e-6)
    assert not got.isnan().any()


def test_bidirectional_attention_has_no_nan_for_an_all_padding_row():
    torch.manual_seed(0)
    attention = SelfAttention(dim=8, num_heads=2, dropout=0.0).eval()
    x = torch.randn(2, 5, 8, requires_grad=True)
    mask = torch.tensor([[False] * 5, [True, True, False, False, False]])
    out = attention(x, is_causal=False, key_padding_mask=mask)
    out.sum().backward()
    assert not out.isnan().any() and not x.grad.isnan().any()


def test_reference_attention_gives_zeros_not_nan_for_fully_masked_rows():
    q = torch.randn(2, 1, 4, 8)
    out = reference_attention(q, q, q, key_padding_mask=torch.tensor([[False] * 4, [True] * 4]))
    assert not out.isnan().any()
    assert out[0].abs().sum() == 0


@pytest.mark.parametrize("pre_norm,positions_from_end", [(True, False), (False, False), (True, True)])
def test_causal_right_padding_needs_no_mask(pre_norm, positions_from_end):
    """Real positions of a right-padded batch equal the same sequences run one by one, unpadded."""
    torch.manual_seed(0)
    model = SASRec(
        num_items=30,
        max_len=12,
        dim=16,
        num_blocks=2,
        num_heads=2,
        pre_norm=pre_norm,
        positions_from_end=positions_from_end,
    ).eval()
    lengths = [12, 5, 1, 8]
    batch = right_padded_batch(lengths)
    with torch.no_grad():
        padded = model(batch)
        assert not padded.isnan().any()
        for row, length in enumerate(lengths):
            alone = model(batch[row : row + 1, :length])
            torch.testing.assert_close(padded[row, :length], alone[0], rtol=1e-5, atol=1e-5)


def test_sasrec_score_uses_last_real_position():
    torch.manual_seed(0)
    model = SASRec(num_items=30, max_len=12, dim=16, num_blocks=1).eval()
    batch = right_padded_batch([4, 9], width=12)
    with torch.no_grad():
        scores = model.score(batch)
        hidden = model(batch)
    assert scores.shape == (2, 31)
    torch.testing.assert_close(scores[0], hidden[0, 3] @ model.item_embedding.weight.T)
    torch.testing.assert_close(scores[1], hidden[1, 8] @ model.item_embedding.weight.T)


def test_sasrec_score_keeps_the_most_recent_items_of_long_histories():
    torch.manual_seed(0)
    model = SASRec(num_items=30, max_len=5, dim=16, num_blocks=1).eval()
    long = right_padded_batch([9], width=11)
    with torch.no_grad():
        torch.testing.assert_close(model.score(long), model.score(long[:, 4:9]))
