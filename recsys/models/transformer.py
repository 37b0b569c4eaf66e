"""Transformer blocks shared by the sequential models, with a plain reference for attention.

Attention goes through `torch.nn.functional.scaled_dot_product_attention` so that PyTorch can pick a
fused kernel (flash on a GPU when there is no explicit mask). `reference_attention` computes the
same thing with plain matrix products; tests hold the fused path to it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    is_causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + masks) v, written out. q, k, v: (B, H, L, d); mask: (B, L), True = real.

    A query whose every key is masked gets zeros rather than NaN.
    """
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
    allowed = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device)
    if is_causal:
        allowed = torch.tril(allowed)
    allowed = allowed.expand(scores.shape)
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, None, :]
    scores = scores.masked_fill(~allowed, float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return weights @ v


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, dropout: float):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"model.dim ({dim}) must be divisible by model.num_heads ({num_heads})")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(
        self, x: torch.Tensor, is_causal: bool, key_padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        batch, length, dim = x.shape
        q, k, v = (
            self.qkv(x).view(batch, length, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        )
        # A boolean mask (True = attend) forces a non-flash kernel; the causal models pass none.
        mask = None
        if key_padding_mask is not None:
            # A padding query would see no key at all and SDPA would return NaN for it; letting every
            # query see itself avoids that and changes nothing for real queries, whose own key is real.
            itself = torch.eye(length, dtype=torch.bool, device=x.device)
            mask = key_padding_mask[:, None, None, :] | itself
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0, is_causal=is_causal
        )
        return self.proj(y.transpose(1, 2).reshape(batch, length, dim))


class TransformerBlock(nn.Module):
    """Self-attention then a feed-forward layer, each with a residual; pre- or post-layer-norm."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        ffn_dim: int,
        dropout: float,
        pre_norm: bool = True,
        attention_dropout: float = 0.0,
    ):
        super().__init__()
        self.pre_norm = pre_norm
        self.attn_norm = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, num_heads, attention_dropout)
        self.ffn_norm = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(
            nn.Linear(dim, ffn_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(ffn_dim, dim)
        )
        self.dropout = nn.Dropout(dropout)

    def forward(
        self, x: torch.Tensor, is_causal: bool, key_padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self.pre_norm:
            x = x + self.dropout(self.attn(self.attn_norm(x), is_causal, key_padding_mask))
            return x + self.dropout(self.ffn(self.ffn_norm(x)))
        x = self.attn_norm(x + self.dropout(self.attn(x, is_causal, key_padding_mask)))
        return self.ffn_norm(x + self.dropout(self.ffn(x)))


class SwiGLU(nn.Module):
    """The gated feed-forward layer W2 (SiLU(W1 x) * W3 x) (Shazeer 2020), without biases."""

    def __init__(self, dim: int, inner_dim: int, dropout: float):
        super().__init__()
        self.gate = nn.Linear(dim, inner_dim, bias=False)
        self.up = nn.Linear(dim, inner_dim, bias=False)
        self.down = nn.Linear(inner_dim, dim, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.dropout(F.silu(self.gate(x)) * self.up(x)))


class LiGRBlock(nn.Module):
    """A LiGR transformer layer (Borisyuk et al., "From Features to Transformers", 2025; the layer
    of eSASRec, Tikhonov et al., RecSys 2025): pre-layer-norm self-attention and a SwiGLU
    feed-forward layer, each added to the residual stream through a learned sigmoid gate per
    dimension, computed from the layer's normalised input:

        h = LN1(x);  x = x + sigmoid(G1 h) * attention(h)
        h = LN2(x);  x = x + sigmoid(G2 h) * SwiGLU(h)

    The gates let a layer pass its input through unchanged where its update does not help, which
    the eSASRec paper found to train more stably than the plain residual.
    """

    def __init__(
        self, dim: int, num_heads: int, ffn_dim: int, dropout: float, attention_dropout: float = 0.0
    ):
        super().__init__()
        self.attn_norm = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, num_heads, attention_dropout)
        self.attn_gate = nn.Linear(dim, dim)
        self.ffn_norm = nn.LayerNorm(dim)
        self.ffn = SwiGLU(dim, ffn_dim, dropout)
        self.ffn_gate = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self, x: torch.Tensor, is_causal: bool, key_padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        h = self.attn_norm(x)
        x = x + torch.sigmoid(self.attn_gate(h)) * self.dropout(self.attn(h, is_causal, key_padding_mask))
        h = self.ffn_norm(x)
        return x + torch.sigmoid(self.ffn_gate(h)) * self.dropout(self.ffn(h))


BLOCKS = ("transformer", "ligr")


def init_weights(model: nn.Module, std: float) -> None:
    """N(0, std) for every linear and embedding weight, zero biases, a zero padding embedding.

    With input and output item embeddings tied, nn.Embedding's default N(0, 1) stalls learning; a
    small std does not (see PROTOCOL.md). Row 0 of each embedding is the padding id.
    """
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()
