"""Event types (browse vs buy) through loaders, preprocessing, the cache, the data module and models."""

import gzip

import numpy as np
import pytest
import torch

from recsys.data import loaders
from recsys.data.datamodule import SequenceDataModule
from recsys.data.features import NUM_GAP_BUCKETS, time_gap_buckets
from recsys.data.preprocess import PreprocessSettings, preprocess
from recsys.data.sequences import SequenceData
from recsys.errors import UserInputError
from recsys.models.bert4rec import BERT4Rec
from recsys.models.network import DataInfo, target_positions
from recsys.models.sasrec import SASRec
from tests.builders import module

EVENTS = ["view", "cart", "buy"]

# Two users in the subset's format (grouped by user, time-ordered). User 0 views 10 and 11,
# carts and buys 11, views 12, buys 12; user 1 views 20, buys 20, views 21. Test purchases: 0 -> 13,
# 1 -> 22.
RETAILROCKET_EVENTS = """user_id,item_id,behavior,timestamp
0,10,view,100
0,11,view,160
0,11,cart,170
0,11,buy,400
0,12,view,500
0,12,buy,4100
1,20,view,10
1,20,buy,20
1,21,view,30
"""
RETAILROCKET_TEST = "user_id,item_id\n0,13\n1,22\n"


@pytest.fixture
def retailrocket(write_file):
    return write_file("rr/events.csv.gz", RETAILROCKET_EVENTS), write_file("rr/test.csv", RETAILROCKET_TEST)


def make_dm(paths, tmp_path, **kwargs):
    events, test = paths
    options = dict(
        name="rr",
        path=str(events),
        test_path=str(test),
        format="retailrocket",
        event_types=EVENTS,
        target_events=["buy"],
        exclude_events=["buy"],
        min_history=2,
        time_order="error",
        cache_dir=str(tmp_path / "cache"),
        batch_size=4,
        eval_batch_size=4,
    )
    options.update(kwargs)
    return SequenceDataModule(**options)


def history_of(data, user):
    lo, hi = data.offsets[user], data.offsets[user + 1]
    items = data.item_ids[data.items[lo:hi]].tolist()
    events = data.event_names[data.events[lo:hi]].tolist()
    return list(zip(items, events))


# --- loaders ----------------------------------------------------------------------------------------


def test_retailrocket_appends_each_test_purchase_after_the_users_events(retailrocket):
    frame = loaders.read_retailrocket(*retailrocket).frame()
    assert len(frame) == 11
    user0 = frame[frame["user"] == 0]
    assert user0.iloc[-1].tolist() == [0, 13, "buy", 4100]  # at the last event's time, after it
    user1 = frame[frame["user"] == 1]
    assert user1.iloc[-1].tolist() == [1, 22, "buy", 30]


def test_retailrocket_test_file_errors_name_the_line(retailrocket, write_file):
    events, _ = retailrocket
    twice = write_file("rr/twice.csv", "user_id,item_id\n0,13\n0,14\n")
    with pytest.raises(UserInputError, match=r"twice.csv:3: .*user 0 has a second test purchase"):
        loaders.read_retailrocket(events, twice)
    stranger = write_file("rr/stranger.csv", "user_id,item_id\n0,13\n7,14\n")
    with pytest.raises(UserInputError, match=r"stranger.csv:3: user 7 has no events"):
        loaders.read_retailrocket(events, stranger)


def test_retailrocket_raw_reads_kaggle_columns_and_milliseconds(write_file):
    path = write_file(
        "events.csv",
        "timestamp,visitorid,event,itemid,transactionid\n"
        "1433221332117,257597,view,355908,\n"
        "1433224214164,992329,addtocart,248676,\n"
        "1433221999827,257597,transaction,355908,4000\n",
    )
    frame = loaders.read_retailrocket_raw(path).frame()
    assert frame["timestamp"].tolist() == [1433221332, 1433224214, 1433221999]
    assert frame["event"].tolist() == ["view", "addtocart", "transaction"]
    assert frame["user"].tolist() == [257597, 992329, 257597]
    bad = write_file("bad.csv", "ts,visitorid,event,itemid\n1,2,view,3\n")
    with pytest.raises(UserInputError, match=r"bad.csv: missing column\(s\) \['timestamp'\]"):
        loaders.read_retailrocket_raw(bad)


