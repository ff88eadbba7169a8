"""Input builders and comparisons shared by the kernel tests.

Tests run on CUDA when a GPU is present (compiled kernels, fp16 and bf16) and on the CPU
through the Triton interpreter otherwise; ``ALIGNER_TEST_DEVICE`` overrides the choice.
"""

from __future__ import annotations

import os

import pytest
import torch

from aligner import aligner_attention, aligner_attention_reference

DEVICE = torch.device(os.environ.get("ALIGNER_TEST_DEVICE", "cuda" if torch.cuda.is_available() else "cpu"))
LOW_PRECISION = (torch.float16, torch.bfloat16)
FP32_ATOL = 2e-4

# The interpreter computes tl.dot on bf16 operands wrongly (DESIGN.md section 4): bf16 kernel
# cases run on a GPU only.
requires_gpu_for_bf16 = pytest.mark.skipif(
    DEVICE.type != "cuda", reason="bf16 tl.dot is wrong in the Triton interpreter; bf16 runs on a GPU"
)


def make_inputs(
    batch=2,
    seqlen_q=24,
    seqlen_k=None,
    heads=4,
    kv_heads=2,
    head_dim=32,
    num_tokens=3,
    per_sequence=False,
    gate_per_sequence=False,
    dtype=torch.float32,
    seed=0,
    seqlens=None,
    device=DEVICE,
    requires_grad=True,
):
    """Random (q, k, v, prefix_k, prefix_v, gate) on ``device``, leaf tensors with gradients enabled
    unless ``requires_grad=False``, and a dict of keyword arguments (empty, or the cu_seqlens).

    gate is (heads,), or (batch, heads) with ``gate_per_sequence``; fp32, or fp64 when ``dtype`` is
    (for gradcheck). With ``seqlens`` (a list of (len_q, len_k)) the tensors are packed.
    """
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, dtype=dtype):
        return torch.randn(*shape, generator=gen).to(device, dtype).requires_grad_(requires_grad)

    if seqlens is None:
        seqlen_k = seqlen_q if seqlen_k is None else seqlen_k
        q = rand(batch, seqlen_q, heads, head_dim)
        k, v = rand(batch, seqlen_k, kv_heads, head_dim), rand(batch, seqlen_k, kv_heads, head_dim)
        varlen = {}
    else:
        batch = len(seqlens)
        total_q, total_k = sum(a for a, _ in seqlens), sum(b for _, b in seqlens)
        q = rand(total_q, heads, head_dim)
        k, v = rand(total_k, kv_heads, head_dim), rand(total_k, kv_heads, head_dim)
        cu = [
            torch.tensor([0] + [s[i] for s in seqlens]).cumsum(0, dtype=torch.int32).to(device)
            for i in (0, 1)
        ]
        varlen = {"cu_seqlens_q": cu[0], "cu_seqlens_k": cu[1]}
    prefix_shape = (
        (batch, num_tokens, kv_heads, head_dim) if per_sequence else (num_tokens, kv_heads, head_dim)
    )
    prefix_k, prefix_v = rand(*prefix_shape), rand(*prefix_shape)
    gate_shape = (batch, heads) if gate_per_sequence else (heads,)
    gate = rand(*gate_shape, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    return (q, k, v, prefix_k, prefix_v, gate), varlen


def forward_backward(inputs, dout=None, backend="fused", **kwargs):
    """Output and the gradients of every input for ``dout`` (default: a fixed random dO)."""
    fn = aligner_attention_reference if backend == "reference" else aligner_attention
    if backend != "reference":
        kwargs["backend"] = backend
    out = fn(*inputs, **kwargs)
    if dout is None:
        dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device, out.dtype)
    grads = torch.autograd.grad(out, inputs, dout)
    return out, grads


NAMES = ("out", "dq", "dk", "dv", "dprefix_k", "dprefix_v", "dgate")


def _compare(name, actual, expected, allowed):
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    error = (actual.float() - expected.float()).abs().max().item()
    assert error <= allowed, f"{name}: max error {error:.3e} > allowed {allowed:.3e}"


def check_against_reference(inputs, backend="fused", **options):
    """The output and gradients of ``backend`` ("fused" or "split") against the reference.

    fp32: within FP32_ATOL (relative to the magnitude for dgate and the prefix gradients, which
    are sums over every row). fp16/bf16, as flash-attn's own tests do: the kernel's error against
    an fp32 reference is at most twice that of the reference computed in the same low precision,
    plus one unit of the dtype's precision.
    """
    actual = forward_backward(inputs, backend=backend, **options)
    dtype = inputs[0].dtype
    if dtype not in LOW_PRECISION:
        expected = forward_backward(inputs, backend="reference", **options)
        for name, a, e in zip(NAMES, (actual[0], *actual[1]), (expected[0], *expected[1])):
            assert a.dtype == e.dtype, f"{name}: dtype {a.dtype} vs {e.dtype}"
            scale = max(1.0, e.abs().max().item()) if name.startswith(("dgate", "dprefix")) else 1.0
            _compare(name, a, e, FP32_ATOL * scale)
        return
    fp32_inputs = [x.detach().float().requires_grad_() for x in inputs]
    truth = forward_backward(fp32_inputs, backend="reference", **options)
    same_precision = forward_backward(inputs, backend="reference", **options)
    eps = torch.finfo(dtype).eps
    for name, a, t, r in zip(
        NAMES, (actual[0], *actual[1]), (truth[0], *truth[1]), (same_precision[0], *same_precision[1])
    ):
        assert a.dtype == r.dtype, f"{name}: dtype {a.dtype} vs {r.dtype}"
        reference_error = (r.float() - t).abs().max().item()
        _compare(name, a, t, 2 * reference_error + eps * max(1.0, t.abs().max().item()))
