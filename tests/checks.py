"""Checks shared by the tests.

`assert_user_error`: what every entry point (train.py, evaluate.py, predict.py) must do on bad
input, as `recsys.runs.files.run_with_user_errors` and the README promise: exit status 2, exactly one
line on stderr, `error: <file or key>: <what is wrong>`, no traceback anywhere, and nothing
written: the run directory, the outputs and the data cache are as they were before the run
(absent if they were absent, byte for byte the same if they existed). `Untouched` takes that
"before" picture.

Usage, in a test that runs an entry point through `tests.test_entrypoints.run`:

    untouched = Untouched(run_dir, tmp_path / "cache", tmp_path / "logs")
    result = run("train.py", ..., check=False)
    assert_user_error(result, "error: data.path: ...", untouched)

Hydra's own refusals (a misspelt key, an unknown config group option) are not ours: they exit 1
with Hydra's message, and their tests do not use this check.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from pathlib import Path

# error: <file or key>[:<line>]: <what is wrong>. A file or key holds no ":" and does not start
# with a space; OmegaConf's errors name theirs as "config key <key>".
ERROR_LINE = re.compile(r"error: (?P<subject>[^\s:][^:]*?)(?::\d+)?: \S.*")


def _picture(path: Path) -> dict[str, str] | None:
    """None for an absent path; else {relative path: content digest or "<dir>"} of the whole tree."""
    if not path.exists() and not path.is_symlink():
        return None
    if not path.is_dir():
        return {".": hashlib.sha256(path.read_bytes()).hexdigest()}
    picture = {".": "<dir>"}
    for item in sorted(path.rglob("*")):
        name = str(item.relative_to(path))
        picture[name] = "<dir>" if item.is_dir() else hashlib.sha256(item.read_bytes()).hexdigest()
    return picture


class Untouched:
    """Files and directory trees whose state (existence, every file's bytes) is recorded now, for
    `differences` / `assert_unchanged` to compare after the run."""

    def __init__(self, *paths: str | Path):
        if not paths:
            raise ValueError("Untouched: name the paths to watch (run directory, outputs, cache)")
        self.before = {Path(p): _picture(Path(p)) for p in paths}

    def differences(self, ignore: Iterable[Path] = ()) -> list[str]:
        ignored = {Path(p) for p in ignore}
        found = []
        for path, before in self.before.items():
            after = _picture(path)
            if before == after or path in ignored:
                continue
            if before is None:
                found.append(f"{path} was created (holding {sorted(after)})")
            elif after is None:
                found.append(f"{path} was removed")
            else:
                changed = sorted(n for n in set(before) | set(after) if before.get(n) != after.get(n))
                found.append(f"{path}: files changed, created or removed: {changed}")
        return found

    def assert_unchanged(self, ignore: Iterable[Path] = ()) -> None:
        differences = self.differences(ignore)
        assert not differences, "a refused run wrote: " + "; ".join(differences)


def assert_user_error(
    result, message: str, untouched: Untouched, exact: bool = False, tolerate: Iterable = ()
) -> str:
    """`result` (a CompletedProcess: returncode, stdout, stderr) is bad input refused as
    `run_with_user_errors` refuses it: exit status 2, no traceback, one stderr line in the form
    `error: <file or key>: ...` that starts with `message` (equals it when `exact`), and nothing
    `untouched` watches was written. Returns that line.

    `tolerate`: watched paths a refused run may still write, e.g. the data cache when only the
    data can show the error (the catalogue is smaller than the loss's negatives)."""
    tolerate = set(tolerate)
    output = f"--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stdout + result.stderr, output
    assert result.returncode == 2, output
    lines = result.stderr.splitlines()
    assert lines, f"nothing on stderr:\n{output}"
    assert len(lines) == 1, f"expected exactly one stderr line:\n{output}"
    line = lines[-1]
    assert ERROR_LINE.fullmatch(line), f"not 'error: <file or key>: ...': {line!r}"
    if exact:
        assert line == message
    else:
        assert line.startswith(message), (line, message)
    untouched.assert_unchanged(ignore=tolerate)
    return line
