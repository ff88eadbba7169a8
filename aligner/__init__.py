"""Aligner: one shared set of learnable tokens steering every layer of an LLM through a gated,
fused flash-attention prefix."""

from .attention import aligner_attention
from .modules import AlignerFlashAttention, AlignerPrefix, project_prefix
from .reference import aligner_attention_reference

__all__ = [
    "AlignerFlashAttention",
    "AlignerPrefix",
    "aligner_attention",
    "aligner_attention_reference",
    "project_prefix",
]
