"""recsys.serving.export: the TorchScript and ONNX scorers give the Lightning model's top-K; files and errors."""

import json

import numpy as np
import pytest
import torch

from recsys.data.item_features import ItemFeatures
from recsys.errors import UserInputError
from recsys.evaluation.metrics import top_k_items
from recsys.models.bert4rec import BERT4Rec
from recsys.models.gru4rec import GRU4Rec
from recsys.models.hstu import HSTU
from recsys.models.network import DataInfo
from recsys.models.popular import MostPopular
from recsys.models.sasrec import SASRec
from recsys.serving.export import (
    DEFAULT_WIDTH,
    TopKScorer,
    export_model,
    export_onnx,
    export_torchscript,
    write_item_mapping,
)

onnxruntime = pytest.importorskip("onnxruntime")

NUM_ITEMS, MAX_LEN, K = 50, 8, 5

MODELS = {
    "sasrec": lambda: SASRec(DataInfo(NUM_ITEMS), max_len=MAX_LEN, dim=16),
    "sasrec_from_end": lambda: SASRec(DataInfo(NUM_ITEMS), max_len=MAX_LEN, dim=16, positions_from_end=True),
    "bert4rec": lambda: BERT4Rec(DataInfo(NUM_ITEMS), max_len=MAX_LEN, dim=16),
    "gru4rec": lambda: GRU4Rec(DataInfo(NUM_ITEMS), max_len=MAX_LEN, dim=16),
    "hstu": lambda: HSTU(DataInfo(NUM_ITEMS), max_len=MAX_LEN, dim=16),
    "sasrec_attributes": lambda: SASRec(
        DataInfo(NUM_ITEMS, item_features=attributes()), max_len=MAX_LEN, dim=16
    ),
    "sasrec_attributes_only": lambda: SASRec(
        DataInfo(NUM_ITEMS, item_features=attributes()), max_len=MAX_LEN, dim=16, item_id=False
    ),
    "bert4rec_attributes": lambda: BERT4Rec(
        DataInfo(NUM_ITEMS, item_features=attributes()), max_len=MAX_LEN, dim=16
    ),
    "popular": lambda: MostPopular(DataInfo(NUM_ITEMS, train_item_counts=torch.arange(NUM_ITEMS + 1))),
}


def attributes() -> ItemFeatures:
    """Two to four of 12 attributes per item, item 7 none (data.item_features)."""
    rng = np.random.default_rng(0)
    rows = [[]] + [sorted(rng.choice(12, rng.integers(2, 5), replace=False) + 1) for _ in range(NUM_ITEMS)]
    rows[7] = []
    return ItemFeatures(
        offsets=np.cumsum([0] + [len(r) for r in rows]).astype(np.int64),
        values=np.array([v for r in rows for v in r], dtype=np.int32),
        vocabulary=np.array([""] + [f"attribute={i}" for i in range(1, 13)]),
        extra_item_ids=np.array([], dtype=str),
        num_items=NUM_ITEMS,
    )


def make_model(name: str):
    torch.manual_seed(0)
    model = MODELS[name]()
    # init_std 0.02 makes the scores tiny; larger random weights spread them out, so no two items
    # tie and the top-K lists must agree exactly.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    return model.eval()


def random_histories(batch: int, width: int, seed: int = 1, lengths=None) -> torch.Tensor:
    """Right-padded rows of different lengths: 1, the full width, empty and in between."""
    generator = torch.Generator().manual_seed(seed)
    items = torch.randint(1, NUM_ITEMS + 1, (batch, width), generator=generator)
    if lengths is None:
        lengths = torch.randint(1, width + 1, (batch,), generator=generator)
        lengths[:3] = torch.tensor([1, width, 0])[:batch]
    lengths = torch.as_tensor(lengths)
    return items * (torch.arange(width)[None, :] < lengths[:, None])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """{model name: (model, scorer, TorchScript module, ONNX Runtime session)}, exported once."""
    out = {}
    for name in MODELS:
        model = make_model(name)
        paths = export_model(model, K, tmp_path_factory.mktemp(name))
        scorer = TopKScorer(model, K)
        session = onnxruntime.InferenceSession(str(paths["onnx"]), providers=["CPUExecutionProvider"])
        out[name] = (model, scorer, torch.jit.load(str(paths["torchscript"])), session)
    return out


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("batch", [1, 7, 64])
def test_exported_top_k_equals_the_lightning_models(exported, name, batch):
    model, scorer, traced, session = exported[name]
    history = random_histories(batch, scorer.width, seed=batch)
    with torch.no_grad():
        reference = top_k_items(model.score(history), history, K)
        scores, items = scorer(history)
        traced_scores, traced_items = traced(history)
    onnx_scores, onnx_items = session.run(["scores", "items"], {"history": history.numpy()})

    assert items.dtype == torch.int64 and scores.dtype == torch.float32
    assert items.shape == (batch, K) and onnx_items.shape == (batch, K)
    assert torch.equal(items, reference)
    assert torch.equal(traced_items, reference)
    assert np.array_equal(onnx_items, reference.numpy())
    torch.testing.assert_close(traced_scores, scores, atol=1e-4, rtol=0)
    np.testing.assert_allclose(onnx_scores, scores.numpy(), atol=1e-4, rtol=0)
    # The scores are the model's own, and seen items and padding never come back.
    with torch.no_grad():
        torch.testing.assert_close(scores, model.score(history).float().gather(1, items), atol=1e-4, rtol=0)
    assert not (items == 0).any()
    assert not (items[:, :, None] == history[:, None, :]).any()


