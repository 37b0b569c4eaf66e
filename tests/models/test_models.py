"""Behaviour of the models beyond attention: masking, causality, padding, options."""

import pytest
import torch

from recsys.data.features import NUM_GAP_BUCKETS
from recsys.errors import UserInputError
from recsys.losses import BinaryCrossEntropy, FullCrossEntropy
from recsys.models.bert4rec import BERT4Rec
from recsys.models.gru4rec import GRU4Rec
from recsys.models.hstu import HSTU
from recsys.models.network import DataInfo, flat_positions, target_positions
from recsys.models.popular import MostPopular
from recsys.models.sasrec import SASRec
from recsys.models.transformer import LiGRBlock, TransformerBlock
from recsys.training.module import check_loss
from tests.builders import module


def right_padded(rows, width):
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, : len(row)] = torch.tensor(row)
    return ids


def test_cloze_mask_statistics():
    torch.manual_seed(0)
    model = BERT4Rec(DataInfo(100), max_len=50, dim=16, mask_prob=0.3)
    lengths = torch.randint(1, 51, (2000,))
    sequences = right_padded([list(range(1, n + 1)) for n in lengths.tolist()], 50)
    masked = model.cloze_mask(sequences)
    real = sequences != 0
    assert not (masked & ~real).any()  # padding is never masked
    assert masked.any(dim=1).all()  # every row has something to predict
    # Beyond the forced one per row, the rate is mask_prob.
    rate = masked[lengths > 20].sum() / real[lengths > 20].sum()
    assert rate.item() == pytest.approx(0.3, abs=0.01)


def test_mask_last_always_hides_the_last_item():
    torch.manual_seed(0)
    model = BERT4Rec(DataInfo(30), max_len=10, dim=16, mask_prob=0.1, mask_last=True)
    sequences = right_padded([[1, 2, 3], [4, 5, 6, 7, 8, 9], [10]], 10)
    masked = model.cloze_mask(sequences)
    assert masked[0, 2] and masked[1, 5] and masked[2, 0]


def test_last_only_rows_hide_only_their_last_item():
    torch.manual_seed(0)
    model = BERT4Rec(DataInfo(100), max_len=20, dim=16, mask_prob=0.5, mask_last=True, last_only_prob=0.3)
    lengths = torch.randint(2, 21, (4000,))
    sequences = right_padded([list(range(1, n + 1)) for n in lengths.tolist()], 20)
    masked = model.cloze_mask(sequences)
    rows = torch.arange(len(lengths))
    assert masked[rows, lengths - 1].all()  # the last item, always
    only = masked.sum(dim=1) == 1
    # Cloze rows of 10+ items almost never hide one item only (0.5 ** 9), so single-hidden long
    # rows are the last-only ones: their share is last_only_prob.
    long = lengths >= 10
    assert only[long].float().mean().item() == pytest.approx(0.3, abs=0.03)
    # The others hide half of their context, as before.
    cloze = long & ~only
    context = (masked[cloze].sum() - cloze.sum()) / (lengths[cloze] - 1).sum()
    assert context.item() == pytest.approx(0.5, abs=0.02)


def test_bert4rec_is_bidirectional_and_scores_the_appended_mask():
    torch.manual_seed(0)
    model = BERT4Rec(DataInfo(30), max_len=8, dim=16).eval()
    a = right_padded([[1, 2, 3, 4]], 6)
    b = right_padded([[1, 2, 3, 5]], 6)
    # A later item changes an earlier position's output: attention looks both ways.
    assert not torch.allclose(model(a)[0, 0], model(b)[0, 0])
    scores = model.score(right_padded([[1, 2, 3], [7]], 8))
    assert scores.shape == (2, 31)  # padding + 30 items; [MASK] is not a candidate
    assert not scores.isnan().any()
    # Extra padding columns and longer-than-max_len histories are handled.
    torch.testing.assert_close(model.score(right_padded([[1, 2, 3]], 3)), scores[:1])
    long = right_padded([list(range(1, 21))], 20)
    torch.testing.assert_close(model.score(long), model.score(right_padded([list(range(13, 21))], 8)))


