"""The @triton.jit building blocks that several kernels share, each written once (as the Triton
fused-attention tutorial's ``_attn_fwd_inner``): the query-block prologue, the visibility mask,
the causal key ranges, and the tile loops of the main and the prefix attention that both the
fused forward (forward.py) and the split-KV decode (decode.py) run; plus the constants and the
launcher helper that forward.py, backward.py and decode.py have in common. Helpers used by one
kernel module only stay in that module (backward.py's dQ/dK/dV tile loops); those of the prefix's
gradients, which the fused and the split backward share, are in prefix_grad.py.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton import knobs

from . import configs

LOG2E = 1.4426950408889634
# The PREFIX switch's values, as constants the jitted code can compare against.
NO_PREFIX = tl.constexpr(configs.NO_PREFIX)
ONE_TOKEN = tl.constexpr(configs.ONE_TOKEN)
MANY_TOKENS = tl.constexpr(configs.MANY_TOKENS)
# Whether the kernel modules were decorated for the interpreter (their interpreted copy,
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
def query_block(
    CuSeqQ, CuSeqK, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr
):
    """Prologue of a program (query block start_m, head, sequence b) of a (blocks, H, B) grid.

    Returns b, head, its KV head, start_m; the sequence's query length, key start and key length;
    offs_m (the block's query positions in the sequence), rows (their int64 rows in the packed
    tensors), offs_d, row_mask (queries inside the sequence), mask (row_mask x real head dims); and
    past_end: the grid covers the longest sequence, so a block may start past this one's end. A
    helper cannot end its caller: the kernel returns when past_end.
    """
    start_m = tl.program_id(0)
    head = tl.program_id(1)
    b = tl.program_id(2)
    q_start, len_q, k_start, len_k = sequence_bounds(CuSeqQ, CuSeqK, b)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_mask = offs_m < len_q
    mask = row_mask[:, None] & (offs_d[None, :] < HEAD_DIM)
    rows = q_start.to(tl.int64) + offs_m
    past_end = start_m * BLOCK_M >= len_q
    return (
        b,
        head,
        head // GROUP,
        start_m,
        len_q,
        k_start,
        len_k,
        offs_m,
        rows,
        offs_d,
        row_mask,
        mask,
        past_end,
    )


@triton.jit
def visible(query, key, len_q, len_k, CAUSAL: tl.constexpr):
    """Whether query position ``query`` attends to key position ``key`` (broadcast against each
    other, in either orientation): the key is inside the sequence and, if CAUSAL, not after the
    query, bottom-right aligned (j <= i + len_k - len_q)."""
    mask = key < len_k
    if CAUSAL:
        mask = mask & (key <= query + (len_k - len_q))
    return mask


@triton.jit
def causal_key_ranges(
    start_m, len_q, len_k, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr
):
    """Keys [0, full_end) are visible to every query of the block (no mask needed); keys
    [full_end, end) need the mask of :func:`visible`; keys from end on are hidden from every query
    of the block and never loaded. full_end is a multiple of BLOCK_N."""
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
            s = tl.where(visible(offs_m[:, None], offs_n[None, :], len_q, len_k, CAUSAL), s, float("-inf"))
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


def with_prefix_placeholders(prefix_k, prefix_v, gate, q):
    """Without a prefix the kernels never read PK/PV/Gate (PREFIX = NO_PREFIX compiles them out),
    but every pointer argument must still be a valid device address: q stands in for them."""
    if prefix_k is None:
        placeholder = q.unsqueeze(0)
        return placeholder, placeholder, q, 0
    return prefix_k, prefix_v, gate, prefix_k.shape[1]
