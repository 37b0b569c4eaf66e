"""How many validation and test targets repeat an item the user had seen, per data set.

    python benchmarks/repeat_targets.py [--data amazon_beauty ml1m ...] [key=value ...]

Builds each data set exactly as train.py does (`configs/train.yaml`, `data=<name>` plus the
overrides) and prints one JSON line per data set and split: the users of the split, how many of
their targets are a seen item (by the data config's `exclude_events`), and the share. Under the
default `evaluation.seen_items=exclude` those users are left out of the metrics; where the count is
0, the three settings give the same numbers, digit for digit.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
OmegaConf.register_new_resolver("project_root", lambda: str(ROOT), replace=True)
SHIPPED = [
    "amazon_beauty",
    "amazon_sports",
    "amazon_toys",
    "lastfm",
    "ml1m",
    "ml100k",
    "ml_latest_small",
    "retailrocket",
]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", nargs="+", default=SHIPPED, help="data configs (configs/data/)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for train.py")
    args = parser.parse_args()
    for name in args.data:
        with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
            cfg = compose("train", overrides=["logger=none", f"data={name}", *args.overrides])
        datamodule = instantiate(cfg.data, seen_items="keep")  # keep: count every user's target
        for split in ("val", "test"):
            counts = datamodule.evaluation_counts(split)
            print(
                json.dumps(
                    {
                        "data": name,
                        "split": split,
                        "users": counts[f"{split}/users"],
                        "repeat_targets": counts[f"{split}/repeat_targets"],
                        "share": round(counts[f"{split}/repeat_target_share"], 4),
                        "exclude_events": OmegaConf.to_container(cfg.data).get("exclude_events"),
                        "hide_target_item": cfg.data.hide_target_item,
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