@pytest.mark.filterwarnings("ignore:You are trying to")
@pytest.mark.parametrize("model_class", [SASRec, GRU4Rec])
def test_batches_weigh_by_their_target_count(model_class):
    short = {"input_ids": right_padded([[1], [3]], 1), "target_ids": right_padded([[2], [4]], 1)}
    long = {
        "input_ids": right_padded([list(range(1, 8)), list(range(8, 15))], 7),
        "target_ids": right_padded([list(range(2, 9)), list(range(9, 16))], 7),
    }
    losses = {}
    for weighted in (True, False):
        torch.manual_seed(0)
        network = model_class(DataInfo(20), max_len=8, dim=8, dropout=0.0)
        model = module(network, weight_batches_by_targets=weighted)
        losses[weighted] = [model.training_step(short, 0), model.training_step(long, 1)]
    # 2 then 14 targets: the first batch is its own mean; the second weighs 14 / mean(2, 14).
    torch.testing.assert_close(losses[True][0], losses[False][0])
    torch.testing.assert_close(losses[True][1], losses[False][1] * 14 / 8)


def test_flat_positions_select_what_the_mask_selects():
    torch.manual_seed(0)
    values = torch.randn(5, 7, 3)
    for mask in (
        torch.rand(5, 7) < 0.4,
        torch.zeros(5, 7, dtype=torch.bool),
        torch.ones(5, 7, dtype=torch.bool),
    ):
        index = flat_positions(mask)
        assert len(index) == int(mask.sum())
        torch.testing.assert_close(values.flatten(0, 1)[index], values[mask])


@pytest.mark.filterwarnings("ignore:You are trying to")
@pytest.mark.parametrize("model_class", [SASRec, GRU4Rec])
def test_training_loss_covers_exactly_the_positions_with_a_next_item(model_class):
    torch.manual_seed(0)
    model = module(model_class(DataInfo(20), max_len=6, dim=8, dropout=0.0), weight_batches_by_targets=False)
    batch = {
        "input_ids": right_padded([[1, 2, 3, 4, 5], [6, 7], [8]], 6),
        "target_ids": right_padded([[2, 3, 4, 5, 6], [7, 9], [10]], 6),
    }
    loss = model.training_step(batch, 0)
    has_target = target_positions(batch)
    hidden = model.network(batch["input_ids"])
    expected = model.loss(
        hidden[has_target], batch["target_ids"][has_target], model.network.item_embedding.weight
    )
    torch.testing.assert_close(loss, expected)


@pytest.mark.filterwarnings("ignore:You are trying to")
def test_bert4rec_training_step_uses_every_window_item():
    torch.manual_seed(0)
    model = module(BERT4Rec(DataInfo(30), max_len=4, dim=16, mask_prob=0.5))
    batch = {
        "input_ids": right_padded([[1, 2, 3, 4], [5, 6]], 4),
        "target_ids": right_padded([[2, 3, 4, 9], [6, 7]], 4),
    }
    loss = model.training_step(batch, 0)
    loss.backward()
    assert torch.isfinite(loss)
    # Item 1 is only the window's first item (in input_ids, not in target_ids): it is still seen.
    assert model.network.item_embedding.weight.grad[1].abs().sum() > 0


@pytest.mark.filterwarnings("ignore:You are trying to")
def test_bert4rec_output_head_options():
    torch.manual_seed(0)
    plain = BERT4Rec(DataInfo(30), max_len=8, dim=16)
    torch.manual_seed(0)
    headed = BERT4Rec(DataInfo(30), max_len=8, dim=16, head_transform=True, item_bias=True)
    # The head is built last: every weight the plain model has starts the same.
    for name, value in plain.state_dict().items():
        torch.testing.assert_close(headed.state_dict()[name], value)
    headed.eval()
    with torch.no_grad():
        headed.item_bias.copy_(torch.linspace(-1.0, 1.0, 31))
    history = right_padded([[1, 2, 3], [7]], 8)
    # Scores are head(h) . e + b, through score() and through the chunked ranking alike.
    h = headed.head_transform(headed(right_padded([[1, 2, 3, 31], [7, 31]], 8))[[0, 1], [3, 1]])
    expected = h @ headed.item_embedding.weight[:31].T + headed.item_bias
    torch.testing.assert_close(headed.score(history), expected)
    target = torch.tensor([5, 9])
    ranks, _ = module(headed)._rank({"history": history, "target": target, "exclude": history}, None)[:2]
    excluded = torch.zeros_like(expected, dtype=torch.bool).scatter_(1, history, True)
    excluded[:, 0] = True
    better = (expected > expected.gather(1, target[:, None])) & ~excluded
    torch.testing.assert_close(ranks, better.sum(dim=1) + 1)
    # Training reaches the head and the offsets.
    headed.train()
    batch = {"input_ids": right_padded([[1, 2, 3, 4]], 4), "target_ids": right_padded([[2, 3, 4, 9]], 4)}
    module(headed).training_step(batch, 0).backward()
    assert headed.item_bias.grad.abs().sum() > 0
    assert headed.head_transform[0].weight.grad.abs().sum() > 0


