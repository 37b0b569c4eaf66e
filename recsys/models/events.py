"""What a customer did at each position, as input to the transformer models (browse vs buy).

With event-typed data (`data.event_types`) every position of a sequence has an event type (view,
add-to-cart, purchase, ...) and a time-gap bucket (the log of the time since the user's previous
event, see `recsys.data.features.time_gap_buckets`). `BehaviourEmbedding` turns them into vectors
that SASRec and BERT4Rec add to the item embedding, as they add the position embedding:

    x = item_embedding(item) * scale + position_embedding(pos) [+ event_embedding(type)] [+ gap_embedding(gap)]

With both switches off (the default) it holds no parameters and adds nothing, so the models are
exactly what they are without it: same parameters, same initialisation, same results.
"""

from __future__ import annotations

import torch
from torch import nn

from recsys.data.features import NUM_GAP_BUCKETS
from recsys.errors import UserInputError


class BehaviourEmbedding(nn.Module):
    def __init__(self, dim: int, num_event_types: int, event_embedding: bool, time_gaps: bool):
        super().__init__()
        num_event_types = num_event_types or 0  # null in a config that was never given data
        if (event_embedding or time_gaps) and num_event_types < 1:
            switch = "model.event_embedding" if event_embedding else "model.time_gaps"
            raise UserInputError(
                f"{switch}: the data has no event types; set data.event_types (e.g. data=retailrocket)"
            )
        # Row 0 is padding for both; gap bucket 0 also stands for "unknown" (a [MASK]).
        self.events = nn.Embedding(num_event_types + 1, dim, padding_idx=0) if event_embedding else None
        self.gaps = nn.Embedding(NUM_GAP_BUCKETS, dim, padding_idx=0) if time_gaps else None

    @property
    def active(self) -> bool:
        return self.events is not None or self.gaps is not None

    def forward(self, events: torch.Tensor | None, gaps: torch.Tensor | None) -> torch.Tensor | float:
        """(B, L, dim) to add to the input embeddings, or 0.0 when both switches are off."""
        out: torch.Tensor | float = 0.0
        if self.events is not None:
            if events is None:
                raise UserInputError(
                    "model.event_embedding: the model reads event types but the batch has none"
                )
            out = out + self.events(events)
        if self.gaps is not None:
            if gaps is None:
                raise UserInputError("model.time_gaps: the model reads time gaps but the batch has none")
            out = out + self.gaps(gaps)
        return out
