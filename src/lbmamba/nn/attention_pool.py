"""Attention pooling with one learned query: a sequence of tokens (B, L, C) -> one vector (B, C)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_, trunc_normal_tf_

__all__ = ["AttentionPoolHead"]


class AttentionPoolHead(nn.Module):
    """Attention pooling with one learned query (`latent`), as in lbvim_528_patch16_224_atthead.

    keys / values from one `kv` Linear(dim, 2 dim), `num_heads` heads, scaled dot-product attention,
    no query mapping and no output projection, then `post_norm` (LayerNorm). (B, L, C) -> (B, C).
    """

    def __init__(self, dim: int, num_heads: int = 6, qkv_bias: bool = True, norm_layer=nn.LayerNorm):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"AttentionPoolHead: dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.latent = nn.Parameter(torch.zeros(1, 1, dim))
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.post_norm = norm_layer(dim)
        self.init_weights()

    def init_weights(self):
        trunc_normal_tf_(self.latent, std=self.latent.shape[-1] ** -0.5)
        trunc_normal_(self.kv.weight, std=0.02)
        if self.kv.bias is not None:
            nn.init.zeros_(self.kv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q = self.latent.to(x.dtype).expand(B, -1, -1).reshape(B, 1, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(x).reshape(B, N, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, heads, 1, head_dim)
        x = x.transpose(1, 2).reshape(B, C)
        return self.post_norm(x)
