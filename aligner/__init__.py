"""Aligner: one shared set of learnable tokens steering every layer of an LLM through a gated,
fused flash-attention prefix."""

from .attention import aligner_attention
from .modules import AlignerFlashAttention, AlignerPrefix, project_prefix
from .patch import (
    aligner_parameters,
    disabled,
    merge,
    patch,
    print_trainable_parameters,
    trainable_parameters,
    unmerge,
    unpatch,
)
from .reference import aligner_attention_reference
from .serialization import aligner_parameter_count, convert_official, load, read_config, save

__all__ = [
    "AlignerFlashAttention",
    "AlignerPrefix",
    "aligner_attention",
    "aligner_attention_reference",
    "aligner_parameter_count",
    "aligner_parameters",
    "convert_official",
    "disabled",
    "load",
    "merge",
    "patch",
    "print_trainable_parameters",
    "project_prefix",
    "read_config",
    "save",
    "trainable_parameters",
    "unmerge",
    "unpatch",
]
