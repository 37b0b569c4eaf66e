import os

import numpy as np
import pytest
import torch

# Tests are small; more threads only add overhead on the 2-core CI machine.
torch.set_num_threads(min(2, os.cpu_count() or 1))
os.environ.setdefault("WANDB_MODE", "disabled")


@pytest.fixture
def write_file(tmp_path):
    """Write text (gzipped when the name ends in .gz) and return the path."""
    import gzip

    def _write(name: str, text: str):
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".gz"):
            with gzip.open(path, "wt") as handle:
                handle.write(text)
        else:
            path.write_text(text)
        return path

    return _write


def write_retailrocket_files(directory, users=30, items=40, seed=0):
    """A small data set in the Retail Rocket subset's format: views, carts and buys in time order
    per user, and one test purchase per user."""
    rng = np.random.default_rng(seed)
    lines, tests = ["user_id,item_id,behavior,timestamp"], ["user_id,item_id"]
    for user in range(users):
        time = 1_433_000_000 + int(rng.integers(0, 10**6))
        for _ in range(int(rng.integers(2, 5))):
            item = int(rng.integers(0, items))
            for behaviour in ("view", "cart", "buy")[: int(rng.integers(1, 4))]:
                lines.append(f"{user},{item},{behaviour},{time}")
                time += int(rng.integers(1, 10_000))
            lines.append(f"{user},{int(rng.integers(0, items))},buy,{time}")
            time += int(rng.integers(1, 10_000))
        tests.append(f"{user},{int(rng.integers(0, items))}")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "events.csv").write_text("\n".join(lines) + "\n")
    (directory / "test.csv").write_text("\n".join(tests) + "\n")
    return directory / "events.csv", directory / "test.csv"


@pytest.fixture
def retailrocket_files():
    """Write a small Retail Rocket-format data set (events.csv, test.csv) into a directory."""
    return write_retailrocket_files
