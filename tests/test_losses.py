import math

import pytest
import torch
import torch.nn.functional as F

from recsys.errors import UserInputError
from recsys.losses import (
    BinaryCrossEntropy,
    FullCrossEntropy,
    GeneralisedBinaryCrossEntropy,
    NegativeSampler,
    SampledSoftmax,
    check_catalogue,
    uniform_negatives,
)
from recsys.losses.sampled import _logits_from_every_score, _logits_from_gathered_vectors


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


@pytest.mark.parametrize("item_chunk", [1, 7, 39, 40])
def test_item_chunked_cross_entropy_equals_plain(item_chunk):
    torch.manual_seed(item_chunk)
    hidden = torch.randn(23, 16, requires_grad=True)
    table = torch.randn(41, 16, requires_grad=True)
    targets = torch.randint(1, 41, (23,))
    targets[:3] = torch.tensor([1, 40, item_chunk])  # first, last and a chunk's edge
    reference = F.cross_entropy(hidden @ table[1:].T, targets - 1)
    ref_grads = torch.autograd.grad(reference, (hidden, table))
    value = FullCrossEntropy(item_chunk_size=item_chunk)(hidden, targets, table)
    grads = torch.autograd.grad(value, (hidden, table))
    assert value.item() == pytest.approx(reference.item(), rel=1e-5)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_large_tables_switch_to_item_chunks(monkeypatch):
    import recsys.losses.cross_entropy as losses

    calls = []
    original = losses._ItemChunkedCrossEntropy.apply
    monkeypatch.setattr(
        losses._ItemChunkedCrossEntropy, "apply", lambda *a: calls.append(a[3]) or original(*a)
    )
    hidden, table, targets = torch.randn(10, 4), torch.randn(31, 4), torch.randint(1, 31, (10,))
    FullCrossEntropy()(hidden, targets, table)
    assert calls == []  # 10 x 30 logits fit the budget: the fast path
    monkeypatch.setattr(losses, "LOGITS_BUDGET_BYTES", 4 * 10 * 8)
    FullCrossEntropy()(hidden, targets, table)
    assert calls == [8]  # 8 items per chunk keep 10 x 8 float32 logits


@pytest.mark.parametrize("size,message", [(0, "must be >= 1"), (41, "larger than the catalogue")])
def test_item_chunk_size_is_checked(size, message):
    with pytest.raises(UserInputError, match=f"loss.item_chunk_size: .*{message}"):
        check_catalogue(FullCrossEntropy(item_chunk_size=size), 40)


def test_plain_cross_entropy_ignores_padding_class():
    hidden = torch.zeros(2, 4)
    table = torch.randn(6, 4)
    # Equal logits over the 5 real items: loss is log 5, not log 6.
    assert FullCrossEntropy(chunk_size=None)(hidden, torch.tensor([1, 5]), table).item() == pytest.approx(
        torch.log(torch.tensor(5.0)).item()
    )


def test_bce_negatives_never_hit_the_positive_and_cover_the_rest():
    num_items = 5
    targets = torch.full((20000,), 3)
    negatives = uniform_negatives(targets, num_items, 1)
    assert not (negatives == 3).any()
    counts = torch.bincount(negatives.flatten(), minlength=num_items + 1)
    assert counts[0] == 0 and counts[3] == 0
    assert (counts[[1, 2, 4, 5]] > 4500).all()  # ~5000 each: uniform over the other items


def small_problem(tokens=12, items=20, dim=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, dim, generator=generator, requires_grad=True)
    table = torch.randn(items + 1, dim, generator=generator, requires_grad=True)
    targets = torch.randint(1, items + 1, (tokens,), generator=generator)
    return hidden, table, targets


def assert_same_value_and_grads(value, reference, inputs):
    grads = torch.autograd.grad(value, inputs)
    ref_grads = torch.autograd.grad(reference, inputs)
    assert value.item() == pytest.approx(reference.item(), rel=1e-5)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def reference_negatives(seed, targets, num_items, num_negatives, distribution="uniform", counts=None):
    """The negatives a loss with `seed` draws on its first call."""
    return NegativeSampler(distribution, seed, counts)(targets, num_items, num_negatives)


