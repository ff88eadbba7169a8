"""The split-KV (flash-decoding) forward for short query blocks against the reference.

On CPU the interpreter runs it with 16-key splits and up to 4 splits per sequence
(kernels/decode.py), so the tiny shapes below have several splits, and sequences shorter than
the longest one, or queries causally hidden from a split, leave splits with no visible key.
"""

from __future__ import annotations

import pytest
import torch
from attention_cases import DEVICE, FP32_ATOL, make_inputs, requires_gpu_for_bf16

import aligner.attention
from aligner import aligner_attention, aligner_attention_reference

CASES = {
    "lq1-gqa-n10": dict(seqlen_q=1, seqlen_k=70, num_tokens=10),
    "lq5-n1": dict(seqlen_q=5, seqlen_k=50, num_tokens=1, heads=2, kv_heads=2),
    "lq16-mqa-no-prefix": dict(seqlen_q=16, seqlen_k=40, heads=4, kv_heads=1, num_tokens=0),
    "lq3-noncausal-d64": dict(seqlen_q=3, seqlen_k=45, head_dim=64, num_tokens=3, causal=False),
    "lq2-d128-n70-chunks": dict(seqlen_q=2, seqlen_k=33, head_dim=128, heads=2, kv_heads=1, num_tokens=70),
    "per-sequence-prefix-and-gate": dict(
        seqlen_q=1, seqlen_k=64, batch=3, num_tokens=4, per_sequence=True, gate_per_sequence=True
    ),
    # Shorter sequences leave the last splits empty; (16, 20) hides keys 16.. from its first queries.
    "varlen-empty-splits": dict(seqlens=[(1, 60), (2, 5), (1, 1), (3, 33)], num_tokens=3),
    "varlen-causally-hidden": dict(
        seqlens=[(16, 20), (1, 40)], num_tokens=2, per_sequence=True, gate_per_sequence=True
    ),
    "fp16-lq1-n10": dict(seqlen_q=1, seqlen_k=50, num_tokens=10, dtype=torch.float16),
    "bf16-lq4-n1": pytest.param(
        dict(seqlen_q=4, seqlen_k=50, num_tokens=1, dtype=torch.bfloat16), marks=requires_gpu_for_bf16
    ),
}


def _decode_inputs(case):
    case = dict(case)
    causal = case.pop("causal", True)
    num_tokens = case.pop("num_tokens")
    inputs, varlen = make_inputs(num_tokens=max(num_tokens, 1), **case)
    inputs = tuple(x.detach() for x in inputs)
    return (inputs if num_tokens else inputs[:3]), {"causal": causal, **varlen}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_decode_matches_reference(case, monkeypatch):
    inputs, options = _decode_inputs(case)
    calls = []
    monkeypatch.setattr(
        aligner.attention,
        "fused_decode_forward",
        lambda *args: calls.append(args) or torch.ops.aligner.fused_decode_forward(*args),
    )
    out = aligner_attention(*inputs, backend="fused", **options)
    assert len(calls) == 1  # no gradient needed, short queries: the split-KV kernels ran
    expected = aligner_attention_reference(*inputs, **options)
    dtype = inputs[0].dtype
    if dtype == torch.float32:
        torch.testing.assert_close(out, expected, atol=FP32_ATOL, rtol=0)
    else:  # as the kernel tests: at most twice the reference's own low-precision error, plus one ulp
        truth = aligner_attention_reference(*(x.float() for x in inputs), **options)
        allowed = 2 * (expected.float() - truth).abs().max().item() + torch.finfo(dtype).eps * max(
            1.0, truth.abs().max().item()
        )
        assert (out.float() - truth).abs().max().item() <= allowed


def test_with_gradient_the_fused_kernels_run(monkeypatch):
    """Decode-shaped inputs that need a gradient take the fused forward (which has a backward)."""
    inputs, _ = make_inputs(seqlen_q=1, seqlen_k=40, num_tokens=3)
    monkeypatch.setattr(aligner.attention, "fused_decode_forward", None)  # would fail if called
    out = aligner_attention(*inputs, backend="fused")
    grads = torch.autograd.grad(out, inputs, torch.ones_like(out))
    ref_inputs = tuple(x.detach().requires_grad_() for x in inputs)
    ref = aligner_attention_reference(*ref_inputs)
    ref_grads = torch.autograd.grad(ref, ref_inputs, torch.ones_like(ref))
    torch.testing.assert_close(out, ref, atol=FP32_ATOL, rtol=0)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)


def test_longer_query_blocks_take_the_fused_forward(monkeypatch):
    inputs, _ = make_inputs(seqlen_q=17, seqlen_k=20, num_tokens=2, heads=2, kv_heads=1)
    monkeypatch.setattr(aligner.attention, "fused_decode_forward", None)
    with torch.no_grad():
        out = aligner_attention(*inputs, backend="fused")
        torch.testing.assert_close(out, aligner_attention_reference(*inputs), atol=FP32_ATOL, rtol=0)


def test_decode_loop_matches_full_recompute():
    """Token by token against a growing cache == the rows of one full causal pass."""
    (q, k, v, pk, pv, gate), _ = make_inputs(seqlen_q=20, num_tokens=3, heads=2, kv_heads=1)
    with torch.no_grad():
        full = aligner_attention_reference(q, k, v, pk, pv, gate)
        for t in (1, 2, 15, 16, 17, 20):  # split and tile boundaries
            step = aligner_attention(q[:, t - 1 : t], k[:, :t], v[:, :t], pk, pv, gate, backend="fused")
            torch.testing.assert_close(step[:, 0], full[:, t - 1], atol=FP32_ATOL, rtol=0)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="autotuning runs on a GPU only")
def test_autotuning_settles_over_a_decode_loop(monkeypatch):
    """200 decode steps over 200 cache lengths tune the split kernel once per length bucket."""
    from aligner_kernels import decode

    monkeypatch.setenv("ALIGNER_AUTOTUNE", "1")
    (q, k, v, pk, pv, gate), _ = make_inputs(seqlen_q=1, seqlen_k=300, num_tokens=3, head_dim=128)
    with torch.no_grad():
        for cache in range(101, 301):
            aligner_attention(q, k[:, :cache], v[:, :cache], pk, pv, gate, backend="fused")
    keys = decode._launch_split.tuned[128].cache
    assert 1 <= len(keys) <= 3  # caches 101..300: buckets 128, 256, 512


def test_kernel_rows_of_the_decode_benchmark(tmp_path):
    """bench_decode.py --kernel at toy size (the interpreter on CPU): every method and N has a row."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    import bench_decode

    argv = ["--kernel", "--results-dir", str(tmp_path), "--device", DEVICE.type, "--dtype", "float32"]
    argv += ["--batches", "1", "--cache-lengths", "40", "--heads", "4", "--kv-heads", "2", "--head-dim", "32"]
    rows = bench_decode.main([*argv, "--num-tokens", "0", "1", "--rounds", "1"])
    assert {(row["method"], row["num_tokens"]) for row in rows} == {
        ("sdpa", 0),
        *((method, n) for method in ("aligner-split-kv", "aligner-fused") for n in (0, 1)),
    }
    assert all(row["ms"] > 0 for row in rows) and (tmp_path / "decode_kernel.json").exists()