def test_scorer_width_is_the_models_max_len_or_the_default():
    assert TopKScorer(make_model("sasrec"), K).width == MAX_LEN
    assert TopKScorer(make_model("popular"), K).width == DEFAULT_WIDTH


def test_bert4rec_mask_position_follows_each_rows_length(exported):
    """The traced [MASK] goes after each row's own last item, whatever lengths the trace saw."""
    model, scorer, traced, session = exported["bert4rec"]
    history = random_histories(MAX_LEN + 1, MAX_LEN, lengths=torch.arange(MAX_LEN + 1))
    with torch.no_grad():
        expected = model.user_vectors(history)
        for row in range(history.size(0)):  # one row at a time: no other row's length involved
            torch.testing.assert_close(model.user_vectors(history[row : row + 1])[0], expected[row])
        reference = top_k_items(model.score(history), history, K)
        assert torch.equal(traced(history)[1], reference)
    assert np.array_equal(session.run(["items"], {"history": history.numpy()})[0], reference.numpy())


def test_wider_input_than_max_len_keeps_the_last_items(tmp_path):
    """width > max_len: the model sees each row's last max_len items, all `width` are excluded."""
    model = make_model("sasrec")
    scorer = TopKScorer(model, K, width=MAX_LEN + 4)
    traced_path = export_torchscript(scorer, tmp_path / "model.ts")
    onnx_path = export_onnx(scorer, tmp_path / "model.onnx")
    history = random_histories(9, MAX_LEN + 4, seed=3)
    with torch.no_grad():
        reference = top_k_items(model.score(history), history, K)
        assert torch.equal(scorer(history)[1], reference)
        assert torch.equal(torch.jit.load(str(traced_path))(history)[1], reference)
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    assert np.array_equal(session.run(["items"], {"history": history.numpy()})[0], reference.numpy())


def test_export_model_writes_the_files_and_the_item_mapping(tmp_path):
    model = make_model("popular")
    item_ids = np.array([-1, *range(1000, 1000 + NUM_ITEMS)])
    paths = export_model(model, K, tmp_path / "out", item_ids=item_ids)
    assert paths == {
        "torchscript": tmp_path / "out" / "model.ts",
        "onnx": tmp_path / "out" / "model.onnx",
        "item_ids": tmp_path / "out" / "item_ids.json",
    }
    assert all(path.is_file() for path in paths.values())
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["item_ids.json", "model.onnx", "model.ts"]
    mapping = json.loads(paths["item_ids"].read_text())
    assert mapping == [None, *range(1000, 1000 + NUM_ITEMS)]
    # Most popular: the K largest counts, i.e. the last items, mapped to their original ids.
    _, items = torch.jit.load(str(paths["torchscript"]))(torch.zeros(1, DEFAULT_WIDTH, dtype=torch.long))
    assert [mapping[i] for i in items[0].tolist()] == [1000 + NUM_ITEMS - 1 - j for j in range(K)]


def test_saved_torchscript_carries_no_autograd_and_leaves_the_model_trainable(tmp_path):
    model = make_model("sasrec")
    path = export_model(model, K, tmp_path, formats=["torchscript"])["torchscript"]
    scores, _ = torch.jit.load(str(path))(random_histories(3, MAX_LEN))
    assert not scores.requires_grad
    assert all(parameter.requires_grad for parameter in model.parameters())


def test_item_mapping_keeps_string_ids(tmp_path):
    path = write_item_mapping(np.array(["", "B00X", "é-1"]), tmp_path / "ids.json")
    assert json.loads(path.read_text(encoding="utf-8")) == [None, "B00X", "é-1"]


def test_existing_files_are_not_overwritten_unless_asked(tmp_path):
    model = make_model("gru4rec")
    (tmp_path / "model.onnx").write_text("keep me")
    with pytest.raises(UserInputError, match=r"model\.onnx exists"):
        export_model(model, K, tmp_path, item_ids=list(range(NUM_ITEMS + 1)))
    # Refused before anything was written.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
    assert (tmp_path / "model.onnx").read_text() == "keep me"
    scorer = TopKScorer(model, K)
    with pytest.raises(UserInputError, match="exists; pass overwrite=True"):
        export_onnx(scorer, tmp_path / "model.onnx")
    (tmp_path / "ids.json").write_text("[]")
    with pytest.raises(UserInputError, match=r"ids\.json exists"):
        write_item_mapping([0, 1], tmp_path / "ids.json")

    paths = export_model(model, K, tmp_path, formats=["onnx"], overwrite=True)
    assert set(paths) == {"onnx"}
    assert (tmp_path / "model.onnx").read_bytes() != b"keep me"
    # No temporary files left beside the outputs.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ids.json", "model.onnx"]


def test_unknown_format_and_bad_arguments_are_user_errors(tmp_path):
    model = make_model("sasrec")
    with pytest.raises(UserInputError, match=r"export: 'xyz' is not one of \['torchscript', 'onnx'\]"):
        export_model(model, K, tmp_path, formats=["onnx", "xyz"])
    with pytest.raises(UserInputError, match="k must lie in 1..50"):
        export_model(model, 0, tmp_path)
    with pytest.raises(UserInputError, match="expected 51"):
        export_model(model, K, tmp_path, item_ids=[1, 2, 3])
    assert list(tmp_path.iterdir()) == []


def test_models_that_do_not_score_by_dot_product_are_refused():
    class ScoresOnly(MostPopular):
        scores_by_dot_product = False  # declared: it overrides score instead

        def score(self, history):
            return self.item_counts.expand(history.size(0), -1)

    with pytest.raises(UserInputError, match="export: ScoresOnly does not score items by dot product"):
        TopKScorer(ScoresOnly(DataInfo(NUM_ITEMS)), K)
