"""DiT self-attention from the packed QKV projection.

Shapes: B batch, T tokens, H heads, Dh head dim, C = H*Dh. qkv (B, T, 3*C) laid out as (3, H, Dh) per token.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def attention_ref(qkv, num_heads, qk_norm=None, scale=None, qk_norm_eps=1e-5):
    """The reference DiT (timm) attention: split + permute, optional LayerNorm on q and k, SDPA, transpose back.

    qkv: (B, T, 3*C). qk_norm: None or (q_weight, q_bias, k_weight, k_bias), each (Dh,), a LayerNorm over Dh
    with eps qk_norm_eps. scale: None -> 1/sqrt(Dh). Returns (B, T, C).
    """
    B, T, C3 = qkv.shape
    C = C3 // 3
    Dh = C // num_heads
    q, k, v = qkv.reshape(B, T, 3, num_heads, Dh).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, T, Dh)
    if qk_norm is not None:
        qw, qb, kw, kb = qk_norm
        q = F.layer_norm(q, (Dh,), qw, qb, qk_norm_eps)
        k = F.layer_norm(k, (Dh,), kw, kb, qk_norm_eps)
    o = F.scaled_dot_product_attention(q, k, v, scale=scale)  # (B, H, T, Dh)
    return o.transpose(1, 2).reshape(B, T, C)


def attention(qkv, num_heads, qk_norm=None, scale=None, qk_norm_eps=1e-5, backend=None):
    from .. import _backend

    _backend.requested(backend, ("torch",))
    return attention_ref(qkv, num_heads, qk_norm, scale, qk_norm_eps)