def test_taobao_reads_headerless_rows_and_catches_a_cut_last_line(write_file, tmp_path):
    rows = "1,2268318,2520377,pv,1511544070\n1,2333346,2520771,buy,1511561733\n2,7,3,cart,1511572885\n"
    frame = loaders.read_taobao(write_file("UserBehavior.csv", rows)).frame()
    assert frame["event"].tolist() == ["pv", "buy", "cart"]
    assert frame["timestamp"].tolist() == [1511544070, 1511561733, 1511572885]
    # A last line cut off mid-timestamp still has five fields: caught as time going backwards.
    cut = write_file("cut.csv", rows + "1,543546,4181361,pv,15")
    settings = PreprocessSettings(
        event_types=("view", "cart", "fav", "buy"),
        event_map=(("pv", "view"),),
        time_order="error",
        min_history=2,
    )
    with pytest.raises(UserInputError, match=r"cut.csv:4: timestamp 15 of user 1 is earlier"):
        preprocess(loaders.read_taobao(cut), settings)
    with pytest.raises(
        UserInputError,
        match=r"four.csv:1: malformed row: expected 5 fields \(user, item, category, event, timestamp\), found 4",
    ):
        loaders.read_taobao(write_file("four.csv", "1,2,3,pv\n"))


# --- preprocessing and the cache ---------------------------------------------------------------------


def test_event_types_survive_preprocessing_and_the_cache(retailrocket, tmp_path):
    dm = make_dm(retailrocket, tmp_path)
    dm.setup()
    data = dm.data
    assert data.event_names.tolist() == ["", *EVENTS]
    assert history_of(data, 0) == [
        (10, "view"),
        (11, "view"),
        (11, "cart"),
        (11, "buy"),
        (12, "view"),
        (12, "buy"),
        (13, "buy"),
    ]
    assert history_of(data, 1) == [(20, "view"), (20, "buy"), (21, "view"), (22, "buy")]
    assert data.timestamps[: data.offsets[1]].tolist() == [100, 160, 170, 400, 500, 4100, 4100]
    # Read back from the cache: the same arrays.
    cached = make_dm(retailrocket, tmp_path)
    cached.setup()
    for name in ("items", "events", "timestamps", "event_names", "offsets"):
        assert np.array_equal(getattr(cached.data, name), getattr(data, name))
    (cache_file,) = (tmp_path / "cache").glob("rr-*")
    loaded = SequenceData.load(cache_file)
    assert loaded.events.dtype == np.int8 and loaded.events.tolist() == data.events.tolist()


def test_an_event_the_config_does_not_know_names_the_line(write_file, tmp_path):
    events = write_file("ev.csv", "user_id,item_id,behavior,timestamp\n0,1,view,1\n0,2,like,2\n0,3,buy,3\n")
    frame = loaders.read_interactions_file(
        events, {"user": "user_id", "item": "item_id", "event": "behavior", "timestamp": "timestamp"}
    )
    with pytest.raises(UserInputError, match=r"ev.csv:3: event 'like' is not one of data.event_types"):
        preprocess(frame, PreprocessSettings(event_types=tuple(EVENTS)))
    renamed = preprocess(frame, PreprocessSettings(event_types=tuple(EVENTS), event_map=(("like", "cart"),)))
    assert renamed.events.tolist() == [1, 2, 3]
    no_events = loaders.read_interactions_file(events, {"user": "user_id", "item": "item_id"})
    with pytest.raises(UserInputError, match="data.event_types: .* has no event column"):
        preprocess(no_events, PreprocessSettings(event_types=tuple(EVENTS)))


def test_bad_event_settings_are_config_errors(retailrocket, tmp_path):
    with pytest.raises(UserInputError, match="data.keep_events: 'click' is not one of data.event_types"):
        PreprocessSettings(event_types=tuple(EVENTS), keep_events=("click",))
    with pytest.raises(UserInputError, match="data.event_map: needs data.event_types"):
        PreprocessSettings(event_map=(("a", "b"),))
    with pytest.raises(UserInputError, match="data.time_order: 'maybe'"):
        PreprocessSettings(time_order="maybe")
    with pytest.raises(UserInputError, match=r"data.target_events: \['cart'\] would be dropped"):
        make_dm(retailrocket, tmp_path, target_events=["cart"], keep_events=["buy"])
    with pytest.raises(UserInputError, match="data.exclude_events: needs data.event_types"):
        make_dm(retailrocket, tmp_path, event_types=None, target_events=None, exclude_events=["buy"])
    dm = make_dm(retailrocket, tmp_path, target_events=["purchase"])
    with pytest.raises(
        UserInputError, match="data.target_events: 'purchase' is not one of the data's event types"
    ):
        dm.setup()


