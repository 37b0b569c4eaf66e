"""Where a run comes from: the launcher's process rank and the git state of the code."""

from __future__ import annotations

import os
from typing import Any


def launch_rank() -> int:
    """This process's global rank as the launcher set it (0 for a single process)."""
    from pytorch_lightning.utilities.rank_zero import rank_zero_only

    return int(getattr(rank_zero_only, "rank", 0) or 0)


def git_state(directory: str | os.PathLike) -> dict[str, Any]:
    """{"commit": HEAD's hash, "dirty": uncommitted changes to tracked files}; None where unknown."""
    import subprocess

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", *args], cwd=directory, capture_output=True, text=True, timeout=10, check=True
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip()

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit or None, "dirty": None if status is None else bool(status)}
