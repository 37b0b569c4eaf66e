import pytest
import torch

from recsys.models.network import DataInfo
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
        DataInfo(30),
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
    model = SASRec(DataInfo(30), max_len=12, dim=16, num_blocks=1).eval()
    batch = right_padded_batch([4, 9], width=12)
    with torch.no_grad():
        scores = model.score(batch)
        hidden = model(batch)
    assert scores.shape == (2, 31)
    torch.testing.assert_close(scores[0], hidden[0, 3] @ model.item_embedding.weight.T)
    torch.testing.assert_close(scores[1], hidden[1, 8] @ model.item_embedding.weight.T)


def test_sasrec_score_keeps_the_most_recent_items_of_long_histories():
    torch.manual_seed(0)
    model = SASRec(DataInfo(30), max_len=5, dim=16, num_blocks=1).eval()
    long = right_padded_batch([9], width=11)
    with torch.no_grad():
        torch.testing.assert_close(model.score(long), model.score(long[:, 4:9]))


def plain_attention(q, k, v, is_causal, key_padding_mask=None):
    """softmax(q k^T / sqrt(d) + masks) v, written out in float64 with matrix products: the keys a
    query may not see get weight 0, the rest exp(logit - max) normalised by their sum.
    q, k, v: (B, H, L, d); key_padding_mask: (B, L), True = a real key."""
    q, k, v = q.double(), k.double(), v.double()
    length = q.size(2)
    logits = q @ k.transpose(-2, -1) / q.size(-1) ** 0.5
    allowed = torch.ones(length, length, dtype=torch.bool)
    if is_causal:
        allowed = torch.arange(length)[None, :] <= torch.arange(length)[:, None]
    allowed = allowed.expand(logits.shape)
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, None, :]
    peak = logits.masked_fill(~allowed, -1e300).amax(dim=-1, keepdim=True)
    weights = torch.where(allowed, (logits - peak).exp(), 0.0)
    return weights / weights.sum(dim=-1, keepdim=True).clamp_min(1e-300) @ v


def random_attention_case(seed):
    """A SelfAttention with random heads and head size, a batch of random size and width, and
    right-padded rows of random lengths (at least one; some rows full)."""
    generator = torch.Generator().manual_seed(seed)

    def draw(low, high):  # an int in [low, high]
        return int(torch.randint(low, high + 1, (), generator=generator))

    heads, head_dim = draw(1, 4), draw(1, 6)
    batch, width = draw(1, 5), draw(1, 9)
    torch.manual_seed(seed)
    attention = SelfAttention(dim=heads * head_dim, num_heads=heads, dropout=0.3).eval()
    x = torch.randn(batch, width, heads * head_dim, generator=generator)
    lengths = torch.randint(1, width + 1, (batch,), generator=generator)
    lengths[draw(0, batch - 1)] = width
    real = torch.arange(width)[None, :] < lengths[:, None]
    return attention, x, real


@pytest.mark.parametrize("is_causal", [True, False])
def test_sdpa_attention_equals_a_plain_reference_over_random_shapes(is_causal):
    """40 random cases each: SASRec's path (is_causal, no mask, right padding) and BERT4Rec's
    (bidirectional, key-padding mask) against the written-out softmax, values and gradients, at
    every real position. Causal attention on right-padded rows needs no mask: the reference
    masks the padding keys too and must agree."""
    for seed in range(40):
        attention, x, real = random_attention_case(seed)
        batch, width, dim = x.shape
        heads = attention.num_heads
        x = x.requires_grad_()
        mask = None if is_causal else real
        got = attention(x, is_causal=is_causal, key_padding_mask=mask)
        q, k, v = attention.qkv(x).view(batch, width, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
        expected = plain_attention(q, k, v, is_causal, key_padding_mask=real)
        expected = attention.proj(expected.transpose(1, 2).reshape(batch, width, dim).float())
        assert not got.isnan().any(), seed
        torch.testing.assert_close(got[real], expected[real], rtol=1e-5, atol=1e-6, msg=f"seed {seed}")
        weights = torch.randn(got.shape, generator=torch.Generator().manual_seed(seed)) * real[..., None]
        (grad,) = torch.autograd.grad((got * weights).sum(), x)
        (want,) = torch.autograd.grad((expected * weights).sum(), x)
        assert not grad.isnan().any(), seed
        torch.testing.assert_close(grad, want, rtol=1e-4, atol=1e-5, msg=f"seed {seed}")
