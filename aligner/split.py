"""The split backend (DESIGN.md section 5): O = attention(q, k, v) + gate * O_pre(q), exactly.

The main attention goes through the fastest exact vendor kernel that takes the inputs, with its
own autograd: flash-attn's ``flash_attn_func`` / ``flash_attn_varlen_func`` when installed (CUDA,
fp16/bf16), else PyTorch SDPA (cuDNN on Hopper, flash elsewhere, whatever SDPA picks). The prefix
term is our own Triton op (kernels/prefix.py) registered with ``torch.library`` like the fused
one: its forward reads q and the main output once and writes the sum, its backward gives the
prefix part of dq (autograd adds it to the main dq), dPK, dPV and dgate, and passes dO through to
the main attention unchanged.

:func:`split_unsupported` says when the split form cannot be used (the caller then runs the fused
kernels): packed inputs without flash-attn (SDPA has no varlen form), and causal attention with
L_q != L_k without flash-attn (SDPA's ``is_causal`` is aligned to the top-left corner, this
project's causal mask to the bottom-right; an explicit mask would cost SDPA its fast backends).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .kernel_inputs import (
    as_batched_gate,
    as_batched_prefix,
    dense_gate,
    equal_lengths,
    last_dim_contiguous,
    load_kernels,
)

# A caller's own plain attention, (q, k, v) -> out in the op's layout (aligner_attention's main_attention).
MainAttention = Callable[[Tensor, Tensor, Tensor], Tensor]

# The optional flash-attn package, looked up once (a constant for torch.compile's tracing).
FLASH_ATTN_AVAILABLE = importlib.util.find_spec("flash_attn") is not None


def _uses_flash_attn(q: Tensor) -> bool:
    return FLASH_ATTN_AVAILABLE and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)


def split_unsupported(
    q: Tensor, packed: bool, causal: bool, max_seqlen_q: int, max_seqlen_k: int
) -> str | None:
    """Why the split backend cannot take these inputs (then the fused kernels run), or None."""
    if _uses_flash_attn(q):
        return None
    if packed:
        return "packed (varlen) inputs need flash-attn for the main attention"
    if causal and max_seqlen_q != max_seqlen_k:
        return "SDPA's causal mask is top-left aligned; L_q != L_k needs the bottom-right one"
    return None


def vendor_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool,
    scale: float,
    cu_seqlens_q: Tensor | None,
    cu_seqlens_k: Tensor | None,
    max_seqlen_q: int,
    max_seqlen_k: int,
) -> Tensor:
    """Plain attention through the vendor kernel, in q's layout (padded or packed), differentiable."""
    if _uses_flash_attn(q):
        from flash_attn import flash_attn_func, flash_attn_varlen_func

        # flash-attn's causal mask is bottom-right aligned, as ours; its backward is deterministic
        # only when asked.
        deterministic = torch.are_deterministic_algorithms_enabled()
        if cu_seqlens_q is None:
            return flash_attn_func(q, k, v, softmax_scale=scale, causal=causal, deterministic=deterministic)
        return flash_attn_varlen_func(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
            softmax_scale=scale, causal=causal, deterministic=deterministic,
        )  # fmt: skip
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        is_causal=causal, scale=scale, enable_gqa=q.shape[2] != k.shape[2],
    )  # fmt: skip
    return out.transpose(1, 2)


def _prefix_forward(
    q: Tensor,
    main: Tensor,
    prefix_k: Tensor,
    prefix_v: Tensor,
    gate: Tensor,
    cu_seqlens_q: Tensor,
    max_seqlen_q: int,
    softmax_scale: float,
    out: Tensor,
) -> Tensor:
    """The prefix forward kernel's launch: out = main + gate * O_pre(q); returns the prefix LSE."""
    batch = cu_seqlens_q.shape[0] - 1
    q, prefix_k, prefix_v = map(last_dim_contiguous, (q, prefix_k, prefix_v))
    return load_kernels(q.device).aligner_prefix_forward(
        q, main, as_batched_prefix(prefix_k, batch), as_batched_prefix(prefix_v, batch),
        as_batched_gate(gate, batch), cu_seqlens_q, max_seqlen_q, softmax_scale, out,
    )  # fmt: skip


@torch.library.custom_op("aligner::split_prefix_forward", mutates_args=())
def split_prefix_forward(
    q: Tensor,
    main: Tensor,
    prefix_k: Tensor,
    prefix_v: Tensor,
    gate: Tensor,
    cu_seqlens_q: Tensor,
    max_seqlen_q: int,
    softmax_scale: float,
) -> tuple[Tensor, Tensor]:
    """main + gate * O_pre(q) as a new tensor, and the prefix LSE; packed tensors (split.py doc)."""
    main = last_dim_contiguous(main)
    out = torch.empty_like(main)
    lse_prefix = _prefix_forward(
        q, main, prefix_k, prefix_v, gate, cu_seqlens_q, max_seqlen_q, softmax_scale, out
    )
    return out, lse_prefix


@split_prefix_forward.register_fake
def _(q, main, prefix_k, prefix_v, gate, cu_seqlens_q, max_seqlen_q, softmax_scale):
    rows = q.shape[0] if prefix_k.shape[-3] > 1 else 0
    return torch.empty_like(main), q.new_empty((q.shape[1], rows), dtype=torch.float32)


