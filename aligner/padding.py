"""Padding helpers of the Hugging Face attention function: between padded (B, L, H, D) batches
and the packed varlen layout (total, H, D) with ``cu_seqlens``, as flash-attn's ``bert_padding``."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def unpad(x: Tensor, keep: Tensor) -> tuple[Tensor, Tensor, Tensor, int]:
    """(B, L, H, D) and a (B, L) keep-mask -> packed (total, H, D), row indices, cu_seqlens, max length."""
    lengths = keep.sum(1, dtype=torch.int32)
    indices = keep.flatten().nonzero().flatten()
    cu_seqlens = nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    return x.flatten(0, 1).index_select(0, indices), indices, cu_seqlens, int(lengths.max())


def packed_sequences(position_ids: Tensor) -> tuple[Tensor, int]:
    """cu_seqlens and max length of a padding-free batch (1, total) whose positions restart per sequence."""
    positions = position_ids.flatten()
    starts = torch.ones_like(positions, dtype=torch.bool)
    starts[1:] = positions[1:] != positions[:-1] + 1
    start_indices = starts.nonzero().flatten().to(torch.int32)
    total = torch.tensor([positions.numel()], dtype=torch.int32, device=positions.device)
    cu_seqlens = torch.cat([start_indices, total])
    return cu_seqlens, int(cu_seqlens.diff().max())


def is_packed(position_ids: Tensor | None) -> bool:
    """Whether the positions of a (1, L) batch restart somewhere: several sequences packed in one row."""
    if position_ids is None:
        return False
    positions = position_ids.flatten()
    return bool((positions[1:] != positions[:-1] + 1).any())
