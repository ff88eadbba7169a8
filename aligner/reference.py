"""Reference Aligner attention in plain PyTorch: the executable spec of DESIGN.md section 1.

This is what every kernel is tested against, and the CPU path of :func:`aligner.aligner_attention`.
It is written for clarity, not speed: scores are materialised, math is done in float32 (float64
inputs stay float64) and cast back to the input dtype at the end.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _upcast(x: Tensor) -> Tensor:
    return x if x.dtype == torch.float64 else x.float()


def _softmax_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, allowed: Tensor | None) -> Tensor:
    """softmax(scale * q k^T) v with heads in dim -3; rows with no allowed key give 0 (as flash-attn)."""
    scores = scale * q @ k.transpose(-1, -2)
    if allowed is None:
        return torch.softmax(scores, dim=-1) @ v
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    # A row with no visible key is all -inf -> NaN; flash attention defines its output as 0.
    return torch.where(allowed.any(-1, keepdim=True), probs, 0.0) @ v


def _aligner_attention_one(q, k, v, prefix_k, prefix_v, gate, causal: bool, scale: float) -> Tensor:
    """One sequence. q (L_q, H, D), k/v (L_k, H_kv, D), prefix (N, H_kv, D) or None, gate (H,) or None."""
    group = q.shape[1] // k.shape[1]

    def heads_first(x: Tensor) -> Tensor:  # GQA: query head h reads key/value head h // group
        return _upcast(x).transpose(0, 1).repeat_interleave(group, dim=0)

    q, k, v = _upcast(q).transpose(0, 1), heads_first(k), heads_first(v)
    allowed = None
    if causal:
        len_q, len_k = q.shape[1], k.shape[1]
        i = torch.arange(len_q, device=q.device)[:, None]
        j = torch.arange(len_k, device=q.device)[None, :]
        allowed = j <= i + (len_k - len_q)  # bottom-right aligned: the last query sees every key
    out = _softmax_attention(q, k, v, scale, allowed)
    if gate is not None:  # separate softmax over the N prefix tokens, gated
        out_prefix = _softmax_attention(q, heads_first(prefix_k), heads_first(prefix_v), scale, None)
        out = out + gate.to(out.dtype)[:, None, None] * out_prefix
    return out.transpose(0, 1)


def aligner_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prefix_k: Tensor | None = None,
    prefix_v: Tensor | None = None,
    gate: Tensor | None = None,
    *,
    causal: bool = True,
    softmax_scale: float | None = None,
    cu_seqlens_q: Tensor | None = None,
    cu_seqlens_k: Tensor | None = None,
) -> Tensor:
    """O = softmax(s q K^T) V + gate * softmax(s q PK^T) PV, per head, per sequence.

    Same shapes as :func:`aligner.aligner_attention`: q (B, L_q, H, D) and k/v (B, L_k, H_kv, D),
    or packed q (total_q, H, D) and k/v (total_k, H_kv, D) with ``cu_seqlens_q/k``; prefix_k/v
    (N, H_kv, D) shared or (B, N, H_kv, D) per sequence; gate (H,). With prefix_k, prefix_v and
    gate None it is plain (flash) attention. Returns q's shape and dtype.
    Inputs are assumed valid (the public op checks them).
    """
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    per_sequence = prefix_k is not None and prefix_k.dim() == 4
    if cu_seqlens_q is None:
        sequences = [(q[b], k[b], v[b]) for b in range(q.shape[0])]
    else:
        bq, bk = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        sequences = [
            (q[bq[b] : bq[b + 1]], k[bk[b] : bk[b + 1]], v[bk[b] : bk[b + 1]]) for b in range(len(bq) - 1)
        ]
    outs = [
        _aligner_attention_one(
            qb,
            kb,
            vb,
            prefix_k[b] if per_sequence else prefix_k,
            prefix_v[b] if per_sequence else prefix_v,
            gate,
            causal,
            scale,
        )
        for b, (qb, kb, vb) in enumerate(sequences)
    ]
    out = torch.stack(outs) if cu_seqlens_q is None else torch.cat(outs)
    return out.to(q.dtype)
