"""Input checks of :func:`aligner.aligner_attention`: every mistake is named before a kernel runs."""

from __future__ import annotations

import math

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _shape(x: Tensor) -> tuple[int, ...]:
    return tuple(x.shape)


def check_attention_inputs(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prefix_k: Tensor | None,
    prefix_v: Tensor | None,
    gate: Tensor | None,
    *,
    causal: bool,
    softmax_scale: float | None,
    cu_seqlens_q: Tensor | None,
    cu_seqlens_k: Tensor | None,
    max_seqlen_q: int | None,
    max_seqlen_k: int | None,
) -> tuple[int, int]:
    """Validate shapes, dtypes and devices; return (max_seqlen_q, max_seqlen_k).

    prefix_k, prefix_v and gate are all given, or all None (plain attention). For packed inputs
    the cu_seqlens values are checked too (one device sync), except while ``torch.compile``
    traces, where data-dependent checks cannot run.
    """
    _check_softmax_scale(softmax_scale)
    prefix = {"prefix_k": prefix_k, "prefix_v": prefix_v, "gate": gate}
    given = [name for name, x in prefix.items() if x is not None]
    missing = [name for name, x in prefix.items() if x is None]
    if len(given) not in (0, 3):
        raise ValueError(
            f"{', '.join(missing)} is None but {', '.join(given)} given: prefix_k, prefix_v and gate go "
            "together (all given, or all None for plain attention)"
        )
    for name, x in (("q", q), ("k", k), ("v", v), *(prefix.items() if given else ())):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}; put all inputs on one device")
    for name, x in (("k", k), ("v", v), *((("prefix_k", prefix_k), ("prefix_v", prefix_v)) if given else ())):
        if x.dtype != q.dtype:
            raise ValueError(f"{name} has dtype {x.dtype} but q has {q.dtype}; they must match")

    packed = cu_seqlens_q is not None or cu_seqlens_k is not None
    rank = 3 if packed else 4
    layout = "(total, heads, head_dim)" if packed else "(batch, seqlen, heads, head_dim)"
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != rank:
            raise ValueError(f"{name} must have shape {layout}, got {_shape(x)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {_shape(k)} and {_shape(v)}")
    heads, head_dim = q.shape[-2], q.shape[-1]
    kv_heads = k.shape[-2]
    if k.shape[-1] != head_dim:
        raise ValueError(f"k/v head_dim {k.shape[-1]} differs from q head_dim {head_dim}; they must match")
    if not (head_dim > 0 and heads > 0 and kv_heads > 0):
        raise ValueError(f"q and k must have non-empty heads, got {_shape(q)}")
    if heads % kv_heads != 0:
        raise ValueError(
            f"q's {heads} heads must be divisible by k/v's {kv_heads} heads (GQA/MQA group size)"
        )

    if packed:
        batch, max_seqlen_q, max_seqlen_k = _check_cu_seqlens(
            q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k
        )
    else:
        batch, max_seqlen_q, max_seqlen_k = q.shape[0], q.shape[1], k.shape[1]
        if k.shape[0] != batch:
            raise ValueError(f"q has batch {batch} but k/v have batch {k.shape[0]}")
        if min(batch, max_seqlen_q, max_seqlen_k) <= 0:
            raise ValueError(f"q and k need batch >= 1 and seqlen >= 1, got q {_shape(q)} and k {_shape(k)}")
        if causal and max_seqlen_q > max_seqlen_k:
            raise ValueError(
                f"causal attention needs seqlen_q <= seqlen_k (bottom-right aligned), got q {max_seqlen_q}, "
                f"k {max_seqlen_k}"
            )

    if given:
        _check_prefix(prefix_k, prefix_v, gate, batch, heads, kv_heads, head_dim)
    return max_seqlen_q, max_seqlen_k


