import os

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
