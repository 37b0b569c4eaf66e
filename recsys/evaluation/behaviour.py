"""What browsing tells about buying: did customers view or cart an item before they bought it?

`purchases_browsed_before` lists every purchase of event-typed data with whether the same user had
viewed / carted the same item earlier, the length of the history before it, and which part of the
protocol it is (training, validation or test target); `browsed_by_history_length` turns that into
shares per history-length bucket (the buckets of per_user.parquet's slices). The notebook
`notebooks/browse_buy.ipynb` plots them.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from recsys.data.sequences import SequenceData
from recsys.data.split import EventSplit
from recsys.errors import UserInputError
from recsys.evaluation.results import HISTORY_LENGTH_EDGES, bucket_labels


def purchases_browsed_before(
    data: SequenceData, split: EventSplit, purchase: str = "buy", browse: tuple[str, ...] = ("view", "cart")
) -> pd.DataFrame:
    """One row per purchase event: user, history_length (events before it), part
    (train / validation / test), and `<type>_before` for each browse type: whether the user had an
    event of that type on the same item earlier in their sequence (ties in time count as earlier
    only when they come first in the sequence)."""
    if not data.has_events:
        raise UserInputError("data.event_types: this analysis needs event-typed data")
    (purchase_code,) = data.event_ids([purchase], "purchase")
    browse_codes = data.event_ids(browse, "browse")
    lengths = np.diff(data.offsets)
    user = np.repeat(np.arange(data.num_users), lengths)
    position = np.arange(len(data.items))
    events = pd.DataFrame({"user": user, "item": data.items, "event": data.events, "position": position})
    bought = events[events["event"] == purchase_code].copy()
    bought["history_length"] = bought["position"].to_numpy() - data.offsets[bought["user"].to_numpy()]
    part = np.full(len(data.items), "train", dtype=object)
    part[split.val_pos[split.val_pos >= 0]] = "validation"
    part[split.test_pos[split.test_pos >= 0]] = "test"
    bought["part"] = part[bought["position"].to_numpy()]
    either = np.zeros(len(bought), dtype=bool)
    for name, code in zip(browse, browse_codes):
        first = events[events["event"] == code].groupby(["user", "item"])["position"].min().rename("first")
        joined = bought.join(first, on=["user", "item"])
        before = (joined["first"] < joined["position"]).to_numpy()  # NaN (never) compares False
        bought[f"{name}_before"] = before
        either |= before
    bought["browsed_before"] = either
    return bought.drop(columns=["event"]).reset_index(drop=True)


def browsed_by_history_length(purchases: pd.DataFrame) -> pd.DataFrame:
    """Share of purchases browsed before, per part and history-length bucket, with counts."""
    labels = bucket_labels(HISTORY_LENGTH_EDGES)
    bucket = np.searchsorted(np.asarray(HISTORY_LENGTH_EDGES), purchases["history_length"], side="right") - 1
    frame = purchases.assign(history=np.asarray(labels, dtype=object)[np.maximum(bucket, 0)])
    shares = [c for c in purchases.columns if c.endswith("_before")]
    table = frame.groupby(["part", "history"], sort=False)[shares].mean()
    table["purchases"] = frame.groupby(["part", "history"], sort=False).size()
    table = table.reset_index()
    table["history"] = pd.Categorical(table["history"], categories=labels, ordered=True)
    table["part"] = pd.Categorical(table["part"], categories=["train", "validation", "test"], ordered=True)
    return table.sort_values(["part", "history"]).reset_index(drop=True)
