"""The split backend (SDPA or flash-attn for the main attention + our prefix kernels) against the
fused kernels and the reference: forward and every gradient, over the layouts it takes, and the
fused fallback for those it does not."""

from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn.functional as F
from attention_cases import (
    DEVICE,
    FP32_ATOL,
    NAMES,
    check_against_reference,
    forward_backward,
    make_inputs,
    requires_gpu_for_bf16,
)

import aligner.attention
import aligner.split
from aligner import aligner_attention, aligner_attention_reference

# Inputs the split form takes: padded, causal with L_q == L_k or not causal.
CASES = {
    "mha-causal-n1": dict(heads=2, kv_heads=2, num_tokens=1),
    "gqa-causal-n3-custom-scale": dict(heads=4, kv_heads=2, num_tokens=3, softmax_scale=0.3),
    "mqa-noncausal-n17": dict(heads=4, kv_heads=1, num_tokens=17, causal=False),
    "gqa-n70-chunks": dict(heads=2, kv_heads=1, num_tokens=70, seqlen_q=20),
    "d64-n10": dict(head_dim=64, num_tokens=10, seqlen_q=33, batch=1),
    "d128-n16-noncausal": dict(head_dim=128, num_tokens=16, heads=2, kv_heads=1, seqlen_q=20, causal=False),
    "noncausal-lq-lt-lk": dict(seqlen_q=20, seqlen_k=37, num_tokens=5, causal=False),
    "per-sequence-n6": dict(num_tokens=6, per_sequence=True, batch=3, seqlen_q=17),
    "gate-per-sequence-n4": dict(num_tokens=4, gate_per_sequence=True, batch=3, seqlen_q=17),
    "gate-per-sequence-n1-per-sequence-prefix": dict(
        num_tokens=1, gate_per_sequence=True, per_sequence=True, batch=3, seqlen_q=17
    ),
    "fp16-gqa-n10": dict(dtype=torch.float16, num_tokens=10),
    "bf16-gqa-n10": pytest.param(
        dict(dtype=torch.bfloat16, num_tokens=10, seqlen_q=40), marks=requires_gpu_for_bf16
    ),
}
# Inputs SDPA cannot take without flash-attn: the fused kernels run instead.
FALLBACK_CASES = {
    "causal-lq-lt-lk": dict(seqlen_q=10, seqlen_k=24, num_tokens=4),
    "varlen-n5": dict(seqlens=[(9, 9), (1, 1), (17, 17)], num_tokens=5),
    "varlen-per-sequence-gate-per-sequence": dict(
        seqlens=[(3, 20), (17, 17)], num_tokens=3, per_sequence=True, gate_per_sequence=True
    ),
}


def _split_options(case: dict) -> tuple[dict, dict]:
    case = dict(case)
    options = {key: case.pop(key) for key in ("causal", "softmax_scale") if key in case}
    return case, options


@pytest.fixture
def split_calls(monkeypatch):
    """How often the split form actually ran (not the fused fallback)."""
    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return aligner.split.split_attention(*args, **kwargs)

    monkeypatch.setattr(aligner.attention, "split_attention", spy)
    return calls


def _assert_close_to_fused(split, fused, dtype):
    """split and fused differ only in the main attention's rounding (SDPA vs our kernel)."""
    for name, a, b in zip(NAMES, (split[0], *split[1]), (fused[0], *fused[1])):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        if dtype == torch.float32:
            scale = max(1.0, b.abs().max().item()) if name.startswith(("dgate", "dprefix")) else 1.0
            allowed = 2 * FP32_ATOL * scale
        else:  # two low-precision results, each within its bound of the fp32 truth
            allowed = 4 * torch.finfo(dtype).eps * max(1.0, b.abs().max().item())
        error = (a.float() - b.float()).abs().max().item()
        assert error <= allowed, f"{name}: split vs fused {error:.3e} > {allowed:.3e}"


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_split_matches_reference(case, split_calls):
    case, options = _split_options(case)
    inputs, varlen = make_inputs(**case)
    check_against_reference(inputs, backend="split", **options, **varlen)
    assert split_calls, "the split form did not run"


# (tests/test_kernels.py holds fused == reference over every case; here split == fused directly.)
@pytest.mark.parametrize("case", ["mha-causal-n1", "gqa-causal-n3-custom-scale", "gate-per-sequence-n4"])
def test_split_matches_fused(case, split_calls):
    case, options = _split_options(CASES[case])
    inputs, _ = make_inputs(**case)
    split = forward_backward(inputs, backend="split", **options)
    fused = forward_backward(inputs, backend="fused", **options)
    assert split_calls
    _assert_close_to_fused(split, fused, inputs[0].dtype)


@pytest.mark.parametrize("case", FALLBACK_CASES.values(), ids=FALLBACK_CASES.keys())
def test_split_falls_back_to_fused(case, split_calls):
    case, options = _split_options(case)
    inputs, varlen = make_inputs(**case)
    split = forward_backward(inputs, backend="split", **options, **varlen)
    fused = forward_backward(inputs, backend="fused", **options, **varlen)
    assert not split_calls
    for name, a, b in zip(NAMES, (split[0], *split[1]), (fused[0], *fused[1])):
        assert torch.equal(a, b), name


