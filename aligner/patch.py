"""Aligner on Hugging Face causal LMs through transformers' own extension points.

``patch`` registers an attention function with ``AttentionInterface`` and, under the same name,
the flash-style 2D padding-mask function with ``AttentionMaskInterface`` (without a mask function
transformers would pass no mask at all), then switches the model to it with
``set_attn_implementation``. No model code is copied and no forward is monkeypatched: the model
stays a normal ``PreTrainedModel`` for ``generate``, ``Trainer``, TRL and accelerate.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

from .attention import aligner_attention
from .modules import AlignerFlashAttention, AlignerPrefix, is_quantized, project_prefix

ATTENTION_NAME = "aligner"
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


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


def _unpad(x: Tensor, keep: Tensor) -> tuple[Tensor, Tensor, Tensor, int]:
    """(B, L, H, D) and a (B, L) keep-mask -> packed (total, H, D), row indices, cu_seqlens, max length."""
    lengths = keep.sum(1, dtype=torch.int32)
    indices = keep.flatten().nonzero().flatten()
    cu_seqlens = nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    return x.flatten(0, 1).index_select(0, indices), indices, cu_seqlens, int(lengths.max())


def _packed_sequences(position_ids: Tensor) -> tuple[Tensor, int]:
    """cu_seqlens and max length of a padding-free batch (1, total) whose positions restart per sequence."""
    positions = position_ids.flatten()
    starts = torch.ones_like(positions, dtype=torch.bool)
    starts[1:] = positions[1:] != positions[:-1] + 1
    start_indices = starts.nonzero().flatten().to(torch.int32)
    total = torch.tensor([positions.numel()], dtype=torch.int32, device=positions.device)
    cu_seqlens = torch.cat([start_indices, total])
    return cu_seqlens, int(cu_seqlens.diff().max())


def _is_packed(position_ids: Tensor | None, batch: int, length: int) -> bool:
    if position_ids is None or batch != 1 or length == 1:
        return False
    positions = position_ids.flatten()
    return bool((positions[1:] != positions[:-1] + 1).any())


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
    **kwargs,
) -> tuple[Tensor, None]:
    """The attention function registered as "aligner": query (B, H, L_q, D), key/value
    (B, H_kv, L_k, D) after RoPE and the KV cache; attention_mask None or the (B, L_k) padding
    mask. Layers with an Aligner add its gated prefix attention; the others are plain causal
    attention. Returns (B, L_q, H, D) like every transformers attention function."""
    if dropout:
        raise ValueError(f"Aligner attention has no dropout; got attention dropout {dropout} (set it to 0)")
    batch, _, len_q, head_dim = query.shape
    len_k = key.shape[2]
    if sliding_window is not None and len_k > sliding_window:
        raise ValueError(
            f"sequence of {len_k} keys exceeds the model's sliding_window={sliding_window}, which Aligner "
            "attention does not implement"
        )
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))
    aligner: AlignerFlashAttention | None = getattr(module, "aligner", None)
    prefix = {}
    if aligner is not None:
        prefix_k, prefix_v = project_prefix(
            aligner.shared_prefix(), module.k_proj, module.v_proj, head_dim, query.dtype
        )
        prefix = {"prefix_k": prefix_k.to(q.dtype), "prefix_v": prefix_v.to(q.dtype), "gate": aligner.gate}
    options = {"softmax_scale": scaling, "backend": getattr(module, "aligner_backend", None)}

    if cu_seq_lens_q is not None and cu_seq_lens_k is not None:  # padding-free collators' flash kwargs
        packed = {
            "cu_seqlens_q": cu_seq_lens_q.to(torch.int32),
            "cu_seqlens_k": cu_seq_lens_k.to(torch.int32),
            "max_seqlen_q": int(max_length_q) if max_length_q is not None else None,
            "max_seqlen_k": int(max_length_k) if max_length_k is not None else None,
        }
        out = aligner_attention(
            q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), **prefix, **packed, **options
        )
        return out.view(batch, len_q, *out.shape[1:]), None
    if attention_mask is not None:  # padding: run the real tokens packed, then re-pad with zeros
        keep_k = attention_mask[:, -len_k:].bool()
        q_packed, q_rows, cu_q, max_q = _unpad(q, keep_k[:, -len_q:])
        k_packed, k_rows, cu_k, max_k = _unpad(k, keep_k)
        v_packed = v.flatten(0, 1).index_select(0, k_rows)
        out_packed = aligner_attention(
            q_packed, k_packed, v_packed, **prefix, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
            max_seqlen_q=max_q, max_seqlen_k=max_k, **options,
        )  # fmt: skip
        out = out_packed.new_zeros(batch * len_q, *out_packed.shape[1:]).index_copy(0, q_rows, out_packed)
        return out.view(batch, len_q, *out.shape[1:]), None
    if _is_packed(position_ids, batch, len_q):  # padding-free batch: positions restart per sequence
        cu_seqlens, max_len = _packed_sequences(position_ids)
        out = aligner_attention(
            q[0], k[0], v[0], **prefix, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens,
            max_seqlen_q=max_len, max_seqlen_k=max_len, **options,
        )  # fmt: skip
        return out[None], None
    return aligner_attention(q, k, v, **prefix, **options), None


AttentionInterface.register(ATTENTION_NAME, aligner_attention_hf)
AttentionMaskInterface.register(ATTENTION_NAME, ALL_MASK_ATTENTION_FUNCTIONS["flash_attention_2"])


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
        if index >= start_layer:
            attn.aligner = AlignerFlashAttention(config.num_attention_heads, backend=backend).to(
                attn.o_proj.weight.device
            )
            attn.aligner.attach(prefix)
            state.layers[index] = attn
    model.aligner_state = state
    model.set_attn_implementation(ATTENTION_NAME)
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
        del attn.aligner_backend
    del model.aligner_prefix
    del model.aligner_state
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
        model.set_attn_implementation(ATTENTION_NAME)


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
    model.set_attn_implementation(ATTENTION_NAME)
    return model