def test_a_target_type_that_never_occurs_is_an_error(write_file, tmp_path):
    events = write_file("rr/events.csv", RETAILROCKET_EVENTS.replace("cart", "view"))
    dm = make_dm((events, write_file("rr/test.csv", RETAILROCKET_TEST)), tmp_path, target_events=["cart"])
    with pytest.raises(UserInputError, match=r"data.target_events: \['cart'\] never occur"):
        dm.setup()


def test_time_order_error_or_counted_sort(write_file):
    path = write_file("ev.csv", "user_id,item_id,behavior,timestamp\n0,1,view,5\n0,2,buy,3\n1,3,view,1\n")
    columns = {"user": "user_id", "item": "item_id", "event": "behavior", "timestamp": "timestamp"}
    frame = loaders.read_interactions_file(path, columns)
    with pytest.raises(UserInputError, match=r"ev.csv:3: timestamp 3 of user 0 is earlier"):
        preprocess(
            frame, PreprocessSettings(event_types=tuple(EVENTS), time_order="error", min_history=1 + 1)
        )
    data = preprocess(frame, PreprocessSettings(event_types=tuple(EVENTS), min_history=2))
    assert data.stats["users_sorted_by_time"] == 1
    assert data.events.tolist() == [3, 1]  # sorted: the buy at time 3 comes first


def test_keep_events_keeps_the_catalogue(retailrocket, tmp_path):
    everything = make_dm(retailrocket, tmp_path)
    purchases = make_dm(retailrocket, tmp_path, keep_events=["buy"])
    everything.setup()
    purchases.setup()
    assert np.array_equal(purchases.data.item_ids, everything.data.item_ids)
    assert history_of(purchases.data, 0) == [(11, "buy"), (12, "buy"), (13, "buy")]
    # The same test users and targets for both, so runs on them compare paired.
    users_a, pos_a = everything.evaluated_users("test")
    users_b, pos_b = purchases.evaluated_users("test")
    assert users_a.tolist() == users_b.tolist() == [0, 1]
    assert everything.data.items[pos_a].tolist() == purchases.data.items[pos_b].tolist()
    # User 1's validation purchase has views but no purchase before it: validated on all events only.
    assert everything.evaluated_users("val")[0].tolist() == [0, 1]
    assert purchases.evaluated_users("val")[0].tolist() == [0]


# --- split, batches, exclusion ----------------------------------------------------------------------


def test_next_purchase_split_uses_the_full_mixed_history(retailrocket, tmp_path):
    dm = make_dm(retailrocket, tmp_path)
    dm.setup()
    ids = dm.data.item_ids
    test = next(iter(dm.eval_dataloader("test")))
    assert ids[test["target"].numpy()].tolist() == [13, 22]
    assert ids[test["history"][0].numpy()].tolist() == [10, 11, 11, 11, 12, 12]  # views and all
    assert test["target_event"].tolist() == [3, 3]
    # Only previously bought items are excluded: 11 and 12 for user 0, 20 for user 1.
    assert sorted(set(ids[test["exclude"][0].numpy()].tolist()) - {-1}) == [11, 12]
    assert sorted(set(ids[test["exclude"][1].numpy()].tolist()) - {-1}) == [20]
    val = next(iter(dm.eval_dataloader("val")))
    assert ids[val["target"].numpy()].tolist() == [12, 20]  # each user's last training purchase
    assert ids[val["history"][1].numpy()[:1]].tolist() == [20]  # user 1: the view before the buy
    assert val["history_events"][0].tolist() == [1, 1, 2, 3, 1]


