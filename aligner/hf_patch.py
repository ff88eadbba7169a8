"""Aligner on Hugging Face causal LMs: an adapter between transformers' attention interface and
:func:`aligner.aligner_attention`, plus the lifecycle (patch, unpatch, merge, disabled).

``patch`` registers, with transformers' ``AttentionInterface``, one attention function per main
attention implementation, named ``"aligner_<main>"`` (``"aligner_sdpa"``, ``"aligner_eager"``,
``"aligner_flash_attention_2"``...), and under the same name with ``AttentionMaskInterface`` the
main implementation's own mask function: transformers builds exactly the mask it builds for the
unpatched model (static cache slots, sliding windows, packed sequences, padding). The function
hands the op the model's own attention with that mask as ``main_attention`` and adds nothing else
but the prefix term, so a layer or a row without an Aligner computes bit for bit what the
unpatched model computes. No model code is copied and no forward is monkeypatched: the model
stays a normal ``PreTrainedModel`` for ``generate``, ``Trainer``, TRL and accelerate.
``model.set_attn_implementation(...)`` after ``patch`` changes the main attention and keeps the
Aligner (a forward pre-hook follows the switch).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from . import hf_compat
from .attention import aligner_attention
from .config import AlignerConfig
from .modules import AlignerFlashAttention, AlignerPrefix, is_quantized, project_prefix
from .padding import is_packed, packed_sequences

ATTENTION_PREFIX = "aligner_"
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


class Memo:
    """Values derived from tensors, recomputed only when a source changes: a source counts as
    unchanged while it is the same object at the same version (in-place updates bump
    ``_version``). Holding the sources also keeps their ids from being reused. One entry per
    name, so memory stays bounded. While ``torch.compile`` traces, nothing is memoised (the
    compiled graph recomputes, and version counters are not traceable)."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[tuple, tuple, Any]] = {}

    @staticmethod
    def _version(x: Any) -> Any:
        if not isinstance(x, Tensor):
            return None
        try:
            return x._version
        except RuntimeError:  # inference-mode tensors keep no version counter
            return None

    def get(self, name: str, sources: tuple, compute: Callable[[], Any]) -> Any:
        if torch.compiler.is_compiling():
            return compute()
        versions = tuple(self._version(x) for x in sources)
        entry = self._entries.get(name)
        if entry is not None:
            old_sources, old_versions, value = entry
            if old_versions == versions and all(
                a is b or (not isinstance(a, Tensor) and not isinstance(b, Tensor) and a == b)
                for a, b in zip(old_sources, sources)
            ):
                return value
        value = compute()
        self._entries[name] = (sources, versions, value)
        return value

    def clear(self) -> None:
        self._entries.clear()


@dataclass
class AlignerState:
    """What ``patch`` changed, kept on the model so that ``unpatch`` can restore it exactly."""

    # The Aligner's config, its base fingerprint filled in from the model.
    config: AlignerConfig
    # The attention implementation the Aligner's prefix term is added to: the model's own
    # ("sdpa", "eager", "flash_attention_2"...), which it runs again after ``unpatch``.
    main_attn_implementation: str
    original_requires_grad: dict[str, bool]
    backend: str | None = None
    # o_proj biases before ``merge``, per layer (None: the layer had no bias).
    merged_biases: dict[int, Tensor | None] | None = None
    # False inside ``disabled``: every layer runs the main attention alone.
    enabled: bool = True
    layers: dict[int, nn.Module] = field(default_factory=dict)
    # The AlignerBank that ``aligner_index`` selects from (see aligner.bank.attach_bank).
    bank: Any = None
    # Inside ``aligner.bank.selected``: one bank Aligner for every row that has no ``aligner_index``,
    # as the tokens (N, hidden) and each layer's gate (H,), on the devices of the model's own Aligner.
    selected: tuple[Tensor, dict[int, Tensor]] | None = None
    # Values derived once per forward / generate call and shared by every layer.
    memo: Memo = field(default_factory=Memo)
    # The forward pre-hook that follows ``set_attn_implementation`` (removed by ``unpatch``).
    hook: Any = None

    @property
    def num_tokens(self) -> int:
        return self.config.num_tokens

    @property
    def start_layer(self) -> int:
        return self.config.start_layer

    @property
    def active(self) -> bool:
        """Whether the prefix term is added (not disabled, not folded into o_proj biases)."""
        return self.enabled and self.merged_biases is None


