"""The prefix's gradients (DESIGN.md section 1, "Backward"), shared by the fused backward
(backward.py) and the split backend's prefix backward (prefix.py), each piece written once:

- ``@triton.jit`` helpers, in the style of the Triton fused-attention tutorial's inner loops:
  :func:`prefix_terms` (a prefix chunk's probabilities A, recomputed from the stored LSE, and
  dO . PV^T, which every prefix gradient is made of), :func:`prefix_chunk` (the same after
  loading the chunk), :func:`prefix_delta` (delta_pre = dO . O_pre, the loop over the prefix
  chunks; :func:`one_token_delta` is its N = 1 closed form), :func:`store_prefix_delta`
  (delta_pre and the block's dgate partial) and :func:`prefix_dq` (the prefix part of dq);
- ``aligner_attention_bwd_prefix_kernel``: per prefix chunk and KV head, dPK and dPV
  accumulated over a fixed share of the query blocks, and its launcher
  :func:`prefix_token_gradients`, which sums the few per-split partials in a fixed order: no
  float atomics, so the result is the same bits run to run.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import configs
from .common import INTERPRETING, MANY_TOKENS, ONE_TOKEN, sequence_bounds
from .configs import interpreter_scope, multiprocessor_count


@triton.jit
def prefix_terms(q, do, pk, pv, offs_p, num_prefix, lse_prefix, qk_scale, DOT_PRECISION: tl.constexpr):
    """For a block of query rows and one chunk of prefix tokens: A = softmax(s q PK^T), recomputed
    from the stored base-2 LSE (0 for the tokens past N), and dO . PV^T."""
    s = tl.dot(q, tl.trans(pk), input_precision=DOT_PRECISION) * qk_scale
    a = tl.exp2(s - lse_prefix[:, None])
    a = tl.where(offs_p[None, :] < num_prefix, a, 0.0)
    dp = tl.dot(do, tl.trans(pv), input_precision=DOT_PRECISION)
    return a, dp


@triton.jit
def prefix_chunk(
    q, do, pk_ptrs, pv_ptrs, stride_pkn, stride_pvn, start_p, offs_d, num_prefix, lse_prefix, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_P: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """The chunk of BLOCK_P prefix tokens from start_p: PK, and :func:`prefix_terms`' A and dO . PV^T."""
    offs_p = start_p + tl.arange(0, BLOCK_P)
    p_mask = (offs_p[:, None] < num_prefix) & (offs_d[None, :] < HEAD_DIM)
    pk = tl.load(pk_ptrs + offs_p[:, None] * stride_pkn, mask=p_mask, other=0.0)
    pv = tl.load(pv_ptrs + offs_p[:, None] * stride_pvn, mask=p_mask, other=0.0)
    a, dp = prefix_terms(q, do, pk, pv, offs_p, num_prefix, lse_prefix, qk_scale, DOT_PRECISION)
    return pk, a, dp