def test_exclusion_is_set_per_event_type(retailrocket, tmp_path):
    def excluded(**kwargs):
        dm = make_dm(retailrocket, tmp_path, **kwargs)
        batch = next(iter(dm.eval_dataloader("test")))
        return sorted(set(dm.data.item_ids[batch["exclude"][0].numpy()].tolist()) - {-1})

    assert excluded() == [11, 12]
    assert excluded(exclude_events=None) == [10, 11, 12]
    assert excluded(exclude_events=["cart"]) == [11]
    assert excluded(exclude_events=[]) == []


def test_users_without_a_target_event_are_skipped_and_counted(write_file, tmp_path):
    events = write_file("ev.csv", RETAILROCKET_EVENTS + "2,30,view,1\n2,31,view,2\n")
    dm = make_dm((events, write_file("t.csv", RETAILROCKET_TEST)), tmp_path)
    dm.setup()
    assert dm.split.skipped_users == 1
    assert dm.evaluated_users("test")[0].tolist() == [0, 1]
    # A user with one purchase is tested on it, never validated.
    events = write_file(
        "one.csv", "user_id,item_id,behavior,timestamp\n5,1,view,1\n5,2,buy,2\n6,1,buy,1\n6,3,buy,2\n"
    )
    dm = SequenceDataModule(
        name="one",
        path=str(events),
        format="interactions",
        min_history=2,
        event_types=EVENTS,
        target_events=["buy"],
        columns={"user": "user_id", "item": "item_id", "event": "behavior", "timestamp": "timestamp"},
    )
    dm.setup()
    assert dm.evaluated_users("test")[0].tolist() == [0, 1]
    assert dm.evaluated_users("val")[0].tolist() == []  # user 6's first buy has no history


def test_training_batches_mark_only_next_purchases_as_targets(retailrocket, tmp_path):
    dm = make_dm(retailrocket, tmp_path)
    windows = dm.train_windows()
    assert len(windows) == 1  # user 1's training part (a view before its validation buy) has no buy to learn
    batch = windows[[0]]
    ids = dm.data.item_ids
    # User 0's training part ends before the validation buy of 12: view 10, view 11, cart 11, buy 11, view 12.
    assert ids[batch["input_ids"][0].numpy()].tolist() == [10, 11, 11, 11]
    assert ids[batch["target_ids"][0].numpy()].tolist() == [11, 11, 11, 12]
    assert batch["target_mask"][0].tolist() == [False, False, True, False]  # only the buy of 11
    assert batch["input_events"][0].tolist() == [1, 1, 2, 3]
    assert batch["target_events"][0].tolist() == [1, 2, 3, 1]
    assert target_positions(batch)[0].tolist() == [False, False, True, False]
    # Popularity counts only training purchases.
    counts = dm.train_item_counts()
    assert counts.sum().item() == 1 and counts[dm.data.items[3]].item() == 1


def test_time_gap_buckets():
    offsets = np.array([0, 3, 5])
    timestamps = np.array([100, 100, 104, 7, 7 + 86400])
    buckets = time_gap_buckets(offsets, timestamps)
    assert buckets.tolist() == [1, 2, 4, 1, 2 + int(np.log2(86401))]
    assert time_gap_buckets(np.array([0, 2]), np.array([0, 2**62])).max() < NUM_GAP_BUCKETS


# --- models -----------------------------------------------------------------------------------------


def test_target_mask_restricts_the_loss_to_those_positions():
    torch.manual_seed(0)
    # Unweighted: the test compares each step's mean loss over the positions it trains on.
    model = module(
        SASRec(DataInfo(20), max_len=6, dim=16, dropout=0.0), weight_batches_by_targets=False
    ).eval()
    batch = {
        "input_ids": torch.tensor([[1, 2, 3, 4, 0], [5, 6, 0, 0, 0]]),
        "target_ids": torch.tensor([[2, 3, 4, 7, 0], [6, 8, 0, 0, 0]]),
    }
    full = model.training_step(batch, 0)
    mask = torch.tensor([[False, True, False, True, False], [False, False, False, False, False]])
    restricted = model.training_step({**batch, "target_mask": mask}, 0)
    hidden = model.network(batch["input_ids"])
    logits = hidden[mask] @ model.network.item_embedding.weight[1:].T  # padding is never a class
    expected = torch.nn.functional.cross_entropy(logits, batch["target_ids"][mask] - 1)
    assert torch.allclose(restricted, expected, atol=1e-5)
    assert not torch.allclose(restricted, full)


