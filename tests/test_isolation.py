"""Interpreted (CPU) and compiled (GPU) kernels side by side in one process, with no side effects.

``backend="fused"`` on CPU tensors runs an interpreted copy of the kernel modules
(kernels/interpreted.py); it must leave the process as it found it: no TRITON_INTERPRET, no
Triton knob changed, no Triton module modified, and a kernel that someone else decorates
afterwards is compiled as usual. The same holds when the user set TRITON_INTERPRET=1 for the
whole process (`make test` runs the kernel tests that way too), where in addition the kernel
modules themselves are interpreted and must run as well.
"""

from __future__ import annotations

import os

import pytest
import torch

# torch imports torch._dynamo on the first call of a torch.library custom op (the fused op), and that
# import sets TORCHINDUCTOR_CACHE_DIR in os.environ: torch's doing, not the library's, so it comes
# before the tests take the process's state.
import torch._dynamo  # noqa: F401
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
    """Fused and split forward and backward, and the split-KV decode forward, on CPU tensors;
    each against the reference."""
    inputs, _ = _cpu_inputs()
    ref = aligner_attention_reference(*inputs)
    ref_grads = torch.autograd.grad(ref, inputs, torch.ones_like(ref))
    for backend in ("fused", "split"):
        out = aligner_attention(*inputs, backend=backend)
        grads = torch.autograd.grad(out, inputs, torch.ones_like(out))
        torch.testing.assert_close(out, ref, atol=2e-4, rtol=2e-4)
        for got, want in zip(grads, ref_grads):
            torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)
    with torch.no_grad():
        q, k, v, *prefix = inputs
        step = aligner_attention(q[:, -1:], k, v, *prefix, backend="fused")
        torch.testing.assert_close(step, ref[:, -1:], atol=2e-4, rtol=2e-4)


def test_cpu_fused_call_leaves_the_process_unchanged():
    """Also with the user's TRITON_INTERPRET=1 (Triton's own library functions are then
    interpreted functions, defined in triton.language.standard): twice, since a second launch
    fails when the first left the interpreter's state broken."""
    before = _global_state()
    _run_every_cpu_kernel()
    _run_every_cpu_kernel()
    after = _global_state()
    for name in before:
        assert after[name] == before[name], f"{name} changed by the CPU kernel calls"

    @triton.jit
    def unrelated_kernel(X):
        tl.store(X, tl.sum(tl.zeros([16], dtype=tl.float32), 0))

    # Compiled, not interpreted, unless the user asked for the interpreter.
    decorated = InterpretedFunction if knobs.runtime.interpret else JITFunction
    assert type(unrelated_kernel) is decorated
    assert type(tl.sum) is decorated and type(tl.zeros) is decorated


@pytest.mark.skipif(not knobs.runtime.interpret, reason="needs TRITON_INTERPRET=1 set by the user")
def test_user_interpret_runs_the_kernel_modules_themselves(monkeypatch):
    """With the user's TRITON_INTERPRET=1 the kernel modules (aligner_kernels.forward, ...) are
    interpreted too (what CUDA tensors get then): they run CPU tensors as well, launch after
    launch, like the copy."""
    compiled_path = kernels.load(interpreted=False)
    assert compiled_path.INTERPRETING
    monkeypatch.setattr(kernels, "load", lambda interpreted: compiled_path)
    _run_every_cpu_kernel()
    _run_every_cpu_kernel()


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
