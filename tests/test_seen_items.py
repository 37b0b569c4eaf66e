"""evaluation.seen_items: a repeat target never leaks through the seen-item exclusion.

A planted "recency" scorer (seen items scored by how recently they were seen, unseen items all
tied at zero) is the model that gains most from the leak: under exclude_but_target every repeat
target is the one seen item left among the candidates, and it puts it at rank 1.
"""

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from recsys.data.datamodule import SequenceDataModule
from recsys.data.synthetic import generate_sequences
from recsys.errors import UserInputError
from recsys.evaluation.metrics import SEEN_ITEMS, metrics_from_ranks
from recsys.models.network import DataInfo, SequenceNetwork
from recsys.training.module import SequentialRecommender

NUM_ITEMS = 40


class RecencyScorer(SequenceNetwork):
    trainable = False
    scores_by_dot_product = False

    def score(self, history: torch.Tensor, **features) -> torch.Tensor:
        scores = torch.zeros(history.size(0), self.num_items + 1)
        recency = torch.arange(1, history.size(1) + 1, dtype=torch.float32).expand_as(history)
        # Later positions overwrite earlier ones: each seen item gets its latest position.
        return scores.scatter_reduce(1, history, recency * (history != 0), reduce="amax")


def sequence_file(tmp_path, repeat_probability):
    offsets, items = generate_sequences(
        300, NUM_ITEMS, 4, 12, length_distribution="uniform", repeat_probability=repeat_probability, seed=3
    )
    lines = [
        " ".join([str(user + 1), *map(str, items[offsets[user] : offsets[user + 1]])])
        for user in range(len(offsets) - 1)
    ]
    path = tmp_path / "sequences.txt"
    path.write_text("\n".join(lines) + "\n")
    return path, offsets, items


def datamodule(tmp_path, path, seen_items):
    return SequenceDataModule(
        name="repeats",
        path=str(path),
        format="sequence",
        max_len=50,  # the whole history: the reference below sees what the model sees
        cache_dir=str(tmp_path / "cache"),
        eval_batch_size=64,
        seen_items=seen_items,
    )


def reference_ranks(offsets, items, seen_items):
    """Per test user (all users, in order): the recency scorer's rank of the test target, or None
    for a user left out, computed from the raw sequences in plain Python."""
    ranks = []
    for user in range(len(offsets) - 1):
        sequence = items[offsets[user] : offsets[user + 1]].tolist()
        history, target = sequence[:-1], sequence[-1]
        last_seen = {item: position for position, item in enumerate(history, start=1)}
        score = {item: float(last_seen.get(item, 0)) for item in range(1, NUM_ITEMS + 1)}
        repeat = target in last_seen
        if seen_items == "exclude" and repeat:
            ranks.append(None)
            continue
        candidates = set(score)
        if seen_items != "keep":
            candidates -= set(history) - {target}
        above = [i for i in candidates if i != target and score[i] >= score[target]]
        ranks.append(1 + len(above))
    return ranks


def test_the_generator_plants_repeats_only_when_asked(tmp_path):
    def repeat_share(offsets, items):
        found = [
            items[p] in items[offsets[u] : p]
            for u in range(len(offsets) - 1)
            for p in range(offsets[u] + 1, offsets[u + 1])
        ]
        return np.mean(found)

    plain = generate_sequences(300, 500, 5, 20, seed=1)
    again = generate_sequences(300, 500, 5, 20, seed=1, repeat_probability=0.0)
    repeated = generate_sequences(300, 500, 5, 20, seed=1, repeat_probability=0.4)
    np.testing.assert_array_equal(plain[1], again[1])  # the default leaves old data unchanged
    np.testing.assert_array_equal(plain[0], repeated[0])
    assert repeat_share(*plain) < 0.1
    assert 0.4 <= repeat_share(*repeated) < 0.5
    with pytest.raises(UserInputError, match=r"data.synthetic.repeat_probability"):
        generate_sequences(10, 10, repeat_probability=1.5)


@pytest.mark.parametrize("seen_items", SEEN_ITEMS)
def test_recency_scorer_gains_nothing_from_repeats_under_exclude(tmp_path, seen_items):
    path, offsets, items = sequence_file(tmp_path, repeat_probability=0.5)
    dm = datamodule(tmp_path, path, seen_items)
    model = SequentialRecommender(RecencyScorer(DataInfo(NUM_ITEMS), max_len=50), ks=(1, 10))
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    results = trainer.test(model, datamodule=dm, verbose=False)[0]

    expected = reference_ranks(offsets, items, seen_items)
    kept = [rank for rank in expected if rank is not None]
    assert model.test_results["rank"].tolist() == kept
    reference = metrics_from_ranks(torch.tensor(kept), (10,))["ndcg@10"].mean().item()
    assert results["test/ndcg@10"] == pytest.approx(reference)

    repeats = sum(
        1 for u in range(300) if items[offsets[u + 1] - 1] in items[offsets[u] : offsets[u + 1] - 1]
    )
    assert 60 < repeats < 240  # the data really has repeat targets
    counts = dm.evaluation_counts("test")
    assert counts["test/repeat_targets"] == repeats
    assert counts["test/repeat_target_share"] == pytest.approx(repeats / 300)
    if seen_items == "exclude":
        # Every repeat user left out and counted; on new items the scorer has nothing (all tied).
        assert counts["test/users_left_out"] == repeats and counts["test/users"] == 300 - repeats
        assert results["test/ndcg@10"] < 0.01
    elif seen_items == "exclude_but_target":
        # The leak this setting keeps for comparisons: every repeat target at rank 1.
        assert counts["test/users_left_out"] == 0
        assert results["test/hr@1"] == pytest.approx(repeats / 300)
    else:
        # keep: a repeat target ranks behind the items seen more recently than it, honestly.
        assert counts["test/users_left_out"] == 0 and counts["test/users"] == 300
        assert 0 < results["test/hr@1"] < repeats / 300


def test_exclude_leaves_out_validation_repeats_too(tmp_path):
    path, offsets, items = sequence_file(tmp_path, repeat_probability=0.5)
    dm = datamodule(tmp_path, path, "exclude")
    users, positions = dm.evaluated_users("val")
    for user, position in zip(users, positions):
        assert dm.data.items[position] not in dm.data.items[dm.data.offsets[user] : position]
    batch = next(iter(dm.eval_dataloader("val")))
    assert not (batch["exclude"] == batch["target"][:, None]).any()
    kept = datamodule(tmp_path, path, "keep")
    assert len(kept.evaluated_users("val")[0]) == 300 > len(users)
    assert next(iter(kept.eval_dataloader("val")))["exclude"].shape[1] == 0  # nothing excluded


def test_an_unknown_seen_items_value_names_the_key(tmp_path):
    with pytest.raises(
        UserInputError,
        match=r"^evaluation.seen_items: 'new' is not one of \['exclude', 'keep', 'exclude_but_target'\]$",
    ):
        datamodule(tmp_path, tmp_path / "none.txt", "new")
