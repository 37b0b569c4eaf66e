"""HSTU (Zhai et al., "Actions Speak Louder than Words", ICML 2024): a causal sequence model whose
blocks replace softmax attention and the feed-forward layer by one gated, pointwise unit.

Each block, from a layer-normalised input x (B, L, d):

    u, v, q, k = split(SiLU(W1 x))                          per head: u, v of `value_dim`, q, k of `attention_dim`
    a[i, j]   = SiLU(q_i . k_j + bias[h, i - j]) / max_len  for j <= i, else 0
    y         = W2 dropout(LayerNorm(a v) * u)
    x         = x + y

- **Pointwise, not softmax**: the weights need not sum to 1, so how much a user did survives into
  the output (the paper's argument for non-stationary, streaming histories). They are divided by
  the model's `max_len`, a constant, so that a row's output never depends on how much right
  padding its batch has (the batch width varies with length bucketing).
- **Relative position bias**: one learned scalar per head and distance i - j, added before the
  SiLU; the item embeddings may also get absolute positions (`absolute_positions`).
- **No feed-forward block**: the elementwise gate `* u` is the nonlinearity.
- **Relative time bias** (`time_bias`, data with timestamps): one learned scalar per head and
  log2 bucket of the time between positions i and j, t_i - t_j, added beside the position bias.
  The reference measures from the time of the event being predicted (t_{i+1} - t_j); here
  position i reads only times up to its own, so nothing about the target, not even when it
  happens, reaches the model (tests/models/test_models.py holds every causal model to that).
  The batches then carry each position's timestamp (`input_times`, `history_times`; the data
  module's `batch_times`, which follows this switch). On event-typed data, `time_gaps` (and
  `event_embedding`) also enter as input embeddings, as in SASRec (recsys/models/events.py).

PyTorch has no fused kernel for SiLU attention (scaled_dot_product_attention is softmax only), so
attention is written with matrix products; `torch.compile` fuses the elementwise parts.
`pointwise_attention_reference` is the same computation with explicit loops over positions,
which the tests hold the batched one to. Scores are dot products with the (tied) item vectors,
as in SASRec, so every loss and the chunked ranking apply unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from recsys.errors import UserInputError
from recsys.models.events import BehaviourEmbedding
from recsys.models.item_attributes import embed_items, item_attributes
from recsys.models.network import (
    CausalItemNetwork,
    DataInfo,
)
from recsys.models.transformer import init_weights

# Time-bias buckets: floor(log2(1 + t_i - t_j)) in the timestamps' unit, capped: 64 cover every
# int64 difference (seconds: 16 is about a day, 24 about half a year).
NUM_TIME_BUCKETS = 64


def time_buckets(times: torch.Tensor) -> torch.Tensor:
    """(B, L, L) bucket of t_i - t_j for right-padded timestamps (B, L): floor(log2(1 + gap)),
    gaps below 0 (j after i, masked anyway) as 0."""
    gaps = (times[:, :, None] - times[:, None, :]).clamp(min=0).double()
    return torch.log2(1.0 + gaps).floor().long().clamp(max=NUM_TIME_BUCKETS - 1)


def pointwise_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float
) -> torch.Tensor:
    """Causal SiLU attention. q, k: (B, H, L, a); v: (B, H, L, e); bias: (i, j) biases, (H, L, L)
    or per row (B, H, L, L).
    Returns (B, H, L, e): sum over j <= i of SiLU(q_i . k_j + bias[:, i, j]) * scale * v_j."""
    length = q.size(2)
    weights = F.silu(q @ k.transpose(-2, -1) + bias) * scale
    causal = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
    return weights.masked_fill(~causal, 0.0) @ v


def pointwise_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float
) -> torch.Tensor:
    """`pointwise_attention` one query position at a time, for tests."""
    out = torch.zeros(*q.shape[:-1], v.size(-1), dtype=v.dtype, device=v.device)
    for i in range(q.size(2)):
        scores = (q[:, :, i : i + 1] * k[:, :, : i + 1]).sum(-1) + bias[..., i, : i + 1]  # (B, H, i + 1)
        out[:, :, i] = (F.silu(scores)[..., None] * scale * v[:, :, : i + 1]).sum(dim=2)
    return out


class HSTUBlock(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        attention_dim: int,
        value_dim: int,
        max_len: int,
        dropout: float,
        time_bias: bool = False,
    ):
        super().__init__()
        self.num_heads, self.attention_dim, self.value_dim = num_heads, attention_dim, value_dim
        self.scale = 1.0 / max_len
        self.input_norm = nn.LayerNorm(dim)
        self.uvqk = nn.Linear(dim, num_heads * (2 * value_dim + 2 * attention_dim))
        # bias[h, d]: head h's bias for a key d positions before the query (d = 0: itself).
        self.position_bias = nn.Parameter(torch.zeros(num_heads, max_len))
        # time_bias[h, b]: head h's bias for a key whose time lies in bucket b before the query's.
        self.time_bias = nn.Parameter(torch.zeros(num_heads, NUM_TIME_BUCKETS)) if time_bias else None
        self.output_norm = nn.LayerNorm(num_heads * value_dim)
        self.output = nn.Linear(num_heads * value_dim, dim)
        self.dropout = nn.Dropout(dropout)

    def relative_bias(self, length: int) -> torch.Tensor:
        """(H, L, L): bias[h, i - j] at (i, j) for j <= i (entries above the diagonal are masked)."""
        positions = torch.arange(length, device=self.position_bias.device)
        distance = (positions[:, None] - positions[None, :]).clamp(min=0, max=self.position_bias.size(1) - 1)
        return self.position_bias[:, distance]

    def attention_bias(self, length: int, buckets: torch.Tensor | None) -> torch.Tensor:
        """(H, L, L) position bias, plus with `time_bias` the (B, L, L) time buckets' bias: (B, H, L, L)."""
        bias = self.relative_bias(length)
        if self.time_bias is None:
            return bias
        return bias + self.time_bias[:, buckets].transpose(0, 1)

    def forward(self, x: torch.Tensor, buckets: torch.Tensor | None = None) -> torch.Tensor:
        batch, length, _ = x.shape
        heads, a, e = self.num_heads, self.attention_dim, self.value_dim
        u, v, q, k = F.silu(self.uvqk(self.input_norm(x))).split(
            [heads * e, heads * e, heads * a, heads * a], -1
        )
        q, k, v = (t.view(batch, length, heads, -1).transpose(1, 2) for t in (q, k, v))
        attended = pointwise_attention(q, k, v, self.attention_bias(length, buckets), self.scale)
        attended = attended.transpose(1, 2).reshape(batch, length, heads * e)
        return x + self.output(self.dropout(self.output_norm(attended) * u))


