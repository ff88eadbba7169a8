"""Backward kernels of the fused Aligner attention (DESIGN.md section 1, "Backward").

Four launches, none with float atomics, so the result is the same bits run to run:

1. ``aligner_attention_bwd_delta_kernel``: per query row, delta_pre = dO . O_pre (the prefix
   output is recomputed from the stored prefix LSE, never stored) and the main-attention Delta,
   dO . O_main = dO . O - gate * delta_pre.
2. ``aligner_attention_bwd_dq_kernel``: per query block, dQ of the main attention plus the
   prefix's s * sum_n dT_n PK_n.
3. ``aligner_attention_bwd_dkdv_kernel``: per key block of one KV head, dK and dV summed over
   every query head of its GQA group inside the program.
4. dPK and dPV: the prefix-gradient reduction of prefix_grad.py (shared with the split backend's
   prefix backward, as are the prefix helpers of 1 and 2): per prefix chunk and KV head, over a
   fixed share of the query blocks; the few per-split partials are then summed in a fixed order.
   dgate is the sum of delta_pre over the rows.

For N = 1 the prefix softmax is 1: delta_pre = dO . PV, dQ and dPK get nothing, and
dPV = sum gate * dO. Without a prefix, this is the plain flash-attention backward.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (
    INTERPRETING,
    LOG2E,
    MANY_TOKENS,
    NO_PREFIX,
    ONE_TOKEN,
    causal_key_ranges,
    query_block,
    sequence_bounds,
    visible,
    with_prefix_placeholders,
)
from .configs import (
    BACKWARD_DKDV_CONFIGS,
    BACKWARD_DKDV_CONFIGS_SM90,
    BACKWARD_DQ_CONFIGS,
    BACKWARD_DQ_CONFIGS_SM90,
    ROWWISE_CONFIGS,
    SMALLEST_BLOCK_M,
    block_d,
    block_p,
    dot_precision,
    launcher,
    prefix_variant,
    seqlen_bucket,
)
from .prefix_grad import one_token_delta, prefix_delta, prefix_dq, prefix_token_gradients, store_prefix_delta


@triton.jit
def aligner_attention_bwd_delta_kernel(
    Q,
    PK,
    PV,
    Gate,
    Out,
    DOut,
    LsePrefix,
    DeltaMain,
    DeltaPrefix,
    DGatePartial,
    CuSeqQ,
    CuSeqK,
    stride_qm,
    stride_qh,
    stride_pkb,
    stride_pkn,
    stride_pkh,
    stride_pvb,
    stride_pvn,
    stride_pvh,
    stride_gb,
    stride_om,
    stride_oh,
    stride_dom,
    stride_doh,
    stride_lh,
    stride_dgb,
    stride_dgh,
    num_prefix,
    qk_scale,
    seqlen_bucket_q,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_P: tl.constexpr,
    PREFIX: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    b, head, kv_head, start_m, len_q, k_start, len_k, offs_m, rows, offs_d, row_mask, mask, past_end = (
        query_block(CuSeqQ, CuSeqK, GROUP, HEAD_DIM, BLOCK_M, BLOCK_D)
    )
    if past_end:
        return
    o = tl.load(Out + rows[:, None] * stride_om + head * stride_oh + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(
        DOut + rows[:, None] * stride_dom + head * stride_doh + offs_d[None, :], mask=mask, other=0.0
    )
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)

    pv_ptrs = PV + b * stride_pvb + kv_head * stride_pvh + offs_d[None, :]
    row_offset = head * stride_lh + rows
    if PREFIX == NO_PREFIX:
        tl.store(DeltaMain + row_offset, delta, mask=row_mask)
        return
    if PREFIX == ONE_TOKEN:
        delta_prefix = one_token_delta(do, pv_ptrs, offs_d, HEAD_DIM)
    else:
        q = tl.load(Q + rows[:, None] * stride_qm + head * stride_qh + offs_d[None, :], mask=mask, other=0.0)
        lse_prefix = tl.load(LsePrefix + row_offset, mask=row_mask, other=float("inf"))
        pk_ptrs = PK + b * stride_pkb + kv_head * stride_pkh + offs_d[None, :]
        delta_prefix = prefix_delta(
            q, do, pk_ptrs, pv_ptrs, stride_pkn, stride_pvn, offs_d, num_prefix, lse_prefix, qk_scale,
            HEAD_DIM, BLOCK_M, BLOCK_P, DOT_PRECISION,
        )  # fmt: skip
    gate = tl.load(Gate + b * stride_gb + head)
    tl.store(DeltaMain + row_offset, delta - gate * delta_prefix, mask=row_mask)
    # dgate[b, head] is the sum of delta_prefix over the sequence's rows.
    store_prefix_delta(
        DeltaPrefix, DGatePartial, delta_prefix, row_offset, row_mask, b, head, start_m,
        stride_dgb, stride_dgh,
    )  # fmt: skip


@triton.jit
def main_dq_tiles(
    dq,
    q,
    do,
    lse,
    delta,
    k_ptrs,
    v_ptrs,
    stride_km,
    stride_vm,
    offs_m,
    offs_d,
    key_lo,
    key_hi,
    len_q,
    len_k,
    qk_scale,
    CAUSAL: tl.constexpr,
    MASKED: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """dQ (unscaled) of the main attention from keys [key_lo, key_hi)."""
    for start_n in range(key_lo, key_hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_mask = (offs_n[:, None] < len_k) & (offs_d[None, :] < HEAD_DIM)
        k = tl.load(k_ptrs + offs_n[:, None] * stride_km, mask=kv_mask, other=0.0)
        v = tl.load(v_ptrs + offs_n[:, None] * stride_vm, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if MASKED:
            s = tl.where(visible(offs_m[:, None], offs_n[None, :], len_q, len_k, CAUSAL), s, float("-inf"))
        p = tl.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def aligner_attention_bwd_dq_kernel(
    Q,
    K,
    V,
    PK,
    PV,
    Gate,
    DOut,
    DQ,
    Lse,
    LsePrefix,
    DeltaMain,
    DeltaPrefix,
    CuSeqQ,
    CuSeqK,
    stride_qm,
    stride_qh,
    stride_km,
    stride_kh,
    stride_vm,
    stride_vh,
    stride_pkb,
    stride_pkn,
    stride_pkh,
    stride_pvb,
    stride_pvn,
    stride_pvh,
    stride_gb,
    stride_dom,
    stride_doh,
    stride_dqm,
    stride_dqh,
    stride_lh,
    num_prefix,
    sm_scale,
    qk_scale,
    seqlen_bucket_q,
    seqlen_bucket_k,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_P: tl.constexpr,
    CAUSAL: tl.constexpr,
    PREFIX: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    b, head, kv_head, start_m, len_q, k_start, len_k, offs_m, rows, offs_d, row_mask, mask, past_end = (
        query_block(CuSeqQ, CuSeqK, GROUP, HEAD_DIM, BLOCK_M, BLOCK_D)
    )
    if past_end:
        return
    q = tl.load(Q + rows[:, None] * stride_qm + head * stride_qh + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(
        DOut + rows[:, None] * stride_dom + head * stride_doh + offs_d[None, :], mask=mask, other=0.0
    )
    row_offset = head * stride_lh + rows
    # Rows past the sequence get lse = +inf, hence p = 0.
    lse = tl.load(Lse + row_offset, mask=row_mask, other=float("inf"))
    delta = tl.load(DeltaMain + row_offset, mask=row_mask, other=0.0)
    k_ptrs = K + k_start.to(tl.int64) * stride_km + kv_head * stride_kh + offs_d[None, :]
    v_ptrs = V + k_start.to(tl.int64) * stride_vm + kv_head * stride_vh + offs_d[None, :]

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    full_end, end = causal_key_ranges(start_m, len_q, len_k, CAUSAL, BLOCK_M, BLOCK_N)
    dq = main_dq_tiles(
        dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_km, stride_vm, offs_m, offs_d, 0, full_end,
        len_q, len_k, qk_scale, CAUSAL, False, HEAD_DIM, BLOCK_N, DOT_PRECISION,
    )  # fmt: skip
    dq = main_dq_tiles(
        dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_km, stride_vm, offs_m, offs_d, full_end, end,
        len_q, len_k, qk_scale, CAUSAL, True, HEAD_DIM, BLOCK_N, DOT_PRECISION,
    )  # fmt: skip

    if PREFIX == MANY_TOKENS:
        # Prefix part: dT = A * (gate dO.PV - gate delta_pre), dq += sum_n dT_n PK_n.
        gate = tl.load(Gate + b * stride_gb + head)
        lse_prefix = tl.load(LsePrefix + row_offset, mask=row_mask, other=float("inf"))
        delta_prefix = tl.load(DeltaPrefix + row_offset, mask=row_mask, other=0.0)
        pk_ptrs = PK + b * stride_pkb + kv_head * stride_pkh + offs_d[None, :]
        pv_ptrs = PV + b * stride_pvb + kv_head * stride_pvh + offs_d[None, :]
        dq = prefix_dq(
            dq, q, do, pk_ptrs, pv_ptrs, stride_pkn, stride_pvn, offs_d, num_prefix, lse_prefix,
            delta_prefix, gate, qk_scale, HEAD_DIM, BLOCK_P, DOT_PRECISION,
        )  # fmt: skip

    dq_ptrs = DQ + rows[:, None] * stride_dqm + head * stride_dqh + offs_d[None, :]
    tl.store(dq_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=mask)


@triton.jit
def main_dkdv_tiles(
    dk,
    dv,
    k,
    v,
    q_ptrs,
    do_ptrs,
    lse_ptrs,
    delta_ptrs,
    stride_qm,
    stride_dom,
    offs_n,
    offs_d,
    row_lo,
    row_hi,
    len_q,
    len_k,
    qk_scale,
    MASKED: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """dK (unscaled) and dV of one key block from query rows [row_lo, row_hi) of one head."""
    for start_m in range(row_lo, row_hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_mask = offs_m < len_q
        mask = row_mask[:, None] & (offs_d[None, :] < HEAD_DIM)
        q = tl.load(q_ptrs + offs_m[:, None] * stride_qm, mask=mask, other=0.0)
        do = tl.load(do_ptrs + offs_m[:, None] * stride_dom, mask=mask, other=0.0)
        lse = tl.load(lse_ptrs + offs_m, mask=row_mask, other=float("inf"))
        delta = tl.load(delta_ptrs + offs_m, mask=row_mask, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
        if MASKED:  # the causal diagonal
            s_t = tl.where(visible(offs_m[None, :], offs_n[:, None], len_q, len_k, True), s_t, float("-inf"))
        p_t = tl.exp2(s_t - lse[None, :])
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def aligner_attention_bwd_dkdv_kernel(
    Q,
    K,
    V,
    DOut,
    DK,
    DV,
    Lse,
    DeltaMain,
    CuSeqQ,
    CuSeqK,
    stride_qm,
    stride_qh,
    stride_km,
    stride_kh,
    stride_vm,
    stride_vh,
    stride_dom,
    stride_doh,
    stride_dkm,
    stride_dkh,
    stride_dvm,
    stride_dvh,
    stride_lh,
    sm_scale,
    qk_scale,
    seqlen_bucket_q,
    seqlen_bucket_k,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    start_n = tl.program_id(0)
    kv_head = tl.program_id(1)
    b = tl.program_id(2)
    q_start, len_q, k_start, len_k = sequence_bounds(CuSeqQ, CuSeqK, b)
    if start_n * BLOCK_N >= len_k:
        return
    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_mask = (offs_n[:, None] < len_k) & (offs_d[None, :] < HEAD_DIM)
    keys = k_start.to(tl.int64) + offs_n[:, None]
    k = tl.load(K + keys * stride_km + kv_head * stride_kh + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + keys * stride_vm + kv_head * stride_vh + offs_d[None, :], mask=kv_mask, other=0.0)

    # Query rows [row_lo, full_lo) see part of this key block (causal mask); rows from full_lo on
    # see all of it. Without causality every row sees every key.
    if CAUSAL:
        shift = len_k - len_q
        row_lo = tl.maximum(start_n * BLOCK_N - shift, 0) // BLOCK_M * BLOCK_M
        full_lo = tl.cdiv(tl.maximum((start_n + 1) * BLOCK_N - 1 - shift, 0), BLOCK_M) * BLOCK_M
        full_lo = tl.minimum(full_lo, tl.cdiv(len_q, BLOCK_M) * BLOCK_M)
    else:
        row_lo = 0
        full_lo = 0

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # GQA: the query heads of the group are summed here, in a fixed order.
    for head in range(kv_head * GROUP, (kv_head + 1) * GROUP):
        rows = q_start.to(tl.int64) * stride_qm + head * stride_qh + offs_d[None, :]
        q_ptrs = Q + rows
        do_ptrs = DOut + q_start.to(tl.int64) * stride_dom + head * stride_doh + offs_d[None, :]
        lse_ptrs = Lse + head * stride_lh + q_start
        delta_ptrs = DeltaMain + head * stride_lh + q_start
        dk, dv = main_dkdv_tiles(
            dk, dv, k, v, q_ptrs, do_ptrs, lse_ptrs, delta_ptrs, stride_qm, stride_dom, offs_n, offs_d,
            row_lo, full_lo, len_q, len_k, qk_scale, True, HEAD_DIM, BLOCK_M, DOT_PRECISION,
        )  # fmt: skip
        dk, dv = main_dkdv_tiles(
            dk, dv, k, v, q_ptrs, do_ptrs, lse_ptrs, delta_ptrs, stride_qm, stride_dom, offs_n, offs_d,
            full_lo, len_q, len_q, len_k, qk_scale, False, HEAD_DIM, BLOCK_M, DOT_PRECISION,
        )  # fmt: skip

    dk_ptrs = DK + keys * stride_dkm + kv_head * stride_dkh + offs_d[None, :]
    tl.store(dk_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(
        DV + keys * stride_dvm + kv_head * stride_dvh + offs_d[None, :],
        dv.to(DV.dtype.element_ty),
        mask=kv_mask,
    )


_launch_delta = launcher(
    aligner_attention_bwd_delta_kernel,
    ROWWISE_CONFIGS,
    key=["seqlen_bucket_q", "HEAD_DIM", "BLOCK_P", "PREFIX"],
    interpreting=INTERPRETING,
)
# As in the forward, the prefix switches stay out of the key: a gate-0 row's dq is the prefix-less
# kernel's, bit for bit.
_launch_dq = launcher(
    aligner_attention_bwd_dq_kernel,
    BACKWARD_DQ_CONFIGS,
    sm90_configs=BACKWARD_DQ_CONFIGS_SM90,
    key=["seqlen_bucket_q", "seqlen_bucket_k", "HEAD_DIM", "GROUP", "CAUSAL"],
    interpreting=INTERPRETING,
)
_launch_dkdv = launcher(
    aligner_attention_bwd_dkdv_kernel,
    BACKWARD_DKDV_CONFIGS,
    sm90_configs=BACKWARD_DKDV_CONFIGS_SM90,
    key=["seqlen_bucket_q", "seqlen_bucket_k", "HEAD_DIM", "GROUP", "CAUSAL"],
    interpreting=INTERPRETING,
)


def aligner_attention_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor | None,
    prefix_v: torch.Tensor | None,
    gate: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    lse_prefix: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: float,
    causal: bool,
    shared_prefix: bool,
    shared_gate: bool,
) -> tuple[torch.Tensor, ...]:
    """Gradients of :func:`aligner_kernels.forward.aligner_attention_forward`'s output.

    Same layouts as the forward (dout like q; prefix (B, N, H_kv, D) and gate (B, H), batch
    stride 0 when shared, or None). Returns dq, dk, dv like q, k, v; dprefix_k, dprefix_v as
    (N, H_kv, D) when ``shared_prefix`` else (B, N, H_kv, D), in the prefix dtype, and dgate
    fp32, (H,) when ``shared_gate`` else (B, H) (all three None without a prefix).
    """
    total_q, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    batch = cu_seqlens_q.shape[0] - 1
    has_prefix = prefix_k is not None
    prefix_k, prefix_v, gate, num_prefix = with_prefix_placeholders(prefix_k, prefix_v, gate, q)
    variant = prefix_variant(num_prefix)
    group = heads // kv_heads
    qk_scale = softmax_scale * LOG2E
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    delta_main = torch.empty_like(lse)
    delta_prefix = torch.empty_like(lse) if has_prefix else lse.new_empty((heads, 0))
    common = {
        "GROUP": group,
        "HEAD_DIM": head_dim,
        "BLOCK_D": block_d(head_dim),
        "DOT_PRECISION": dot_precision(q.dtype),
    }
    prefix_strides = (*prefix_k.stride()[:3], *prefix_v.stride()[:3], gate.stride(0))
    # One dgate partial per (sequence, head, query block); sized for the smallest BLOCK_M any
    # config may pick, the blocks a launch does not have stay 0.
    dgate_partial = torch.zeros(
        (batch, heads, triton.cdiv(max_seqlen_q, SMALLEST_BLOCK_M) if has_prefix else 0),
        device=q.device,
        dtype=torch.float32,
    )

    def query_grid(meta):
        return (triton.cdiv(max_seqlen_q, meta["BLOCK_M"]), heads, batch)

    _launch_delta(
        query_grid, head_dim,
        q, prefix_k, prefix_v, gate, out, dout, lse_prefix, delta_main, delta_prefix, dgate_partial,
        cu_seqlens_q, cu_seqlens_k, q.stride(0), q.stride(1), *prefix_strides,
        out.stride(0), out.stride(1), dout.stride(0), dout.stride(1), lse.stride(0),
        dgate_partial.stride(0), dgate_partial.stride(1), num_prefix, qk_scale, seqlen_bucket(max_seqlen_q),
        BLOCK_P=block_p(num_prefix), PREFIX=variant, **common,
    )  # fmt: skip
    _launch_dq(
        query_grid, head_dim,
        q, k, v, prefix_k, prefix_v, gate, dout, dq, lse, lse_prefix, delta_main, delta_prefix,
        cu_seqlens_q, cu_seqlens_k,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), *prefix_strides,
        dout.stride(0), dout.stride(1), dq.stride(0), dq.stride(1), lse.stride(0),
        num_prefix, softmax_scale, qk_scale, seqlen_bucket(max_seqlen_q), seqlen_bucket(max_seqlen_k),
        BLOCK_P=block_p(num_prefix), CAUSAL=causal, PREFIX=variant, **common,
    )  # fmt: skip
    _launch_dkdv(
        lambda meta: (triton.cdiv(max_seqlen_k, meta["BLOCK_N"]), kv_heads, batch), head_dim,
        q, k, v, dout, dk, dv, lse, delta_main, cu_seqlens_q, cu_seqlens_k,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        dout.stride(0), dout.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
        lse.stride(0), softmax_scale, qk_scale, seqlen_bucket(max_seqlen_q), seqlen_bucket(max_seqlen_k),
        CAUSAL=causal, **common,
    )  # fmt: skip

    if not has_prefix:
        return dq, dk, dv, None, None, None
    dprefix_k, dprefix_v = prefix_token_gradients(
        q, prefix_k, prefix_v, gate, dout, lse_prefix, delta_prefix, cu_seqlens_q, cu_seqlens_k,
        prefix_strides, num_prefix, max_seqlen_q, shared_prefix, softmax_scale, qk_scale,
        {**common, "BLOCK_P": block_p(num_prefix), "PREFIX": variant},
    )  # fmt: skip
    dgate = dgate_partial.sum(2)
    if shared_gate:
        dgate = dgate.sum(0)
    return dq, dk, dv, dprefix_k, dprefix_v, dgate
