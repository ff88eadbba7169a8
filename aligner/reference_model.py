"""The base model of a patched model as a module of its own, sharing every weight: a DPO reference
(TRL's ``DPOTrainer(ref_model=...)``), a distillation teacher or a KL anchor without a second copy.

::

    ref = aligner.disabled_model(model)      # no new weights: model's own modules, Aligner off
    trainer = DPOTrainer(model=model, ref_model=ref, args=..., train_dataset=..., processing_class=...)

Every call of the returned module (``ref(...)``, ``ref.base_model(...)``, ``ref.generate(...)``)
runs ``model`` inside :func:`aligner.disabled` and in eval mode (no dropout, as TRL's own reference
copy runs), then restores the Aligner and each module's training flag. What TRL's ``DPOTrainer`` reads
from a reference model is there: ``config``, ``base_model`` and ``get_output_embeddings()`` (its
fused log-prob head), ``disable_dropout_in_model`` and accelerate's ``prepare_model(...,
evaluation_mode=True)`` (device placement, autocast), ``state_dict()`` (the hash of
``precompute_ref_log_probs``). It owns no parameters (``parameters()`` is empty; they are the
policy's), so ``sync_ref_model=True``, meaningless here, fails at once without touching a weight.
DeepSpeed and FSDP wrapping of the reference are untested.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch import nn

from .hf_patch import disabled, get_state


@contextlib.contextmanager
def as_base(model: nn.Module) -> Iterator[None]:
    """Run ``model`` as its base model inside the block: the Aligner disabled (nesting is harmless:
    :func:`aligner.disabled` restores the outer state) and every module in eval mode; both restored
    afterwards."""
    modes = [(module, module.training) for module in model.modules()]
    for module, _ in modes:
        module.training = False
    try:
        with disabled(model):
            yield
    finally:
        for module, mode in modes:
            module.training = mode


class _AsBase(nn.Module):
    """Calls ``module`` (a part of ``model``, e.g. its backbone) with ``model``'s Aligner disabled."""

    def __init__(self, module: nn.Module, model: nn.Module) -> None:
        super().__init__()
        self.module = module
        object.__setattr__(self, "_model", model)  # not a submodule: module is already part of it

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with as_base(self._model):
            return self.module(*args, **kwargs)


# What a DisabledModel reads from its model (TRL's fused head reads config and the output embeddings).
SHARED = frozenset(
    {"config", "generation_config", "device", "dtype", "get_input_embeddings", "get_output_embeddings"}
)


class DisabledModel(nn.Module):
    """``model`` (patched with an Aligner) run as its base model; see :func:`disabled_model`."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        state = get_state(model)
        if state.merged_biases is not None:
            raise ValueError(
                "the Aligner is merged into o_proj biases, so the model's base is gone; call "
                "aligner.unmerge(model) first"
            )
        self.model = model
        self.training = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # The whole call, hooks and any replacement of ``forward`` (TRL's fused log-prob head,
        # accelerate's autocast wrapper) included, runs with the Aligner disabled.
        with as_base(self.model):
            return super().__call__(*args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        with as_base(self.model):
            return self.model.generate(*args, **kwargs)

    @property
    def base_model(self) -> nn.Module:
        """The backbone (e.g. ``LlamaModel``), called with the Aligner disabled; looked up on each
        access, like TRL's fused head does, in case a wrapper replaced it."""
        return _AsBase(self.model.base_model, self.model)

    def __getattr__(self, name: str) -> Any:
        if name in SHARED:  # read from the model: its config, device, dtype, embeddings
            return getattr(self._modules["model"], name)
        return super().__getattr__(name)

    def named_parameters(self, *args: Any, **kwargs: Any) -> Iterator[tuple[str, nn.Parameter]]:
        """None: the weights are ``model``'s, which owns them (``state_dict()`` still lists them).
        So nothing can train or blend them through the reference: TRL's ``sync_ref_model``, which
        would mix the policy into the reference, fails at once, before changing a shared weight."""
        return iter(())

    def train(self, mode: bool = True) -> DisabledModel:
        """Only this wrapper's flag: the shared modules keep the policy's mode (every call runs in
        eval mode anyway)."""
        self.training = mode
        return self


def disabled_model(model: nn.Module) -> DisabledModel:
    """``model``'s base model as a module sharing all of ``model``'s weights (no copy): each call runs
    ``model`` with its Aligner disabled and in eval mode. Pass it as TRL's ``DPOTrainer(ref_model=...)``
    to keep one copy of the base in memory instead of two."""
    return DisabledModel(model)
