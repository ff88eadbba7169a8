"""Padding-free batches in the Hugging Face attention function: the sequences packed in one row
(positions restarting per sequence, as TRL's collators make them) as ``cu_seqlens``, which
per-sequence bank rows need."""

from __future__ import annotations

import torch
from torch import Tensor


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
