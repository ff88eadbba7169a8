"""Aligner on Hugging Face causal LMs through transformers' own extension points.

``patch`` registers an attention function with ``AttentionInterface`` and, under the same name,
the flash-style 2D padding-mask function with ``AttentionMaskInterface`` (without a mask function
transformers would pass no mask at all), then switches the model to it with
``set_attn_implementation``. No model code is copied and no forward is monkeypatched: the model
stays a normal ``PreTrainedModel`` for ``generate``, ``Trainer``, TRL and accelerate.
"""

from __future__ import annotations

import contextlib
import os
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .attention import aligner_attention
from .modules import AlignerFlashAttention, AlignerPrefix, is_quantized, project_prefix
from .padding import is_packed, packed_sequences, unpad

ATTENTION_NAME = "aligner"
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


class Memo:
    """Values derived from tensors, recomputed only when a source changes: a source counts as
    unchanged while it is the same object at the same version (in-place updates bump
    ``_version``). Holding the sources also keeps their ids from being reused. One entry per
    name, so memory stays bounded."""

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

    num_tokens: int
    start_layer: int
    original_attn_implementation: str
    original_requires_grad: dict[str, bool]
    backend: str | None = None
    # o_proj biases before ``merge``, per layer (None: the layer had no bias).
    merged_biases: dict[int, Tensor | None] | None = None
    layers: dict[int, nn.Module] = field(default_factory=dict)
    # The AlignerBank that ``aligner_index`` selects from (see aligner.bank.attach_bank).
    bank: Any = None
    # Values derived once per forward / generate call and shared by every layer.
    memo: Memo = field(default_factory=Memo)


def _dense_mask(attention_mask: Tensor | None, len_q: int, len_k: int, device: torch.device) -> Tensor | None:
    """The (B, 1, L_q, L_k) boolean mask that transformers' ``sdpa_mask`` builds from a 2D padding
    mask (causal, bottom-right aligned); None where SDPA's own ``is_causal`` is exact."""
    if attention_mask is None and (len_q == 1 or len_q == len_k):
        return None
    i = torch.arange(len_q, device=device)[:, None]
    mask = (torch.arange(len_k, device=device)[None, :] <= i + (len_k - len_q))[None, None]
    return mask if attention_mask is None else mask & attention_mask[:, None, None, -len_k:].bool()


def _main_attention(module, query, key, value, attention_mask, scaling, state: AlignerState) -> Tensor:
    """The base model's own attention (its original implementation: SDPA unless it was flash-attn),
    so that a row without an Aligner computes exactly what the unpatched model computes."""
    implementation = state.original_attn_implementation
    if implementation.startswith("flash_attention"):
        function, mask = ALL_ATTENTION_FUNCTIONS[implementation], attention_mask  # takes the 2D mask
    else:  # sdpa; eager and others get SDPA, the same math
        len_q, len_k = query.shape[2], key.shape[2]
        mask = (
            None
            if attention_mask is None and len_q == 1
            else state.memo.get(
                "dense_mask",
                (attention_mask, len_q, len_k, query.device),
                lambda: _dense_mask(attention_mask, len_q, len_k, query.device),
            )
        )
        function = ALL_ATTENTION_FUNCTIONS["sdpa"]
    return function(module, query, key, value, mask, dropout=0.0, scaling=scaling)[0]