@pytest.mark.parametrize("cls", [SASRec, BERT4Rec])
def test_with_both_switches_off_the_model_is_unchanged(cls):
    torch.manual_seed(3)
    plain = cls(DataInfo(30), max_len=8, dim=16)
    torch.manual_seed(3)
    on_event_data = cls(DataInfo(30, num_event_types=3), max_len=8, dim=16)
    assert plain.state_dict().keys() == on_event_data.state_dict().keys()
    for name, value in plain.state_dict().items():
        assert torch.equal(value, on_event_data.state_dict()[name]), name
    assert not on_event_data.reads_events


@pytest.mark.parametrize("cls", [SASRec, BERT4Rec])
def test_event_and_gap_embeddings_change_the_user_vectors(cls):
    torch.manual_seed(0)
    model = cls(
        DataInfo(30, num_event_types=3), max_len=8, dim=16, event_embedding=True, time_gaps=True
    ).eval()
    history = torch.tensor([[1, 2, 3, 0]])
    events = torch.tensor([[1, 1, 2, 0]])
    gaps = torch.tensor([[1, 5, 9, 0]])
    target = torch.tensor([3])
    base = model.user_vectors(history, events, gaps, target)
    assert not torch.allclose(base, model.user_vectors(history, torch.tensor([[3, 3, 3, 0]]), gaps, target))
    assert not torch.allclose(base, model.user_vectors(history, events, torch.tensor([[1, 2, 2, 0]]), target))
    with pytest.raises(UserInputError, match="model.event_embedding: the model reads event types"):
        model.user_vectors(history)


def test_event_embedding_without_event_data_is_a_config_error():
    with pytest.raises(UserInputError, match="model.event_embedding: the data has no event types"):
        SASRec(DataInfo(10), event_embedding=True)
    with pytest.raises(UserInputError, match="model.time_gaps: the data has no event types"):
        BERT4Rec(DataInfo(10, num_event_types=0), time_gaps=True)


def test_bert4rec_hides_only_target_positions():
    torch.manual_seed(0)
    model = module(
        BERT4Rec(DataInfo(30, num_event_types=3), max_len=8, dim=16, mask_prob=0.5, event_embedding=True)
    )
    sequences = torch.randint(1, 30, (64, 6))
    maskable = torch.zeros(64, 6, dtype=torch.bool)
    maskable[:, 2] = True
    maskable[:, 4] = True
    masked = model.network.cloze_mask(sequences, maskable)
    assert not (masked & ~maskable).any()
    assert masked.any(dim=1).all()  # every row hides something
    batch = {
        "input_ids": torch.tensor([[1, 2, 3, 4]]),
        "target_ids": torch.tensor([[2, 3, 4, 5]]),
        "input_events": torch.tensor([[1, 1, 3, 1]]),
        "target_events": torch.tensor([[1, 3, 1, 3]]),
        "input_gaps": torch.tensor([[1, 3, 3, 3]]),
        "target_gaps": torch.tensor([[3, 3, 3, 3]]),
        "target_mask": torch.tensor([[False, True, False, True]]),
    }
    assert torch.isfinite(model.training_step(batch, 0))


def test_a_model_learns_next_purchases_on_event_data(retailrocket, tmp_path):
    """End to end on the tiny data: SASRec with event types trains (its training loss falls) and is
    evaluated on purchases."""
    import pytorch_lightning as pl

    class TrainingLosses(pl.Callback):
        def __init__(self):
            self.by_epoch = {}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.by_epoch.setdefault(trainer.current_epoch, []).append(float(outputs["loss"]))

    dm = make_dm(retailrocket, tmp_path)
    dm.setup()
    network = SASRec(
        DataInfo(dm.num_items, num_event_types=dm.num_event_types),
        max_len=50,
        dim=16,
        event_embedding=True,
        time_gaps=True,
    )
    model = module(network, ks=[1, 5])
    losses = TrainingLosses()
    trainer = pl.Trainer(
        max_epochs=4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        callbacks=[losses],
    )
    trainer.fit(model, datamodule=dm)
    per_epoch = [sum(values) / len(values) for _, values in sorted(losses.by_epoch.items())]
    assert len(per_epoch) == 4 and per_epoch[-1] < 0.98 * per_epoch[0], per_epoch  # it learns
    (results,) = trainer.test(model, datamodule=dm, verbose=False)
    assert 0.0 <= results["test/ndcg@5"] <= 1.0
    assert model.test_results["user"].tolist() == [0, 1]


