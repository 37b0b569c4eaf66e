"""W&B in offline mode: what a run records (config with git commit and data fingerprint, curves,
test metrics as summary, results and best checkpoint as artifacts), that a resumed run continues
the same W&B run, and that the API key is written nowhere.

wandb 0.31 writes an offline run as one `run-<id>.wandb` file of protobuf records in LevelDB-log
framing (its `files/` holds no config.yaml or wandb-summary.json until synced); `records` reads it.
"""

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_entrypoints import ROOT, train_overrides

FAKE_KEY = "0123456789abcdef0123456789abcdef01234567"  # must never be written anywhere


def records(path: Path):
    """Every record of a .wandb file (LevelDB log: 32 KiB blocks, 7-byte chunk headers)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    ident, magic, _version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic) == (b":W&B", 0xBEE1)
    position, block, pending = 7, 32768, b""
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:  # a block's tail too short for a header is padding
            position += left
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[position : position + 7])
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk  # FULL, FIRST / MIDDLE, LAST
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            yield record


def read_run(run_dir: Path) -> dict:
    """id, config, final summary, history rows and artifacts of the run's offline W&B runs, by directory."""
    runs = {}
    for directory in sorted((run_dir / "wandb").glob("offline-run-*")):
        run = {"id": None, "config": {}, "summary": {}, "history": [], "artifacts": []}
        for record in records(next(directory.glob("run-*.wandb"))):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run["id"] = record.run.run_id
            elif kind == "config":
                run["config"].update({u.key: json.loads(u.value_json) for u in record.config.update})
            elif kind == "summary":
                for u in record.summary.update:
                    run["summary"]["/".join(u.nested_key) if u.nested_key else u.key] = json.loads(
                        u.value_json
                    )
            elif kind == "history":
                run["history"].append(
                    {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item}
                )
            elif kind == "artifact":
                run["artifacts"].append((record.artifact.name, record.artifact.type))
        runs[directory.name] = run
    return runs


def train(tmp, run_dir):
    overrides = [o for o in train_overrides(tmp, run_dir, "trainer.max_epochs=2") if o != "logger=csv"]
    env = dict(
        os.environ,
        WANDB_MODE="offline",
        WANDB_API_KEY=FAKE_KEY,
        WANDB_CACHE_DIR=str(tmp / "wandb_cache"),
        WANDB_DATA_DIR=str(tmp / "wandb_data"),
        WANDB_CONFIG_DIR=str(tmp / "wandb_config"),
        HYDRA_FULL_ERROR="0",
    )
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *overrides, "logger=wandb"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def wandb_runs(tmp_path_factory):
    """A run with W&B offline; then the same directory without metrics.json (as if killed during
    the final test) resumed: it restores the last checkpoint, tests and logs to the same W&B run."""
    tmp = tmp_path_factory.mktemp("wandb")
    run_dir = tmp / "run"
    train(tmp, run_dir)
    first = read_run(run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    (run_dir / "metrics.json").unlink()
    train(tmp, run_dir)
    return run_dir, first, read_run(run_dir), metrics


def test_offline_run_has_config_provenance_curves_summary_and_artifacts(wandb_runs):
    run_dir, first, _, metrics = wandb_runs
    assert len(first) == 1
    (run,) = first.values()
    assert run["id"] == (run_dir / "wandb_run_id").read_text().strip()
    config = run["config"]
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    assert config["git"]["commit"] == commit and isinstance(config["git"]["dirty"], bool)
    assert config["data_fingerprint"] == metrics["data_fingerprint"]
    assert config["model"]["dim"] == 32 and config["seed"] == 42 and config["data"]["name"] == "synthetic"
    # Curves: one validation and one training-loss point per epoch.
    assert [h["epoch"] for h in run["history"] if "val/ndcg@10" in h][:2] == [0, 1]
    assert sum("train/loss_epoch" in h for h in run["history"]) == 2
    # Summary: the final metrics of the best checkpoint.
    for key in ("test/ndcg@10", "test/hr@10", "val/ndcg@10", "best_epoch"):
        assert run["summary"][key] == pytest.approx(metrics[key])
    assert run["summary"]["data_fingerprint"] == metrics["data_fingerprint"]
    # Artifacts: the results files, the best checkpoint, and the slices table (a W&B table is
    # stored as an artifact of type run_table).
    artifacts = set(run["artifacts"])
    assert {(f"model-{run['id']}", "model"), (f"results-{run['id']}", "results")} <= artifacts
    assert any(kind == "run_table" and "slices" in name for name, kind in artifacts)


def test_a_resumed_run_continues_the_same_wandb_run(wandb_runs):
    run_dir, first, both, metrics = wandb_runs
    (first_id,) = [r["id"] for r in first.values()]
    assert len(both) == 2 and {r["id"] for r in both.values()} == {first_id}
    assert all(name.endswith(first_id) for name in both)
    resumed = both[max(both)]
    assert resumed["summary"]["test/ndcg@10"] == pytest.approx(metrics["test/ndcg@10"])
    assert resumed["config"]["git"]["commit"] == first[min(first)]["config"]["git"]["commit"]
    assert json.loads((run_dir / "metrics.json").read_text())["resumed_from"] == "checkpoints/last.ckpt"


def test_the_api_key_is_written_nowhere(wandb_runs):
    run_dir, *_ = wandb_runs
    for path in run_dir.parent.rglob("*"):
        if path.is_file():
            assert FAKE_KEY.encode() not in path.read_bytes(), path


def test_a_logger_whose_package_is_missing_is_a_one_line_error(tmp_path):
    import importlib.util

    from omegaconf import OmegaConf

    from recsys.errors import UserInputError
    from recsys.runs.loggers import build_loggers

    if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
        pytest.skip("tensorboard is installed")
    config = OmegaConf.load(ROOT / "configs" / "logger" / "tensorboard.yaml")
    config.tensorboard.save_dir = str(tmp_path)
    with pytest.raises(
        UserInputError, match=r"^logger.tensorboard: Neither `tensorboard` nor `tensorboardX`"
    ):
        build_loggers(config, tmp_path)
