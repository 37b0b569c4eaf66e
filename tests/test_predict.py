"""predict.py and recsys.serving.recommend: recommendations in original ids, new sessions, bad input."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from recsys.errors import UserInputError
from recsys.serving.recommend import Recommender
from recsys.serving.sessions import read_sessions
from tests.checks import Untouched, assert_user_error
from tests.test_entrypoints import common, run, train_overrides


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("predict")
    run_dir = tmp / "run"
    run("train.py", *train_overrides(tmp, run_dir, "trainer.max_epochs=2"))
    return tmp, run_dir, run_dir / "checkpoints" / "best.ckpt"


def cached_data(tmp, ckpt):
    from hydra.utils import instantiate

    datamodule = instantiate(
        Recommender.from_checkpoint(ckpt).model.data_config, cache_dir=str(tmp / "cache")
    )
    datamodule.setup()
    return datamodule.data


def test_test_split_ranks_equal_the_evaluation_ranks(trained):
    tmp, run_dir, ckpt = trained
    out = tmp / "pred_test"
    # k = the whole catalogue: every unseen item is listed.
    run("predict.py", f"ckpt_path={ckpt}", "k=50", f"hydra.run.dir={out}", *common(tmp))
    recs = pd.read_parquet(out / "recommendations.parquet")
    assert list(recs.columns) == ["user", "rank", "item", "score"]
    per_user = pd.read_parquet(run_dir / "per_user.parquet")
    found = per_user.merge(recs, left_on=["user_id", "target_item_id"], right_on=["user", "item"])
    assert (found["rank_x"] == found["rank_y"]).all()
    # Every evaluated user is found: evaluation.seen_items=exclude left out exactly the users whose
    # test item repeats one they saw, which predict.py never recommends (seen items are excluded).
    assert len(found) == len(per_user)
    data = cached_data(tmp, ckpt)
    repeats = {
        int(data.user_ids[u])
        for u in range(data.num_users)
        if data.items[data.offsets[u + 1] - 1] in data.items[data.offsets[u] : data.offsets[u + 1] - 1]
    }
    assert set(per_user["user_id"]) == set(data.user_ids.tolist()) - repeats
    assert not per_user["repeat_target"].any()
    assert 0 < len(repeats) < 50
    # Ranks run 1.. per user with non-increasing scores.
    first = recs[recs["user"] == recs["user"].iloc[0]]
    assert first["rank"].tolist() == list(range(1, len(first) + 1))
    assert (np.diff(first["score"].to_numpy()) <= 0).all()


def test_test_split_with_seen_items_kept_equals_evaluation_with_seen_items_kept(trained):
    tmp, run_dir, ckpt = trained
    evaluated, predicted = tmp / "eval_keep", tmp / "pred_keep"
    run(
        "evaluate.py",
        f"ckpt_path={ckpt}",
        "evaluation.seen_items=keep",
        f"hydra.run.dir={evaluated}",
        *common(tmp),
    )
    run(
        "predict.py",
        f"ckpt_path={ckpt}",
        "k=50",
        "exclude_seen=false",
        f"hydra.run.dir={predicted}",
        *common(tmp),
    )
    per_user = pd.read_parquet(evaluated / "per_user.parquet")
    recs = pd.read_parquet(predicted / "recommendations.parquet")
    found = per_user.merge(recs, left_on=["user_id", "target_item_id"], right_on=["user", "item"])
    # Every user, the repeat targets included, at the rank evaluate.py gives them.
    assert len(found) == len(per_user) == 200
    assert (found["rank_x"] == found["rank_y"]).all()
    assert per_user["repeat_target"].any()
    metrics = json.loads((evaluated / "metrics.json").read_text())
    assert metrics["seen_items"] == "keep" and metrics["test/users_left_out"] == 0
    assert metrics["test/repeat_targets"] == int(per_user["repeat_target"].sum())


def test_next_split_and_python_api_agree_and_exclude_the_history(trained):
    tmp, run_dir, ckpt = trained
    out = tmp / "pred_next"
    run("predict.py", f"ckpt_path={ckpt}", "k=5", "split=next", f"hydra.run.dir={out}", *common(tmp))
    recs = pd.read_parquet(out / "recommendations.parquet")
    recommender = Recommender.from_checkpoint(ckpt)
    data = cached_data(tmp, ckpt)
    user = int(data.user_ids[0])
    history = data.item_ids[data.history(0)].tolist()
    mine = recommender.recommend([history], k=5)
    theirs = recs[recs["user"] == user]
    assert mine["item"].tolist() == theirs["item"].tolist()
    assert not set(mine["item"]) & set(history)
    np.testing.assert_allclose(mine["score"], theirs["score"], rtol=1e-5)


def test_sessions_skip_unknown_ids_and_fall_back_to_popularity(trained, tmp_path):
    _, _, ckpt = trained
    recommender = Recommender.from_checkpoint(ckpt)
    known = recommender.item_ids[1:4].tolist()
    frame = recommender.recommend([known + [999999, "abc"], [], ["nope"]], k=3, session_ids=["a", "b", "c"])
    first = frame[frame["session"] == "a"]
    assert first["unknown_items"].tolist() == [2, 2, 2] and not first["fallback"].any()
    assert not set(first["item"]) & set(known)
    popular = recommender.popular(3)[1][0].tolist()
    for session, unknown in (("b", 0), ("c", 1)):
        rows = frame[frame["session"] == session]
        assert rows["fallback"].all() and rows["unknown_items"].iloc[0] == unknown
        assert rows["item"].tolist() == recommender.item_ids[popular].tolist()

    sessions = tmp_path / "sessions.jsonl"
    sessions.write_text("\n".join(json.dumps({"session": s, "items": i}) for s, i in [(1, known), (2, [])]))
    ids, histories = read_sessions(sessions)
    assert ids == [1, 2] and histories == [known, []]
    table = tmp_path / "sessions.csv"
    pd.DataFrame({"session": ["x", "x", "y"], "item": known[:2] + known[2:], "timestamp": [2, 1, 5]}).to_csv(
        table, index=False
    )
    ids, histories = read_sessions(table)
    assert ids == ["x", "y"] and histories == [[str(known[1]), str(known[0])], [str(known[2])]]


def test_predict_sessions_file_and_export_refusals(trained, tmp_path):
    tmp, _, ckpt = trained
    sessions = tmp_path / "s.jsonl"
    sessions.write_text(json.dumps({"session": "s1", "items": [1, 2, 3]}) + "\n")
    out = tmp_path / "out"
    result = run(
        "predict.py", f"ckpt_path={ckpt}", f"sessions={sessions}", "k=4", f"hydra.run.dir={out}", *common(tmp)
    )
    assert "top-4 for 1 sessions" in result.stdout
    frame = pd.read_parquet(out / "recommendations.parquet")
    assert frame["session"].tolist() == ["s1"] * 4
    # The same output again is refused, and the existing file is left as it was.
    untouched = Untouched(out, tmp / "cache", sessions)
    again = run(
        "predict.py",
        f"ckpt_path={ckpt}",
        f"sessions={sessions}",
        f"hydra.run.dir={out}",
        *common(tmp),
        check=False,
    )
    assert "already exists" in assert_user_error(again, "error: ", untouched)
    # Export through the CLI: the files recsys/serving/export.py writes (parity is tested in test_export.py).
    exported = tmp_path / "exported"
    run(
        "predict.py",
        f"ckpt_path={ckpt}",
        "export=[torchscript,onnx]",
        "k=5",
        f"hydra.run.dir={exported}",
        *common(tmp),
    )
    assert {"model.ts", "model.onnx", "item_ids.json"} <= {p.name for p in exported.iterdir()}
    ids = json.loads((exported / "item_ids.json").read_text())
    assert ids[0] is None and len(ids) == 51


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["ckpt_path=/nonexistent/best.ckpt"], "ckpt_path: /nonexistent/best.ckpt does not exist"),
        (["k=51"], "k: must lie in 1..50"),
    ],
)
def test_bad_input_is_one_line(trained, tmp_path, overrides, message):
    tmp, run_dir, ckpt = trained
    untouched = Untouched(tmp_path / "o", tmp / "cache", run_dir)
    result = run(
        "predict.py",
        f"ckpt_path={ckpt}",
        *overrides,
        f"hydra.run.dir={tmp_path / 'o'}",
        *common(tmp),
        check=False,
    )
    assert_user_error(result, f"error: {message}", untouched)


def test_bad_sessions_and_splits(trained, tmp_path):
    _, _, ckpt = trained
    with pytest.raises(UserInputError, match="sessions: /nonexistent.jsonl does not exist"):
        read_sessions("/nonexistent.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"session": 1, "items": 5}\n')
    with pytest.raises(UserInputError, match="line 1: 'items' must be a list"):
        read_sessions(bad)
    table = tmp_path / "t.csv"
    table.write_text("user,item\n1,2\n")
    with pytest.raises(UserInputError, match="has no 'session' column"):
        read_sessions(table)
    recommender = Recommender.from_checkpoint(ckpt)
    with pytest.raises(UserInputError, match="split: 'later' is not one of"):
        recommender.recommend_users(None, "later", 5, tmp_path / "r.parquet")
    with pytest.raises(UserInputError, match="k: must lie in 1..50"):
        recommender.recommend([[1]], k=0)


def test_checkpoints_that_are_not_ours_or_lack_the_catalogue(trained, tmp_path):
    tmp, run_dir, ckpt = trained
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(UserInputError, match="is not a checkpoint written by train.py"):
        Recommender.from_checkpoint(foreign, run_dir=run_dir)
    # An older checkpoint without the catalogue is completed from the run's data.
    checkpoint = torch.load(ckpt, weights_only=True)
    del checkpoint["item_ids"], checkpoint["train_item_counts"]
    old = tmp_path / "old.ckpt"
    torch.save(checkpoint, old)
    import os

    cwd = os.getcwd()
    try:
        os.chdir(tmp)  # the run's config names its cache relative to nothing: use the test's cache
        recommender = Recommender.from_checkpoint(old, run_dir=run_dir)
    finally:
        os.chdir(cwd)
    assert recommender.item_ids.tolist() == Recommender.from_checkpoint(ckpt).item_ids.tolist()