def _project(module: nn.Module, tokens: Tensor, gate: Tensor, dtype: torch.dtype) -> tuple:
    """A layer's prefix term, ready to add: for N = 1 the constant gate_h * PV_g, (1 or B, 1, H, D)
    fp32 (DESIGN.md "N = 1"); for N > 1 (PK, PV) heads first in ``dtype`` and gate (1 or B, 1, H, 1)."""
    head_dim = module.head_dim
    prefix_k, prefix_v = project_prefix(tokens, module.k_proj, module.v_proj, head_dim, dtype)
    if prefix_k.dim() == 3:
        prefix_k, prefix_v = prefix_k[None], prefix_v[None]
    gate = gate.float().reshape(-1, gate.shape[-1])  # (1 or B, H)
    heads = gate.shape[-1]
    if prefix_v.shape[1] == 1:
        per_head = prefix_v[:, 0].float().repeat_interleave(heads // prefix_v.shape[2], dim=1)
        return (gate[:, :, None] * per_head)[:, None], None, None
    pk, pv = (x.to(dtype).transpose(1, 2) for x in (prefix_k, prefix_v))
    return None, (pk, pv), gate[:, None, :, None]


def _add_prefix(out: Tensor, query: Tensor, scaling: float | None, term: tuple) -> Tensor:
    """out (B, L, H, D) + the gated prefix attention. A row whose gate is 0 gets exactly 0 added."""
    constant, prefix, gate = term
    if constant is not None:
        return (out + constant).to(out.dtype)
    pk, pv = (x.expand(query.shape[0], *x.shape[1:]) for x in prefix)
    prefix_out = nn.functional.scaled_dot_product_attention(query, pk, pv, scale=scaling, enable_gqa=True)
    return (out + gate * prefix_out.transpose(1, 2)).to(out.dtype)


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


def aligner_attention_hf(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    position_ids: Tensor | None = None,
    cu_seq_lens_q: Tensor | None = None,
    cu_seq_lens_k: Tensor | None = None,
    max_length_q: int | None = None,
    max_length_k: int | None = None,
    aligner_index: Tensor | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """The attention function registered as "aligner": query (B, H, L_q, D), key/value
    (B, H_kv, L_k, D) after RoPE and the KV cache; attention_mask None or the (B, L_k) padding
    mask. Layers with an Aligner add its gated prefix attention; the others are plain causal
    attention. ``aligner_index`` (one bank index per sequence, -1: none), passed to ``model(...)``
    or ``model.generate(...)``, gives each row its own Aligner from the attached bank. Returns
    (B, L_q, H, D) like every transformers attention function.

    Two ways to the same math (DESIGN.md section 5): with a gradient to compute, the fused op; for
    inference (and for bank rows), the "split" form: the base model's own attention plus the prefix
    term, projected once per weights version or generate call and cached (N = 1: one add per layer).
    """
    if dropout:
        raise ValueError(f"Aligner attention has no dropout; got attention dropout {dropout} (set it to 0)")
    batch, _, len_q, head_dim = query.shape
    len_k = key.shape[2]
    if sliding_window is not None and len_k > sliding_window:
        raise ValueError(
            f"sequence of {len_k} keys exceeds the model's sliding_window={sliding_window}, which Aligner "
            "attention does not implement"
        )
    state: AlignerState = module.aligner_model_state
    aligner: AlignerFlashAttention | None = getattr(module, "aligner", None)
    backend = getattr(module, "aligner_backend", None)
    packed = None
    if cu_seq_lens_q is not None and cu_seq_lens_k is not None:  # padding-free collators' flash kwargs
        packed = (cu_seq_lens_q.to(torch.int32), cu_seq_lens_k.to(torch.int32), max_length_q, max_length_k)
    elif (
        attention_mask is None
        and batch == 1
        and len_q > 1
        and state.memo.get("is_packed", (position_ids,), lambda: is_packed(position_ids))
    ):  # padding-free batch: positions restart per sequence
        cu_seqlens, max_len = state.memo.get(
            "cu_seqlens", (position_ids,), lambda: packed_sequences(position_ids)
        )
        packed = (cu_seqlens, cu_seqlens, max_len, max_len)
    sequences = batch if packed is None else packed[0].shape[0] - 1

    tokens = gate = None
    if aligner_index is not None:
        if aligner is not None:
            tokens, gates = _selected(state, aligner_index, sequences, query.device)
            gate = gates[:, module.layer_idx - state.start_layer]
        else:  # layers before start_layer: still check the index, once
            _selected(state, aligner_index, sequences, query.device)
    elif aligner is not None:
        tokens, gate = aligner.shared_prefix(), aligner.gate

    needs_grad = torch.is_grad_enabled() and (
        query.requires_grad or any(x is not None and x.requires_grad for x in (tokens, gate))
    )
    forced = backend is not None or os.environ.get("ALIGNER_BACKEND", "auto") != "auto"
    if packed is None and (aligner_index is not None or not (needs_grad or forced)):
        out = _main_attention(module, query, key, value, attention_mask, scaling, state)
        if tokens is None:
            return out, None
        sources = (tokens, gate, module.k_proj.weight, module.k_proj.bias, module.v_proj.weight,
                   module.v_proj.bias, query.dtype)  # fmt: skip
        compute = lambda: _project(module, tokens, gate, query.dtype)  # noqa: E731
        term = compute() if needs_grad else module.aligner_memo.get("prefix", sources, compute)
        return _add_prefix(out, query, scaling, term), None

    q, k, v = (x.transpose(1, 2) for x in (query, key, value))
    prefix = {}
    if tokens is not None:
        prefix_k, prefix_v = project_prefix(tokens, module.k_proj, module.v_proj, head_dim, q.dtype)
        prefix = {"prefix_k": prefix_k.to(q.dtype), "prefix_v": prefix_v.to(q.dtype), "gate": gate}
    options = {"softmax_scale": scaling, "backend": backend}
    if packed is not None:
        cu_q, cu_k, max_q, max_k = packed
        out = aligner_attention(
            q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), **prefix, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
            max_seqlen_q=int(max_q) if max_q is not None else None,
            max_seqlen_k=int(max_k) if max_k is not None else None, **options,
        )  # fmt: skip
        return out.view(batch, len_q, *out.shape[1:]), None
    if attention_mask is not None:  # padding: run the real tokens packed, then re-pad with zeros
        keep_k = attention_mask[:, -len_k:].bool()
        q_packed, q_rows, cu_q, max_q = unpad(q, keep_k[:, -len_q:])
        k_packed, k_rows, cu_k, max_k = unpad(k, keep_k)
        v_packed = v.flatten(0, 1).index_select(0, k_rows)
        out_packed = aligner_attention(
            q_packed, k_packed, v_packed, **prefix, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
            max_seqlen_q=max_q, max_seqlen_k=max_k, **options,
        )  # fmt: skip
        out = out_packed.new_zeros(batch * len_q, *out_packed.shape[1:]).index_copy(0, q_rows, out_packed)
        return out.view(batch, len_q, *out.shape[1:]), None
    return aligner_attention(q, k, v, **prefix, **options), None


def _use_aligner_attention(model: PreTrainedModel) -> None:
    """Switch ``model`` to the "aligner" attention, registered here with transformers'
    ``AttentionInterface`` together with, under the same name, its flash-style 2D padding-mask
    function: without a mask function transformers would pass ``attention_mask=None`` and padding
    would be silently ignored (DESIGN.md section 3). Registering again is harmless."""
    AttentionInterface.register(ATTENTION_NAME, aligner_attention_hf)
    AttentionMaskInterface.register(ATTENTION_NAME, ALL_MASK_ATTENTION_FUNCTIONS["flash_attention_2"])
    model.set_attn_implementation(ATTENTION_NAME)


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
    if not model._can_set_attn_implementation():
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
    num_tokens: int = 1,
    start_layer: int = 2,
    *,
    init_std: float = 1.0,
    backend: str | None = None,
) -> PreTrainedModel:
    """Add an Aligner to ``model`` in place and return it.

    Freezes every base parameter, adds one shared ``AlignerPrefix`` (``model.aligner_prefix``,
    num_tokens x hidden, fp32) and a zero-initialised per-head gate to the attention of every
    layer >= ``start_layer``, and routes attention through the fused Aligner attention.
    ``backend`` is passed to :func:`aligner.aligner_attention` ("auto" by default).
    """
    if hasattr(model, "aligner_state"):
        raise ValueError("model already carries an Aligner; call aligner.unpatch(model) first")
    layers = _check_supported(model)
    config = model.config
    if not 0 <= start_layer < config.num_hidden_layers:
        raise ValueError(f"start_layer must be in [0, {config.num_hidden_layers}), got {start_layer}")
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")

    state = AlignerState(
        num_tokens=num_tokens,
        start_layer=start_layer,
        original_attn_implementation=config._attn_implementation,
        original_requires_grad={name: p.requires_grad for name, p in model.named_parameters()},
        backend=backend,
    )
    model.requires_grad_(False)
    device = model.get_input_embeddings().weight.device
    prefix = AlignerPrefix(num_tokens, config.hidden_size, init_std=init_std).to(device)
    model.aligner_prefix = prefix
    for index, attn in layers.items():
        attn.aligner_backend = backend  # every layer, those without an Aligner included
        attn.aligner_model_state = state
        attn.aligner_memo = Memo()  # this layer's projected prefix, per weights version or bank selection
        if index >= start_layer:
            attn.aligner = AlignerFlashAttention(config.num_attention_heads, backend=backend).to(
                attn.o_proj.weight.device
            )
            attn.aligner.attach(prefix)
            state.layers[index] = attn
    model.aligner_state = state
    if hasattr(type(model), "_validate_model_kwargs"):
        model._validate_model_kwargs = types.MethodType(_validate_model_kwargs, model)
    _use_aligner_attention(model)
    return model