class HSTU(CausalItemNetwork):
    def __init__(
        self,
        data: DataInfo,
        max_len: int = 50,
        dim: int = 64,
        num_blocks: int = 2,
        num_heads: int = 2,
        attention_dim: int | None = None,
        value_dim: int | None = None,
        dropout: float = 0.2,
        init_std: float = 0.02,
        absolute_positions: bool = True,
        scale_embeddings: bool = True,
        event_embedding: bool = False,
        time_gaps: bool = False,
        time_bias: bool = False,
        item_id: bool = True,
        item_features: bool = True,
        id_dropout: float = 0.0,
    ):
        super().__init__(data, max_len)
        if num_heads < 1 or num_blocks < 0:
            raise UserInputError(
                f"model.num_heads / model.num_blocks: need >= 1 / >= 0, got {num_heads} / {num_blocks}"
            )
        attention_dim = attention_dim or max(1, dim // num_heads)
        value_dim = value_dim or max(1, dim // num_heads)
        self.embedding_scale = dim**0.5 if scale_embeddings else 1.0
        self.item_embedding = nn.Embedding(data.num_items + 1, dim, padding_idx=0) if item_id else None
        self.position_embedding = nn.Embedding(max_len, dim) if absolute_positions else None
        self.embedding_dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            HSTUBlock(dim, num_heads, attention_dim, value_dim, max_len, dropout, time_bias)
            for _ in range(num_blocks)
        )
        self.reads_times = time_bias
        self.final_norm = nn.LayerNorm(dim)
        self.behaviour = BehaviourEmbedding(dim, data.num_event_types, event_embedding, time_gaps)
        init_weights(self, init_std)
        self.item_attributes = item_attributes(
            data, dim, data.num_items + 1, init_std, item_features, item_id, "HSTU", id_dropout
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        events: torch.Tensor | None = None,
        gaps: torch.Tensor | None = None,
        times: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states (B, L, dim) for right-padded item ids (B, L), L <= max_len, and, for a
        model that reads them, the positions' event types, time-gap buckets and timestamps (B, L)."""
        x = embed_items(input_ids, self.item_embedding, self.item_attributes) * self.embedding_scale
        if self.position_embedding is not None:
            x = x + self.position_embedding(torch.arange(input_ids.size(1), device=input_ids.device))
        x = self.embedding_dropout(x + self.behaviour(events, gaps))
        buckets = None
        if self.reads_times:
            if times is None:
                raise UserInputError("model.time_bias: the model reads timestamps but the batch has none")
            buckets = time_buckets(times)
        for block in self.blocks:
            x = block(x, buckets)
        return self.final_norm(x)