@pytest.mark.parametrize("num_negatives", [1, 3])
@pytest.mark.parametrize("t", [None, 0.0, 0.5, 1.0])
def test_bce_and_gbce_match_a_plain_computation(num_negatives, t):
    hidden, table, targets = small_problem()
    if t is None:
        loss_fn, beta = BinaryCrossEntropy(num_negatives, seed=7), 1.0
    else:
        loss_fn = GeneralisedBinaryCrossEntropy(num_negatives, t=t, seed=7, logit_bias=False)
        alpha = num_negatives / 19  # 20 items: 19 candidates besides the positive
        beta = alpha * (t * (1 - 1 / alpha) + 1 / alpha)
    negatives = reference_negatives(7, targets, 20, num_negatives)
    pos = (hidden * table[targets]).sum(-1)
    neg = (hidden[:, None, :] * table[negatives]).sum(-1)
    # -log(sigmoid(pos) ** beta) - sum log(1 - sigmoid(neg)), written with probabilities
    reference = (-(torch.sigmoid(pos) ** beta).log() - (1 - torch.sigmoid(neg)).log().sum(-1)).mean()
    assert_same_value_and_grads(loss_fn(hidden, targets, table), reference, (hidden, table))


@pytest.mark.parametrize("seed", range(6))
def test_both_routes_to_sampled_logits_agree_over_random_shapes(seed):
    """Scoring every item and gathering the negatives' vectors: the same logits and gradients
    (with padding targets and repeated negatives), whichever route the catalogue's size picks."""
    generator = torch.Generator().manual_seed(seed)
    tokens, items, dim, num_negatives = (
        int(torch.randint(lo, hi, (1,), generator=generator))
        for lo, hi in ((1, 40), (2, 300), (1, 33), (1, 20))
    )
    hidden = torch.randn(tokens, dim, generator=generator, requires_grad=True)
    table = torch.randn(items + 1, dim, generator=generator, requires_grad=True)
    targets = torch.randint(0, items + 1, (tokens,), generator=generator)
    negatives = torch.randint(1, items + 1, (tokens, num_negatives), generator=generator)
    weights = torch.randn(tokens, num_negatives + 1, generator=generator)
    results = []
    for route in (_logits_from_every_score, _logits_from_gathered_vectors):
        positive, negative = route(hidden, targets, table, negatives)
        value = (torch.cat([positive[:, None], negative], 1) * weights).sum()
        results.append((value, *torch.autograd.grad(value, (hidden, table))))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_gbce_beta_is_one_at_t_zero_and_alpha_at_t_one():
    assert GeneralisedBinaryCrossEntropy(4, t=0.0).positive_weight(21) == pytest.approx(1.0)
    assert GeneralisedBinaryCrossEntropy(4, t=1.0).positive_weight(21) == pytest.approx(0.2)


# 20 items: the loss scores every item (21 rows <= 5 negatives x dim 8); 60: it gathers the negatives.
@pytest.mark.parametrize("items", [20, 60])
@pytest.mark.parametrize("logq", [False, True])
@pytest.mark.parametrize("distribution", ["uniform", "popularity"])
def test_sampled_softmax_matches_a_plain_computation(distribution, logq, items):
    hidden, table, targets = small_problem(items=items)
    counts = torch.arange(items + 1) * 3
    loss_fn = SampledSoftmax(5, sampler=distribution, logq_correction=logq, seed=3, item_counts=counts)
    negatives = reference_negatives(3, targets, items, 5, distribution, counts)
    pos = (hidden * table[targets]).sum(-1)
    neg = (hidden[:, None, :] * table[negatives]).sum(-1)
    if logq:
        if distribution == "uniform":
            q = torch.full(negatives.shape, 1 / items)
        else:
            q = (counts[negatives] + 1.0) / (counts[1:] + 1.0).sum()
        neg = neg - (5 * q).log()
    logits = torch.cat([pos[:, None], neg], dim=1)
    reference = (torch.logsumexp(logits, dim=1) - pos).mean()
    assert_same_value_and_grads(loss_fn(hidden, targets, table), reference, (hidden, table))


