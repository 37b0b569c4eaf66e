"""Item vectors made of ids and attributes (data.item_features; recsys/models/item_attributes.py)."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from recsys.data.item_features import ItemFeatures
from recsys.errors import UserInputError
from recsys.models.attribute_knn import AttributeKNN
from recsys.models.bert4rec import BERT4Rec
from recsys.models.gru4rec import GRU4Rec
from recsys.models.network import DataInfo
from recsys.models.sasrec import SASRec
from recsys.serving.recommend import Recommender
from tests.builders import module
from tests.checks import Untouched, assert_user_error
from tests.test_entrypoints import common, run, train_overrides, train_tiny

NUM_ITEMS = 6
# Attributes of items 1..6 (0 is padding): items 2 and 5 share theirs, item 6 has none.
ATTRIBUTES = [[], [1, 2], [3], [1, 4], [2], [3], []]


def features() -> ItemFeatures:
    counts = [len(a) for a in ATTRIBUTES]
    return ItemFeatures(
        offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        values=np.array([v for a in ATTRIBUTES for v in a], dtype=np.int32),
        vocabulary=np.array(["", "brand=a", "brand=b", "category=x", "category=y"]),
        extra_item_ids=np.array([], dtype=str),
        num_items=NUM_ITEMS,
        stats={},
    )


def data(with_features: bool = True) -> DataInfo:
    return DataInfo(num_items=NUM_ITEMS, item_features=features() if with_features else None)


NETWORKS = [
    (SASRec, {"max_len": 5, "dim": 8}),
    (BERT4Rec, {"max_len": 5, "dim": 8, "num_heads": 2}),
    (GRU4Rec, {"max_len": 5, "dim": 8}),
]


@pytest.mark.parametrize(("network", "options"), NETWORKS)
def test_without_attributes_the_model_is_the_id_only_model(network, options):
    torch.manual_seed(0)
    plain = network(data(False), **options).state_dict()
    torch.manual_seed(0)
    switched_off = network(data(True), item_features=False, **options).state_dict()
    assert switched_off.keys() == plain.keys()
    assert all(torch.equal(switched_off[k], plain[k]) for k in plain)
    torch.manual_seed(0)
    with_attributes = network(data(True), **options).state_dict()
    # The attribute table comes last: every other weight starts where it did.
    assert all(torch.equal(with_attributes[k], plain[k]) for k in plain)
    assert any(k.startswith("item_attributes.") for k in with_attributes)


@pytest.mark.parametrize(("network", "options"), NETWORKS)
def test_an_item_vector_is_its_id_plus_the_mean_of_its_attributes(network, options):
    model = network(data(), **options)
    table = model.item_attributes.embedding.weight
    ids = model.item_embedding.weight
    vectors = model.item_vectors()
    assert vectors.shape[0] == NUM_ITEMS + 1
    for item, attributes in enumerate(ATTRIBUTES):
        pooled = table[attributes].mean(dim=0) if attributes else torch.zeros(table.size(1))
        assert torch.allclose(vectors[item, : table.size(1)], ids[item] + pooled, atol=1e-6)


@pytest.mark.parametrize(("network", "options"), NETWORKS)
def test_an_item_no_training_event_reached_is_its_attributes_alone(network, options):
    # Items 2 and 5 never occur in training: their id embeddings are only their initialisation.
    counts = torch.tensor([0, 4, 0, 1, 2, 0, 3])
    model = network(DataInfo(NUM_ITEMS, train_item_counts=counts, item_features=features()), **options)
    table, ids = model.item_attributes.embedding.weight, model.item_embedding.weight
    vectors = model.item_vectors()
    for item, attributes in enumerate(ATTRIBUTES):
        pooled = table[attributes].mean(dim=0) if attributes else torch.zeros(table.size(1))
        expected = pooled if counts[item] == 0 else ids[item] + pooled
        assert torch.allclose(vectors[item, : table.size(1)], expected, atol=1e-6), item
    # Items 2 and 5 share their attributes: the same vector, as a new item with them would get.
    assert torch.equal(vectors[2], vectors[5])


def test_id_dropout_leaves_out_a_share_of_the_ids_in_training_only():
    torch.manual_seed(0)
    many = 2000
    rows = [[]] + [[1 + i % 4] for i in range(many)]
    wide = ItemFeatures(
        offsets=np.cumsum([0] + [len(r) for r in rows]).astype(np.int64),
        values=np.array([v for r in rows for v in r], dtype=np.int32),
        vocabulary=np.array(["", "a", "b", "c", "d"]),
        extra_item_ids=np.array([], dtype=str),
        num_items=many,
        stats={},
    )
    model = SASRec(DataInfo(many, item_features=wide), max_len=5, dim=8, id_dropout=0.3)
    pooled = model.item_attributes()
    model.train()
    vectors = model.item_vectors()
    dropped = (vectors[1:] == pooled[1:]).all(dim=1).float().mean()
    assert float(dropped) == pytest.approx(0.3, abs=0.04)
    model.eval()
    assert not (model.item_vectors()[1:] == pooled[1:]).all(dim=1).any()
    with pytest.raises(UserInputError, match=r"model.id_dropout: must lie in \[0, 1\)"):
        SASRec(DataInfo(many, item_features=wide), max_len=5, dim=8, id_dropout=1.0)
    with pytest.raises(UserInputError, match="model.id_dropout: leaves out item ids .* needs both"):
        SASRec(DataInfo(many), max_len=5, dim=8, id_dropout=0.3)


@pytest.mark.parametrize(("network", "options"), NETWORKS)
def test_without_ids_items_with_the_same_attributes_score_the_same(network, options):
    model = network(data(), item_id=False, **options).eval()
    history = torch.tensor([[1, 3, 4, 0], [5, 2, 0, 0]])
    scores = model.user_vectors(history) @ model.item_vectors().T
    assert torch.equal(scores[:, 2], scores[:, 5])  # items 2 and 5 share their attributes
    # And as inputs: swapping item 2 for item 5 in a history changes nothing.
    swapped = torch.where(history == 2, 5, history)
    assert torch.allclose(model.user_vectors(swapped), model.user_vectors(history))


@pytest.mark.parametrize(("network", "options"), NETWORKS)
def test_training_reaches_the_attribute_embeddings(network, options):
    model = module(network(data(), **options), ks=(1, 5))
    batch = {
        "input_ids": torch.tensor([[1, 2, 3, 0], [4, 5, 0, 0]]),
        "target_ids": torch.tensor([[2, 3, 4, 0], [5, 6, 0, 0]]),
    }
    model.training_step(batch, 0).backward()
    gradient = model.network.item_attributes.embedding.weight.grad
    assert gradient[1:].abs().sum() > 0 and gradient[0].abs().sum() == 0  # padding never learns


def test_bert4rec_without_ids_keeps_a_mask_vector_of_its_own():
    model = BERT4Rec(data(), item_id=False, max_len=5, dim=8, num_heads=2)
    table = model._item_table()
    assert table.shape[0] == NUM_ITEMS + 2
    assert torch.equal(table[NUM_ITEMS + 1], model.mask_vector)
    assert model.item_vectors().shape[0] == NUM_ITEMS + 1


@pytest.mark.parametrize(("network", "options"), NETWORKS)
def test_no_ids_and_no_attributes_is_a_config_error(network, options):
    with pytest.raises(UserInputError, match=r"^model.item_id: .* needs item attributes"):
        network(data(False), item_id=False, **options)
    with pytest.raises(UserInputError, match=r"^model.item_id: "):
        network(data(True), item_id=False, item_features=False, **options)


def test_a_run_with_item_features_trains_evaluates_and_serves(tmp_path):
    # Items 1..50 of the synthetic data, a brand each (items 1 and 2 share theirs) and a category;
    # item 51 has no interactions (an extra row) and item 7 no attributes.
    rows = [f"{i},brand{min(i, 2) if i <= 2 else i % 9},cat{i % 4}" for i in range(1, 52) if i != 7]
    (tmp_path / "items.csv").write_text("item,brand,category\n" + "\n".join(rows) + "\n")
    run_dir = tmp_path / "run"
    features = f"data.item_features={tmp_path / 'items.csv'}"
    run("train.py", *train_overrides(tmp_path, run_dir, features, "trainer.max_epochs=1"))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    checkpoint = torch.load(run_dir / "checkpoints" / "best.ckpt", weights_only=True)
    assert "network.item_attributes.embedding.weight" in checkpoint["state_dict"]
    assert "brand=brand1" in checkpoint["item_attribute_vocabulary"]
    plain = tmp_path / "plain"
    run("train.py", *train_overrides(tmp_path, plain, "trainer.max_epochs=1"))
    plain_metrics = json.loads((plain / "metrics.json").read_text())
    assert metrics["data_fingerprint"] != plain_metrics["data_fingerprint"]  # features are part of it
    # evaluate.py rebuilds the same model from the run's data and gets the same numbers.
    ckpt = f"ckpt_path={run_dir / 'checkpoints' / 'best.ckpt'}"
    run("evaluate.py", ckpt, f"hydra.run.dir={tmp_path / 'eval'}", *common(tmp_path))
    again = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert again["test/ndcg@10"] == metrics["test/ndcg@10"]
    # Serving rebuilds the model from the checkpoint alone (its attribute lists travel in it).
    recommender = Recommender.from_checkpoint(run_dir / "checkpoints" / "best.ckpt")
    assert recommender.network.item_attributes is not None
    recommended = recommender.recommend([[3, 4, 5]], k=5)
    assert len(recommended) == 5 and not set(recommended["item"]) & {3, 4, 5}


@pytest.fixture(scope="module")
def attributes_only_run(tmp_path_factory):
    """A SASRec trained on the synthetic data with attributes only (model.item_id=false)."""
    tmp = tmp_path_factory.mktemp("attributes_only")
    rows = [f"{i},brand{i % 7},cat{i % 5}" for i in range(1, 51)]
    (tmp / "items.csv").write_text("item,brand,category\n" + "\n".join(rows) + "\n")
    run_dir = tmp / "run"
    overrides = [f"data.item_features={tmp / 'items.csv'}", "model.item_id=false", "trainer.max_epochs=1"]
    run("train.py", *train_overrides(tmp, run_dir, *overrides))
    return tmp, run_dir


def test_a_new_item_with_a_known_items_attributes_gets_exactly_its_scores(attributes_only_run, tmp_path):
    _, run_dir = attributes_only_run
    # Item 900 is new with item 3's attributes (other order); 901 has an unknown brand but a known
    # category; 902 has nothing the model knows: it cannot be ranked.
    new = "item,brand,category\n900,brand3,cat3\n901,brand99,cat1\n902,brand98,cat98\n3,brand3,cat3\n"
    (tmp_path / "new.csv").write_text(new)
    recommender = Recommender.from_checkpoint(run_dir / "checkpoints" / "best.ckpt")
    added = recommender.add_items(tmp_path / "new.csv")
    assert added.item_ids == ["900", "901"] and added.unrankable_items == 1
    assert added.known_items == 1 and added.unknown_attributes == 3
    table = recommender.item_table()
    assert table.shape[0] == 50 + 1 + 2
    assert torch.equal(table[51], table[3])  # the same attributes, bit for bit
    history = torch.tensor([[5, 9, 12, 0], [1, 2, 0, 0]])
    queries = recommender.network.user_vectors(history)
    scores = (queries[:, None, :] * table[None, :, :]).sum(dim=-1)
    assert torch.equal(scores[:, 51], scores[:, 3])
    # Recommended by their original ids, beside the catalogue's.
    frame = recommender.recommend([[5, 9, 12]], k=53 - 4)
    assert {900, 901} <= set(frame["item"])


def test_new_items_are_refused_by_a_model_without_attributes(tmp_path):
    run_dir = tmp_path / "run"
    run("train.py", *train_overrides(tmp_path, run_dir, "trainer.max_epochs=1"))
    (tmp_path / "new.csv").write_text("item,brand\n900,brand3\n")
    checkpoint = f"ckpt_path={run_dir / 'checkpoints' / 'best.ckpt'}"
    untouched = Untouched(tmp_path / "predict")
    result = run(
        "predict.py",
        checkpoint,
        f"item_features={tmp_path / 'new.csv'}",
        f"hydra.run.dir={tmp_path / 'predict'}",
        *common(tmp_path),
        check=False,
    )
    assert_user_error(
        result,
        f"error: item_features: {tmp_path / 'new.csv'}: the checkpoint's model was trained without item attributes",
        untouched,
    )


def test_predict_and_export_rank_new_items(attributes_only_run, tmp_path):
    tmp, run_dir = attributes_only_run
    (tmp_path / "new.csv").write_text("item,brand,category\n900,brand3,cat3\n")
    (tmp_path / "sessions.csv").write_text("session,item\ns1,5\ns1,9\n")
    checkpoint = f"ckpt_path={run_dir / 'checkpoints' / 'best.ckpt'}"
    features = f"item_features={tmp_path / 'new.csv'}"
    out = tmp_path / "predict"
    run(
        "predict.py",
        checkpoint,
        features,
        f"sessions={tmp_path / 'sessions.csv'}",
        "k=48",
        f"hydra.run.dir={out}",
        *common(tmp),
    )
    assert 900 in set(pd.read_parquet(out / "recommendations.parquet")["item"])
    exported = tmp_path / "export"
    run(
        "predict.py",
        checkpoint,
        features,
        "export=[torchscript]",
        "k=5",
        f"hydra.run.dir={exported}",
        *common(tmp),
    )
    assert len(json.loads((exported / "item_ids.json").read_text())) == 52  # padding, 50 items, 1 new


def test_attribute_knn_ranks_by_attribute_overlap_with_the_history():
    model = AttributeKNN(data(), max_len=5)
    # A history of item 1 (attributes 1, 2): item 3 (1, 4) shares attribute 1, item 4 (2) shares
    # attribute 2, items 2 and 5 (3) nothing, item 6 has no attributes.
    scores = (model.user_vectors(torch.tensor([[1, 0]])) @ model.item_vectors().T)[0]
    assert scores[3] == pytest.approx(0.5) and scores[4] == pytest.approx(2**-0.5)
    assert scores[2] == 0 and scores[5] == 0 and scores[6] == 0 and scores[0] == 0
    # Items 2 and 5 have the same attributes: the same score after any history.
    many = model.user_vectors(torch.tensor([[1, 3, 4], [2, 0, 0]])) @ model.item_vectors().T
    assert torch.equal(many[:, 2], many[:, 5])
    with pytest.raises(UserInputError, match=r"^model: attribute_knn .* set data.item_features"):
        AttributeKNN(data(False))


def test_the_attribute_knn_preset_trains_and_evaluates(tmp_path):
    # Items 1..50, in 5 categories along the synthetic data's hidden cycle order of ids.
    rows = [f"{i},cat{i % 5}" for i in range(1, 51)]
    (tmp_path / "items.csv").write_text("item,category\n" + "\n".join(rows) + "\n")
    run_dir = tmp_path / "run"
    features = f"data.item_features={tmp_path / 'items.csv'}"
    metrics, _ = train_tiny(tmp_path, run_dir, "experiment=attribute_knn", "data=synthetic", features)
    assert 0 <= metrics["test/ndcg@10"] <= 1 and metrics["epochs"] == 1