@torch.library.custom_op("aligner::split_prefix_add_", mutates_args=("main",))
def split_prefix_add_(
    q: Tensor,
    main: Tensor,
    prefix_k: Tensor,
    prefix_v: Tensor,
    gate: Tensor,
    cu_seqlens_q: Tensor,
    max_seqlen_q: int,
    softmax_scale: float,
) -> None:
    """main += gate * O_pre(q), in place (no gradient needed: the main output is not saved)."""
    _prefix_forward(q, main, prefix_k, prefix_v, gate, cu_seqlens_q, max_seqlen_q, softmax_scale, main)


@split_prefix_add_.register_fake
def _(q, main, prefix_k, prefix_v, gate, cu_seqlens_q, max_seqlen_q, softmax_scale):
    return None


@torch.library.custom_op("aligner::split_prefix_backward", mutates_args=())
def split_prefix_backward(
    dout: Tensor,
    q: Tensor,
    prefix_k: Tensor,
    prefix_v: Tensor,
    gate: Tensor,
    lse_prefix: Tensor,
    cu_seqlens_q: Tensor,
    max_seqlen_q: int,
    softmax_scale: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """dq_prefix (empty for N = 1), dprefix_k, dprefix_v, dgate (fp32) of the prefix term."""
    batch = cu_seqlens_q.shape[0] - 1
    dout, q, prefix_k, prefix_v = map(last_dim_contiguous, (dout, q, prefix_k, prefix_v))
    dq, dpk, dpv, dgate = load_kernels(q.device).aligner_prefix_backward(
        dout, q, as_batched_prefix(prefix_k, batch), as_batched_prefix(prefix_v, batch),
        as_batched_gate(gate, batch), lse_prefix, cu_seqlens_q, max_seqlen_q, softmax_scale,
        shared_prefix=prefix_k.dim() == 3, shared_gate=gate.dim() == 1,
    )  # fmt: skip
    return q.new_empty(0) if dq is None else dq, dpk, dpv, dgate


@split_prefix_backward.register_fake
def _(dout, q, prefix_k, prefix_v, gate, *rest):
    dq = torch.empty_like(q) if prefix_k.shape[-3] > 1 else q.new_empty(0)
    return (
        dq,
        torch.empty_like(prefix_k),
        torch.empty_like(prefix_v),
        torch.empty_like(gate, dtype=torch.float32),
    )


def _setup_context(ctx, inputs, output):
    q, _main, prefix_k, prefix_v, gate, cu_seqlens_q, max_seqlen_q, scale = inputs
    # The prefix backward needs q, the prefix and its LSE, never the outputs: nothing of the size
    # of O is kept beyond what the main attention saves itself.
    ctx.save_for_backward(q, prefix_k, prefix_v, gate, output[1], cu_seqlens_q)
    ctx.options = (max_seqlen_q, scale)


def _backward(ctx, dout, _dlse_prefix):
    q, prefix_k, prefix_v, gate, lse_prefix, cu_seqlens_q = ctx.saved_tensors
    dq, dpk, dpv, dgate = split_prefix_backward(
        dout, q, prefix_k, prefix_v, gate, lse_prefix, cu_seqlens_q, *ctx.options
    )
    # N = 1: the prefix term does not depend on q.
    return None if dq.numel() == 0 else dq, dout, dpk, dpv, dgate.to(gate.dtype), None, None, None


split_prefix_forward.register_autograd(_backward, setup_context=_setup_context)


def split_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prefix_k: Tensor | None,
    prefix_v: Tensor | None,
    gate: Tensor | None,
    *,
    causal: bool,
    scale: float,
    cu_seqlens_q: Tensor | None,
    cu_seqlens_k: Tensor | None,
    max_seqlen_q: int,
    max_seqlen_k: int,
    main_attention: MainAttention | None = None,
) -> Tensor:
    """Aligner attention in the split form, same layouts and result as :func:`aligner.aligner_attention`
    (inputs validated; without ``main_attention``, :func:`split_unsupported` None). The main term is
    ``main_attention(q, k, v)`` when given (the caller's own kernel and mask), else the vendor kernel."""
    if main_attention is not None:
        main = main_attention(q, k, v)
    else:
        main = vendor_attention(
            q, k, v, causal=causal, scale=scale, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
            max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
        )  # fmt: skip
    if gate is None:
        return main
    packed = cu_seqlens_q is not None
    if packed:  # the prefix kernels read cu_seqlens as a dense array
        cu_seqlens_q = cu_seqlens_q.contiguous()
    else:  # the prefix kernels address a padded batch as packed sequences of equal length
        cu_seqlens_q = equal_lengths(q.shape[0], max_seqlen_q, q.device)
        q, main = q.reshape(-1, *q.shape[2:]), main.reshape(-1, *main.shape[2:])
    gate = dense_gate(gate)
    inputs = (q, prefix_k, prefix_v, gate)
    if torch.is_grad_enabled() and any(x.requires_grad for x in (*inputs, main)):
        out, _ = split_prefix_forward(q, main, prefix_k, prefix_v, gate, cu_seqlens_q, max_seqlen_q, scale)
    else:
        main = last_dim_contiguous(main)
        split_prefix_add_(q, main, prefix_k, prefix_v, gate, cu_seqlens_q, max_seqlen_q, scale)
        out = main
    return out if packed else out.view(-1, max_seqlen_q, *out.shape[1:])