def test_gzipped_and_plain_retailrocket_files_read_the_same(write_file):
    plain = loaders.read_retailrocket(
        write_file("a/e.csv", RETAILROCKET_EVENTS), write_file("a/t.csv", RETAILROCKET_TEST)
    ).frame()
    zipped = write_file("b/e.csv.gz", RETAILROCKET_EVENTS)
    assert gzip.open(zipped).read(7) == b"user_id"
    assert plain.equals(loaders.read_retailrocket(zipped, write_file("b/t.csv", RETAILROCKET_TEST)).frame())


def test_hide_target_item_removes_the_targets_own_events_from_the_query(retailrocket, tmp_path):
    dm = make_dm(retailrocket, tmp_path, hide_target_item=True)
    dm.setup()
    ids = dm.data.item_ids
    # User 0's validation target is the buy of 12: its view of 12 leaves the history.
    val = next(iter(dm.eval_dataloader("val")))
    assert ids[val["target"].numpy()].tolist() == [12]  # user 1 viewed only item 20 before buying it
    assert ids[val["history"][0].numpy()].tolist() == [10, 11, 11, 11]
    assert val["history_events"][0].tolist() == [1, 1, 2, 3]
    test = next(iter(dm.eval_dataloader("test")))  # test items were never seen: nothing changes
    assert ids[test["history"][0].numpy()].tolist() == [10, 11, 11, 11, 12, 12]
    assert dm.evaluated_users("test")[0].tolist() == [0, 1]


def test_hidden_events_do_not_show_through_the_time_gaps(write_file, tmp_path):
    # User 0 views 14 long before anything else, later buys it (the validation target): with the
    # view hidden, the view of 10 is the history's first event (bucket 1), not 900 s after one.
    events = (
        "user_id,item_id,behavior,timestamp\n0,14,view,100\n0,10,view,1000\n0,11,view,1100\n0,14,buy,1200\n"
    )
    paths = write_file("h/events.csv", events), write_file("h/test.csv", "user_id,item_id\n0,13\n")
    val = next(iter(make_dm(paths, tmp_path, hide_target_item=True).eval_dataloader("val")))
    assert val["history_gaps"][0].tolist() == [1, 2 + int(np.log2(101))]
    shown = next(iter(make_dm(paths, tmp_path / "b").eval_dataloader("val")))
    assert shown["history_gaps"][0].tolist() == [1, 2 + int(np.log2(901)), 2 + int(np.log2(101))]


def test_long_histories_keep_their_last_max_len_events(retailrocket, tmp_path):
    dm = make_dm(retailrocket, tmp_path, max_len=2, hide_target_item=True)
    test = next(iter(dm.eval_dataloader("test")))
    assert dm.data.item_ids[test["history"][0].numpy()].tolist() == [12, 12]
    assert test["history_events"][0].tolist() == [1, 3]
    assert dm.data.item_ids[test["exclude"][0].numpy()].tolist().count(11) == 1  # the whole history


def test_serving_and_export_refuse_a_model_that_reads_events():
    from recsys.serving.export import TopKScorer

    model = SASRec(DataInfo(30, num_event_types=3), max_len=8, dim=16, event_embedding=True)
    with pytest.raises(UserInputError, match="export: this SASRec reads event types"):
        TopKScorer(model, k=5)


def test_data_without_event_settings_keeps_its_fingerprint():
    """Checkpoints record their data's fingerprint: the settings added for event types must not
    change it for data that does not use them (or every older checkpoint would be refused)."""
    from recsys.data.cache import fingerprint

    plain = PreprocessSettings(min_item_interactions=5)
    assert plain.as_dict() == {
        "min_rating": None,
        "min_user_interactions": 0,
        "min_item_interactions": 5,
        "kcore_iterative": True,
    }
    source = {"format": "synthetic", "synthetic": {"num_users": 10}}
    assert fingerprint(source, plain) != fingerprint(
        source, PreprocessSettings(min_item_interactions=5, min_history=2)
    )
    assert fingerprint(source, plain) != fingerprint(
        source, PreprocessSettings(min_item_interactions=5, event_types=("view", "buy"))
    )
