"""Split-KV forward (flash-decoding) for short query blocks: decoding with a KV cache.

With L_q <= 16 the fused forward runs one program per (query block, head, sequence), each
streaming the sequence's whole cache: at small batch most of the GPU idles. Here two launches:

1. ``aligner_attention_decode_split_kernel``: program (split, kv head x row block, sequence)
   takes one slice of the sequence's keys and the query rows of the kv head's GQA group (GROUP x
   L_q rows packed into BLOCK_M, so each K/V tile is loaded once for the whole group), runs the
   online softmax over its slice and writes the normalised partial output and its base-2 LSE
   (-inf for a split in which a row sees no key: beyond the sequence's end, or causally hidden).
2. ``aligner_attention_decode_combine_kernel``: program (query block, head, sequence) merges the
   partials (weights exp2(lse_s - max)), then adds the gated prefix once: N = 1 the closed form
   O += gate * PV, N > 1 the separate prefix softmax.

Forward only (no LSE is kept for a backward): ``aligner_attention`` uses it when no gradient is
needed. Padded and packed layouts, GQA, shared or per-sequence prefix and gate, as the fused
forward (kernels/forward.py), whose @triton.jit helpers (kernels/common.py) it shares.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (
    INTERPRETING,
    LOG2E,
    MANY_TOKENS,
    ONE_TOKEN,
    causal_key_ranges,
    main_attention_tiles,
    prefix_attention,
    query_block,
    sequence_bounds,
    with_prefix_placeholders,
)
from .configs import (
    DECODE_BLOCK_M,
    DECODE_CONFIGS,
    INTERPRETER_CONFIG,
    block_d,
    block_p,
    dot_precision,
    interpreter_scope,
    launcher,
    multiprocessor_count,
    prefix_variant,
    seqlen_bucket,
)


@triton.jit
def aligner_attention_decode_split_kernel(
    Q,
    K,
    V,
    OutPartial,
    LsePartial,
    CuSeqQ,
    CuSeqK,
    stride_qm,
    stride_qh,
    stride_km,
    stride_kh,
    stride_vm,
    stride_vh,
    stride_ops,
    stride_opm,
    stride_oph,
    stride_lps,
    stride_lph,
    keys_per_split,
    row_blocks,
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
    split = tl.program_id(0)
    kv_head = tl.program_id(1) // row_blocks
    row_block = tl.program_id(1) % row_blocks
    b = tl.program_id(2)
    q_start, len_q, k_start, len_k = sequence_bounds(CuSeqQ, CuSeqK, b)
    num_rows = GROUP * len_q
    if row_block * BLOCK_M >= num_rows:
        return

    # Row r of the block is query r % len_q of head kv_head * GROUP + r // len_q.
    rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < num_rows
    query = rows % len_q
    head = kv_head * GROUP + rows // len_q
    offs_d = tl.arange(0, BLOCK_D)
    mask = row_mask[:, None] & (offs_d[None, :] < HEAD_DIM)
    packed_rows = q_start.to(tl.int64) + query
    q = tl.load(
        Q + packed_rows[:, None] * stride_qm + head[:, None] * stride_qh + offs_d[None, :],
        mask=mask,
        other=0.0,
    )
    k_ptrs = K + k_start.to(tl.int64) * stride_km + kv_head * stride_kh + offs_d[None, :]
    v_ptrs = V + k_start.to(tl.int64) * stride_vm + kv_head * stride_vh + offs_d[None, :]

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    # This split's keys [key_lo, key_hi); keys below full_end are visible to every query: the ranges
    # of a block that starts at query 0, which sees the fewest keys. Split bounds are multiples of
    # BLOCK_N.
    key_lo = split * keys_per_split
    key_hi = tl.minimum(key_lo + keys_per_split, len_k)
    full_end, _ = causal_key_ranges(0, len_q, len_k, CAUSAL, BLOCK_M, BLOCK_N)
    mid = tl.maximum(tl.minimum(key_hi, full_end), key_lo)
    acc, row_sum, row_max = main_attention_tiles(
        acc, row_sum, row_max, q, k_ptrs, v_ptrs, stride_km, stride_vm, query, offs_d, key_lo, mid,
        len_q, len_k, qk_scale, CAUSAL, False, HEAD_DIM, BLOCK_N, DOT_PRECISION,
    )  # fmt: skip
    acc, row_sum, row_max = main_attention_tiles(
        acc, row_sum, row_max, q, k_ptrs, v_ptrs, stride_km, stride_vm, query, offs_d, mid, key_hi,
        len_q, len_k, qk_scale, CAUSAL, True, HEAD_DIM, BLOCK_N, DOT_PRECISION,
    )  # fmt: skip
    has_keys = row_sum > 0
    out = acc / tl.where(has_keys, row_sum, 1.0)[:, None]
    lse = tl.where(has_keys, row_max + tl.log2(tl.where(has_keys, row_sum, 1.0)), float("-inf"))
    tl.store(
        OutPartial + split * stride_ops + packed_rows[:, None] * stride_opm + head[:, None] * stride_oph
        + offs_d[None, :],
        out,
        mask=mask,
    )  # fmt: skip
    tl.store(LsePartial + split * stride_lps + head * stride_lph + packed_rows, lse, mask=row_mask)


@triton.jit
def aligner_attention_decode_combine_kernel(
    Q,
    PK,
    PV,
    Gate,
    OutPartial,
    LsePartial,
    Out,
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
    stride_ops,
    stride_opm,
    stride_oph,
    stride_lps,
    stride_lph,
    stride_om,
    stride_oh,
    num_splits,
    num_prefix,
    qk_scale,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_P: tl.constexpr,
    PREFIX: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    b, head, kv_head, start_m, len_q, k_start, len_k, offs_m, rows, offs_d, row_mask, mask, past_end = (
        query_block(CuSeqQ, CuSeqK, GROUP, HEAD_DIM, BLOCK_M, BLOCK_D)
    )
    if past_end:
        return

    # Merge the splits' partial softmaxes, rescaling as the running max grows (as over key tiles).
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    weight_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    lse_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for split in range(0, num_splits):
        lse = tl.load(
            LsePartial + split * stride_lps + head * stride_lph + rows, mask=row_mask, other=float("-inf")
        )
        new_max = tl.maximum(lse_max, lse)
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        alpha = tl.exp2(lse_max - shift)
        weight = tl.exp2(lse - shift)
        partial = tl.load(
            OutPartial
            + split * stride_ops
            + rows[:, None] * stride_opm
            + head * stride_oph
            + offs_d[None, :],
            mask=mask,
            other=0.0,
        )
        acc = acc * alpha[:, None] + weight[:, None] * partial
        weight_sum = weight_sum * alpha + weight
        lse_max = new_max
    # A query that sees no key at all outputs 0, as in the fused forward.
    out = acc / tl.where(weight_sum > 0, weight_sum, 1.0)[:, None]

    pv_ptrs = PV + b * stride_pvb + kv_head * stride_pvh + offs_d[None, :]
    if PREFIX == ONE_TOKEN:
        pv = tl.load(pv_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
        out += tl.load(Gate + b * stride_gb + head) * pv.to(tl.float32)
    elif PREFIX == MANY_TOKENS:
        q = tl.load(Q + rows[:, None] * stride_qm + head * stride_qh + offs_d[None, :], mask=mask, other=0.0)
        pk_ptrs = PK + b * stride_pkb + kv_head * stride_pkh + offs_d[None, :]
        out_prefix, _ = prefix_attention(
            q, pk_ptrs, pv_ptrs, stride_pkn, stride_pvn, offs_d, num_prefix, qk_scale,
            HEAD_DIM, BLOCK_M, BLOCK_D, BLOCK_P, DOT_PRECISION,
        )  # fmt: skip
        out += tl.load(Gate + b * stride_gb + head) * out_prefix
    tl.store(
        Out + rows[:, None] * stride_om + head * stride_oh + offs_d[None, :],
        out.to(Out.dtype.element_ty),
        mask=mask,
    )


_launch_split = launcher(
    aligner_attention_decode_split_kernel,
    DECODE_CONFIGS,
    key=["seqlen_bucket_q", "seqlen_bucket_k", "HEAD_DIM", "GROUP", "CAUSAL"],
    interpreting=INTERPRETING,
)
# The splits are multiples of every BLOCK_N a config may pick, so any of them tiles a split exactly.
SPLIT_ALIGN = (
    INTERPRETER_CONFIG["BLOCK_N"]
    if INTERPRETING
    else max(c.kwargs["BLOCK_N"] for cs in DECODE_CONFIGS.values() for c in cs)
)
# At most this many splits: each adds a partial output to write and merge.
MAX_SPLITS = 128


def decode_splits(device: torch.device, programs: int, max_seqlen_k: int) -> int:
    """Key splits per (kv head, row block, sequence): enough programs for two waves over the GPU's
    SMs. On the CPU (interpreter) up to 4, so that tests see several splits on tiny shapes."""
    tiles = triton.cdiv(max_seqlen_k, SPLIT_ALIGN)
    if device.type != "cuda":
        return min(4, tiles)
    target = 2 * multiprocessor_count(device.index or 0)
    return max(1, min(triton.cdiv(target, programs), tiles, MAX_SPLITS))


def aligner_attention_decode(
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
) -> torch.Tensor:
    """The forward of :func:`aligner_kernels.forward.aligner_attention_forward` for short query blocks,
    split over the keys; same arguments (q (total_q, H, D), k/v (total_k, H_kv, D), prefix
    (B, N, H_kv, D) and gate (B, H) fp32, batch stride 0 when shared, or None). Returns out only.
    """
    total_q, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    batch = cu_seqlens_q.shape[0] - 1
    prefix_k, prefix_v, gate, num_prefix = with_prefix_placeholders(prefix_k, prefix_v, gate, q)
    qk_scale = softmax_scale * LOG2E
    common = {"GROUP": group, "HEAD_DIM": head_dim, "BLOCK_D": block_d(head_dim)}
    precision = dot_precision(q.dtype)

    row_blocks = triton.cdiv(group * max_seqlen_q, DECODE_BLOCK_M)
    splits = decode_splits(q.device, batch * kv_heads * row_blocks, max_seqlen_k)
    keys_per_split = triton.cdiv(triton.cdiv(max_seqlen_k, splits), SPLIT_ALIGN) * SPLIT_ALIGN
    splits = triton.cdiv(max_seqlen_k, keys_per_split)
    out_partial = torch.empty((splits, total_q, heads, head_dim), device=q.device, dtype=torch.float32)
    lse_partial = torch.empty((splits, heads, total_q), device=q.device, dtype=torch.float32)
    _launch_split(
        (splits, kv_heads * row_blocks, batch), head_dim,
        q, k, v, out_partial, lse_partial, cu_seqlens_q, cu_seqlens_k,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        *out_partial.stride()[:3], *lse_partial.stride()[:2],
        keys_per_split, row_blocks, qk_scale, seqlen_bucket(max_seqlen_q), seqlen_bucket(max_seqlen_k),
        CAUSAL=causal, DOT_PRECISION=precision, **common,
    )  # fmt: skip

    out = torch.empty_like(q)
    launch_options = {} if INTERPRETING else {"num_warps": 4, "num_stages": 1}
    with interpreter_scope(INTERPRETING):
        aligner_attention_decode_combine_kernel[(triton.cdiv(max_seqlen_q, DECODE_BLOCK_M), heads, batch)](
            q, prefix_k, prefix_v, gate, out_partial, lse_partial, out, cu_seqlens_q, cu_seqlens_k,
            q.stride(0), q.stride(1), *prefix_k.stride()[:3], *prefix_v.stride()[:3], gate.stride(0),
            *out_partial.stride()[:3], *lse_partial.stride()[:2], out.stride(0), out.stride(1),
            splits, num_prefix, qk_scale,
            BLOCK_P=block_p(num_prefix), PREFIX=prefix_variant(num_prefix), DOT_PRECISION=precision,
            BLOCK_M=DECODE_BLOCK_M, **common, **launch_options,
        )  # fmt: skip
    return out
