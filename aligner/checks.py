"""Input checks of :func:`aligner.aligner_attention`: every mistake is named before a kernel runs."""

from __future__ import annotations

import math

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


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
    _require(
        len(given) in (0, 3),
        f"{', '.join(missing)} is None but {', '.join(given)} given: prefix_k, prefix_v and gate go together "
        "(all given, or all None for plain attention)",
    )
    for name, x in (("q", q), ("k", k), ("v", v), *(prefix.items() if given else ())):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        _require(x.dtype in FLOAT_DTYPES, f"{name} must be a floating-point tensor, got dtype {x.dtype}")
        _require(
            x.device == q.device,
            f"{name} is on {x.device} but q is on {q.device}; put all inputs on one device",
        )
    for name, x in (("k", k), ("v", v), *((("prefix_k", prefix_k), ("prefix_v", prefix_v)) if given else ())):
        _require(x.dtype == q.dtype, f"{name} has dtype {x.dtype} but q has {q.dtype}; they must match")

    packed = cu_seqlens_q is not None or cu_seqlens_k is not None
    rank = 3 if packed else 4
    layout = "(total, heads, head_dim)" if packed else "(batch, seqlen, heads, head_dim)"
    for name, x in (("q", q), ("k", k), ("v", v)):
        _require(x.dim() == rank, f"{name} must have shape {layout}, got {_shape(x)}")
    _require(k.shape == v.shape, f"k and v must have the same shape, got {_shape(k)} and {_shape(v)}")
    heads, head_dim = q.shape[-2], q.shape[-1]
    kv_heads = k.shape[-2]
    _require(
        k.shape[-1] == head_dim,
        f"k/v head_dim {k.shape[-1]} differs from q head_dim {head_dim}; they must match",
    )
    _require(
        head_dim > 0 and heads > 0 and kv_heads > 0, f"q and k must have non-empty heads, got {_shape(q)}"
    )
    _require(
        heads % kv_heads == 0,
        f"q's {heads} heads must be divisible by k/v's {kv_heads} heads (GQA/MQA group size)",
    )

    if packed:
        batch, max_seqlen_q, max_seqlen_k = _check_cu_seqlens(
            q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k
        )
    else:
        batch, max_seqlen_q, max_seqlen_k = q.shape[0], q.shape[1], k.shape[1]
        _require(k.shape[0] == batch, f"q has batch {batch} but k/v have batch {k.shape[0]}")
        _require(
            min(batch, max_seqlen_q, max_seqlen_k) > 0,
            f"q and k need batch >= 1 and seqlen >= 1, got q {_shape(q)} and k {_shape(k)}",
        )
        _require(
            not causal or max_seqlen_q <= max_seqlen_k,
            f"causal attention needs seqlen_q <= seqlen_k (bottom-right aligned), got q {max_seqlen_q}, "
            f"k {max_seqlen_k}",
        )

    if given:
        _check_prefix(prefix_k, prefix_v, gate, batch, heads, kv_heads, head_dim)
    return max_seqlen_q, max_seqlen_k


def _check_prefix(prefix_k, prefix_v, gate, batch: int, heads: int, kv_heads: int, head_dim: int) -> None:
    expected = "(num_tokens, kv_heads, head_dim) or (batch, num_tokens, kv_heads, head_dim)"
    _require(prefix_k.dim() in (3, 4), f"prefix_k must have shape {expected}, got {_shape(prefix_k)}")
    _require(
        prefix_v.shape == prefix_k.shape,
        f"prefix_v must have the shape of prefix_k {_shape(prefix_k)}, got {_shape(prefix_v)}",
    )
    _require(prefix_k.shape[-3] >= 1, f"prefix_k needs at least one token (N >= 1), got {_shape(prefix_k)}")
    _require(
        prefix_k.shape[-2:] == (kv_heads, head_dim),
        f"prefix_k must end in (kv_heads, head_dim) = ({kv_heads}, {head_dim}), got {_shape(prefix_k)}",
    )
    if prefix_k.dim() == 4:
        _require(
            prefix_k.shape[0] == batch,
            f"per-sequence prefix_k has batch {prefix_k.shape[0]}, expected {batch}",
        )
    _require(
        gate.shape in ((heads,), (batch, heads)),
        f"gate must have shape (heads,) = ({heads},) or per sequence (batch, heads) = ({batch}, {heads}), "
        f"got {_shape(gate)}",
    )


def _check_softmax_scale(softmax_scale) -> None:
    if softmax_scale is None:
        return
    is_number = isinstance(softmax_scale, (int, float)) and not isinstance(softmax_scale, bool)
    _require(
        is_number and math.isfinite(softmax_scale) and softmax_scale > 0,
        f"softmax_scale must be a positive finite number or None, got {softmax_scale!r}",
    )


def _check_cu_seqlens(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) -> tuple[int, int, int]:
    _require(
        cu_seqlens_q is not None and cu_seqlens_k is not None,
        "packed inputs need both cu_seqlens_q and cu_seqlens_k",
    )
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not isinstance(cu, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of dtype int32, got {type(cu).__name__}")
        _require(
            cu.dim() == 1 and cu.shape[0] >= 2,
            f"{name} must be 1-D of length batch + 1 >= 2, got {_shape(cu)}",
        )
        _require(cu.dtype == torch.int32, f"{name} must be torch.int32 (as in flash-attn), got {cu.dtype}")
        _require(cu.device == q.device, f"{name} is on {cu.device} but q is on {q.device}")
    _require(
        cu_seqlens_q.shape == cu_seqlens_k.shape,
        f"cu_seqlens_q and cu_seqlens_k must have the same length, got {cu_seqlens_q.shape[0]} and "
        f"{cu_seqlens_k.shape[0]}",
    )
    batch = cu_seqlens_q.shape[0] - 1
    if torch.compiler.is_compiling():
        _require(
            max_seqlen_q is not None and max_seqlen_k is not None,
            "max_seqlen_q/k must be given under torch.compile",
        )
        return batch, max_seqlen_q, max_seqlen_k
    lengths = {}
    for name, cu, x, given in (
        ("cu_seqlens_q", cu_seqlens_q, q, max_seqlen_q),
        ("cu_seqlens_k", cu_seqlens_k, k, max_seqlen_k),
    ):
        values = cu.tolist()
        _require(values[0] == 0, f"{name} must start at 0, got {values[0]}")
        seq_lens = [b - a for a, b in zip(values, values[1:])]
        _require(min(seq_lens) >= 0, f"{name} must be non-decreasing, got {values}")
        _require(
            values[-1] == x.shape[0],
            f"{name} must end at the number of packed tokens {x.shape[0]}, got {values[-1]}",
        )
        longest = max(seq_lens)
        suffix = name[len("cu_seqlens_") :]
        _require(
            given is None or given >= longest,
            f"max_seqlen_{suffix}={given} is shorter than the longest sequence in {name} ({longest})",
        )
        lengths[suffix] = longest if given is None else given
    return batch, lengths["q"], lengths["k"]