def _validate_model_kwargs(model: PreTrainedModel, model_kwargs: dict[str, Any]) -> None:
    """``generate`` refuses keyword arguments that are neither in the model's forward signature nor
    transformers' own attention kwargs; ``aligner_index`` reaches the attention through the
    forward's ``**kwargs`` like those, so it is let through (set on the instance by ``patch``)."""
    model_kwargs = {key: value for key, value in model_kwargs.items() if key != "aligner_index"}
    type(model)._validate_model_kwargs(model, model_kwargs)


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
    del model.aligner_prefix
    del model.aligner_state
    model.__dict__.pop("_validate_model_kwargs", None)
    for name, param in model.named_parameters():
        param.requires_grad_(state.original_requires_grad[name])
    model.set_attn_implementation(state.original_attn_implementation)
    return model


@contextlib.contextmanager
def disabled(model: PreTrainedModel) -> Iterator[PreTrainedModel]:
    """Run the base model inside the block (e.g. DPO reference log-probs without a second copy)."""
    state = get_state(model)
    if state.merged_biases is not None:
        raise ValueError(
            "the Aligner is merged into o_proj biases; call aligner.unmerge(model) before disabling it"
        )
    model.set_attn_implementation(state.original_attn_implementation)
    try:
        yield model
    finally:
        _use_aligner_attention(model)


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
    o_proj each layer adds the constant c = W_o concat_h(gate_h PV_g). The model then runs its
    original attention implementation again (sdpa, flash-attn...), plus those biases. The
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
    state.merged_biases = merged
    model.set_attn_implementation(state.original_attn_implementation)
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
    _use_aligner_attention(model)
    return model
