"""Every config group option composes, and instantiates into the objects train.py expects."""

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from recsys.data import SequenceDataModule
from recsys.data.item_features import ItemFeatures
from recsys.models.from_config import build_model
from recsys.models.network import DataInfo
from recsys.training.module import SequentialRecommender

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
OmegaConf.register_new_resolver("project_root", lambda: str(CONFIGS.parent), replace=True)


def options(group):
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml") if p.stem != "common")


def compose_train(*overrides):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=False)


@pytest.mark.parametrize("data", options("data"))
def test_every_data_config_instantiates(data):
    overrides = [f"data={data}"]
    if data in ("sequence_file", "interactions_file", "retailrocket_raw", "taobao"):
        overrides.append("data.path=/tmp/some_file")
    cfg = compose_train(*overrides)
    datamodule = instantiate(cfg.data)
    assert isinstance(datamodule, SequenceDataModule)
    assert datamodule.name == data


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_composes_and_builds_its_model(experiment):
    cfg = compose_train(f"experiment={experiment}")
    # Each item one of 10 attributes (data.item_features), which attribute_knn needs.
    features = ItemFeatures(
        offsets=np.r_[0, np.arange(1001)].astype(np.int64),  # padding none, items one each
        values=(np.arange(1000) % 10 + 1).astype(np.int32),
        vocabulary=np.array([""] + [f"a={i}" for i in range(10)]),
        extra_item_ids=np.array([], dtype=str),
        num_items=1000,
    )
    data = DataInfo(
        1000, num_event_types=3, train_item_counts=torch.arange(1001), fingerprint="x", item_features=features
    )
    model = build_model(cfg, data)
    assert isinstance(model, SequentialRecommender)


@pytest.mark.parametrize("group", ["trainer", "logger", "callbacks"])
def test_every_option_of_the_other_groups_composes(group):
    for option in options(group):
        cfg = compose_train(f"{group}={option}")
        assert group in cfg


def test_shipped_default_data_file_exists():
    cfg = compose_train()
    assert cfg.data.name == "amazon_beauty"
    assert Path(cfg.data.path).is_file()


def test_a_misspelt_key_is_an_error():
    with pytest.raises(Exception, match="dropuot"):
        compose_train("model.dropuot=0.1")


def test_event_data_configs_read_their_sources(tmp_path):
    taobao = tmp_path / "UserBehavior.csv"
    taobao.write_text(
        "1,10,7,pv,100\n1,11,7,fav,200\n1,11,7,buy,300\n1,12,7,pv,400\n1,12,7,buy,500\n"
        "2,10,7,pv,100\n2,10,7,cart,150\n2,10,7,buy,160\n2,13,7,buy,900\n"
    )
    cfg = compose_train("data=taobao", f"data.path={taobao}", f"paths.cache_dir={tmp_path / 'cache'}")
    datamodule = instantiate(cfg.data)
    datamodule.setup()
    assert datamodule.data.event_names.tolist() == ["", "view", "cart", "fav", "buy"]
    users, targets = datamodule.evaluated_users("test")
    assert datamodule.data.item_ids[datamodule.data.items[targets]].tolist() == [12, 13]

    kaggle = tmp_path / "events.csv"
    rows = ["timestamp,visitorid,event,itemid,transactionid"]
    for visitor in (5, 6):
        for step, (event, item) in enumerate(
            [("view", 1), ("addtocart", 1), ("transaction", 1), ("view", 2), ("transaction", 2)]
        ):
            rows.append(f"{1433221332000 + 1000 * (10 - step)},{visitor},{event},{item},")  # newest first
    kaggle.write_text("\n".join(rows) + "\n")
    cfg = compose_train(
        "data=retailrocket_raw",
        f"data.path={kaggle}",
        "data.min_user_interactions=0",
        "data.min_item_interactions=0",
        f"paths.cache_dir={tmp_path / 'cache'}",
    )
    datamodule = instantiate(cfg.data)
    datamodule.setup()
    data = datamodule.data
    assert data.stats["users_sorted_by_time"] == 2  # newest-first rows, sorted and counted
    assert data.event_names[data.events[: data.offsets[1]]].tolist() == ["buy", "view", "buy", "cart", "view"]
    assert data.timestamps[0] == 1433221332 + 6  # milliseconds made seconds