@pytest.mark.parametrize("logq", [False, True])
def test_in_batch_softmax_matches_a_plain_computation(logq):
    hidden, table, targets = small_problem(tokens=15, items=6)  # repeated targets in the batch
    counts = torch.tensor([0, 5, 1, 9, 2, 7, 3])
    loss_fn = SampledSoftmax(sampler="in_batch", logq_correction=logq, item_counts=counts)
    candidates = sorted(set(targets.tolist()))
    q = (counts.float() + 1) / (counts[1:].float() + 1).sum()
    terms = []
    for row in range(len(targets)):
        logits = torch.stack([hidden[row] @ table[c] - (q[c].log() if logq else 0) for c in candidates])
        positive = logits[candidates.index(int(targets[row]))]
        terms.append(torch.logsumexp(logits, 0) - positive)
    reference = torch.stack(terms).mean()
    assert_same_value_and_grads(loss_fn(hidden, targets, table), reference, (hidden, table))


@pytest.mark.parametrize("logq", [False, True])
def test_mixed_negatives_match_a_plain_computation(logq):
    hidden, table, targets = small_problem(tokens=15, items=6)
    counts = torch.tensor([0, 5, 1, 9, 2, 7, 3])
    loss_fn = SampledSoftmax(
        num_negatives=4, sampler="mixed", logq_correction=logq, seed=3, item_counts=counts
    )
    # The uniform part: 4 draws for the batch from the loss's own seeded generator.
    drawn = torch.randint(1, 7, (4,), generator=torch.Generator().manual_seed(3)).tolist()
    candidates = sorted(set(targets.tolist()))
    q = (counts.float() + 1) / (counts[1:].float() + 1).sum()
    terms = []
    for row in range(len(targets)):
        target = int(targets[row])
        # In-batch candidates less the log of their expected count among the batch's 15 targets.
        in_batch = [hidden[row] @ table[c] - ((15 * q[c]).log() if logq else 0) for c in candidates]
        # A uniform draw equal to the token's positive is left out; the others count, repeats too.
        uniform = [hidden[row] @ table[d] - (math.log(4 / 6) if logq else 0) for d in drawn if d != target]
        logits = torch.stack(in_batch + uniform)
        terms.append(torch.logsumexp(logits, 0) - in_batch[candidates.index(target)])
    reference = torch.stack(terms).mean()
    assert_same_value_and_grads(loss_fn(hidden, targets, table), reference, (hidden, table))
    assert any(d in targets.tolist() for d in drawn)  # the masking above was exercised


def test_popularity_negatives_never_hit_the_positive_and_follow_the_counts():
    counts = torch.tensor([0, 1000, 10, 10, 100, 0])  # the target is by far the most popular item
    targets = torch.full((4000,), 1)
    negatives = NegativeSampler("popularity", 0, counts)(targets, 5, 5)
    assert not (negatives == 1).any() and not (negatives == 0).any()
    frequency = torch.bincount(negatives.flatten(), minlength=6).float() / negatives.numel()
    # q without the positive: (counts + 1) over items 2..5 = 11, 11, 101, 1 of 124
    expected = torch.tensor([0, 0, 11, 11, 101, 1]) / 124
    torch.testing.assert_close(frequency, expected, atol=0.01, rtol=0)


def test_samplers_are_seeded():
    targets = torch.randint(1, 50, (100,))
    first = NegativeSampler("uniform", 1)(targets, 50, 4)
    assert torch.equal(first, NegativeSampler("uniform", 1)(targets, 50, 4))
    assert not torch.equal(first, NegativeSampler("uniform", 2)(targets, 50, 4))
    # The loss's draws do not depend on the global random state.
    hidden, table, targets = small_problem()
    torch.manual_seed(0)
    a = BinaryCrossEntropy(2, seed=5)(hidden, targets, table)
    torch.manual_seed(1)
    b = BinaryCrossEntropy(2, seed=5)(hidden, targets, table)
    assert a.item() == b.item()


