"""Interpreted (CPU) and compiled (GPU) kernels side by side in one process, with no side effects.

``backend="fused"`` on CPU tensors runs an interpreted copy of the kernel modules
(kernels/interpreted.py); it must leave the process as it found it: no TRITON_INTERPRET, no
Triton knob changed, no Triton module modified, and a kernel that someone else decorates
afterwards is compiled as usual.
"""

from __future__ import annotations

import os

import pytest
import torch
import triton
import triton.language as tl
from attention_cases import make_inputs
from triton import knobs
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

import aligner_kernels as kernels
from aligner import aligner_attention, aligner_attention_reference

user_interprets = pytest.mark.skipif(
    knobs.runtime.interpret, reason="TRITON_INTERPRET=1 was set by the user: every kernel is interpreted"
)


def _cpu_inputs(**options):
    return make_inputs(
        batch=2, seqlen_q=17, heads=2, kv_heads=1, head_dim=16, num_tokens=3, device="cpu", **options
    )


def _identities(namespace: dict) -> dict:
    return {name: id(value) for name, value in namespace.items()}


def _global_state() -> dict:
    return {
        "environ": dict(os.environ),
        "runtime knobs": _identities(knobs.runtime.__dict__),
        "interpret": knobs.runtime.interpret,
        "triton.language": _identities(tl.__dict__),
        "triton.language.core": _identities(tl.core.__dict__),
        "triton.language.standard": _identities(tl.standard.__dict__),
        "JITFunction.__call__": id(JITFunction.__call__),
    }


def _run_every_cpu_kernel():
    """Fused forward and backward, and the split-KV decode forward, on CPU tensors."""
    inputs, _ = _cpu_inputs()
    out = aligner_attention(*inputs, backend="fused")
    torch.autograd.grad(out, inputs, torch.ones_like(out))
    with torch.no_grad():
        q, k, v, *prefix = inputs
        aligner_attention(q[:, -1:], k, v, *prefix, backend="fused")


@user_interprets
def test_cpu_fused_call_leaves_the_process_unchanged():
    before = _global_state()
    _run_every_cpu_kernel()
    after = _global_state()
    for name in before:
        assert after[name] == before[name], f"{name} changed by a CPU backend='fused' call"

    @triton.jit
    def unrelated_kernel(X):
        tl.store(X, tl.sum(tl.zeros([16], dtype=tl.float32), 0))

    assert type(unrelated_kernel) is JITFunction  # compiled, not interpreted
    assert type(tl.sum) is JITFunction and type(tl.zeros) is JITFunction


@user_interprets
def test_compiled_and_interpreted_copies_coexist():
    compiled, interpreted = kernels.load(interpreted=False), kernels.load(interpreted=True)
    assert not compiled.INTERPRETING and interpreted.INTERPRETING
    from aligner_kernels import backward, decode, forward  # the compiled modules, importable next to the copy

    for kernel in (
        forward.aligner_attention_fwd_kernel,
        backward.aligner_attention_bwd_dq_kernel,
        decode.aligner_attention_decode_split_kernel,
    ):
        assert type(kernel) is JITFunction
    copy = __import__("aligner_kernels._interpreted.forward", fromlist=["forward"])
    assert isinstance(copy.aligner_attention_fwd_kernel, InterpretedFunction)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cpu_then_cuda_then_cpu_in_one_process():
    """Each call against the reference: the interpreter on CPU, the compiled kernels on CUDA
    (compiled, so not interpreted: checked on the launcher), then the interpreter again."""
    inputs, _ = _cpu_inputs()

    def check(device):
        leaves = tuple(x.detach().to(device).requires_grad_() for x in inputs)
        out = aligner_attention(*leaves, backend="fused")
        grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
        ref_leaves = tuple(x.detach().requires_grad_() for x in inputs)
        ref = aligner_attention_reference(*ref_leaves)
        ref_grads = torch.autograd.grad(ref, ref_leaves, torch.ones_like(ref))
        torch.testing.assert_close(out.cpu(), ref, atol=2e-4, rtol=2e-4)
        for got, want in zip(grads, ref_grads):
            torch.testing.assert_close(got.cpu(), want, atol=1e-3, rtol=1e-3)
        with torch.no_grad():  # the split-KV decode forward
            q, k, v, *prefix = leaves
            step = aligner_attention(q[:, -1:], k, v, *prefix, backend="fused")
            torch.testing.assert_close(step.cpu(), ref[:, -1:].detach(), atol=2e-4, rtol=2e-4)

    check("cpu")
    check("cuda")
    assert not kernels.load(interpreted=False).INTERPRETING
    check("cpu")