def test_bert4rec_positions_from_end():
    # Without blocks, the [MASK]'s vector is its embedding plus its position's: counted from the
    # end, that position is the same for every history length; counted from the start, it is not.
    short, long = right_padded([[1, 2, 3]], 8), right_padded([[4, 5, 6, 1, 2, 3]], 8)
    for from_end in (True, False):
        torch.manual_seed(0)
        model = BERT4Rec(DataInfo(30), max_len=8, dim=16, num_blocks=0, positions_from_end=from_end).eval()
        same = torch.allclose(model.user_vectors(short), model.user_vectors(long))
        assert same == from_end
    # Training windows count the same way: the last item is at position 0.
    torch.manual_seed(0)
    model = BERT4Rec(DataInfo(30), max_len=8, dim=16, num_blocks=0, positions_from_end=True).eval()
    mask = model.mask_id
    torch.testing.assert_close(
        model(right_padded([[7, mask]], 4))[0, 1], model(right_padded([[1, 2, mask]], 4))[0, 2]
    )


# Every causal network, with and without event-type / time-gap inputs: (name, constructor).
CAUSAL_MODELS = {
    "sasrec": lambda: SASRec(DataInfo(30), max_len=8, dim=16),
    "sasrec_events": lambda: SASRec(
        DataInfo(30, num_event_types=3), max_len=8, dim=16, event_embedding=True, time_gaps=True
    ),
    "sasrec_ligr": lambda: SASRec(DataInfo(30), max_len=8, dim=16, block="ligr"),
    "gru4rec": lambda: GRU4Rec(DataInfo(30), max_len=8, dim=16),
    "hstu": lambda: HSTU(DataInfo(30), max_len=8, dim=16),
    "hstu_events": lambda: HSTU(
        DataInfo(30, num_event_types=3), max_len=8, dim=16, event_embedding=True, time_gaps=True
    ),
    "hstu_time_bias": lambda: _with_random_time_bias(HSTU(DataInfo(30), max_len=8, dim=16, time_bias=True)),
}


def _with_random_time_bias(model: HSTU) -> HSTU:
    """The time bias starts at zero, where it could not show a look ahead: make it matter."""
    with torch.no_grad():
        for block in model.blocks:
            block.time_bias.normal_()
    return model


def random_history(generator, batch, width):
    """Right-padded random items (B, width) with lengths 1..width, and matching event types, gap
    buckets and non-decreasing timestamps (0 at padding)."""
    lengths = torch.randint(1, width + 1, (batch,), generator=generator)
    real = torch.arange(width)[None, :] < lengths[:, None]
    items = torch.randint(1, 31, (batch, width), generator=generator) * real
    events = torch.randint(1, 4, (batch, width), generator=generator) * real
    gaps = torch.randint(1, NUM_GAP_BUCKETS, (batch, width), generator=generator) * real
    times = torch.randint(0, 10**6, (batch, width), generator=generator).cumsum(dim=1) * real
    return items, {"events": events, "gaps": gaps, "times": times}, lengths


def position_inputs(model, features: dict) -> dict:
    """The per-position inputs `model` reads, of those `random_history` made."""
    keys = (("events", "gaps") if model.reads_events else ()) + (("times",) if model.reads_times else ())
    return {key: features[key] for key in keys}


