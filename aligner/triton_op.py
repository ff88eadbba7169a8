"""The Triton kernels as a differentiable PyTorch op that ``torch.compile`` can capture.

Registered with ``torch.library.custom_op`` (forward and backward each an opaque op with a fake
implementation), so a compiled model keeps the fused kernel instead of graph-breaking on it.
Inputs here are already validated and packed: q (total_q, H, D), k/v (total_k, H_kv, D),
prefix (N, H_kv, D) or (B, N, H_kv, D), gate (H,) or (B, H) fp32, cu_seqlens int32 (B + 1,);
prefix and gate None for plain attention (their gradients then come back as empty tensors, since a custom
op cannot return None, and leave the autograd function as None).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .kernel_inputs import as_batched_gate, as_batched_prefix, last_dim_contiguous, load_kernels


@torch.library.custom_op("aligner::fused_attention_forward", mutates_args=())
def fused_attention_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prefix_k: Tensor | None,
    prefix_v: Tensor | None,
    gate: Tensor | None,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: float,
    causal: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    batch = cu_seqlens_q.shape[0] - 1
    q, k, v, prefix_k, prefix_v = map(last_dim_contiguous, (q, k, v, prefix_k, prefix_v))
    return load_kernels(q.device).aligner_attention_forward(
        q, k, v, as_batched_prefix(prefix_k, batch), as_batched_prefix(prefix_v, batch),
        as_batched_gate(gate, batch), cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
        causal,
    )  # fmt: skip


@fused_attention_forward.register_fake
def _(
    q,
    k,
    v,
    prefix_k,
    prefix_v,
    gate,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    softmax_scale,
    causal,
):
    heads, total_q = q.shape[1], q.shape[0]
    lse = q.new_empty((heads, total_q), dtype=torch.float32)
    many_tokens = prefix_k is not None and prefix_k.shape[-3] > 1
    lse_prefix = q.new_empty((heads, total_q if many_tokens else 0), dtype=torch.float32)
    return torch.empty_like(q), lse, lse_prefix


@torch.library.custom_op("aligner::fused_attention_backward", mutates_args=())
def fused_attention_backward(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prefix_k: Tensor | None,
    prefix_v: Tensor | None,
    gate: Tensor | None,
    out: Tensor,
    lse: Tensor,
    lse_prefix: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: float,
    causal: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    batch = cu_seqlens_q.shape[0] - 1
    dout, q, k, v, prefix_k, prefix_v = map(last_dim_contiguous, (dout, q, k, v, prefix_k, prefix_v))
    grads = load_kernels(q.device).aligner_attention_backward(
        dout, q, k, v, as_batched_prefix(prefix_k, batch), as_batched_prefix(prefix_v, batch),
        as_batched_gate(gate, batch), out, lse, lse_prefix, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
        max_seqlen_k, softmax_scale, causal,
        shared_prefix=prefix_k is not None and prefix_k.dim() == 3,
        shared_gate=gate is not None and gate.dim() == 1,
    )  # fmt: skip
    return tuple(q.new_empty(0) if grad is None else grad for grad in grads)


@fused_attention_backward.register_fake
def _(dout, q, k, v, prefix_k, prefix_v, gate, *rest):
    if prefix_k is None:
        return (
            torch.empty_like(q),
            torch.empty_like(k),
            torch.empty_like(v),
            *(q.new_empty(0) for _ in range(3)),
        )
    return (
        torch.empty_like(q),
        torch.empty_like(k),
        torch.empty_like(v),
        torch.empty_like(prefix_k),
        torch.empty_like(prefix_v),
        torch.empty_like(gate, dtype=torch.float32),
    )


def _setup_context(ctx, inputs, output):
    q, k, v, prefix_k, prefix_v, gate, cu_seqlens_q, cu_seqlens_k, max_q, max_k, scale, causal = inputs
    out, lse, lse_prefix = output
    ctx.save_for_backward(q, k, v, prefix_k, prefix_v, gate, out, lse, lse_prefix, cu_seqlens_q, cu_seqlens_k)
    ctx.options = (max_q, max_k, scale, causal)


def _backward(ctx, dout, _dlse, _dlse_prefix):
    q, k, v, prefix_k, prefix_v, gate, out, lse, lse_prefix, cu_q, cu_k = ctx.saved_tensors
    dq, dk, dv, dpk, dpv, dgate = fused_attention_backward(
        dout, q, k, v, prefix_k, prefix_v, gate, out, lse, lse_prefix, cu_q, cu_k, *ctx.options
    )
    prefix_grads = (None, None, None) if gate is None else (dpk, dpv, dgate.to(gate.dtype))
    return dq, dk, dv, *prefix_grads, None, None, None, None, None, None


fused_attention_forward.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("aligner::fused_decode_forward", mutates_args=())
def fused_decode_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prefix_k: Tensor | None,
    prefix_v: Tensor | None,
    gate: Tensor | None,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: float,
    causal: bool,
) -> Tensor:
    """The split-KV (flash-decoding) forward for short query blocks; no backward."""
    batch = cu_seqlens_q.shape[0] - 1
    q, k, v, prefix_k, prefix_v = map(last_dim_contiguous, (q, k, v, prefix_k, prefix_v))
    return load_kernels(q.device).aligner_attention_decode(
        q, k, v, as_batched_prefix(prefix_k, batch), as_batched_prefix(prefix_v, batch),
        as_batched_gate(gate, batch), cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
        causal,
    )  # fmt: skip


@fused_decode_forward.register_fake
def _(q, *rest):
    return torch.empty_like(q)
