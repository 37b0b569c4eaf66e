"""Every shipped data set preprocesses to exactly what it did before the engine (issue 27): the
same users and items in the same order, the same sequences, the same statistics. The digests in
tests/fixtures/shipped_data_digests.json were written by the in-memory preprocessing it replaced,
so every published number keeps its data."""

import json
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from tests.data.shipped_cases import CASES, TIMED, digest

ROOT = Path(__file__).parents[2]
DIGESTS = json.loads((ROOT / "tests" / "fixtures" / "shipped_data_digests.json").read_text())
OmegaConf.register_new_resolver("project_root", lambda: str(ROOT), replace=True)


def datamodule(config: str, overrides: dict, tmp_path: Path):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=[f"data={config}", f"paths.cache_dir={tmp_path}"])
    for key, value in overrides.items():
        cfg.data[key] = value
    return instantiate(cfg.data)


@pytest.mark.parametrize("name", sorted(CASES))
def test_shipped_data_is_preprocessed_as_before(name, tmp_path):
    dm = datamodule(*CASES[name], tmp_path)
    path = dm.source.path
    if path is not None and not Path(path).exists():
        pytest.skip(f"{path} is not on this machine")
    dm.setup()
    assert {"arrays": digest(dm.data), "stats": dm.data.stats} == DIGESTS[name]


@pytest.mark.parametrize("name", sorted(TIMED))
def test_amazon_times_keep_the_sequences_and_add_real_days(name, tmp_path):
    dm = datamodule(name, {}, tmp_path)
    if not Path(dm.source.times_path).exists():
        pytest.skip(f"{dm.source.times_path} is not on this machine")
    dm.setup()
    data = dm.data
    arrays = digest(data)
    assert {k: arrays[k] for k in ("offsets", "items", "user_ids", "item_ids")} == DIGESTS[TIMED[name]][
        "arrays"
    ]
    assert data.has_time and np.all(data.timestamps % 86400 == 0)  # day resolution, unix seconds
    steps = np.diff(data.timestamps)
    steps[data.offsets[1:-1] - 1] = 0  # the steps from one user's last event to the next user's first
    assert steps.min() >= 0  # times never go back along a user's history
