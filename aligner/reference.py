"""Reference Aligner attention in plain PyTorch: the executable spec of DESIGN.md section 1.

This is what every kernel is tested against, and the CPU path of :func:`aligner.aligner_attention`.
It is written to be obviously right: the main attention is PyTorch's own
``scaled_dot_product_attention`` with an explicit bottom-right causal mask, the prefix attention a
second, separate ``scaled_dot_product_attention`` without a mask (for N = 1 its closed form), then
the gated sum. Math runs in float32 (float64 inputs stay float64) and the result is cast back to
the input dtype.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def _upcast(x: Tensor) -> Tensor:
    return x if x.dtype == torch.float64 else x.float()


def _main(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> Tensor:
    """Plain attention, heads first, fp32: q (B, H, L_q, D), k/v (B, H_kv, L_k, D)."""
    len_q, len_k = q.shape[2], k.shape[2]
    if causal and len_q == len_k:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    mask = None
    if causal:  # bottom-right aligned: query i sees key j iff j <= i + (L_k - L_q)
        i = torch.arange(len_q, device=q.device)[:, None]
        mask = torch.arange(len_k, device=q.device)[None, :] <= i + (len_k - len_q)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    if mask is not None and len_q > len_k:  # queries that see no key output 0, as in flash-attn
        out = out.masked_fill(~mask.any(-1)[:, None], 0.0)
    return out


def _add_gated_prefix(out: Tensor, q: Tensor, prefix_k: Tensor, prefix_v: Tensor, gate: Tensor, scale: float):
    """out + gate * O_pre(q), heads first, fp32: out and q (B, H, L_q, D), prefix (N, H_kv, D) or
    (B, N, H_kv, D), gate (H,) or (B, H)."""
    batch = q.shape[0]
    if prefix_k.dim() == 3:
        prefix_k, prefix_v = prefix_k.expand(batch, *prefix_k.shape), prefix_v.expand(batch, *prefix_v.shape)
    pk, pv = (_upcast(x).transpose(1, 2) for x in (prefix_k, prefix_v))
    if pk.shape[2] == 1:
        # N = 1 (DESIGN.md): the softmax over one token is 1, so O_pre = PV for every query, and
        # PK's gradient is 0 (multiplying it by 0 keeps it in the graph: a zero, not "unused").
        prefix_out = pv.repeat_interleave(q.shape[1] // pv.shape[1], dim=1)
        if pk.requires_grad:
            prefix_out = prefix_out + 0.0 * pk.sum()
    else:  # separate softmax over the N prefix tokens, visible to every query (no mask)
        prefix_out = F.scaled_dot_product_attention(q, pk, pv, scale=scale, enable_gqa=True)
    # gate (H,) shared or (B, H) per sequence, against out (B, H, L_q, D)
    return torch.addcmul(out, gate.to(out.dtype)[..., None, None], prefix_out)


def _batched(q, k, v, prefix_k, prefix_v, gate, causal: bool, scale: float, main=None) -> Tensor:
    """q (B, L_q, H, D), k/v (B, L_k, H_kv, D), prefix (N, H_kv, D), (B, N, H_kv, D) or None,
    gate (H,), (B, H) or None; ``main``: the main term (B, L_q, H, D) already computed, or None."""
    q_heads = _upcast(q).transpose(1, 2)
    if main is None:
        k, v = (_upcast(x).transpose(1, 2) for x in (k, v))
        out = _main(q_heads, k, v, causal, scale)
    else:
        out = _upcast(main).transpose(1, 2)
    if gate is not None:
        out = _add_gated_prefix(out, q_heads, prefix_k, prefix_v, gate, scale)
    return out.transpose(1, 2)


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
    main_attention: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None,
) -> Tensor:
    """O = softmax(s q K^T) V + gate * softmax(s q PK^T) PV, per head, per sequence.

    Same shapes as :func:`aligner.aligner_attention`: q (B, L_q, H, D) and k/v (B, L_k, H_kv, D),
    or packed q (total_q, H, D) and k/v (total_k, H_kv, D) with ``cu_seqlens_q/k``; prefix_k/v
    (N, H_kv, D) shared or (B, N, H_kv, D) per sequence; gate (H,) shared or (B, H) per sequence.
    With prefix_k, prefix_v and gate None it is plain (flash) attention. ``main_attention(q, k, v)``,
    if given, is the main term instead of SDPA (the caller's kernel and mask). Returns q's shape and
    dtype. Inputs are assumed valid (the public op checks them).
    """
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    main = None if main_attention is None else main_attention(q, k, v)
    if main is not None and gate is None:
        return main
    if cu_seqlens_q is None:
        return _batched(q, k, v, prefix_k, prefix_v, gate, causal, scale, main).to(q.dtype)
    per_sequence = prefix_k is not None and prefix_k.dim() == 4
    gate_per_sequence = gate is not None and gate.dim() == 2
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs = []
    for b, (q0, q1, k0, k1) in enumerate(zip(bounds_q, bounds_q[1:], bounds_k, bounds_k[1:])):
        prefix = [p[b : b + 1] if per_sequence else p for p in (prefix_k, prefix_v)]
        gate_b = gate[b : b + 1] if gate_per_sequence else gate
        main_b = None if main is None else main[None, q0:q1]
        one = _batched(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], *prefix, gate_b, causal, scale, main_b)
        outs.append(one[0])
    return torch.cat(outs).to(q.dtype)


def prefix_attention_weights(q: Tensor, prefix_k: Tensor, softmax_scale: float | None = None) -> Tensor:
    """The prefix attention's own probabilities softmax_n(s q PK_n), which ``output_attentions``
    does not include (the main attention's are separate, DESIGN.md section 1).

    q (B, L_q, H, D) after RoPE, prefix_k (N, H_kv, D) or (B, N, H_kv, D) (``project_prefix``'s).
    Returns (B, H, L_q, N) fp32; for N = 1 all ones.
    """
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    if prefix_k.dim() == 3:
        prefix_k = prefix_k.expand(q.shape[0], *prefix_k.shape)
    q_heads, pk = _upcast(q).transpose(1, 2), _upcast(prefix_k).transpose(1, 2)
    pk = pk.repeat_interleave(q_heads.shape[1] // pk.shape[1], dim=1)
    return torch.softmax(scale * q_heads @ pk.transpose(-1, -2), dim=-1)