def test_bad_loss_options_are_user_errors():
    with pytest.raises(UserInputError, match="loss.num_negatives"):
        BinaryCrossEntropy(0)
    with pytest.raises(UserInputError, match="loss.t"):
        GeneralisedBinaryCrossEntropy(4, t=1.5)
    with pytest.raises(UserInputError, match="loss.sampler.*'in_batch'"):
        SampledSoftmax(4, sampler="zipf")
    hidden, table, targets = small_problem()
    with pytest.raises(UserInputError, match="loss.item_counts"):
        SampledSoftmax(4, sampler="popularity")(hidden, targets, table)  # no counts given


def test_more_negatives_than_the_catalogue_is_a_user_error():
    check_catalogue(SampledSoftmax(19), num_items=20)
    check_catalogue(SampledSoftmax(500, sampler="in_batch"), num_items=20)  # num_negatives unused
    with pytest.raises(UserInputError, match="loss.num_negatives: 20 negatives.*only 20 items"):
        check_catalogue(GeneralisedBinaryCrossEntropy(20), num_items=20)


def test_logit_bias_starts_at_the_best_constant_score_and_is_learned():
    hidden, table, targets = small_problem()
    loss_fn = GeneralisedBinaryCrossEntropy(4, t=0.5, seed=7)  # logit_bias on by default for gBCE
    beta = loss_fn.positive_weight(20)
    shift = torch.log(torch.tensor(beta / 4))
    negatives = reference_negatives(7, targets, 20, 4)
    pos = (hidden * table[targets]).sum(-1) + shift
    neg = (hidden[:, None, :] * table[negatives]).sum(-1) + shift
    reference = (-beta * F.logsigmoid(pos) - F.logsigmoid(-neg).sum(-1)).mean()
    value = loss_fn(hidden, targets, table)
    assert value.item() == pytest.approx(reference.item(), rel=1e-5)
    value.backward()
    assert loss_fn.logit_bias.grad is not None and loss_fn.logit_bias.grad.abs() > 0
    # All scores equal: the shift is where the loss is flat in a common offset (beta s(-b) = N s(b)).
    b = shift.item()
    assert beta * torch.sigmoid(torch.tensor(-b)).item() == pytest.approx(
        4 * torch.sigmoid(torch.tensor(b)).item()
    )
    assert BinaryCrossEntropy(1).logit_bias is None  # the original SASRec loss has none


def plain_full_softmax(hidden, targets, table):
    """mean_t [log sum_j exp(h_t . w_j) - h_t . w_{y_t}] over the real items j = 1..N, in float64,
    the logsumexp written out."""
    logits = hidden.double() @ table[1:].double().T
    peak = logits.max(dim=1, keepdim=True).values
    logsumexp = peak[:, 0] + (logits - peak).exp().sum(dim=1).log()
    return (logsumexp - logits[torch.arange(len(targets)), targets - 1]).mean()