@triton.jit
def prefix_delta(
    q, do, pk_ptrs, pv_ptrs, stride_pkn, stride_pvn, offs_d, num_prefix, lse_prefix, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """delta_pre = dO . O_pre = sum_n A_n (dO . PV_n) per query row (fp32), over every prefix chunk:
    O_pre itself is never formed. Needed whole before any dT; used by the fused backward's Delta
    kernel and the split backward."""
    delta_prefix = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start_p in range(0, num_prefix, BLOCK_P):
        _, a, dp = prefix_chunk(
            q, do, pk_ptrs, pv_ptrs, stride_pkn, stride_pvn, start_p, offs_d, num_prefix, lse_prefix,
            qk_scale, HEAD_DIM, BLOCK_P, DOT_PRECISION,
        )  # fmt: skip
        delta_prefix += tl.sum(a * dp, 1)
    return delta_prefix


@triton.jit
def one_token_delta(do, pv_ptrs, offs_d, HEAD_DIM: tl.constexpr):
    """delta_pre for N = 1: the prefix softmax is 1, O_pre = PV, so delta_pre = dO . PV."""
    pv = tl.load(pv_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    return tl.sum(do.to(tl.float32) * pv.to(tl.float32), 1)


@triton.jit
def store_prefix_delta(
    DeltaPrefix, DGatePartial, delta_prefix, row_offset, row_mask, b, head, start_m, stride_dgb, stride_dgh
):
    """Store delta_pre for the block's rows and the block's share of dgate[b, head], the sum of
    delta_pre over its rows (rows past the sequence hold 0); the launcher sums the blocks' shares
    in a fixed order."""
    tl.store(DeltaPrefix + row_offset, delta_prefix, mask=row_mask)
    tl.store(DGatePartial + b * stride_dgb + head * stride_dgh + start_m, tl.sum(delta_prefix, 0))


@triton.jit
def prefix_dq(
    dq, q, do, pk_ptrs, pv_ptrs, stride_pkn, stride_pvn, offs_d, num_prefix, lse_prefix, delta_prefix,
    gate, qk_scale, HEAD_DIM: tl.constexpr, BLOCK_P: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """dq plus the prefix part, sum_n dT_n PK_n with dT = gate * A * (dO.PV - delta_pre); used by
    the fused dQ kernel and the split backward."""
    for start_p in range(0, num_prefix, BLOCK_P):
        pk, a, dp = prefix_chunk(
            q, do, pk_ptrs, pv_ptrs, stride_pkn, stride_pvn, start_p, offs_d, num_prefix, lse_prefix,
            qk_scale, HEAD_DIM, BLOCK_P, DOT_PRECISION,
        )  # fmt: skip
        dt = gate * a * (dp - delta_prefix[:, None])
        dq += tl.dot(dt.to(pk.dtype), pk, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def aligner_attention_bwd_prefix_kernel(
    Q,
    PK,
    PV,
    Gate,
    DOut,
    DPKPartial,
    DPVPartial,
    LsePrefix,
    DeltaPrefix,
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
    stride_dom,
    stride_doh,
    stride_partial_z,
    stride_partial_n,
    stride_partial_h,
    stride_lh,
    num_prefix,
    sequences_per_program,
    num_splits,
    sm_scale,
    qk_scale,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_P: tl.constexpr,
    PREFIX: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Program (chunk, kv_head, z) sums over query blocks split, split + num_splits, ... of
    sequences [z // num_splits * sequences_per_program, + sequences_per_program) and over the
    GROUP query heads of kv_head, then writes its partial dPK/dPV for the prefix chunk."""
    start_p = tl.program_id(0) * BLOCK_P
    kv_head = tl.program_id(1)
    z = tl.program_id(2)
    split = z % num_splits
    first_seq = z // num_splits * sequences_per_program
    offs_p = start_p + tl.arange(0, BLOCK_P)
    offs_d = tl.arange(0, BLOCK_D)
    p_mask = (offs_p[:, None] < num_prefix) & (offs_d[None, :] < HEAD_DIM)
    dpk = tl.zeros([BLOCK_P, BLOCK_D], dtype=tl.float32)
    dpv = tl.zeros([BLOCK_P, BLOCK_D], dtype=tl.float32)
    for b in range(first_seq, first_seq + sequences_per_program):
        q_start, len_q, _, _ = sequence_bounds(CuSeqQ, CuSeqK, b)
        pk_ptrs = PK + b * stride_pkb + kv_head * stride_pkh + offs_p[:, None] * stride_pkn + offs_d[None, :]
        pv_ptrs = PV + b * stride_pvb + kv_head * stride_pvh + offs_p[:, None] * stride_pvn + offs_d[None, :]
        pk = tl.load(pk_ptrs, mask=p_mask, other=0.0)
        pv = tl.load(pv_ptrs, mask=p_mask, other=0.0)
        for start_m in range(split * BLOCK_M, len_q, num_splits * BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            row_mask = offs_m < len_q
            mask = row_mask[:, None] & (offs_d[None, :] < HEAD_DIM)
            rows = q_start.to(tl.int64) + offs_m[:, None]
            for head in range(kv_head * GROUP, (kv_head + 1) * GROUP):
                gate = tl.load(Gate + b * stride_gb + head)
                do = tl.load(
                    DOut + rows * stride_dom + head * stride_doh + offs_d[None, :], mask=mask, other=0.0
                )
                if PREFIX == ONE_TOKEN:  # dPV = sum_rows gate * dO (stored in row 0 of the chunk)
                    dpv += tl.where(offs_p[:, None] == 0, gate * tl.sum(do.to(tl.float32), 0)[None, :], 0.0)
                else:
                    q = tl.load(
                        Q + rows * stride_qm + head * stride_qh + offs_d[None, :], mask=mask, other=0.0
                    )
                    row_offset = head * stride_lh + q_start + offs_m
                    lse_prefix = tl.load(LsePrefix + row_offset, mask=row_mask, other=float("inf"))
                    delta_prefix = tl.load(DeltaPrefix + row_offset, mask=row_mask, other=0.0)
                    a, dp = prefix_terms(
                        q, do, pk, pv, offs_p, num_prefix, lse_prefix, qk_scale, DOT_PRECISION
                    )
                    dt = gate * a * (dp - delta_prefix[:, None])
                    dpk += tl.dot(tl.trans(dt.to(q.dtype)), q, input_precision=DOT_PRECISION)
                    dpv += tl.dot(tl.trans((gate * a).to(do.dtype)), do, input_precision=DOT_PRECISION)
    out = (
        z * stride_partial_z
        + kv_head * stride_partial_h
        + offs_p[:, None] * stride_partial_n
        + offs_d[None, :]
    )
    tl.store(DPVPartial + out, dpv, mask=p_mask)
    if PREFIX == MANY_TOKENS:
        tl.store(DPKPartial + out, dpk * sm_scale, mask=p_mask)


def prefix_token_gradients(
    q: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    gate: torch.Tensor,
    dout: torch.Tensor,
    lse_prefix: torch.Tensor,
    delta_prefix: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    prefix_strides: tuple[int, ...],
    num_prefix: int,
    max_seqlen_q: int,
    shared_prefix: bool,
    softmax_scale: float,
    qk_scale: float,
    kernel_options: dict,
) -> tuple[torch.Tensor, torch.Tensor]:
    """dPK and dPV (prefix dtype; (N, H_kv, D) when ``shared_prefix`` else (B, N, H_kv, D)) through
    :func:`aligner_attention_bwd_prefix_kernel`: fixed-order partials per program, summed here, so
    the result is bitwise deterministic. Shared by the fused and the split backward;
    ``kernel_options`` holds GROUP, HEAD_DIM, BLOCK_D, BLOCK_P, PREFIX and DOT_PRECISION."""
    batch = cu_seqlens_q.shape[0] - 1
    kv_heads, head_dim = prefix_k.shape[-2], q.shape[-1]
    # A shared prefix sums over every sequence, a per-sequence one over its own.
    single = kernel_options["PREFIX"] == configs.ONE_TOKEN
    reduction = configs.PREFIX_REDUCTION_CONFIG  # not autotuned: see its comment in configs.py
    block_m = 16 if INTERPRETING else reduction.kwargs["BLOCK_M"]
    chunks = 1 if single else triton.cdiv(num_prefix, kernel_options["BLOCK_P"])
    sequence_groups, sequences_per_program = (1, batch) if shared_prefix else (batch, 1)
    splits = _prefix_splits(q.device, chunks * kv_heads * sequence_groups, max_seqlen_q, block_m)
    partial_shape = (sequence_groups * splits, num_prefix, kv_heads, head_dim)
    dpv_partial = torch.empty(partial_shape, device=q.device, dtype=torch.float32)
    dpk_partial = torch.empty((0,) if single else partial_shape, device=q.device, dtype=torch.float32)
    launch_options = (
        {} if INTERPRETING else {"num_warps": reduction.num_warps, "num_stages": reduction.num_stages}
    )
    with interpreter_scope(INTERPRETING):
        aligner_attention_bwd_prefix_kernel[(chunks, kv_heads, sequence_groups * splits)](
            q, prefix_k, prefix_v, gate, dout, dpk_partial, dpv_partial, lse_prefix, delta_prefix,
            cu_seqlens_q, cu_seqlens_k, q.stride(0), q.stride(1), *prefix_strides, dout.stride(0),
            dout.stride(1), *dpv_partial.stride()[:3], delta_prefix.stride(0), num_prefix,
            sequences_per_program, splits, softmax_scale, qk_scale, BLOCK_M=block_m, BLOCK_N=16,
            **kernel_options, **launch_options,
        )  # fmt: skip
    partial_to_grad = (
        (lambda t: t.sum(0)) if shared_prefix else (lambda t: t.view(batch, splits, *t.shape[1:]).sum(1))
    )
    dprefix_v = partial_to_grad(dpv_partial).to(prefix_v.dtype)
    dprefix_k = torch.zeros_like(dprefix_v) if single else partial_to_grad(dpk_partial).to(prefix_k.dtype)
    return dprefix_k, dprefix_v


def _prefix_splits(device: torch.device, programs: int, max_seqlen_q: int, block_m: int) -> int:
    """Query-block splits per prefix program: enough programs to fill the GPU, few partials."""
    if device.type != "cuda":
        return min(2, triton.cdiv(max_seqlen_q, block_m))
    target = 2 * multiprocessor_count(device.index or 0)
    return max(1, min(triton.cdiv(target, programs), triton.cdiv(max_seqlen_q, block_m), 64))