@pytest.mark.parametrize("name", list(CAUSAL_MODELS))
def test_no_causal_model_looks_ahead_or_reads_padding(name):
    """Changing the items (and event inputs and timestamps) after position t never changes the
    output at t, and extra right padding never changes a real position's output; over random shapes."""
    torch.manual_seed(0)
    model = CAUSAL_MODELS[name]().eval()
    generator = torch.Generator().manual_seed(1)
    for _ in range(20):
        batch, width = (
            int(torch.randint(1, 5, (1,), generator=generator)),
            int(torch.randint(2, 9, (1,), generator=generator)),
        )
        items, features, lengths = random_history(generator, batch, width)
        inputs = position_inputs(model, features)
        t = int(torch.randint(0, width - 1, (1,), generator=generator))
        later = torch.arange(width)[None, :] > t
        real = items != 0
        changed = torch.where(later & real, torch.randint(1, 31, items.shape, generator=generator), items)
        _, other, _ = random_history(generator, batch, width)
        other["times"] = features["times"] + other["times"]  # later events later still
        changed_inputs = {key: torch.where(later & real, other[key], x) for key, x in inputs.items()}
        with torch.no_grad():
            before = model(items, **inputs)
            after = model(changed, **changed_inputs)
            torch.testing.assert_close(before[:, : t + 1], after[:, : t + 1])
            padded = (
                model(
                    torch.nn.functional.pad(items, (0, 3)),
                    **{key: torch.nn.functional.pad(x, (0, 3)) for key, x in inputs.items()},
                )
                if width + 3 <= 8
                else None
            )
        if padded is not None:
            torch.testing.assert_close(padded[:, :width][real], before[real])
    history = right_padded([[1, 2, 3]], 3)
    scores = model.score(history, **position_inputs(model, random_history(generator, 1, 3)[1]))
    assert scores.shape == (1, 31)


def test_bert4rec_never_reads_padding():
    # BERT4Rec's own contract: a masked position sees both sides (test above), padding never.
    torch.manual_seed(0)
    model = BERT4Rec(DataInfo(30), max_len=8, dim=16).eval()
    generator = torch.Generator().manual_seed(2)
    for _ in range(20):
        items, _, _ = random_history(generator, 3, 5)
        real = items != 0
        with torch.no_grad():
            before = model(items)
            padded = model(torch.nn.functional.pad(items, (0, 3)))
        torch.testing.assert_close(padded[:, :5][real], before[real])


def test_most_popular_ranks_by_training_counts():
    model = MostPopular(DataInfo(4, train_item_counts=torch.tensor([0, 5, 9, 1, 9])))
    scores = model.score(torch.zeros(2, 3, dtype=torch.long))
    assert scores.shape == (2, 5)
    assert scores[0].argmax() != 0 and scores[0, 0] < scores[0, 3]  # padding below every item
    assert scores[0, 2] == scores[0, 4] > scores[0, 1] > scores[0, 3]
    with pytest.raises(UserInputError, match="cannot use a loss"):
        check_loss(MostPopular, FullCrossEntropy())


def test_ligr_blocks_gate_each_update_and_train():
    torch.manual_seed(0)
    plain = SASRec(DataInfo(20), max_len=6, dim=8)
    torch.manual_seed(0)
    ligr = SASRec(DataInfo(20), max_len=6, dim=8, block="ligr", dropout=0.0)
    assert isinstance(ligr.blocks[0], LiGRBlock) and isinstance(plain.blocks[0], TransformerBlock)
    block = ligr.blocks[0].eval()
    x = torch.randn(2, 5, 8)
    # With the gates' biases driven to -inf, the block passes its input through unchanged.
    with torch.no_grad():
        block.attn_gate.bias.fill_(-1e4)
        block.ffn_gate.bias.fill_(-1e4)
    torch.testing.assert_close(block(x, is_causal=True), x)
    batch = {"input_ids": right_padded([[1, 2, 3, 4]], 6), "target_ids": right_padded([[2, 3, 4, 5]], 6)}
    model = module(SASRec(DataInfo(20), max_len=6, dim=8, block="ligr"), weight_batches_by_targets=False)
    model.training_step(batch, 0).backward()
    assert model.network.blocks[0].ffn_gate.weight.grad.abs().sum() > 0
    assert model.network.blocks[0].ffn.gate.weight.grad.abs().sum() > 0


def test_bad_model_options_are_user_errors():
    with pytest.raises(UserInputError, match=r"model.block: 'ligr2' is not one of \['transformer', 'ligr'\]"):
        SASRec.check_options({"block": "ligr2"})
    for p in (0.0, 1.0, 1.5):
        with pytest.raises(UserInputError, match="model.mask_prob"):
            BERT4Rec.check_options({"mask_prob": p})
    with pytest.raises(UserInputError, match="model.last_only_prob"):
        BERT4Rec.check_options({"mask_prob": 0.2, "last_only_prob": 1.5})
    with pytest.raises(UserInputError, match="loss: SASRec is trained with a loss"):
        check_loss(SASRec, None)
    with pytest.raises(UserInputError, match="loss.num_negatives"):
        module(GRU4Rec(DataInfo(5)), ks=(1, 5), loss=BinaryCrossEntropy(num_negatives=5))
