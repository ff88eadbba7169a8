"""Forward kernel: flash attention over the sequence and the gated N-token prefix, in one pass.

Each program owns BLOCK_M queries of one (sequence, head). It streams the sequence's K/V tiles
once with an online softmax, then the prefix (N <= 64: one tile) with a second, separate online
softmax, and writes O = O_main + gate * O_pre together with the log-sum-exps the backward needs.
The compile-time switch PREFIX selects N tokens, one token (the prefix softmax is identically 1,
so O_pre = PV and the prefix costs one vector add in the epilogue) or no prefix at all (plain
flash attention, for layers without an Aligner).

Sequences are always addressed through cu_seqlens (a padded batch is a packed batch of equal
lengths), so one kernel serves both layouts. Log-sum-exps are kept in base 2 (exp2 is cheaper).
The kernel is made of the shared building blocks of kernels/common.py: the query-block prologue,
the causal key ranges, and the main and prefix tile loops (which decode.py runs too).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import configs
from .common import (
    INTERPRETING,
    LOG2E,
    MANY_TOKENS,
    ONE_TOKEN,
    causal_key_ranges,
    main_attention_tiles,
    prefix_attention,
    query_block,
    with_prefix_placeholders,
)
from .configs import (
    FORWARD_CONFIGS,
    FORWARD_CONFIGS_SM90,
    block_d,
    block_p,
    dot_precision,
    launcher,
    prefix_variant,
    seqlen_bucket,
)


@triton.jit
def aligner_attention_fwd_kernel(
    Q,
    K,
    V,
    PK,
    PV,
    Gate,
    Out,
    Lse,
    LsePrefix,
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
    stride_om,
    stride_oh,
    stride_lh,
    num_prefix,
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
    k_ptrs = K + k_start.to(tl.int64) * stride_km + kv_head * stride_kh + offs_d[None, :]
    v_ptrs = V + k_start.to(tl.int64) * stride_vm + kv_head * stride_vh + offs_d[None, :]

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    full_end, end = causal_key_ranges(start_m, len_q, len_k, CAUSAL, BLOCK_M, BLOCK_N)
    acc, row_sum, row_max = main_attention_tiles(
        acc, row_sum, row_max, q, k_ptrs, v_ptrs, stride_km, stride_vm, offs_m, offs_d, 0, full_end,
        len_q, len_k, qk_scale, CAUSAL, False, HEAD_DIM, BLOCK_N, DOT_PRECISION,
    )  # fmt: skip
    acc, row_sum, row_max = main_attention_tiles(
        acc, row_sum, row_max, q, k_ptrs, v_ptrs, stride_km, stride_vm, offs_m, offs_d, full_end, end,
        len_q, len_k, qk_scale, CAUSAL, True, HEAD_DIM, BLOCK_N, DOT_PRECISION,
    )  # fmt: skip
    # A query with no visible key (L_q > L_k, causal) outputs 0 like flash-attn; its LSE is +inf
    # so that the backward's exp2(s - lse) is exactly 0 for it.
    has_keys = row_sum > 0
    row_sum = tl.where(has_keys, row_sum, 1.0)
    out = acc / row_sum[:, None]
    lse = tl.where(has_keys, row_max + tl.log2(row_sum), float("inf"))

    pv_ptrs = PV + b * stride_pvb + kv_head * stride_pvh + offs_d[None, :]
    row_offset = head * stride_lh + rows
    if PREFIX == ONE_TOKEN:
        pv = tl.load(pv_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
        out += tl.load(Gate + b * stride_gb + head) * pv.to(tl.float32)
    elif PREFIX == MANY_TOKENS:
        gate = tl.load(Gate + b * stride_gb + head)
        pk_ptrs = PK + b * stride_pkb + kv_head * stride_pkh + offs_d[None, :]
        out_prefix, lse_prefix = prefix_attention(
            q, pk_ptrs, pv_ptrs, stride_pkn, stride_pvn, offs_d, num_prefix, qk_scale,
            HEAD_DIM, BLOCK_M, BLOCK_D, BLOCK_P, DOT_PRECISION,
        )  # fmt: skip
        out += gate * out_prefix
        tl.store(LsePrefix + row_offset, lse_prefix, mask=row_mask)

    tl.store(Lse + row_offset, lse, mask=row_mask)
    o_ptrs = Out + rows[:, None] * stride_om + head * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=mask)


# The prefix switches are not in the key: every prefix variant of a shape runs the main attention
# with the same tiles, so a row with gate 0 gives the prefix-less kernel's bits (and a shape is
# tuned once, not once per variant).
_launch_forward = launcher(
    aligner_attention_fwd_kernel,
    FORWARD_CONFIGS,
    sm90_configs=FORWARD_CONFIGS_SM90,
    key=["seqlen_bucket_q", "seqlen_bucket_k", "HEAD_DIM", "GROUP", "CAUSAL"],
    interpreting=INTERPRETING,
)


def aligner_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor | None,
    prefix_v: torch.Tensor | None,
    gate: torch.Tensor | None,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: float,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the fused forward on packed tensors.

    q (total_q, H, D), k/v (total_k, H_kv, D), prefix_k/v (B, N, H_kv, D) and gate (B, H) fp32
    (a shared prefix or gate is passed expanded, batch stride 0) or None (no prefix), cu_seqlens
    int32 (B + 1,). Last dims must be contiguous. Returns out (total_q, H, D), lse (H, total_q)
    fp32 (base 2) and lse_prefix (H, total_q) fp32 (empty unless N > 1).
    """
    total_q, heads, head_dim = q.shape
    batch = cu_seqlens_q.shape[0] - 1
    prefix_k, prefix_v, gate, num_prefix = with_prefix_placeholders(prefix_k, prefix_v, gate, q)
    variant = prefix_variant(num_prefix)
    out = torch.empty_like(q)
    lse = torch.empty((heads, total_q), device=q.device, dtype=torch.float32)
    lse_rows = total_q if variant == configs.MANY_TOKENS else 0
    lse_prefix = torch.empty((heads, lse_rows), device=q.device, dtype=torch.float32)

    def grid(meta):
        return (triton.cdiv(max_seqlen_q, meta["BLOCK_M"]), heads, batch)

    _launch_forward(
        grid, head_dim,
        q, k, v, prefix_k, prefix_v, gate, out, lse, lse_prefix, cu_seqlens_q, cu_seqlens_k,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        prefix_k.stride(0), prefix_k.stride(1), prefix_k.stride(2),
        prefix_v.stride(0), prefix_v.stride(1), prefix_v.stride(2), gate.stride(0),
        out.stride(0), out.stride(1), lse.stride(0),
        num_prefix, softmax_scale * LOG2E, seqlen_bucket(max_seqlen_q), seqlen_bucket(max_seqlen_k),
        GROUP=heads // k.shape[1], HEAD_DIM=head_dim, BLOCK_D=block_d(head_dim), BLOCK_P=block_p(num_prefix),
        CAUSAL=causal, PREFIX=variant, DOT_PRECISION=dot_precision(q.dtype),
    )  # fmt: skip
    return out, lse, lse_prefix
