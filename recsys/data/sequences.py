"""A preprocessed data set: every user's time-ordered events in CSR arrays, with the raw ids.

On disk (`SequenceData.save`, the cache of recsys/data/cache.py) a data set is a directory of
uncompressed .npy arrays plus meta.json; `SequenceData.load` maps them into memory read-only, so
every process of a machine shares one copy in the page cache and starts without reading them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from recsys.errors import UserInputError
from recsys.runs.files import atomic_directory

# The arrays of a data set on disk, mapped when loaded (None-valued ones are not written).
ARRAYS = ("offsets", "items", "timestamps", "user_ids", "item_ids", "events", "event_names")


class MappedArray(np.memmap):
    """A cache array mapped from its .npy file, which pickles as its path: a DataLoader worker or
    a process started by spawn or forkserver maps the file again instead of receiving a copy.
    (Slices of it pickle their values, as any array.)"""

    npy_path: str | None = None

    def __reduce__(self):
        if self.npy_path is not None:
            return (_map_npy, (self.npy_path,))
        return super().__reduce__()


def _map_npy(path: str) -> MappedArray:
    array = np.load(path, mmap_mode="r", allow_pickle=False).view(MappedArray)
    array.npy_path = path
    return array


@dataclass
class SequenceData:
    """Time-ordered item sequences of all users in CSR form, with the raw ids they came from."""

    offsets: np.ndarray  # (num_users + 1,) int64: user u's events are items[offsets[u]:offsets[u+1]]
    items: (
        np.ndarray
    )  # (num_events,) int32 (int64 past 2**31 items) item indices in 1..num_items; 0 is padding
    user_ids: np.ndarray  # (num_users,) raw user ids
    item_ids: np.ndarray  # (num_items + 1,) raw item ids; entry 0 stands for padding
    fingerprint: str = ""
    stats: dict[str, Any] = field(default_factory=dict)
    # With data.event_types: (num_events,) int8 type ids 1..E aligned with `items`, their names
    # (entry 0 = "" for padding).
    events: np.ndarray | None = None
    event_names: np.ndarray | None = None
    # (num_events,) the time of each event in the source's unit (for a source without times, its
    # position in the file); `has_time` says which.
    timestamps: np.ndarray | None = None
    has_time: bool = False
    # The unit of `timestamps` when the source says it (parsed date-times: "ns"); None: numbers in
    # the unit data.time_unit declares.
    time_unit: str | None = None

    @property
    def has_events(self) -> bool:
        return self.events is not None

    def event_ids(self, names, key: str) -> list[int]:
        """Type ids of event names; an unknown name is a config error naming `key`."""
        known = [str(n) for n in self.event_names[1:]] if self.has_events else []
        ids = []
        for name in names:
            if str(name) not in known:
                raise UserInputError(f"{key}: {name!r} is not one of the data's event types {known}")
            ids.append(known.index(str(name)) + 1)
        return ids

    @property
    def num_users(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_items(self) -> int:
        """Number of real items; valid item indices are 1..num_items."""
        return len(self.item_ids) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def history(self, user: int) -> np.ndarray:
        return self.items[self.offsets[user] : self.offsets[user + 1]]

    def save(self, path: Path) -> None:
        """Write as a directory of .npy arrays plus meta.json, atomically
        (recsys.runs.files.atomic_directory): readers never see a part of it."""
        with atomic_directory(path) as tmp:
            for name in ARRAYS:
                values = getattr(self, name)
                if values is not None:
                    np.save(tmp / f"{name}.npy", np.asarray(values), allow_pickle=False)
            (tmp / "meta.json").write_text(json.dumps(self.meta()))

    def meta(self) -> dict[str, Any]:
        return {
            "fingerprint": self.fingerprint,
            "stats": self.stats,
            "has_time": self.has_time,
            "time_unit": self.time_unit,
        }

    @classmethod
    def load(cls, path: Path) -> SequenceData:
        """Map a saved data set into memory (read-only; pages are read when first touched)."""
        path = Path(path)
        meta = json.loads((path / "meta.json").read_text())
        arrays = {}
        for name in ARRAYS:
            file = path / f"{name}.npy"
            arrays[name] = _map_npy(str(file)) if file.exists() else None
        return cls(
            **arrays,
            fingerprint=meta["fingerprint"],
            stats=meta["stats"],
            has_time=meta["has_time"],
            time_unit=meta.get("time_unit"),
        )
