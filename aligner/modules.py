"""Drop-in modules for training code: the shared prefix tokens and the per-layer fused attention."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .attention import aligner_attention


class AlignerPrefix(nn.Module):
    """The N learnable tokens (N, hidden_size) shared by every layer: one per model, kept in fp32.

    Args:
        num_tokens: N, the number of prefix tokens (the paper's default is 1).
        hidden_size: the model's hidden size (the input width of k_proj / v_proj).
        init_std: standard deviation of the normal initialisation. The default 1.0 is the paper's
            code (an ``nn.Embedding`` at its default N(0, 1) init); its released checkpoints still
            have std ~1.0 after training, so the gates, not the tokens, carry the scale.
    """

    def __init__(self, num_tokens: int, hidden_size: int, init_std: float = 1.0) -> None:
        super().__init__()
        if num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
        if hidden_size < 1:
            raise ValueError(f"hidden_size must be >= 1, got {hidden_size}")
        self.init_std = init_std
        self.tokens = nn.Parameter(torch.empty(num_tokens, hidden_size, dtype=torch.float32))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.tokens, std=self.init_std)

    def forward(self) -> Tensor:
        """The tokens, (num_tokens, hidden_size) fp32."""
        return self.tokens

    def extra_repr(self) -> str:
        return f"num_tokens={self.tokens.shape[0]}, hidden_size={self.tokens.shape[1]}"


def is_quantized(linear: nn.Module) -> bool:
    """Whether a linear layer stores quantized weights: bitsandbytes keeps int8 (8-bit) or packed
    uint8 (4-bit), FP8 schemes one-byte floats; full precision is fp16 / bf16 / fp32 / fp64."""
    weight = linear.weight
    return not (weight.is_floating_point() and weight.element_size() > 1)


def compute_dtype(linear: nn.Module, fallback: torch.dtype | None = None) -> torch.dtype:
    """The dtype a linear layer takes its input in: its weight's dtype, unless the weight is
    quantized; then the layer's own ``compute_dtype`` (bitsandbytes 4-bit), its bias's dtype, or
    ``fallback`` (bitsandbytes 8-bit layers accept any float input: pass the activations' dtype)."""
    weight = linear.weight
    if not is_quantized(linear):
        return weight.dtype
    bias = getattr(linear, "bias", None)
    for dtype in (getattr(linear, "compute_dtype", None), None if bias is None else bias.dtype, fallback):
        if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
            return dtype
    raise ValueError(
        f"cannot tell which dtype {type(linear).__name__} computes in: its weight is quantized "
        f"({weight.dtype}) and it has no compute_dtype or floating-point bias; pass the activations' "
        "dtype as the fallback"
    )


def project_prefix(
    tokens: Tensor,
    k_proj: nn.Module,
    v_proj: nn.Module,
    head_dim: int,
    activation_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """A layer's prefix keys and values: its own k_proj / v_proj (bias included, no RoPE, no norm).

    tokens (N, hidden) or (B, N, hidden) -> prefix_k, prefix_v (N, H_kv, D) or (B, N, H_kv, D).
    The tokens enter the projections in :func:`compute_dtype` of ``k_proj``: the weights' dtype,
    or for quantized projections (bitsandbytes 8-bit / 4-bit, whose weights are integers) their
    compute dtype, falling back to ``activation_dtype`` (the dtype of the layer's hidden states).
    """
    tokens = tokens.to(compute_dtype(k_proj, activation_dtype))
    return k_proj(tokens).unflatten(-1, (-1, head_dim)), v_proj(tokens).unflatten(-1, (-1, head_dim))


class AlignerFlashAttention(nn.Module):
    """``flash_attn_func(q, k, v, causal=True)`` plus this layer's gated attention to the Aligner.

    One per layer; owns the layer's per-head gate (zero-initialised, so a fresh Aligner leaves
    the model unchanged). Call it with the layer's q, k, v (flash-attn layout, after RoPE) and
    either the shared prefix tokens together with the layer's ``k_proj`` / ``v_proj``, or the
    already projected ``(prefix_k, prefix_v)``.

    Args:
        num_heads: query heads H of the layer.
        causal, softmax_scale, backend: defaults passed to :func:`aligner.aligner_attention`.
    """

    def __init__(
        self,
        num_heads: int,
        *,
        causal: bool = True,
        softmax_scale: float | None = None,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        if num_heads < 1:
            raise ValueError(f"num_heads must be >= 1, got {num_heads}")
        self.gate = nn.Parameter(torch.zeros(num_heads, dtype=torch.float32))
        self.causal = causal
        self.softmax_scale = softmax_scale
        self.backend = backend
        self._prefix: tuple[AlignerPrefix, ...] = ()

    def attach(self, prefix: AlignerPrefix) -> None:
        """Point this layer at the model's shared prefix. The reference is deliberately not a
        registered submodule: the prefix belongs to the model, and every layer reads the same one."""
        self._prefix = (prefix,)

    def shared_prefix(self) -> Tensor:
        """The attached shared prefix tokens (N, hidden)."""
        if not self._prefix:
            raise ValueError(
                "no AlignerPrefix attached to this layer; call attach(prefix) or pass the prefix"
            )
        return self._prefix[0]()

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        prefix: Tensor | tuple[Tensor, Tensor],
        *,
        k_proj: nn.Module | None = None,
        v_proj: nn.Module | None = None,
        **kwargs,
    ) -> Tensor:
        """q (B, L_q, H, D), k/v (B, L_k, H_kv, D) (or packed, with cu_seqlens in ``kwargs``);
        prefix: tokens (N, hidden) / (B, N, hidden) with ``k_proj`` and ``v_proj``, or a pair
        (prefix_k, prefix_v) of shape (N, H_kv, D) / (B, N, H_kv, D). Returns q's shape.
        Extra keyword arguments (cu_seqlens_q, max_seqlen_q, causal, ...) go to aligner_attention."""
        if isinstance(prefix, tuple):
            prefix_k, prefix_v = prefix
        else:
            if k_proj is None or v_proj is None:
                raise ValueError(
                    "prefix tokens need the layer's k_proj and v_proj (or pass (prefix_k, prefix_v))"
                )
            prefix_k, prefix_v = project_prefix(prefix, k_proj, v_proj, q.shape[-1], q.dtype)
        options = {
            "causal": self.causal,
            "softmax_scale": self.softmax_scale,
            "backend": self.backend,
            **kwargs,
        }
        return aligner_attention(q, k, v, prefix_k.to(q.dtype), prefix_v.to(q.dtype), self.gate, **options)

    def extra_repr(self) -> str:
        return f"num_heads={self.gate.shape[0]}, causal={self.causal}"
