"""What a network is: the contract between a model file and the one training module.

A model is one network file plus one config. The network (a plain `nn.Module`, subclass of
`SequenceNetwork`) holds only the model: its embeddings and blocks, how it turns a training batch
into hidden states, target items and which positions have a target (`training_outputs`), and how
it scores items after a history (`user_vectors` and `item_vectors`, whose dot products are the
scores; or `score`). Everything else, which positions enter the loss (gathered, or all of them
weighted under `data.static_shapes`), the loss, batch weighting, the optimizer and scheduler,
evaluation, checkpoints, is `recsys.training.module.SequentialRecommender`, the same for every model.

What the network needs from the data (item count, event types, training item counts) reaches it
once, as `DataInfo`, the first argument of its constructor. What it can do is declared, not
discovered: `trainable` (False for a model with nothing to learn), `scores_by_dot_product` (False
for a model that overrides `score`), `reads_events` (it reads event types and time gaps, so
evaluation hands them over and serving refuses it), `reads_times` (it reads each position's
timestamp, likewise) and `max_len` (the history length it reads).
`check_options` checks its config before any data is read.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from recsys.models.item_attributes import item_table


@dataclass(frozen=True)
class DataInfo:
    """What a network and the training module are told about the data they are built for.

    num_items: real items, indices 1..num_items (0 is padding).
    num_event_types: event types of event-typed data, ids 1..num_event_types (0: none).
    train_item_counts: (num_items + 1,) interactions of each item in the training part.
    item_ids: (num_items + 1,) original id of each index (entry 0 for padding), for serving.
    recent_item_counts: under data.split=time, the training counts of the last N days only.
    item_features: the items' attributes (data.item_features), for models that use them.
    fingerprint: the data's cache fingerprint; evaluate.py refuses a checkpoint of other data.
    """

    num_items: int
    num_event_types: int = 0
    train_item_counts: torch.Tensor | None = None
    item_ids: np.ndarray | None = field(default=None, repr=False)
    # Under a time split: days -> (num_items + 1,) training item counts of the last `days` before
    # the validation cut (a recency popularity); None where the data has no such cut.
    recent_item_counts: Callable[[float], torch.Tensor] | None = field(default=None, repr=False)
    fingerprint: str = ""
    # (num_items + 1,) bool: the items with an event in the training part (None: all of them). Under a
    # time split, items first seen after the validation cut are no class of the training loss.
    trained_items: np.ndarray | None = field(default=None, repr=False)
    # data.item_features: the items' attributes in CSR rows (recsys/data/item_features.py), or None.
    item_features: Any = field(default=None, repr=False)


class SequenceNetwork(nn.Module):
    """Base of every network: the declared capabilities and the two scoring methods' contract."""

    # False for a network with nothing to learn (most-popular): no loss, no optimizer.
    trainable: ClassVar[bool] = True
    # True: scores are user_vectors(history) @ item_vectors().T, ranked a chunk of items at a time
    # (bounded memory at any catalogue size). False: the network overrides `score`.
    scores_by_dot_product: ClassVar[bool] = True
    # True for a network built to read each position's timestamp (HSTU's model.time_bias): the
    # batches then carry `input_times` / `history_times` and evaluation hands them over as `times`.
    reads_times: bool = False

    def __init__(self, data: DataInfo, max_len: int):
        super().__init__()
        self.num_items = data.num_items
        self.max_len = max_len

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> None:
        """Raise UserInputError for config values that cannot work; runs before data is read."""

    @property
    def reads_events(self) -> bool:
        """True for a network built to read event types or time gaps: evaluation then hands it
        the history's `events`, `gaps` and the `target_event` type."""
        return False

    def training_outputs(
        self, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(hidden (B, L, d), target items (B, L), has_target (B, L) bool) of a training batch: the
        loss scores `query_head(hidden)` at the positions with a target against `item_vectors()`.
        Every position is returned, so that the training module, not the network, chooses between
        gathering the target positions and weighting all of them (a shape that does not depend on
        the data, which torch.compile and CUDA graphs need)."""
        raise NotImplementedError(f"{type(self).__name__} must implement training_outputs")

    def query_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Query vectors (N, d') from hidden states (N, d) of `training_outputs`: identity, unless
        a network scores through a head of its own (BERT4Rec). Applied after the target positions
        are gathered, so that it runs on those alone."""
        return hidden

    def user_vectors(self, history: torch.Tensor, **features: torch.Tensor) -> torch.Tensor:
        """(B, d) vectors whose dot products with `item_vectors()` score every item as the next one
        after right-padded `history` (B, L) (and, for a network that reads them, its features)."""
        raise NotImplementedError(f"{type(self).__name__} must implement user_vectors or score")

    def item_vectors(self) -> torch.Tensor:
        """(num_items + 1, d) vectors of padding (row 0) and the items."""
        raise NotImplementedError(f"{type(self).__name__} must implement item_vectors or score")

    def score(self, history: torch.Tensor, **features: torch.Tensor) -> torch.Tensor:
        """Scores (B, num_items + 1) of every item as the next one after right-padded `history`."""
        return self.user_vectors(history, **features) @ self.item_vectors().T


class CausalItemNetwork(SequenceNetwork):
    """A causal network whose forward(input_ids, events, gaps[, times]) gives one hidden state per position
    (SASRec, HSTU): every position with a next item predicts it, the history's last real position
    is the user's vector, and the items are `item_embedding` plus `item_attributes` (either may be
    None). Subclasses set those two and `behaviour` (recsys/models/events.py)."""

    @property
    def reads_events(self) -> bool:
        return self.behaviour.active

    def training_outputs(
        self, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        times = {"times": batch["input_times"]} if self.reads_times else {}
        hidden = self(batch["input_ids"], batch.get("input_events"), batch.get("input_gaps"), **times)
        # Every position with a next item (of a target type) predicts it.
        return hidden, batch["target_ids"], target_positions(batch)

    def user_vectors(
        self,
        history: torch.Tensor,
        events: torch.Tensor | None = None,
        gaps: torch.Tensor | None = None,
        target_event: torch.Tensor | None = None,  # a causal model predicts any next event
        times: torch.Tensor | None = None,
    ) -> torch.Tensor:
        history, events, gaps, times = keep_last_positions(history, self.max_len, events, gaps, times)
        extra = {"times": times} if self.reads_times else {}
        return last_real_position(self(history, events, gaps, **extra), history)

    def item_vectors(self) -> torch.Tensor:
        return item_table(self.item_embedding, self.item_attributes)


# --- helpers the networks share ---------------------------------------------------------------


def target_positions(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, L) bool: training positions with a next item, and, where the data module restricts the
    targets to some event types (`target_mask`), whose next event is of one of them."""
    has_target = batch["target_ids"] != 0
    if "target_mask" in batch:
        has_target = has_target & batch["target_mask"]
    return has_target


def flat_positions(mask: torch.Tensor) -> torch.Tensor:
    """Indices of the True entries of `mask` (B, L) into its flattened B * L positions, row by row.

    Index (B, L, ...) tensors with them (`x.flatten(0, 1)[index]`) rather than with the mask: every
    boolean indexing, and every count of the mask, waits for the device to say how many entries are
    True (a device-to-host sync that drains a GPU's queue of kernels), where this waits once, and
    the count is `len(index)`. Same rows in the same order as `x[mask]`."""
    return mask.flatten().nonzero().squeeze(1)


def position_ids(input_ids: torch.Tensor, from_end: bool) -> torch.Tensor:
    """(B, L) position of each column of right-padded `input_ids`: 0 at the first column, or, with
    `from_end`, 0 at each row's last real (non-padding) column, counting up towards the start
    (padding columns get 0; their outputs are never used)."""
    positions = torch.arange(input_ids.size(1), device=input_ids.device).expand_as(input_ids)
    if not from_end:
        return positions
    lengths = (input_ids != 0).sum(dim=1, keepdim=True)
    return (lengths - 1 - positions).clamp(min=0)


def last_real_position(hidden: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """hidden (B, L, d) at each right-padded row's last real item: (B, d)."""
    last = (input_ids != 0).sum(dim=1).clamp(min=1) - 1
    return hidden[torch.arange(input_ids.size(0), device=input_ids.device), last]


def keep_last_positions(
    history: torch.Tensor, max_len: int, *aligned: torch.Tensor | None
) -> tuple[torch.Tensor | None, ...]:
    """Each right-padded row's last `max_len` positions of `history` and of the tensors aligned
    with it (None passes through), still right-padded."""
    if history.size(1) <= max_len:
        return (history, *aligned)
    lengths = (history != 0).sum(dim=1, keepdim=True)
    index = (lengths - max_len).clamp(min=0) + torch.arange(max_len, device=history.device)
    real = index < lengths
    index = index.clamp(max=history.size(1) - 1)
    return tuple(None if t is None else t.gather(1, index) * real for t in (history, *aligned))
