"""New sessions for `predict.py sessions=FILE`: lists of original item ids, read from a file, for
`Recommender.recommend` (recsys/serving/recommend.py)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from recsys.errors import UserInputError


def read_sessions(path: str | Path) -> tuple[list, list[list]]:
    """Sessions of original item ids from a file: JSON lines {"session": id, "items": [ids...]}, or a
    CSV / parquet table with columns session and item (and optionally timestamp: the order within a
    session; otherwise the file's order)."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"sessions: {path} does not exist")
    name = path.name.lower()
    if name.endswith((".jsonl", ".json", ".jsonl.gz", ".ndjson")):
        try:
            frame = pd.read_json(path, lines=True, dtype=False)
        except ValueError as err:
            raise UserInputError(f"sessions: {path} is not JSON lines ({str(err).splitlines()[0]})") from None
        for column in ("session", "items"):
            if column not in frame.columns:
                raise UserInputError(f"sessions: {path} has no '{column}' field (expected session, items)")
        bad = [i for i, items in enumerate(frame["items"]) if not isinstance(items, list)]
        if bad:
            raise UserInputError(f"sessions: {path} line {bad[0] + 1}: 'items' must be a list of item ids")
        return frame["session"].tolist(), frame["items"].tolist()
    if name.endswith((".parquet", ".pq")):
        frame = pd.read_parquet(path)
    elif name.endswith((".csv", ".csv.gz", ".tsv")):
        frame = pd.read_csv(
            path, sep="\t" if name.endswith(".tsv") else ",", dtype={"item": str, "session": str}
        )
    else:
        raise UserInputError(f"sessions: {path}: unknown format (use .jsonl, .csv, .tsv or .parquet)")
    for column in ("session", "item"):
        if column not in frame.columns:
            raise UserInputError(
                f"sessions: {path} has no '{column}' column (columns: {list(frame.columns)})"
            )
    if "timestamp" in frame.columns:
        frame = frame.sort_values(["timestamp"], kind="stable")
    grouped = frame.groupby("session", sort=False)["item"].agg(list)
    return grouped.index.tolist(), grouped.tolist()