def test_sdpa_causal_is_top_left_aligned():
    """Why causal L_q != L_k cannot go to SDPA's is_causal: SDPA lets query i see keys j <= i
    (top-left), this project's mask keys j <= i + L_k - L_q (bottom-right, KV-cache decoding)."""
    (q, k, v, *_), _ = make_inputs(seqlen_q=4, seqlen_k=9, heads=2, kv_heads=2, num_tokens=1)
    q, k, v = (x.detach().cpu() for x in (q, k, v))
    sdpa = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)), is_causal=True)
    bottom_right = aligner_attention_reference(q, k, v, causal=True)
    top_left_mask = torch.ones(4, 9, dtype=torch.bool).tril()
    top_left = F.scaled_dot_product_attention(
        *(x.transpose(1, 2) for x in (q, k, v)), attn_mask=top_left_mask
    )
    torch.testing.assert_close(sdpa, top_left)
    assert (sdpa.transpose(1, 2) - bottom_right).abs().max() > 0.1


def test_split_without_gradient_adds_in_place_and_matches(split_calls, monkeypatch):
    inputs, _ = make_inputs(num_tokens=5, seqlen_q=20)
    with_grad = aligner_attention(*inputs, backend="split")
    added = []
    real_add = aligner.split.split_prefix_add_
    monkeypatch.setattr(aligner.split, "split_prefix_add_", lambda *a: added.append(1) or real_add(*a))
    with torch.no_grad():
        without = aligner_attention(*inputs, backend="split")
    assert added == [1]
    assert torch.equal(with_grad.detach(), without)


def test_zero_gate_rows_are_the_plain_attention(split_calls):
    """A per-sequence gate row of 0 gives that sequence exactly the plain (SDPA) attention."""
    (q, k, v, pk, pv, gate), _ = make_inputs(num_tokens=3, batch=3, gate_per_sequence=True, per_sequence=True)
    gate = gate.detach().clone()
    gate[1] = 0.0
    out = aligner_attention(q, k, v, pk, pv, gate, backend="split")
    plain = aligner_attention(q, k, v, backend="split")
    assert torch.equal(out[1], plain[1])
    assert not torch.equal(out[0], plain[0])


def test_split_backward_is_deterministic():
    inputs, _ = make_inputs(num_tokens=6, seqlen_q=40, batch=3)
    first = forward_backward(inputs, backend="split")
    second = forward_backward(inputs, backend="split")
    for name, a, b in zip(NAMES, (first[0], *first[1]), (second[0], *second[1])):
        assert torch.equal(a, b), name


def test_split_compiles_in_one_graph():
    """The prefix op is a torch.library custom op: torch.compile(fullgraph=True) traces the split
    form (SDPA + the op) without a graph break, forward and backward, with the eager results."""
    torch._dynamo.reset()
    inputs, _ = make_inputs(num_tokens=3, seqlen_q=16, heads=2, kv_heads=1)
    compiled = torch.compile(
        lambda *x: aligner_attention(*x, backend="split"), fullgraph=True, backend="aot_eager"
    )
    eager = forward_backward(inputs, backend="split")
    out = compiled(*inputs)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device, out.dtype)
    grads = torch.autograd.grad(out, inputs, dout)  # forward_backward's dO
    torch.testing.assert_close(out, eager[0], rtol=0, atol=1e-6)
    for name, a, b in zip(NAMES[1:], grads, eager[1]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


def test_split_float64_is_refused():
    (q, k, v, pk, pv, gate), _ = make_inputs(num_tokens=2, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"backend='split'.*float64"):
        aligner_attention(q, k, v, pk, pv, gate, backend="split")


def _fake_flash_attn():
    """flash-attn's two entry points, computed by the reference (bottom-right causal, varlen)."""

    def flash_attn_func(q, k, v, softmax_scale, causal, deterministic):
        return aligner_attention_reference(q, k, v, causal=causal, softmax_scale=softmax_scale)

    def flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale, causal, deterministic):
        return aligner_attention_reference(
            q, k, v, causal=causal, softmax_scale=softmax_scale, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k
        )

    module = types.ModuleType("flash_attn")
    module.flash_attn_func, module.flash_attn_varlen_func = flash_attn_func, flash_attn_varlen_func
    return module


@pytest.mark.parametrize("case", FALLBACK_CASES.values(), ids=FALLBACK_CASES.keys())
def test_split_with_flash_attn_takes_varlen_and_bottom_right_causal(case, split_calls, monkeypatch):
    """With flash-attn installed the split form runs for packed and causal L_q != L_k inputs too
    (flash-attn itself stands in here: it is not installed on these machines)."""
    monkeypatch.setitem(sys.modules, "flash_attn", _fake_flash_attn())
    monkeypatch.setattr(aligner.split, "_uses_flash_attn", lambda q: True)
    case, options = _split_options(case)
    inputs, varlen = make_inputs(**case)
    check_against_reference(inputs, backend="split", **options, **varlen)
    assert split_calls


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the CPU SDPA is what this checks")
def test_split_on_cpu_uses_the_interpreted_prefix_kernels():
    inputs, _ = make_inputs(num_tokens=3)
    out = aligner_attention(*inputs, backend="split")
    assert out.device.type == "cpu"
    assert aligner.split.load_kernels(out.device).INTERPRETING
