"""Prefix kernels of the split backend (DESIGN.md section 5): the gated prefix attention on its own,
added to a main attention output computed by any exact kernel (SDPA's cuDNN or flash backend,
flash-attn).

1. ``aligner_prefix_fwd_kernel``: per query block, reads q and the main output once and writes
   O = O_main + gate * softmax(s q PK^T) PV (in place when the output is the main output), and the
   prefix's base-2 LSE for the backward. N = 1: O_main + gate * PV, no scores.
2. ``aligner_prefix_bwd_dq_kernel``: per query block, delta_pre = dO . O_pre (O_pre recomputed from
   the LSE), the per-block dgate partials, and the prefix part of dq, s * sum_n dT_n PK_n (none for
   N = 1).
3. dPK / dPV: the fused backward's own deterministic reduction kernel
   (``prefix_grad.aligner_attention_bwd_prefix_kernel``) over the same q, dO, LSE and delta_pre,
   then a fixed-order sum of its partials: no float atomics anywhere, the same bits run to run.

The delta_pre loop, the prefix part of dq and the store of delta_pre and the dgate partials are
the fused backward's own jit helpers too (prefix_grad.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import configs
from .common import INTERPRETING, LOG2E, ONE_TOKEN, prefix_attention, query_block
from .configs import (
    SMALLEST_BLOCK_M,
    SPLIT_PREFIX_CONFIGS,
    block_d,
    block_p,
    dot_precision,
    head_dim_bucket,
    interpreter_scope,
    prefix_variant,
)
from .prefix_grad import one_token_delta, prefix_delta, prefix_dq, prefix_token_gradients, store_prefix_delta


@triton.jit
def aligner_prefix_fwd_kernel(
    Q, Main, PK, PV, Gate, Out, LsePrefix, CuSeqQ,
    stride_qm, stride_qh, stride_mm, stride_mh, stride_pkb, stride_pkn, stride_pkh,
    stride_pvb, stride_pvn, stride_pvh, stride_gb, stride_om, stride_oh, stride_lh,
    num_prefix, qk_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
    PREFIX: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    b, head, kv_head, _, _, _, _, _, rows, offs_d, row_mask, mask, past_end = query_block(
        CuSeqQ, CuSeqQ, GROUP, HEAD_DIM, BLOCK_M, BLOCK_D
    )
    if past_end:
        return
    out = tl.load(Main + rows[:, None] * stride_mm + head * stride_mh + offs_d[None, :], mask=mask, other=0.0)
    out = out.to(tl.float32)
    gate = tl.load(Gate + b * stride_gb + head)
    pv_ptrs = PV + b * stride_pvb + kv_head * stride_pvh + offs_d[None, :]
    if PREFIX == ONE_TOKEN:  # softmax over one token is 1: O_pre = PV for every query
        pv = tl.load(pv_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
        out += gate * pv.to(tl.float32)
    else:
        q = tl.load(Q + rows[:, None] * stride_qm + head * stride_qh + offs_d[None, :], mask=mask, other=0.0)
        pk_ptrs = PK + b * stride_pkb + kv_head * stride_pkh + offs_d[None, :]
        out_prefix, lse_prefix = prefix_attention(
            q, pk_ptrs, pv_ptrs, stride_pkn, stride_pvn, offs_d, num_prefix, qk_scale,
            HEAD_DIM, BLOCK_M, BLOCK_D, BLOCK_P, DOT_PRECISION,
        )  # fmt: skip
        out += gate * out_prefix
        tl.store(LsePrefix + head * stride_lh + rows, lse_prefix, mask=row_mask)
    o_ptrs = Out + rows[:, None] * stride_om + head * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=mask)


@triton.jit
def aligner_prefix_bwd_dq_kernel(
    Q, PK, PV, Gate, DOut, DQ, LsePrefix, DeltaPrefix, DGatePartial, CuSeqQ,
    stride_qm, stride_qh, stride_pkb, stride_pkn, stride_pkh, stride_pvb, stride_pvn, stride_pvh,
    stride_gb, stride_dom, stride_doh, stride_dqm, stride_dqh, stride_lh, stride_dgb, stride_dgh,
    num_prefix, sm_scale, qk_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
    PREFIX: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    b, head, kv_head, start_m, _, _, _, _, rows, offs_d, row_mask, mask, past_end = query_block(
        CuSeqQ, CuSeqQ, GROUP, HEAD_DIM, BLOCK_M, BLOCK_D
    )
    if past_end:
        return
    row_offset = head * stride_lh + rows
    do_ptrs = DOut + rows[:, None] * stride_dom + head * stride_doh + offs_d[None, :]
    do = tl.load(do_ptrs, mask=mask, other=0.0)
    pv_ptrs = PV + b * stride_pvb + kv_head * stride_pvh + offs_d[None, :]
    if PREFIX == ONE_TOKEN:  # delta_pre = dO . PV; dT = 0, so dq gets nothing
        delta_prefix = one_token_delta(do, pv_ptrs, offs_d, HEAD_DIM)
    else:
        gate = tl.load(Gate + b * stride_gb + head)
        q = tl.load(Q + rows[:, None] * stride_qm + head * stride_qh + offs_d[None, :], mask=mask, other=0.0)
        lse_prefix = tl.load(LsePrefix + row_offset, mask=row_mask, other=float("inf"))
        pk_ptrs = PK + b * stride_pkb + kv_head * stride_pkh + offs_d[None, :]
        delta_prefix = prefix_delta(
            q, do, pk_ptrs, pv_ptrs, stride_pkn, stride_pvn, offs_d, num_prefix, lse_prefix, qk_scale,
            HEAD_DIM, BLOCK_M, BLOCK_P, DOT_PRECISION,
        )  # fmt: skip
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        dq = prefix_dq(
            dq, q, do, pk_ptrs, pv_ptrs, stride_pkn, stride_pvn, offs_d, num_prefix, lse_prefix,
            delta_prefix, gate, qk_scale, HEAD_DIM, BLOCK_P, DOT_PRECISION,
        )  # fmt: skip
        dq_ptrs = DQ + rows[:, None] * stride_dqm + head * stride_dqh + offs_d[None, :]
        tl.store(dq_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=mask)
    store_prefix_delta(
        DeltaPrefix, DGatePartial, delta_prefix, row_offset, row_mask, b, head, start_m,
        stride_dgb, stride_dgh,
    )  # fmt: skip


def _launch_options(head_dim: int) -> dict:
    # Not autotuned: the forward may write in place, and an autotuner's trial runs would add the
    # prefix several times. One fixed config per head-dim bucket (configs.SPLIT_PREFIX_CONFIGS).
    if INTERPRETING:
        return {"BLOCK_M": configs.INTERPRETER_CONFIG["BLOCK_M"]}
    config = SPLIT_PREFIX_CONFIGS[head_dim_bucket(head_dim)]
    return {
        "BLOCK_M": config.kwargs["BLOCK_M"],
        "num_warps": config.num_warps,
        "num_stages": config.num_stages,
    }


def _common(q: torch.Tensor, group: int, num_prefix: int) -> dict:
    head_dim = q.shape[-1]
    return {
        "GROUP": group,
        "HEAD_DIM": head_dim,
        "BLOCK_D": block_d(head_dim),
        "BLOCK_P": block_p(num_prefix),
        "PREFIX": prefix_variant(num_prefix),
        "DOT_PRECISION": dot_precision(q.dtype),
    }


def aligner_prefix_forward(
    q: torch.Tensor,
    main: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    gate: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    max_seqlen_q: int,
    softmax_scale: float,
    out: torch.Tensor,
) -> torch.Tensor:
    """out = main + gate * softmax(s q PK^T) PV on packed tensors; ``out`` may be ``main`` itself.

    q, main and out (total_q, H, D); prefix_k/v (B, N, H_kv, D) and gate (B, H) fp32 (batch stride
    0 when shared); cu_seqlens_q int32 (B + 1,); last dims contiguous. Returns the prefix's
    base-2 LSE (H, total_q) fp32 (empty for N = 1, which needs none).
    """
    total_q, heads, head_dim = q.shape
    batch = cu_seqlens_q.shape[0] - 1
    num_prefix = prefix_k.shape[1]
    rows = total_q if prefix_variant(num_prefix) == configs.MANY_TOKENS else 0
    lse_prefix = torch.empty((heads, rows), device=q.device, dtype=torch.float32)
    options = _launch_options(head_dim)
    grid = (triton.cdiv(max_seqlen_q, options["BLOCK_M"]), heads, batch)
    with interpreter_scope(INTERPRETING):
        aligner_prefix_fwd_kernel[grid](
            q, main, prefix_k, prefix_v, gate, out, lse_prefix, cu_seqlens_q,
            q.stride(0), q.stride(1), main.stride(0), main.stride(1), *prefix_k.stride()[:3],
            *prefix_v.stride()[:3], gate.stride(0), out.stride(0), out.stride(1), max(rows, 1),
            num_prefix, softmax_scale * LOG2E, **_common(q, heads // prefix_k.shape[2], num_prefix),
            **options,
        )  # fmt: skip
    return lse_prefix


def aligner_prefix_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    gate: torch.Tensor,
    lse_prefix: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    max_seqlen_q: int,
    softmax_scale: float,
    shared_prefix: bool,
    shared_gate: bool,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`aligner_prefix_forward`'s prefix term for ``dout`` (like q).

    Returns dq_prefix like q (None for N = 1: the prefix adds nothing to dq), dprefix_k and
    dprefix_v as (N, H_kv, D) when ``shared_prefix`` else (B, N, H_kv, D) in the prefix dtype, and
    dgate fp32, (H,) when ``shared_gate`` else (B, H). The main output's gradient is dout itself.
    """
    total_q, heads, head_dim = q.shape
    kv_heads = prefix_k.shape[2]
    batch = cu_seqlens_q.shape[0] - 1
    num_prefix = prefix_k.shape[1]
    common = _common(q, heads // kv_heads, num_prefix)
    single = common["PREFIX"] == configs.ONE_TOKEN
    options = _launch_options(head_dim)
    qk_scale = softmax_scale * LOG2E
    dq = None if single else torch.empty_like(q)
    delta_prefix = torch.empty((heads, total_q), device=q.device, dtype=torch.float32)
    dgate_partial = torch.zeros(
        (batch, heads, triton.cdiv(max_seqlen_q, SMALLEST_BLOCK_M)), device=q.device, dtype=torch.float32
    )
    prefix_strides = (*prefix_k.stride()[:3], *prefix_v.stride()[:3], gate.stride(0))
    dq_arg = q if dq is None else dq  # N = 1 never stores dq; any valid pointer will do
    with interpreter_scope(INTERPRETING):
        aligner_prefix_bwd_dq_kernel[(triton.cdiv(max_seqlen_q, options["BLOCK_M"]), heads, batch)](
            q, prefix_k, prefix_v, gate, dout, dq_arg, lse_prefix, delta_prefix, dgate_partial, cu_seqlens_q,
            q.stride(0), q.stride(1), *prefix_strides, dout.stride(0), dout.stride(1),
            dq_arg.stride(0), dq_arg.stride(1), delta_prefix.stride(0), dgate_partial.stride(0),
            dgate_partial.stride(1), num_prefix, softmax_scale, qk_scale, **common, **options,
        )  # fmt: skip

    # dPK / dPV: the fused backward's own deterministic reduction.
    options = {name: common[name] for name in ("GROUP", "BLOCK_D", "BLOCK_P", "PREFIX", "DOT_PRECISION")}
    dprefix_k, dprefix_v = prefix_token_gradients(
        q, prefix_k, prefix_v, gate, dout, lse_prefix, delta_prefix, cu_seqlens_q, cu_seqlens_q,
        prefix_strides, num_prefix, max_seqlen_q, shared_prefix, softmax_scale, qk_scale,
        {**options, "HEAD_DIM": head_dim},
    )  # fmt: skip
    dgate = dgate_partial.sum(2)
    return dq, dprefix_k, dprefix_v, dgate.sum(0) if shared_gate else dgate
