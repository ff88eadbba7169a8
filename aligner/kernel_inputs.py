"""How validated op inputs reach the Triton launchers, written once for the fused, split and decode
paths: the kernels address every batch as packed sequences (a padded batch is a packed batch of
equal lengths), read a shared prefix or gate as a per-sequence one with batch stride 0, need a
unit stride on the last dimension, and come compiled (CUDA tensors) or interpreted (CPU tensors).
"""

from __future__ import annotations

import types

import torch
from torch import Tensor

import aligner_kernels


def load_kernels(device: torch.device) -> types.SimpleNamespace:
    """The kernel launchers for tensors on ``device``: the Triton interpreter's copy for CPU
    tensors, the compiled one otherwise. Both may be used in one process, in any order, and
    neither changes TRITON_INTERPRET or any other process-wide setting (kernels/interpreted.py)."""
    return aligner_kernels.load(interpreted=device.type == "cpu")


def as_batched_prefix(prefix: Tensor | None, batch: int) -> Tensor | None:
    """(N, H_kv, D) shared -> a (B, N, H_kv, D) view with batch stride 0; per-sequence unchanged."""
    if prefix is None or prefix.dim() == 4:
        return prefix
    return prefix.unsqueeze(0).expand(batch, *prefix.shape)


def as_batched_gate(gate: Tensor | None, batch: int) -> Tensor | None:
    """(H,) shared -> a (B, H) view with batch stride 0; per-sequence unchanged."""
    if gate is None or gate.dim() == 2:
        return gate
    return gate.unsqueeze(0).expand(batch, *gate.shape)


def last_dim_contiguous(x: Tensor | None) -> Tensor | None:
    return x if x is None or x.stride(-1) == 1 else x.contiguous()


def equal_lengths(batch: int, length: int, device: torch.device) -> Tensor:
    """cu_seqlens (int32, B + 1) of ``batch`` sequences of ``length`` tokens each."""
    return torch.arange(0, (batch + 1) * length, length, dtype=torch.int32, device=device)


def packed_layout(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor | None, cu_seqlens_k: Tensor | None,
    max_seqlen_q: int, max_seqlen_k: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """q, k, v as packed (total, heads, D) tensors and dense cu_seqlens_q/k: the kernels' layout.
    A padded batch (cu_seqlens None) is flattened into B sequences of equal length."""
    if cu_seqlens_q is not None:  # the kernels read cu_seqlens as dense arrays
        return q, k, v, cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous()
    batch = q.shape[0]
    q, k, v = (x.reshape(-1, *x.shape[2:]) for x in (q, k, v))
    return (
        q, k, v, equal_lengths(batch, max_seqlen_q, q.device), equal_lengths(batch, max_seqlen_k, q.device)
    )  # fmt: skip


def dense_gate(gate: Tensor | None) -> Tensor | None:
    """The gate as the kernels read it: fp32, dense."""
    return None if gate is None else gate.float().contiguous()
