"""Files of a run directory: atomic writes and the one-line error exit.

Nothing the user gave is overwritten: files are written to a temporary name and renamed into
place, a finished run's directory is never reused, and a run that fails on bad input before it
wrote anything leaves no directory behind.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from recsys.errors import UserInputError

# The W&B run id of a run directory, kept so that a resumed run continues the same W&B run.
WANDB_ID_FILE = "wandb_run_id"


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    The one way the project writes a file (run outputs, the data cache, exported models): a reader
    finds the old file or the whole new one, never a part, and a failure leaves no file behind. The
    file gets the permissions open() would give it (mkstemp's are owner-only)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        if Path(tmp).exists():
            os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


@contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; rename it onto `path` only if the block
    succeeds (the data cache: a reader finds the whole directory or none). If another process
    finished the same directory first, its copy stays and ours is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        try:
            os.rename(tmp, path)
        except OSError:
            if not path.is_dir():  # not a concurrent writer's finished copy: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in payload.items()}
    write_text_atomic(path, json.dumps(clean, indent=2, sort_keys=True) + "\n")


def write_config(path: str | os.PathLike, cfg: DictConfig) -> None:
    write_text_atomic(path, OmegaConf.to_yaml(cfg, resolve=True))


def run_with_user_errors(run_dir: Path | None, body: Callable[[], Any]) -> Any:
    """Run `body`; on bad input print one line and exit 2, removing a run dir that holds only logs
    (None: the command writes no run dir)."""
    try:
        try:
            return body()
        except InstantiationException as err:
            # A constructor's own bad-input error (a data key, say), wrapped by hydra.utils.instantiate.
            if isinstance(err.__cause__, UserInputError):
                raise err.__cause__ from None
            raise
    except (UserInputError, OmegaConfBaseException) as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if isinstance(err, OmegaConfBaseException) and getattr(err, "full_key", None):
            message = f"config key {err.full_key}: {message}"
        if run_dir is not None:
            _remove_if_only_logs(run_dir)
        print(f"error: {message}", file=sys.stderr)
        logging.shutdown()
        sys.exit(2)


def _remove_if_only_logs(run_dir: Path) -> None:
    if not run_dir.is_dir():
        return
    if all(p.is_file() and (p.suffix == ".log" or p.name == WANDB_ID_FILE) for p in run_dir.iterdir()):
        logging.shutdown()  # close Hydra's log file before removing it
        shutil.rmtree(run_dir, ignore_errors=True)
