"""Build a data set's cache from its config, and nothing else: prepare once, train many times.

    python prepare.py data=retailrocket
    python prepare.py data=interactions_file data.path=/logs/events/ data.columns.user=visitor ...

Prints the data set's statistics and the cache directory that train.py, evaluate.py and
predict.py then map (the same config gives the same fingerprint, so they find it). Run it on a CPU
node before the GPU jobs of a sweep start; the preprocessing memory is data.memory_limit.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from recsys.data.cache import cache_path
from recsys.errors import UserInputError
from recsys.runs.files import run_with_user_errors

OmegaConf.register_new_resolver("project_root", lambda: str(Path(__file__).resolve().parent), replace=True)


def prepare(cfg: DictConfig) -> Path:
    if not cfg.data.get("cache_dir"):
        raise UserInputError("data.cache_dir: prepare.py builds a cache; give it a directory")
    datamodule = instantiate(cfg.data)
    started = time.perf_counter()
    datamodule.setup()
    seconds = time.perf_counter() - started
    data = datamodule.data
    where = cache_path(cfg.data.cache_dir, datamodule.name, data.fingerprint)
    print(json.dumps(data.stats, indent=1))
    print(f"data {datamodule.name}: {data.num_users} users, {data.num_items} items, {len(data.items)} events")
    print(f"ready in {seconds:.1f} s; cache: {where}")
    return where


@hydra.main(version_base="1.3", config_path="configs", config_name="prepare")
def main(cfg: DictConfig) -> None:
    run_with_user_errors(None, lambda: prepare(cfg))


if __name__ == "__main__":
    main()
