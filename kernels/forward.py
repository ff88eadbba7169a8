"""Forward kernel: flash attention over the sequence and the gated N-token prefix, in one pass.

Each program owns BLOCK_M queries of one (sequence, head). It streams the sequence's K/V tiles
once with an online softmax, then the prefix (N <= 64: one tile) with a second, separate online
softmax, and writes O = O_main + gate * O_pre together with the log-sum-exps the backward needs.
The compile-time switch PREFIX selects N tokens, one token (the prefix softmax is identically 1,
so O_pre = PV and the prefix costs one vector add in the epilogue) or no prefix at all (plain
flash attention, for layers without an Aligner).

Sequences are always addressed through cu_seqlens (a padded batch is a packed batch of equal
lengths), so one kernel serves both layouts. Log-sum-exps are kept in base 2 (exp2 is cheaper).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton import knobs

from . import configs
from .configs import FORWARD_CONFIGS, block_d, block_p, dot_precision, launcher, prefix_variant, seqlen_bucket

LOG2E = 1.4426950408889634
# The PREFIX switch's values, as constants the jitted code can compare against.
NO_PREFIX = tl.constexpr(configs.NO_PREFIX)
ONE_TOKEN = tl.constexpr(configs.ONE_TOKEN)
MANY_TOKENS = tl.constexpr(configs.MANY_TOKENS)
# Whether the kernels below were decorated for the interpreter (this module's interpreted copy,
# kernels/interpreted.py, or TRITON_INTERPRET=1 set by the user).
INTERPRETING = knobs.runtime.interpret


@triton.jit
def sequence_bounds(CuSeqQ, CuSeqK, b):
    """Start offsets and lengths of sequence b in the packed query and key tensors."""
    q_start = tl.load(CuSeqQ + b)
    k_start = tl.load(CuSeqK + b)
    len_q = tl.load(CuSeqQ + b + 1) - q_start
    len_k = tl.load(CuSeqK + b + 1) - k_start
    return q_start, len_q, k_start, len_k


@triton.jit
def causal_key_ranges(
    start_m, len_q, len_k, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr
):
    """Keys [0, full_end) are visible to every query of the block (no mask needed); keys
    [full_end, end) need the causal / length mask. Bottom-right causal alignment: query i sees
    key j iff j <= i + (len_k - len_q)."""
    if CAUSAL:
        shift = len_k - len_q
        end = tl.minimum((start_m + 1) * BLOCK_M + shift, len_k)
        full_end = tl.minimum(start_m * BLOCK_M + shift + 1, len_k)
        end = tl.maximum(end, 0)
        full_end = tl.maximum(full_end, 0) // BLOCK_N * BLOCK_N
    else:
        end = len_k
        full_end = len_k // BLOCK_N * BLOCK_N
    return full_end, end


@triton.jit
def main_attention_tiles(
    acc,
    row_sum,
    row_max,
    q,
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
    """Online-softmax accumulation of keys [key_lo, key_hi) into (acc, row_sum, row_max)."""
    for start_n in range(key_lo, key_hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_mask = (offs_n[:, None] < len_k) & (offs_d[None, :] < HEAD_DIM)
        k = tl.load(k_ptrs + offs_n[:, None] * stride_km, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if MASKED:
            visible = offs_n[None, :] < len_k
            if CAUSAL:
                visible = visible & (offs_n[None, :] <= offs_m[:, None] + (len_k - len_q))
            s = tl.where(visible, s, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(s, 1))
        # A row that has seen no visible key yet keeps max -inf; shift by 0 to avoid inf - inf.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        p = tl.exp2(s - shift[:, None])
        alpha = tl.exp2(row_max - shift)
        row_sum = row_sum * alpha + tl.sum(p, 1)
        v = tl.load(v_ptrs + offs_n[:, None] * stride_vm, mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        row_max = new_max
    return acc, row_sum, row_max


@triton.jit
def prefix_attention(
    q,
    pk_ptrs,
    pv_ptrs,
    stride_pkn,
    stride_pvn,
    offs_d,
    num_prefix,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_P: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """softmax(s q PK^T) PV over the N prefix tokens, streamed BLOCK_P at a time.
    Returns O_pre (fp32) and its base-2 log-sum-exp."""
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for start_p in range(0, num_prefix, BLOCK_P):
        offs_p = start_p + tl.arange(0, BLOCK_P)
        p_mask = (offs_p[:, None] < num_prefix) & (offs_d[None, :] < HEAD_DIM)
        pk = tl.load(pk_ptrs + offs_p[:, None] * stride_pkn, mask=p_mask, other=0.0)
        s = tl.dot(q, tl.trans(pk), input_precision=DOT_PRECISION) * qk_scale
        s = tl.where(offs_p[None, :] < num_prefix, s, float("-inf"))
        # Every chunk holds at least one real token, so new_max is finite.
        new_max = tl.maximum(row_max, tl.max(s, 1))
        a = tl.exp2(s - new_max[:, None])
        alpha = tl.exp2(row_max - new_max)
        row_sum = row_sum * alpha + tl.sum(a, 1)
        pv = tl.load(pv_ptrs + offs_p[:, None] * stride_pvn, mask=p_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(a.to(pv.dtype), pv, input_precision=DOT_PRECISION)
        row_max = new_max
    return acc / row_sum[:, None], row_max + tl.log2(row_sum)


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
    start_m = tl.program_id(0)
    head = tl.program_id(1)
    b = tl.program_id(2)
    kv_head = head // GROUP
    q_start, len_q, k_start, len_k = sequence_bounds(CuSeqQ, CuSeqK, b)
    if start_m * BLOCK_M >= len_q:
        return

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_mask = (offs_m[:, None] < len_q) & (offs_d[None, :] < HEAD_DIM)
    q_ptrs = (
        Q
        + q_start.to(tl.int64) * stride_qm
        + head * stride_qh
        + offs_m[:, None] * stride_qm
        + offs_d[None, :]
    )
    q = tl.load(q_ptrs, mask=q_mask, other=0.0)
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
    row_offset = head * stride_lh + q_start + offs_m
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
        tl.store(LsePrefix + row_offset, lse_prefix, mask=offs_m < len_q)

    tl.store(Lse + row_offset, lse, mask=offs_m < len_q)
    o_ptrs = (
        Out
        + q_start.to(tl.int64) * stride_om
        + head * stride_oh
        + offs_m[:, None] * stride_om
        + offs_d[None, :]
    )
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=q_mask)


def with_prefix_placeholders(prefix_k, prefix_v, gate, q):
    """Without a prefix the kernels never read PK/PV/Gate (PREFIX = NO_PREFIX compiles them out),
    but every pointer argument must still be a valid device address: q stands in for them."""
    if prefix_k is None:
        placeholder = q.unsqueeze(0)
        return placeholder, placeholder, q, 0
    return prefix_k, prefix_v, gate, prefix_k.shape[1]


# The prefix switches are not in the key: every prefix variant of a shape runs the main attention
# with the same tiles, so a row with gate 0 gives the prefix-less kernel's bits (and a shape is
# tuned once, not once per variant).
_launch_forward = launcher(
    aligner_attention_fwd_kernel,
    FORWARD_CONFIGS,
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
