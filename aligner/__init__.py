"""Aligner: one shared set of learnable tokens steering every layer of an LLM through a gated,
fused flash-attention prefix."""

from __future__ import annotations

from .lazy import lazy_exports

# Public name -> the submodule that defines it, imported on first use (PEP 562), so that
# ``import aligner`` and ``aligner --help`` do not pay for torch, transformers or the training stack.
_EXPORTS = {
    "AlignerBank": "bank",
    "AlignerConfig": "config",
    "AlignerFlashAttention": "modules",
    "AlignerPrefix": "modules",
    "DisabledModel": "reference_model",
    "aligner_attention": "attention",
    "aligner_attention_reference": "reference",
    "aligner_parameter_count": "serialization",
    "aligner_parameters": "hf_patch",
    "attach_bank": "bank",
    "convert_official": "official",
    "detach_bank": "bank",
    "disabled": "hf_patch",
    "disabled_model": "reference_model",
    "evaluate": "evaluation",
    "load": "serialization",
    "merge": "hf_patch",
    "patch": "hf_patch",
    "print_trainable_parameters": "hf_patch",
    "project_prefix": "modules",
    "push_bank_to_hub": "publish",
    "push_to_hub": "publish",
    "read_config": "config",
    "save": "serialization",
    "selected": "bank",
    "trainable_parameters": "hf_patch",
    "unmerge": "hf_patch",
    "unpatch": "hf_patch",
}

__all__ = [
    "AlignerBank",
    "AlignerConfig",
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
    "evaluate",
    "load",
    "merge",
    "patch",
    "print_trainable_parameters",
    "project_prefix",
    "push_bank_to_hub",
    "push_to_hub",
    "read_config",
    "save",
    "selected",
    "trainable_parameters",
    "unmerge",
    "unpatch",
]


__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)
