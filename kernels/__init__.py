"""Triton kernels of the fused Aligner attention: ``@triton.jit`` functions and their launchers."""

from .backward import aligner_attention_backward
from .configs import INTERPRETING, MAX_PREFIX_TOKENS, SUPPORTED_HEAD_DIMS
from .forward import aligner_attention_forward

__all__ = [
    "INTERPRETING",
    "MAX_PREFIX_TOKENS",
    "SUPPORTED_HEAD_DIMS",
    "aligner_attention_backward",
    "aligner_attention_forward",
]
