"""Input builders and comparisons shared by the kernel tests."""

from __future__ import annotations

import torch

from aligner import aligner_attention, aligner_attention_reference

# Tolerances per dtype, for outputs and gradients of O(1) magnitude. fp16 rounds P and dS to
# fp16 before their matmuls (as every flash attention does), hence ~1e-3 relative error.
TOLERANCES = {torch.float32: 2e-4, torch.float16: 2e-2}


def make_inputs(
    batch=2,
    seqlen_q=24,
    seqlen_k=None,
    heads=4,
    kv_heads=2,
    head_dim=32,
    num_tokens=3,
    per_sequence=False,
    dtype=torch.float32,
    seed=0,
    seqlens=None,
):
    """Random (q, k, v, prefix_k, prefix_v, gate) with gradients enabled.

    With ``seqlens`` (a list of (len_q, len_k)) the tensors are packed and cu_seqlens are returned.
    """
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(dtype).requires_grad_()

    if seqlens is None:
        seqlen_k = seqlen_k or seqlen_q
        q = rand(batch, seqlen_q, heads, head_dim)
        k, v = rand(batch, seqlen_k, kv_heads, head_dim), rand(batch, seqlen_k, kv_heads, head_dim)
        varlen = {}
    else:
        batch = len(seqlens)
        total_q, total_k = sum(a for a, _ in seqlens), sum(b for _, b in seqlens)
        q = rand(total_q, heads, head_dim)
        k, v = rand(total_k, kv_heads, head_dim), rand(total_k, kv_heads, head_dim)
        cu = [
            torch.tensor([0] + [s[i] for s in seqlens], dtype=torch.int32).cumsum(0, dtype=torch.int32)
            for i in (0, 1)
        ]
        varlen = {"cu_seqlens_q": cu[0], "cu_seqlens_k": cu[1]}
    prefix_shape = (
        (batch, num_tokens, kv_heads, head_dim) if per_sequence else (num_tokens, kv_heads, head_dim)
    )
    prefix_k, prefix_v = rand(*prefix_shape), rand(*prefix_shape)
    gate = torch.randn(heads, generator=gen).requires_grad_()
    return (q, k, v, prefix_k, prefix_v, gate), varlen


def forward_backward(inputs, dout=None, backend="triton", **kwargs):
    """Output and the gradients of every input for ``dout`` (default: a fixed random dO)."""
    fn = aligner_attention_reference if backend == "reference" else aligner_attention
    if backend != "reference":
        kwargs["backend"] = backend
    out = fn(*inputs, **kwargs)
    if dout is None:
        dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
    grads = torch.autograd.grad(out, inputs, dout)
    return out, grads


NAMES = ("out", "dq", "dk", "dv", "dprefix_k", "dprefix_v", "dgate")


def assert_close_all(actual, expected, atol, rtol=None):
    """Compare (out, grads) pairs, naming the first tensor that differs."""
    rtol = atol if rtol is None else rtol
    (out_a, grads_a), (out_e, grads_e) = actual, expected
    for name, a, e in zip(NAMES, (out_a, *grads_a), (out_e, *grads_e)):
        assert a.shape == e.shape and a.dtype == e.dtype, (
            f"{name}: {a.shape}/{a.dtype} vs {e.shape}/{e.dtype}"
        )
        # dgate and the prefix gradients are sums over every row: scale the tolerance with them.
        scale = max(1.0, e.abs().max().item()) if name.startswith(("dgate", "dprefix")) else 1.0
        torch.testing.assert_close(
            a.float(), e.float(), atol=atol * scale, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}"
        )