def main_attention_function(module: nn.Module, implementation: str) -> Callable:
    """The transformers attention function of ``implementation`` for ``module``."""
    if implementation == "eager":
        return hf_compat.eager_attention(module)
    return ALL_ATTENTION_FUNCTIONS[implementation]


def _check_index(index: Any, count: int) -> None:
    if not isinstance(index, Tensor) or index.dim() != 1 or index.dtype not in (torch.int32, torch.int64):
        shape = tuple(index.shape) if isinstance(index, Tensor) else type(index).__name__
        raise ValueError(
            f"aligner_index must be a 1-D int64 tensor of bank indices (-1: base model), got {shape}"
        )
    if index.shape[0] != count:
        raise ValueError(
            f"aligner_index has {index.shape[0]} entries but the batch has {count} sequences; "
            "give one per row"
        )


def _selected(state: AlignerState, index: Tensor, count: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """The bank rows ``index`` selects, on ``device``: tokens (B, N, hidden) and gates (B, layers, H),
    zeros for -1. Gathered (and range-checked) once per index tensor, i.e. once per generate call,
    not per layer or step."""

    bank = state.bank
    if bank is None:
        raise ValueError(
            "aligner_index needs a bank on the model: call aligner.attach_bank(model, bank) first"
        )

    def gather() -> tuple[Tensor, Tensor]:
        _check_index(index, count)
        tokens, gates = bank.select(index)
        return tokens.to(device), gates.to(device)

    return state.memo.get("selected", (index, bank, bank.tokens, bank.gates, device), gather)


def _packed_rows(state: AlignerState, query: Tensor, kwargs: dict[str, Any]) -> tuple[Tensor, int] | None:
    """cu_seqlens and the longest sequence of a padding-free batch (one row holding several
    sequences), else None: what per-sequence bank rows need to tell the sequences apart (the main
    attention reads the same from its mask or its flash kwargs)."""
    if query.shape[0] != 1 or query.shape[2] == 1:
        return None
    if kwargs.get("cu_seq_lens_q") is not None:  # padding-free collators' flash kwargs
        cu_seqlens = kwargs["cu_seq_lens_q"].to(torch.int32)
        longest = kwargs.get("max_length_q")
        return cu_seqlens, int(cu_seqlens.diff().max()) if longest is None else int(longest)
    position_ids = kwargs.get("position_ids")
    if not state.memo.get("is_packed", (position_ids,), lambda: is_packed(position_ids)):
        return None
    return state.memo.get("cu_seqlens", (position_ids,), lambda: packed_sequences(position_ids))


def _prefix(module: nn.Module, tokens: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """This layer's prefix keys and values in ``dtype``: projected on every call when a gradient
    may flow, else once per weights version or bank selection (memoised on the layer)."""

    def compute() -> tuple[Tensor, Tensor]:
        prefix_k, prefix_v = project_prefix(tokens, module.k_proj, module.v_proj, module.head_dim, dtype)
        return prefix_k.to(dtype), prefix_v.to(dtype)

    if torch.is_grad_enabled():
        return compute()
    sources = (
        tokens,
        module.k_proj.weight,
        module.k_proj.bias,
        module.v_proj.weight,
        module.v_proj.bias,
        dtype,
    )
    return module.aligner_memo.get("prefix", sources, compute)


def aligner_attention_hf(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    *,
    main: str,
    aligner_index: Tensor | None = None,
    **kwargs,
) -> tuple[Tensor, Tensor | None]:
    """The attention function registered as ``"aligner_<main>"``: query (B, H, L_q, D), key/value
    (B, H_kv, L_k, D) after RoPE and the KV cache, ``attention_mask`` whatever ``main``'s mask
    function built. Returns (B, L_q, H, D) and the main attention's weights, like every
    transformers attention function.

    Layers with an Aligner return :func:`aligner.aligner_attention` with ``main``'s attention
    function as its ``main_attention``; other layers, a module without an Aligner (a model loaded
    with this implementation, e.g. TRL's reference copy), and a disabled or merged Aligner return
    the main attention alone. ``aligner_index`` (one bank index per sequence, -1: none), passed to
    ``model(...)`` or ``model.generate(...)``, gives each row its own Aligner from the attached bank;
    without it, inside ``aligner.bank.selected`` every row gets the bank Aligner selected there.
    """
    main_function = main_attention_function(module, main)
    weights = None

    def call_main(query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        """The main attention in transformers' layout, with the mask transformers built for it."""
        nonlocal weights
        out, weights = main_function(module, query, key, value, attention_mask, **kwargs)
        if weights is None and kwargs.get("output_attentions"):
            raise ValueError(
                f"output_attentions=True needs attention weights, which the {main!r} attention does not "
                "return: call model.set_attn_implementation('eager') (the Aligner stays). The prefix "
                "attention's own weights: aligner.reference.prefix_attention_weights"
            )
        return out

    def main_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """``call_main`` in the op's layout: (B, L, H, D), or one packed row (total, H, D)."""
        packed = q.dim() == 3
        if packed:
            q, k, v = q[None], k[None], v[None]
        out = call_main(*(x.transpose(1, 2) for x in (q, k, v)))
        return out[0] if packed else out

    state: AlignerState | None = getattr(module, "aligner_model_state", None)
    if state is None:
        if aligner_index is not None:
            raise ValueError(
                "aligner_index needs a model patched with an Aligner and a bank (aligner.attach_bank)"
            )
        return call_main(query, key, value), weights
    aligner: AlignerFlashAttention | None = getattr(module, "aligner", None)
    packed = _packed_rows(state, query, kwargs) if aligner_index is not None else None
    sequences = query.shape[0] if packed is None else packed[0].shape[0] - 1
    tokens = gate = None
    if aligner_index is not None:
        # Checked in every layer, those without an Aligner included (once: memoised).
        tokens, gates = _selected(state, aligner_index, sequences, query.device)
        gate = None if aligner is None else gates[:, module.layer_idx - state.start_layer]
    elif aligner is not None and state.selected is not None:  # aligner.bank.selected: one row for all
        tokens, gate = state.selected[0], state.selected[1][module.layer_idx]
    elif aligner is not None:
        tokens, gate = aligner.shared_prefix(), aligner.gate
    if gate is None or not state.active:
        return call_main(query, key, value), weights

    q, k, v = (x.transpose(1, 2) for x in (query, key, value))
    prefix_k, prefix_v = _prefix(module, tokens, q.dtype)
    options = {"softmax_scale": kwargs.get("scaling"), "backend": module.aligner_backend}
    if packed is not None:  # per-sequence rows of one packed row
        cu_seqlens, max_len = packed
        out = aligner_attention(
            q[0], k[0], v[0], prefix_k, prefix_v, gate, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens,
            max_seqlen_q=max_len, max_seqlen_k=max_len, main_attention=main_attention, **options,
        )  # fmt: skip
        return out[None], weights
    out = aligner_attention(q, k, v, prefix_k, prefix_v, gate, main_attention=main_attention, **options)
    return out, weights


def _use_aligner_attention(model: PreTrainedModel, main: str) -> None:
    """Switch ``model`` to ``"aligner_<main>"``, registering it first: the attention function with
    ``AttentionInterface`` and, under the same name, ``main``'s mask function with
    ``AttentionMaskInterface`` (DESIGN.md section 3). Registering again is harmless."""
    if main != "eager" and main not in ALL_ATTENTION_FUNCTIONS:
        raise ValueError(
            f"attention implementation {main!r} is not registered with transformers' AttentionInterface"
        )
    if main not in ALL_MASK_ATTENTION_FUNCTIONS:
        raise ValueError(
            f"attention implementation {main!r} has no mask function in transformers' "
            "AttentionMaskInterface, which Aligner needs to build the mask the main attention expects"
        )
    name = ATTENTION_PREFIX + main

    def attention(module, query, key, value, attention_mask, **kwargs):
        return aligner_attention_hf(module, query, key, value, attention_mask, main=main, **kwargs)

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[main])
    model.set_attn_implementation(name)


def _follow_attn_implementation(model: PreTrainedModel, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook: after ``model.set_attn_implementation(X)`` on a patched model, X becomes the
    main attention and the Aligner stays (without it the Aligner would silently be dropped)."""
    current = hf_compat.attn_implementation(model)
    if not current.startswith(ATTENTION_PREFIX):
        model.aligner_state.main_attn_implementation = current
        _use_aligner_attention(model, current)


def attention_layers(model: PreTrainedModel) -> dict[int, nn.Module]:
    """The decoder's attention modules by layer index: modules with q/k/v/o projections and a layer_idx."""
    layers = {}
    for module in model.modules():
        if all(hasattr(module, name) for name in PROJECTIONS) and isinstance(
            getattr(module, "layer_idx", None), int
        ):
            layers[module.layer_idx] = module
    return dict(sorted(layers.items()))


def _check_supported(model: PreTrainedModel) -> dict[int, nn.Module]:
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"aligner.patch needs a transformers PreTrainedModel, got {type(model).__name__}")
    config = model.config
    model_type = getattr(config, "model_type", type(model).__name__)
    missing = [
        name
        for name in ("hidden_size", "num_attention_heads", "num_hidden_layers")
        if not hasattr(config, name)
    ]
    if missing:
        raise ValueError(
            f"model type {model_type!r} is not supported: its config has no {', '.join(missing)}"
        )
    if not hf_compat.supports_attention_interface(model):
        raise ValueError(
            f"model type {model_type!r} is not supported: its attention does not go through transformers' "
            "AttentionInterface, which Aligner plugs into"
        )
    layers = attention_layers(model)
    if len(layers) != config.num_hidden_layers:
        raise ValueError(
            f"model type {model_type!r} is not supported: found {len(layers)} attention modules with "
            f"{'/'.join(PROJECTIONS)} and a layer_idx, expected one per layer ({config.num_hidden_layers})"
        )
    return layers


def patch(
    model: PreTrainedModel,
    num_tokens: int | None = None,
    start_layer: int | None = None,
    *,
    config: AlignerConfig | None = None,
    init_std: float = 1.0,
    backend: str | None = None,
) -> PreTrainedModel:
    """Add an Aligner to ``model`` in place and return it.

    Freezes every base parameter, adds one shared ``AlignerPrefix`` (``model.aligner_prefix``,
    num_tokens x hidden, fp32) and a zero-initialised per-head gate to the attention of every
    layer >= ``start_layer``, and routes attention through the fused Aligner attention.
    ``config``: an :class:`~aligner.config.AlignerConfig` instead of ``num_tokens`` / ``start_layer``
    (those given as well must agree with it; neither: N = 1 from layer 2); a config that names a base
    must match the model's. ``backend`` is passed to :func:`aligner.aligner_attention` ("auto" by
    default).
    """
    if hasattr(model, "aligner_state"):
        raise ValueError("model already carries an Aligner; call aligner.unpatch(model) first")
    given = {"num_tokens": num_tokens, "start_layer": start_layer}
    given = {name: value for name, value in given.items() if value is not None}
    if config is None:
        config = AlignerConfig(**given)
    elif not isinstance(config, AlignerConfig):
        raise TypeError(f"config must be an AlignerConfig, got {type(config).__name__}")
    for name, value in given.items():
        if value != getattr(config, name):
            raise ValueError(
                f"{name}={value!r} conflicts with config.{name}={getattr(config, name)!r}; give one of them"
            )
    layers = _check_supported(model)
    config = config.for_model(model.config)  # checks start_layer against the model's layers

    main = hf_compat.attn_implementation(model)
    state = AlignerState(
        config=config,
        main_attn_implementation=main,
        original_requires_grad={name: p.requires_grad for name, p in model.named_parameters()},
        backend=backend,
    )
    model.requires_grad_(False)
    device = model.get_input_embeddings().weight.device
    prefix = AlignerPrefix(config.num_tokens, model.config.hidden_size, init_std=init_std).to(device)
    model.aligner_prefix = prefix
    for index, attn in layers.items():
        attn.aligner_backend = backend  # every layer, those without an Aligner included
        attn.aligner_model_state = state
        attn.aligner_memo = Memo()  # this layer's projected prefix, per weights version or bank selection
        if index in config.layers:
            attn.aligner = AlignerFlashAttention(model.config.num_attention_heads, backend=backend).to(
                attn.o_proj.weight.device
            )
            attn.aligner.attach(prefix)
            state.layers[index] = attn
    model.aligner_state = state
    hf_compat.accept_generate_kwarg(model, "aligner_index")
    _use_aligner_attention(model, main)
    state.hook = model.register_forward_pre_hook(_follow_attn_implementation, with_kwargs=True)
    return model


def get_state(model: PreTrainedModel) -> AlignerState:
    """The Aligner state that ``patch`` left on ``model``; a clear error if it carries none."""
    state = getattr(model, "aligner_state", None)
    if state is None:
        raise ValueError(
            "model carries no Aligner; call aligner.patch(model) or aligner.load(model, path) first"
        )
    return state


def unpatch(model: PreTrainedModel) -> PreTrainedModel:
    """Remove the Aligner: the model's modules, parameters, flags and attention return to what they were."""
    state = get_state(model)
    if state.merged_biases is not None:
        unmerge(model)
    for attn in state.layers.values():
        del attn.aligner
    for attn in attention_layers(model).values():
        del attn.aligner_backend, attn.aligner_model_state, attn.aligner_memo
    state.hook.remove()
    del model.aligner_prefix
    del model.aligner_state
    hf_compat.restore_generate_kwargs(model)
    for name, param in model.named_parameters():
        param.requires_grad_(state.original_requires_grad[name])
    model.set_attn_implementation(_main_of(model, state))
    return model


def _main_of(model: PreTrainedModel, state: AlignerState) -> str:
    """The main attention now: the patched one's, or one the user set since the last forward."""
    current = hf_compat.attn_implementation(model)
    return state.main_attn_implementation if current.startswith(ATTENTION_PREFIX) else current


@contextlib.contextmanager
def disabled(model: PreTrainedModel) -> Iterator[PreTrainedModel]:
    """Run the base model inside the block (e.g. DPO reference log-probs without a second copy)."""
    state = get_state(model)
    if state.merged_biases is not None:
        raise ValueError(
            "the Aligner is merged into o_proj biases; call aligner.unmerge(model) before disabling it"
        )
    previous, state.enabled = state.enabled, False
    try:
        yield model
    finally:
        state.enabled = previous  # nested blocks: the outer one stays disabled


def aligner_parameters(model: PreTrainedModel) -> dict[str, nn.Parameter]:
    """The Aligner's parameters by name: the shared prefix tokens and every layer's gate."""
    state = get_state(model)
    params = {"prefix": model.aligner_prefix.tokens}
    params.update({f"gate.{index}": attn.aligner.gate for index, attn in state.layers.items()})
    return params


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, each shared parameter counted once."""
    params = list(model.parameters())  # nn.Module.parameters() already yields each tensor once
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def print_trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """Print the counts like PEFT's ``print_trainable_parameters`` and return them."""
    trainable, total = trainable_parameters(model)
    share = 100 * trainable / total
    print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {share:.6f}")
    return trainable, total


def merge(model: PreTrainedModel) -> PreTrainedModel:
    """Fold a 1-token Aligner into the o_proj biases: zero inference overhead.

    With N = 1 the prefix attention is the constant gate_h * PV_g (DESIGN.md "N = 1"), so after
    o_proj each layer adds the constant c = W_o concat_h(gate_h PV_g). Each layer then runs its
    main attention alone (sdpa, flash-attn...: the prefix term is skipped), plus those biases. The
    original biases are kept so that ``unmerge`` restores them bit for bit.
    """
    state = get_state(model)
    if state.bank is not None:
        raise ValueError(
            "a model with an attached bank cannot be merged: each row may use a different Aligner; "
            "call aligner.detach_bank(model) first"
        )
    if state.num_tokens != 1:
        raise ValueError(
            f"only a 1-token Aligner can be merged: with N = {state.num_tokens} tokens the prefix softmax "
            "depends on each query, so the prefix output is not a constant vector"
        )
    if state.merged_biases is not None:
        raise ValueError("the Aligner is already merged")
    for index, attn in state.layers.items():
        if is_quantized(attn.o_proj):
            raise ValueError(
                f"merge needs a full-precision o_proj, but layer {index}'s o_proj "
                f"({type(attn.o_proj).__name__}) holds quantized {attn.o_proj.weight.dtype} weights, "
                "into which the Aligner's constant cannot be folded. Keep the Aligner unmerged on the "
                "quantized model, or load the base without quantization (e.g. dtype=torch.bfloat16), "
                "aligner.load it, merge, and quantize the merged model afterwards"
            )
    merged = {}
    with torch.no_grad():
        for index, attn in state.layers.items():
            o_proj = attn.o_proj
            _, prefix_v = project_prefix(
                attn.aligner.shared_prefix(), attn.k_proj, attn.v_proj, attn.head_dim, o_proj.weight.dtype
            )
            group = attn.aligner.gate.shape[0] // prefix_v.shape[1]
            per_head = attn.aligner.gate[:, None] * prefix_v[0].float().repeat_interleave(group, dim=0)
            constant = per_head.flatten() @ o_proj.weight.float().T
            merged[index] = None if o_proj.bias is None else o_proj.bias.detach().clone()
            if o_proj.bias is None:
                o_proj.bias = nn.Parameter(constant.to(o_proj.weight.dtype), requires_grad=False)
            else:
                o_proj.bias.copy_(o_proj.bias.float() + constant)
    state.merged_biases = merged  # the attention now adds nothing: the main attention alone runs
    return model


def unmerge(model: PreTrainedModel) -> PreTrainedModel:
    """Undo ``merge``: the original o_proj biases come back exactly and the prefix path returns."""
    state = get_state(model)
    if state.merged_biases is None:
        raise ValueError("the Aligner is not merged")
    with torch.no_grad():
        for index, attn in state.layers.items():
            original = state.merged_biases[index]
            if original is None:
                attn.o_proj.bias = None
            else:
                attn.o_proj.bias.copy_(original)
    state.merged_biases = None
    return model


def merged_model(model: PreTrainedModel) -> list[int]:
    """Turn a model carrying a 1-token Aligner into a plain transformers model: the Aligner is folded
    into the o_proj biases (:func:`merge`), the patch is removed, and zero q/k/v biases are added with
    ``config.attention_bias = True`` so that ``from_pretrained`` rebuilds it without this package.
    Returns the layers whose bias changed. The model is changed in place."""
    state = get_state(model)
    if state.num_tokens != 1:
        raise ValueError(f"the model's Aligner has {state.num_tokens} tokens; only a 1-token Aligner merges")
    if not hasattr(model.config, "attention_bias"):
        raise ValueError(
            f"model type {model.config.model_type!r} has no attention_bias setting, so a merged o_proj bias "
            "could not be saved as a plain transformers model"
        )
    layers = dict(state.layers)
    merge(model)
    biases = {index: attn.o_proj.bias.detach().clone() for index, attn in layers.items()}
    unpatch(model)  # restores the original biases; the merged ones are put back below as plain parameters
    with torch.no_grad():
        for index, attn in attention_layers(model).items():
            for name in PROJECTIONS:
                linear = getattr(attn, name)
                if linear.bias is None:
                    weight = linear.weight
                    linear.bias = nn.Parameter(
                        torch.zeros(linear.out_features, dtype=weight.dtype, device=weight.device)
                    )
            if index in biases:
                attn.o_proj.bias.copy_(biases[index])
    model.config.attention_bias = True
    return sorted(biases)
