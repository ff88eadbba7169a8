"""``aligner_attention``: the public fused op, with backend dispatch."""

from __future__ import annotations

import os
import warnings

import torch
from torch import Tensor

from aligner_kernels import SUPPORTED_HEAD_DIMS

from . import backend_choice
from .checks import check_attention_inputs
from .reference import aligner_attention_reference
from .split import split_attention, split_unsupported
from .triton_op import fused_attention_forward, fused_decode_forward

BACKENDS = ("auto", "fused", "split", "reference")
# Query blocks up to this long (decoding with a KV cache, speculative verification) run the
# split-KV forward when no gradient is needed.
DECODE_MAX_QUERIES = 16


def _use_kernels(backend: str, q: Tensor) -> bool:
    if backend == "reference":
        return False
    if backend == "auto" and q.device.type != "cuda":
        return False
    head_dim = q.shape[-1]
    reason = None
    if head_dim not in SUPPORTED_HEAD_DIMS:
        reason = f"head_dim {head_dim} has no Triton kernel (supported: {SUPPORTED_HEAD_DIMS})"
    elif q.dtype == torch.float64:
        reason = "float64 has no Triton kernel (use float16, bfloat16 or float32)"
    if reason is None:
        return True
    if backend != "auto":
        raise ValueError(f"backend={backend!r}: {reason}")
    warnings.warn(f"aligner_attention falls back to the PyTorch reference: {reason}", stacklevel=3)
    return False


def aligner_attention(
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
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    backend: str | None = None,
) -> Tensor:
    """Flash attention plus the gated attention to N shared prefix tokens, fused in one pass.

    out = softmax(s q K^T + mask) V + gate[h] * softmax(s q PK^T) PV, with separate softmaxes
    (DESIGN.md section 1). Arguments follow ``flash_attn_func`` / ``flash_attn_varlen_func``.

    Arguments:
        q: (batch_size, seqlen_q, nheads, headdim), or packed (total_q, nheads, headdim) with
            ``cu_seqlens_q``. float16, bfloat16 or float32 (float64: reference backend only).
        k: (batch_size, seqlen_k, nheads_k, headdim), or packed (total_k, nheads_k, headdim).
            nheads must be divisible by nheads_k (MQA/GQA). Same dtype as q.
        v: same shape and dtype as k.
        prefix_k: (num_tokens, nheads_k, headdim) shared by the batch, or
            (batch_size, num_tokens, nheads_k, headdim) one prefix per sequence: the Aligner
            tokens through this layer's k_proj (no RoPE). num_tokens >= 1. Same dtype as q.
        prefix_v: same shape and dtype as prefix_k (the tokens through v_proj).
        gate: (nheads,), this layer's per-head gate shared by the batch, or (batch_size, nheads)
            one row per sequence (a row of zeros: that sequence gets exactly the plain attention);
            float32 even when q is half precision. prefix_k, prefix_v and gate all None: plain
            flash attention (a layer without an Aligner).
        causal: causal mask over the sequence, aligned to the bottom-right corner when
            seqlen_q < seqlen_k (decoding with a KV cache). Prefix tokens are always visible.
        softmax_scale: defaults to 1 / sqrt(headdim).
        cu_seqlens_q: (batch_size + 1,) int32, cumulative query lengths of a packed batch.
        cu_seqlens_k: (batch_size + 1,) int32, cumulative key lengths.
        max_seqlen_q: longest query sequence of the packed batch (computed if None).
        max_seqlen_k: longest key sequence of the packed batch (computed if None).
        backend: "auto" (on CUDA tensors the faster of "fused" and "split", measured once per
            shape bucket and cached, see :mod:`aligner.backend_choice`; the PyTorch reference on
            other devices), "fused" (our fused Triton kernels; CPU tensors run through the Triton
            interpreter), "split" (the main attention through SDPA or flash-attn plus our Triton
            prefix kernels; inputs SDPA cannot take, packed or causal with seqlen_q != seqlen_k,
            run the fused kernels unless flash-attn is installed) or "reference". Defaults to the
            ``ALIGNER_BACKEND`` environment variable, else "auto".

    Returns:
        out: (batch_size, seqlen_q, nheads, headdim), or packed (total_q, nheads, headdim); q's
        dtype. Differentiable in q, k, v, prefix_k, prefix_v and gate.

    On every kernel backend (fused, split, auto), a query block of at most 16 tokens (decoding)
    that needs no gradient runs the split-KV forward (flash-decoding: the keys are split across
    programs, the partial softmaxes merged, the gated prefix added once).
    """
    backend = backend or os.environ.get("ALIGNER_BACKEND", "auto")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    max_seqlen_q, max_seqlen_k = check_attention_inputs(
        q, k, v, prefix_k, prefix_v, gate,
        causal=causal, softmax_scale=softmax_scale, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
    )  # fmt: skip
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    if not _use_kernels(backend, q):
        return aligner_attention_reference(
            q, k, v, prefix_k, prefix_v, gate,
            causal=causal, softmax_scale=scale, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
        )  # fmt: skip

    packed = cu_seqlens_q is not None
    needs_grad = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (q, k, v, prefix_k, prefix_v, gate)
    )
    decoding = max_seqlen_q <= DECODE_MAX_QUERIES and not needs_grad
    if backend != "fused" and not decoding:
        unsupported = split_unsupported(q, packed, causal, max_seqlen_q, max_seqlen_k)
        if backend == "auto" and unsupported is None:
            backend = backend_choice.choose(
                q, k, v, prefix_k, prefix_v, gate,
                causal=causal, softmax_scale=scale, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, needs_grad=needs_grad,
            )  # fmt: skip
        if backend == "split" and unsupported is None:
            return split_attention(
                q, k, v, prefix_k, prefix_v, gate,
                causal=causal, scale=scale, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
            )  # fmt: skip
    return _fused(q, k, v, prefix_k, prefix_v, gate, causal, scale, cu_seqlens_q, cu_seqlens_k,
                  max_seqlen_q, max_seqlen_k, decoding)  # fmt: skip


def _fused(q, k, v, prefix_k, prefix_v, gate, causal, scale, cu_seqlens_q, cu_seqlens_k,
           max_seqlen_q, max_seqlen_k, decoding) -> Tensor:  # fmt: skip
    """The fused kernels (the split-KV forward when decoding) on validated inputs."""
    packed = cu_seqlens_q is not None
    if packed:  # the kernels read cu_seqlens as dense arrays
        cu_seqlens_q, cu_seqlens_k = cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous()
    else:  # a padded batch is a packed batch of equal lengths
        batch = q.shape[0]
        cu_seqlens_q = torch.arange(
            0, (batch + 1) * max_seqlen_q, max_seqlen_q, dtype=torch.int32, device=q.device
        )
        cu_seqlens_k = torch.arange(
            0, (batch + 1) * max_seqlen_k, max_seqlen_k, dtype=torch.int32, device=q.device
        )
        q, k, v = (x.reshape(-1, *x.shape[2:]) for x in (q, k, v))
    if gate is not None:  # the kernels read an fp32 gate as a dense array
        gate = gate.float().contiguous()
    args = (q, k, v, prefix_k, prefix_v, gate, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    args = (*args, float(scale), causal)
    if decoding:
        out = fused_decode_forward(*args)
    else:
        out, _, _ = fused_attention_forward(*args)
    return out if packed else out.view(-1, max_seqlen_q, *out.shape[1:])