def _check_prefix(prefix_k, prefix_v, gate, batch: int, heads: int, kv_heads: int, head_dim: int) -> None:
    expected = "(num_tokens, kv_heads, head_dim) or (batch, num_tokens, kv_heads, head_dim)"
    if prefix_k.dim() not in (3, 4):
        raise ValueError(f"prefix_k must have shape {expected}, got {_shape(prefix_k)}")
    if prefix_v.shape != prefix_k.shape:
        raise ValueError(
            f"prefix_v must have the shape of prefix_k {_shape(prefix_k)}, got {_shape(prefix_v)}"
        )
    if prefix_k.shape[-3] < 1:
        raise ValueError(f"prefix_k needs at least one token (N >= 1), got {_shape(prefix_k)}")
    if prefix_k.shape[-2:] != (kv_heads, head_dim):
        raise ValueError(
            f"prefix_k must end in (kv_heads, head_dim) = ({kv_heads}, {head_dim}), got {_shape(prefix_k)}"
        )
    if prefix_k.dim() == 4:
        if prefix_k.shape[0] != batch:
            raise ValueError(f"per-sequence prefix_k has batch {prefix_k.shape[0]}, expected {batch}")
    if gate.shape not in ((heads,), (batch, heads)):
        raise ValueError(
            f"gate must have shape (heads,) = ({heads},) shared by the batch, or (batch, heads) = "
            f"({batch}, {heads}) one row per sequence, got {_shape(gate)}"
        )


def _check_softmax_scale(softmax_scale) -> None:
    if softmax_scale is None:
        return
    is_number = isinstance(softmax_scale, (int, float)) and not isinstance(softmax_scale, bool)
    if not (is_number and math.isfinite(softmax_scale) and softmax_scale > 0):
        raise ValueError(f"softmax_scale must be a positive finite number or None, got {softmax_scale!r}")


def _check_cu_seqlens(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) -> tuple[int, int, int]:
    if cu_seqlens_q is None or cu_seqlens_k is None:
        raise ValueError("packed inputs need both cu_seqlens_q and cu_seqlens_k")
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not isinstance(cu, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of dtype int32, got {type(cu).__name__}")
        if not (cu.dim() == 1 and cu.shape[0] >= 2):
            raise ValueError(f"{name} must be 1-D of length batch + 1 >= 2, got {_shape(cu)}")
        if cu.dtype != torch.int32:
            raise ValueError(f"{name} must be torch.int32 (as in flash-attn), got {cu.dtype}")
        if cu.device != q.device:
            raise ValueError(f"{name} is on {cu.device} but q is on {q.device}")
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k must have the same length, got {cu_seqlens_q.shape[0]} and "
            f"{cu_seqlens_k.shape[0]}"
        )
    batch = cu_seqlens_q.shape[0] - 1
    if torch.compiler.is_compiling():
        if max_seqlen_q is None or max_seqlen_k is None:
            raise ValueError("max_seqlen_q/k must be given under torch.compile")
        return batch, max_seqlen_q, max_seqlen_k
    lengths = {}
    for name, cu, x, given in (
        ("cu_seqlens_q", cu_seqlens_q, q, max_seqlen_q),
        ("cu_seqlens_k", cu_seqlens_k, k, max_seqlen_k),
    ):
        values = cu.tolist()
        if values[0] != 0:
            raise ValueError(f"{name} must start at 0, got {values[0]}")
        seq_lens = [b - a for a, b in zip(values, values[1:])]
        if min(seq_lens) < 0:
            raise ValueError(f"{name} must be non-decreasing, got {values}")
        if values[-1] != x.shape[0]:
            raise ValueError(f"{name} must end at the number of packed tokens {x.shape[0]}, got {values[-1]}")
        longest = max(seq_lens)
        suffix = name[len("cu_seqlens_") :]
        if given is not None and given < longest:
            raise ValueError(
                f"max_seqlen_{suffix}={given} is shorter than the longest sequence in {name} ({longest})"
            )
        lengths[suffix] = longest if given is None else given
    return batch, lengths["q"], lengths["k"]
