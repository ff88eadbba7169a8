"""Triton kernels (through the interpreter on CPU) against the reference, forward and every gradient."""

from __future__ import annotations

import pytest
import torch
from attention_cases import (
    DEVICE,
    check_against_reference,
    forward_backward,
    make_inputs,
    requires_gpu_for_bf16,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from triton import knobs

from aligner import aligner_attention

# Each case: make_inputs arguments plus aligner_attention options. Together they cover every
# supported feature: MHA/GQA/MQA, head dims, N = 1 / small / not a power of two / several prefix
# chunks, causal and not, L_q < L_k, packed varlen, per-sequence prefixes, fp32 and fp16.
CASES = {
    "mha-causal-n1": dict(heads=2, kv_heads=2, num_tokens=1),
    "gqa-causal-n3": dict(heads=4, kv_heads=2, num_tokens=3),
    "mqa-noncausal-n17": dict(heads=4, kv_heads=1, num_tokens=17, causal=False),
    "gqa-n70-chunks": dict(heads=2, kv_heads=1, num_tokens=70, seqlen_q=20),
    "d16-n2": dict(head_dim=16, num_tokens=2, seqlen_q=21),
    "d64-n10": dict(head_dim=64, num_tokens=10, seqlen_q=33),
    "d96-n5": dict(head_dim=96, num_tokens=5, heads=2, kv_heads=1, seqlen_q=18),
    "d128-n1": dict(head_dim=128, num_tokens=1, heads=2, kv_heads=2, seqlen_q=20, batch=1),
    "d128-n16-noncausal": dict(head_dim=128, num_tokens=16, heads=2, kv_heads=1, seqlen_q=20, causal=False),
    "decode-lq-lt-lk": dict(seqlen_q=7, seqlen_k=40, num_tokens=4),
    "decode-lq1-n1": dict(seqlen_q=1, seqlen_k=35, num_tokens=1),
    "noncausal-lq-gt-lk": dict(seqlen_q=40, seqlen_k=13, num_tokens=2, causal=False),
    "per-sequence-n6": dict(num_tokens=6, per_sequence=True, batch=3, seqlen_q=17),
    "per-sequence-n1": dict(num_tokens=1, per_sequence=True, batch=3, seqlen_q=17),
    "varlen-n5": dict(seqlens=[(19, 19), (1, 1), (33, 33), (8, 8)], num_tokens=5),
    "varlen-decode-per-sequence": dict(seqlens=[(3, 30), (1, 17), (16, 16)], num_tokens=9, per_sequence=True),
    "varlen-n1-noncausal": dict(seqlens=[(5, 12), (20, 7)], num_tokens=1, causal=False),
    "fp16-gqa-n10": dict(dtype=torch.float16, num_tokens=10, seqlen_q=40),
    "fp16-n1": dict(dtype=torch.float16, num_tokens=1, heads=2, kv_heads=1),
    "fp16-varlen-per-sequence": dict(
        dtype=torch.float16, seqlens=[(9, 20), (30, 30)], num_tokens=3, per_sequence=True
    ),
    "custom-scale": dict(num_tokens=4, softmax_scale=0.3),
    "gate-per-sequence-n4": dict(num_tokens=4, gate_per_sequence=True, batch=3, seqlen_q=17),
    "gate-per-sequence-n1-per-sequence-prefix": dict(
        num_tokens=1, gate_per_sequence=True, per_sequence=True, batch=3, seqlen_q=17
    ),
    "varlen-gate-per-sequence-n3": dict(
        seqlens=[(3, 20), (17, 17), (1, 5)], num_tokens=3, gate_per_sequence=True
    ),
    "bf16-gqa-n10": pytest.param(
        dict(dtype=torch.bfloat16, num_tokens=10, seqlen_q=40), marks=requires_gpu_for_bf16
    ),
    "bf16-n1-mqa": pytest.param(
        dict(dtype=torch.bfloat16, num_tokens=1, kv_heads=1), marks=requires_gpu_for_bf16
    ),
    "bf16-varlen-d128-n70": pytest.param(
        dict(dtype=torch.bfloat16, seqlens=[(9, 20), (30, 30)], num_tokens=70, head_dim=128),
        marks=requires_gpu_for_bf16,
    ),
    "bf16-d64-noncausal-per-sequence": pytest.param(
        dict(dtype=torch.bfloat16, head_dim=64, num_tokens=5, per_sequence=True, causal=False),
        marks=requires_gpu_for_bf16,
    ),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_kernel_matches_reference(case):
    case = dict(case)
    options = {key: case.pop(key) for key in ("causal", "softmax_scale") if key in case}
    inputs, varlen = make_inputs(**case)
    check_against_reference(inputs, **options, **varlen)


PLAIN_CASES = {
    "causal-gqa": dict(kv_heads=2),
    "noncausal-mqa": dict(kv_heads=1, causal=False),
    "decode": dict(seqlen_q=5, seqlen_k=29),
    "varlen": dict(seqlens=[(3, 30), (17, 17), (1, 9)]),
    "fp16-d64": dict(dtype=torch.float16, head_dim=64),
    "bf16-d128": pytest.param(dict(dtype=torch.bfloat16, head_dim=128), marks=requires_gpu_for_bf16),
}


@pytest.mark.parametrize("case", PLAIN_CASES.values(), ids=PLAIN_CASES.keys())
def test_plain_attention_without_prefix(case):
    """No prefix (layers without an Aligner, merged layers): the kernels are a flash attention."""
    case = dict(case)
    options = {key: case.pop(key) for key in ("causal",) if key in case}
    (q, k, v, *_), varlen = make_inputs(**case)
    check_against_reference((q, k, v), **options, **varlen)


def test_one_token_fast_path_equals_general_formula():
    """N = 1 (closed form, no prefix scores) == N = 2 with the token duplicated (general path)."""
    inputs, _ = make_inputs(num_tokens=1, seqlen_q=20)
    q, k, v, pk, pv, gate = inputs
    doubled = [x.detach().repeat(2, 1, 1).requires_grad_() for x in (pk, pv)]
    out1, grads1 = forward_backward(inputs)
    out2, grads2 = forward_backward((q, k, v, *doubled, gate))
    torch.testing.assert_close(out1, out2, atol=1e-5, rtol=1e-5)
    for g1, g2 in zip(grads1[:3], grads2[:3]):
        torch.testing.assert_close(g1, g2, atol=1e-5, rtol=1e-5)
    # dPV of one token == the sum over its two copies; dPK is zero for one token.
    torch.testing.assert_close(grads1[4], grads2[4].sum(0, keepdim=True), atol=1e-4, rtol=1e-4)
    assert torch.all(grads1[3] == 0)
    torch.testing.assert_close(grads1[5], grads2[5], atol=1e-4, rtol=1e-4)


def test_zero_gate_is_plain_attention_exactly():
    """gate = 0: the prefix cannot change a single bit of the output or of dq, dk, dv."""
    inputs, _ = make_inputs(num_tokens=5, seqlen_q=20)
    q, k, v, pk, pv, gate = inputs
    zero_gate = torch.zeros_like(gate, requires_grad=True)
    out_a, grads_a = forward_backward((q, k, v, pk, pv, zero_gate))
    other = [(3 * torch.randn_like(x)).requires_grad_() for x in (pk, pv)]
    out_b, grads_b = forward_backward((q, k, v, *other, zero_gate))
    assert torch.equal(out_a, out_b)
    for ga, gb in zip(grads_a[:3], grads_b[:3]):
        assert torch.equal(ga, gb)
    plain = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
    ).transpose(1, 2)
    torch.testing.assert_close(out_a, plain, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("gate_per_sequence", [False, True], ids=["shared_gate", "per_seq_gate"])
def test_per_sequence_prefix_equals_each_sequence_alone(gate_per_sequence):
    inputs, _ = make_inputs(
        batch=3, num_tokens=4, per_sequence=True, gate_per_sequence=gate_per_sequence, seqlen_q=17, heads=2,
        kv_heads=1,
    )  # fmt: skip
    dout = torch.randn(inputs[0].shape, device=DEVICE)
    out, grads = forward_backward(inputs, dout)
    q, k, v, pk, pv, gate = inputs
    for b in range(3):
        alone = [x[b : b + 1].detach().requires_grad_() for x in (q, k, v)]
        prefix = [x[b].detach().requires_grad_() for x in (pk, pv)]
        gate_b = gate[b].detach().requires_grad_() if gate_per_sequence else gate
        out_b, grads_b = forward_backward((*alone, *prefix, gate_b), dout[b : b + 1])
        torch.testing.assert_close(out[b : b + 1], out_b, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(grads[3][b], grads_b[3], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(grads[4][b], grads_b[4], atol=1e-4, rtol=1e-4)
        if gate_per_sequence:  # dgate (B, H): row b is sequence b's own dgate
            torch.testing.assert_close(grads[5][b], grads_b[5], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("num_tokens", [1, 5])
def test_zero_gate_row_is_plain_attention_exactly(num_tokens):
    """A row without an Aligner (gate row 0) in a batch of per-sequence Aligners: its output and
    its dq, dk, dv are the prefix-less kernels' bits."""
    inputs, _ = make_inputs(
        batch=3,
        seqlen_q=17,
        heads=2,
        kv_heads=1,
        num_tokens=num_tokens,
        per_sequence=True,
        gate_per_sequence=True,
    )
    q, k, v, pk, pv, gate = inputs
    with torch.no_grad():
        gate[1] = 0.0
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    out, grads = forward_backward(inputs, dout)
    plain_out, plain_grads = forward_backward((q, k, v), dout)
    assert torch.equal(out[1], plain_out[1])
    for grad, plain in zip(grads[:3], plain_grads):
        assert torch.equal(grad[1], plain[1])
    assert not torch.equal(out[0], plain_out[0])
    with torch.no_grad():  # the split-KV decode forward too
        step = aligner_attention(q[:, -1:], k, v, pk, pv, gate, backend="fused")
        plain_step = aligner_attention(q[:, -1:], k, v, backend="fused")
    assert torch.equal(step[1], plain_step[1])


def test_varlen_equals_padded_batch():
    """Packed sequences == the same sequences run one by one in the padded (batch) layout."""
    lengths = [11, 24, 3]
    inputs, varlen = make_inputs(seqlens=[(n, n) for n in lengths], num_tokens=6)
    dout = torch.randn(inputs[0].shape, device=DEVICE)
    out, grads = forward_backward(inputs, dout, **varlen)
    q, k, v, pk, pv, gate = inputs
    start = 0
    for n in lengths:
        rows = slice(start, start + n)
        alone = [x[rows][None].detach().requires_grad_() for x in (q, k, v)]
        out_b, grads_b = forward_backward((*alone, pk, pv, gate), dout[rows][None])
        torch.testing.assert_close(out[rows], out_b[0], atol=1e-5, rtol=1e-5)
        for g, gb in zip(grads[:3], grads_b[:3]):
            torch.testing.assert_close(g[rows], gb[0], atol=1e-5, rtol=1e-5)
        start += n


def test_decoding_matches_full_recompute():
    """L_q = 1 against a growing KV cache (bottom-right causal) == the last row recomputed in full."""
    (q, k, v, pk, pv, gate), _ = make_inputs(seqlen_q=12, num_tokens=3)
    q, k, v = (x.detach() for x in (q, k, v))
    full = aligner_attention(q, k, v, pk, pv, gate, backend="fused")
    for t in range(1, 13):
        step = aligner_attention(q[:, t - 1 : t], k[:, :t], v[:, :t], pk, pv, gate, backend="fused")
        torch.testing.assert_close(step[:, 0], full[:, t - 1], atol=1e-5, rtol=1e-5)


def test_autotune_keys_settle():
    """The autotuners see sequence lengths only as power-of-two buckets: a 2,000-step decode loop
    and 1,000 distinct training lengths give a handful of keys per kernel variant."""
    import random

    from aligner_kernels import backward, configs, decode, forward

    launchers = [forward._launch_forward, decode._launch_split, backward._launch_delta, backward._launch_dq]
    launchers.append(backward._launch_dkdv)
    for launch in launchers:  # no raw length is part of any key
        params = launch.kernel.arg_names
        assert all(name in params for name in launch.key)
        assert not any(name.startswith("max_seqlen") for name in params)
        assert {name for name in launch.key if "seqlen" in name} <= {"seqlen_bucket_q", "seqlen_bucket_k"}

    def keys(lengths):
        return {(configs.seqlen_bucket(len_q), configs.seqlen_bucket(len_k)) for len_q, len_k in lengths}

    prompt = 100
    decode_steps = [(1, prompt + step) for step in range(1, 2001)]
    assert len({len_k for _, len_k in decode_steps}) == 2000
    assert len(keys(decode_steps)) == 6  # L_k 101..2100: buckets 128, 256, 512, 1024, 2048, 4096
    training = random.Random(0).sample(range(1, 8193), 1000)
    assert len(keys((n, n) for n in training)) <= 14  # 1..8192: at most 14 powers of two
    # Every length of a bucket shares its key with the bucket's longest.
    assert all(configs.seqlen_bucket(n) == 2048 for n in range(1025, 2049))


@pytest.mark.skipif(
    knobs.runtime.interpret,
    reason="TRITON_INTERPRET=1 was set by the user: the launchers are interpreted and tune nothing",
)
def test_hopper_launchers_tune_over_the_sm90_tables():
    """On sm_90 the fused launchers tune over the Hopper tables: a Hopper config first (the one
    ALIGNER_AUTOTUNE=0 runs), then every Ampere config of the bucket, none twice. Every other GPU
    keeps the Ampere tables."""
    from aligner_kernels import backward, configs, decode, forward

    def names(table):
        return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in table]

    launchers = {
        forward._launch_forward: (configs.FORWARD_CONFIGS, configs.FORWARD_CONFIGS_SM90),
        backward._launch_dq: (configs.BACKWARD_DQ_CONFIGS, configs.BACKWARD_DQ_CONFIGS_SM90),
        backward._launch_dkdv: (configs.BACKWARD_DKDV_CONFIGS, configs.BACKWARD_DKDV_CONFIGS_SM90),
    }
    for launch, (ampere, hopper) in launchers.items():
        assert configs.device_configs(ampere, hopper, (9, 0)) is hopper
        for capability in ((8, 0), (8, 6), (8, 9), (10, 0), (12, 0)):
            assert configs.device_configs(ampere, hopper, capability) is ampere
        assert hopper.keys() == ampere.keys() == launch.tuned.keys() == launch.tuned_sm90.keys()
        for bucket in ampere:
            assert names(launch.tuned[bucket].configs) == names(ampere[bucket])
            assert names(launch.tuned_sm90[bucket].configs) == names(hopper[bucket])
            assert len(set(names(hopper[bucket]))) == len(hopper[bucket])
            assert set(names(ampere[bucket])) <= set(names(hopper[bucket]))
        assert names(hopper[128])[0] not in names(ampere[128])
    assert names(configs.FORWARD_CONFIGS_SM90[128])[0][:2] == (128, 128)  # BLOCK_N = 128 forward
    assert not decode._launch_split.tuned_sm90  # decoding has no Hopper table yet


@pytest.mark.parametrize("num_tokens", [1, 7])
def test_backward_is_deterministic(num_tokens):
    inputs, varlen = make_inputs(seqlens=[(30, 30), (21, 21)], num_tokens=num_tokens, heads=4, kv_heads=1)
    _, first = forward_backward(inputs, **varlen)
    _, second = forward_backward(inputs, **varlen)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@settings(max_examples=12, deadline=None)
@given(
    data=st.data(),
    group=st.sampled_from([1, 2, 4]),
    kv_heads=st.integers(1, 2),
    head_dim=st.sampled_from([32, 64]),
    num_tokens=st.integers(1, 80),
    causal=st.booleans(),
    per_sequence=st.booleans(),
    gate_per_sequence=st.booleans(),
)
def test_kernel_property(
    data, group, kv_heads, head_dim, num_tokens, causal, per_sequence, gate_per_sequence
):
    """Random shapes and N, packed with random lengths (L_q <= L_k), against the reference."""
    batch = data.draw(st.integers(1, 3), label="batch")
    seqlens = []
    for _ in range(batch):
        len_k = data.draw(st.integers(1, 40), label="len_k")
        seqlens.append((data.draw(st.integers(1, len_k), label="len_q"), len_k))
    inputs, varlen = make_inputs(
        seqlens=seqlens,
        heads=group * kv_heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        num_tokens=num_tokens,
        per_sequence=per_sequence,
        gate_per_sequence=gate_per_sequence,
        seed=data.draw(st.integers(0, 2**16), label="seed"),
    )
    check_against_reference(inputs, causal=causal, **varlen)