def random_loss_case(seed):
    """Random tokens, items, dims and chunk sizes (some dividing the sizes, most not); targets
    that include the first and the last item."""
    generator = torch.Generator().manual_seed(seed)

    def draw(low, high):
        return int(torch.randint(low, high + 1, (), generator=generator))

    tokens, items, dim = draw(1, 150), draw(1, 120), draw(1, 24)
    hidden = torch.randn(tokens, dim, generator=generator).requires_grad_()
    table = (torch.randn(items + 1, dim, generator=generator) * 0.7).requires_grad_()
    targets = torch.randint(1, items + 1, (tokens,), generator=generator)
    targets[0] = items
    targets[-1] = 1
    chunk = draw(1, tokens + 3) if seed % 3 else max(1, tokens // max(1, draw(1, 4)))
    item_chunk = draw(1, items) if seed % 4 else max(1, items // max(1, draw(1, 4)))
    return hidden, table, targets, chunk, item_chunk


@pytest.mark.parametrize("path", ["plain", "token_chunks", "item_chunks"])
def test_every_cross_entropy_path_equals_a_plain_full_softmax_over_random_shapes(path):
    """30 random cases per path: value and both gradients (through an upstream gradient other than
    1) against the float64 reference; the padding row never gets a gradient."""
    for seed in range(30):
        hidden, table, targets, chunk, item_chunk = random_loss_case(seed)
        loss = {
            "plain": FullCrossEntropy(chunk_size=None),
            "token_chunks": FullCrossEntropy(chunk_size=chunk),
            "item_chunks": FullCrossEntropy(item_chunk_size=item_chunk),
        }[path]
        value = loss(hidden, targets, table)
        reference = plain_full_softmax(hidden, targets, table)
        assert value.dtype == torch.float32
        assert value.item() == pytest.approx(reference.item(), rel=1e-5, abs=1e-6), seed
        grads = torch.autograd.grad(2.5 * value, (hidden, table))
        want = torch.autograd.grad(2.5 * reference, (hidden, table))
        for got, expected in zip(grads, want):
            torch.testing.assert_close(got, expected.float(), rtol=1e-4, atol=1e-5, msg=f"seed {seed}")
        assert grads[1][0].abs().sum() == 0, seed


@pytest.mark.parametrize("options", [{"chunk_size": 7}, {"chunk_size": 1000}, {"item_chunk_size": 9}])
@pytest.mark.parametrize("hidden_dtype", [torch.float32, torch.bfloat16])
def test_chunked_cross_entropy_computes_in_float32_under_cpu_bf16_autocast(options, hidden_dtype):
    """Under a bf16 autocast the token- and item-chunked losses give the float32 loss of the same
    operands (the hidden states as a bf16 autocast model hands them over, or float32), with
    float32 gradients cast to each input's dtype; bf16 logits would be off by ~1e-3."""
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(50, 32, generator=generator).to(hidden_dtype).requires_grad_()
    table = torch.randn(201, 32, generator=generator).requires_grad_()
    targets = torch.randint(1, 201, (50,), generator=generator)
    loss = FullCrossEntropy(**options)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = loss(hidden, targets, table)
        grads = torch.autograd.grad(value, (hidden, table))
    assert value.dtype == torch.float32
    assert grads[0].dtype == hidden_dtype and grads[1].dtype == torch.float32
    exact = hidden.detach().float().requires_grad_()
    reference = plain_full_softmax(exact, targets, table)
    want = torch.autograd.grad(reference, (exact, table))
    assert value.item() == pytest.approx(reference.item(), rel=1e-6)
    torch.testing.assert_close(grads[0].float(), want[0].to(hidden_dtype).float(), rtol=1e-2, atol=1e-5)
    torch.testing.assert_close(grads[1], want[1].float(), rtol=1e-4, atol=1e-6)
    # The same call without autocast: the same float32 computation.
    assert value.item() == pytest.approx(loss(hidden, targets, table).item(), rel=1e-6)


@pytest.mark.parametrize(
    "make",
    [
        lambda: FullCrossEntropy(chunk_size=None),
        lambda: SampledSoftmax(20, seed=1),
        lambda: SampledSoftmax(sampler="in_batch", item_counts=torch.arange(201)),
        lambda: SampledSoftmax(16, sampler="mixed", seed=1, item_counts=torch.arange(201)),
        lambda: BinaryCrossEntropy(3, seed=1),
    ],
    ids=["ce_unchunked", "sampled_softmax", "in_batch", "mixed", "bce"],
)
def test_every_pytorch_loss_computes_logits_in_float32_under_cpu_bf16_autocast(make):
    generator = torch.Generator().manual_seed(0)
    hidden, table = torch.randn(50, 32, generator=generator), torch.randn(201, 32, generator=generator)
    targets = torch.randint(1, 201, (50,), generator=generator)
    reference = make()(hidden, targets, table)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = make()(hidden, targets, table)  # the same seed: the same negatives
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(reference.item(), rel=1e-6)
