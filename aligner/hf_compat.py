"""Every use of transformers' non-public API, in one place, each pinned by tests/test_hf_compat.py
so that a transformers release that changes one fails loudly there.

transformers offers public extension points for what Aligner does (``AttentionInterface``,
``AttentionMaskInterface``, ``set_attn_implementation``); what it has no public form for:

- reading a model's current attention implementation: ``config._attn_implementation`` is what
  transformers itself, TRL and accelerate read;
- the model's own eager attention: modeling files pass it as the default of
  ``ALL_ATTENTION_FUNCTIONS.get_interface`` instead of registering it, so it is looked up as the
  ``eager_attention_forward`` function of the attention module's own modeling file;
- whether a model's attention goes through ``AttentionInterface``:
  ``PreTrainedModel._can_set_attn_implementation``;
- a keyword argument of ``generate`` that reaches the attention through the forward's ``**kwargs``
  (``aligner_index``): ``generate`` refuses every keyword that is neither in the forward's
  signature nor in ``TransformersKwargs``, so the instance's ``_validate_model_kwargs`` lets it through.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable
from typing import Any

from torch import nn
from transformers import PreTrainedModel


def attn_implementation(model_or_config: Any) -> str:
    """The attention implementation a model (or its config) runs now, e.g. "sdpa"."""
    config = getattr(model_or_config, "config", model_or_config)
    return config._attn_implementation


def supports_attention_interface(model: PreTrainedModel) -> bool:
    """Whether ``model``'s attention goes through ``AttentionInterface`` (set_attn_implementation works)."""
    return model._can_set_attn_implementation()


def eager_attention(module: nn.Module) -> Callable:
    """The eager attention function of ``module``'s own modeling file (what transformers runs for
    ``attn_implementation="eager"``)."""
    function = getattr(inspect.getmodule(type(module)), "eager_attention_forward", None)
    if function is None:
        raise ValueError(
            f"{type(module).__name__}'s modeling file has no eager_attention_forward: Aligner cannot run "
            "its eager attention; use attn_implementation='sdpa'"
        )
    return function


def accept_generate_kwarg(model: PreTrainedModel, name: str) -> None:
    """Let ``model.generate(..., name=...)`` pass ``name`` on to the forward's ``**kwargs``."""
    if not hasattr(type(model), "_validate_model_kwargs"):
        return

    def validate(self: PreTrainedModel, model_kwargs: dict[str, Any]) -> None:
        type(self)._validate_model_kwargs(self, {key: v for key, v in model_kwargs.items() if key != name})

    model._validate_model_kwargs = types.MethodType(validate, model)


def restore_generate_kwargs(model: PreTrainedModel) -> None:
    """Undo :func:`accept_generate_kwarg`."""
    model.__dict__.pop("_validate_model_kwargs", None)
