"""Aligner: one shared set of learnable tokens steering every layer of an LLM through a gated,
fused flash-attention prefix."""

from .attention import aligner_attention
from .bank import AlignerBank, attach_bank, detach_bank
from .disabled_model import DisabledModel, disabled_model
from .hub import push_to_hub
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
    "AlignerBank",
    "AlignerFlashAttention",
    "AlignerPrefix",
    "DisabledModel",
    "aligner_attention",
    "aligner_attention_reference",
    "aligner_parameter_count",
    "aligner_parameters",
    "attach_bank",
    "detach_bank",
    "convert_official",
    "disabled",
    "disabled_model",
    "load",
    "merge",
    "patch",
    "print_trainable_parameters",
    "project_prefix",
    "push_to_hub",
    "read_config",
    "save",
    "trainable_parameters",
    "unmerge",
    "unpatch",
]
