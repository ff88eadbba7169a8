"""``aligner_attention``: the public fused op, with backend dispatch."""

from __future__ import annotations

import os
import warnings

import torch
from torch import Tensor

from aligner_kernels import SUPPORTED_HEAD_DIMS

from . import backend_choice
from .checks import check_attention_inputs
from .kernel_inputs import dense_gate, packed_layout
from .reference import aligner_attention_reference
from .split import MainAttention, split_attention, split_unsupported
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
    main_attention: MainAttention | None = None,
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
        main_attention: optional ``(q, k, v) -> out``, plain attention in the layouts above, that
            replaces the op's own main term: the caller's kernel with a mask the op cannot express
            (a Hugging Face model's configured attention with the mask transformers built: static
            cache slots, sliding windows, 4D masks). The prefix term does not depend on the mask, so
            every backend then runs the split form: ``main_attention`` plus the prefix term, from
            the PyTorch reference ("reference", and "auto" off CUDA) or our prefix kernels ("split",
            "fused", "auto" on CUDA). ``causal`` and the cu_seqlens still describe q's layout.

    Inside ``torch.autocast`` q, k, v, prefix_k and prefix_v are first cast to the autocast dtype,
    as SDPA's inputs are (so they may then differ in dtype on entry).

    Returns:
        out: (batch_size, seqlen_q, nheads, headdim), or packed (total_q, nheads, headdim); q's
        dtype (the autocast dtype inside autocast). Differentiable in q, k, v, prefix_k, prefix_v and gate.

    On every kernel backend (fused, split, auto), a query block of at most 16 tokens (decoding)
    that needs no gradient runs the split-KV forward (flash-decoding: the keys are split across
    programs, the partial softmaxes merged, the gated prefix added once).
    """
    backend = backend or os.environ.get("ALIGNER_BACKEND", "auto")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if main_attention is not None and not callable(main_attention):
        raise TypeError(
            f"main_attention must be callable (q, k, v) -> out, got {type(main_attention).__name__}"
        )
    q, k, v, prefix_k, prefix_v = _autocast(q, k, v, prefix_k, prefix_v)
    max_seqlen_q, max_seqlen_k = check_attention_inputs(
        q, k, v, prefix_k, prefix_v, gate,
        causal=causal, softmax_scale=softmax_scale, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
    )  # fmt: skip
    options = dict(
        causal=causal, scale=softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5,
        cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
    )  # fmt: skip
    if not _use_kernels(backend, q):
        return aligner_attention_reference(
            q, k, v, prefix_k, prefix_v, gate, causal=causal, softmax_scale=options["scale"],
            cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, main_attention=main_attention,
        )  # fmt: skip
    inputs = (q, k, v, prefix_k, prefix_v, gate)
    if main_attention is not None:  # only the split form can use the caller's main attention
        return split_attention(*inputs, main_attention=main_attention, **options)
    needs_grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in inputs)
    if max_seqlen_q <= DECODE_MAX_QUERIES and not needs_grad:
        return _fused(*inputs, decoding=True, **options)
    if backend != "fused":
        unsupported = split_unsupported(q, cu_seqlens_q is not None, causal, max_seqlen_q, max_seqlen_k)
        if backend == "auto" and unsupported is None:
            backend = backend_choice.choose(*inputs, run=run_backend, needs_grad=needs_grad, **options)
        if backend == "split" and unsupported is None:
            return split_attention(*inputs, **options)
    return _fused(*inputs, decoding=False, **options)


def _autocast(q: Tensor, *others: Tensor | None) -> tuple[Tensor | None, ...]:
    """Inside ``torch.autocast``, q, k, v and the prefix in the autocast dtype, as autocast hands
    them to SDPA (under autocast RoPE leaves q in fp32 while v_proj gives bf16); the gate stays
    fp32 and every backend accumulates in fp32. Outside autocast, unchanged."""
    tensors = (q, *others)
    if not isinstance(q, Tensor) or not torch.is_autocast_enabled(q.device.type):
        return tensors
    dtype = torch.get_autocast_dtype(q.device.type)
    castable = (torch.float32, torch.float16, torch.bfloat16)
    return tuple(x.to(dtype) if isinstance(x, Tensor) and x.dtype in castable else x for x in tensors)


def run_backend(backend: str, q, k, v, prefix_k, prefix_v, gate, **options) -> Tensor:
    """One of auto's candidates, "fused" or "split", on validated inputs (``options`` as
    :func:`split_attention` takes them): what :mod:`aligner.backend_choice` times."""
    if backend == "split":
        return split_attention(q, k, v, prefix_k, prefix_v, gate, **options)
    return _fused(q, k, v, prefix_k, prefix_v, gate, decoding=False, **options)


def _fused(q, k, v, prefix_k, prefix_v, gate, *, causal, scale, cu_seqlens_q, cu_seqlens_k,
           max_seqlen_q, max_seqlen_k, decoding) -> Tensor:  # fmt: skip
    """The fused kernels (the split-KV forward when decoding) on validated inputs."""
    shape = q.shape
    q, k, v, cu_q, cu_k = packed_layout(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    args = (q, k, v, prefix_k, prefix_v, dense_gate(gate), cu_q, cu_k, max_seqlen_q, max_seqlen_k)
    args = (*args, float(scale), causal)
    out = fused_decode_forward(*args) if decoding else fused_attention_forward(*args)[0]
    return out.view(shape)
