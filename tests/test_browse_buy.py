"""The browse-vs-buy presets run end to end on a small Retail Rocket-format data set.

(a) purchases only (keep_events), (d) event types plus time gaps (the superset of (b) and (c), whose
configs differ from it only in switching these off; tests/test_configs.py builds every preset) and
the popularity baseline run as a user runs them; (d)'s checkpoint reads back through evaluate.py.
"""

import json

import pandas as pd
import pytest

from tests.test_entrypoints import common, run, train_tiny


@pytest.mark.parametrize("preset", ["browse_buy_purchases", "browse_buy_typed_gaps", "browse_buy_popular"])
def test_every_browse_buy_preset_runs_on_tiny_data(tmp_path, preset, retailrocket_files):
    events, test = retailrocket_files(tmp_path / "rr")
    run_dir = tmp_path / "run"
    trains = preset != "browse_buy_popular"
    metrics, losses = train_tiny(
        tmp_path,
        run_dir,
        f"experiment={preset}",
        f"data.path={events}",
        f"data.test_path={test}",
        "model.ks=[1,5,10]",
        epochs=2 if trains else 1,
    )
    assert 0.0 <= metrics["test/ndcg@10"] <= 1.0
    if trains:  # the purchases are random here: nothing to rank well, but the training loss falls
        assert len(losses) == 2 and losses[1] < 0.99 * losses[0], losses
    assert metrics["protocol"].startswith("next buy event from the full history before it")
    assert metrics["exclude_seen"] == ["buy"]
    per_user = pd.read_parquet(run_dir / "per_user.parquet")
    assert len(per_user) == 30  # every user is tested on their test.csv purchase
    if preset == "browse_buy_typed_gaps":  # a model that reads events reads back through evaluate.py
        out = tmp_path / "eval"
        run(
            "evaluate.py",
            f"ckpt_path={run_dir}/checkpoints/best.ckpt",
            f"hydra.run.dir={out}",
            *common(tmp_path),
        )
        assert json.loads((out / "metrics.json").read_text())["test/ndcg@10"] == metrics["test/ndcg@10"]
        out_all = tmp_path / "eval_all"
        run(
            "evaluate.py",
            f"ckpt_path={run_dir}/checkpoints/best.ckpt",
            "exclude_events=all",
            f"hydra.run.dir={out_all}",
            *common(tmp_path),
        )
        assert json.loads((out_all / "metrics.json").read_text())["exclude_seen"] is True
