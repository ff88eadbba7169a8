"""The reference (DESIGN.md section 1) against independent formulations of the same math.

The main comparison is with "the unfused way the paper's code computes it": the ordinary causal
attention through ``torch.nn.functional.scaled_dot_product_attention`` plus a separately computed
prefix attention with plain matmuls, summed with the per-head gate. All shapes are tiny.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from attention_cases import make_inputs
from hypothesis import given, settings
from hypothesis import strategies as st

from aligner import aligner_attention, aligner_attention_reference

F32 = {"rtol": 1e-5, "atol": 1e-5}
F64 = {"rtol": 1e-12, "atol": 1e-12}
GROUPS = {"mha": (4, 4), "gqa": (4, 2), "mqa": (4, 1)}  # (H, H_kv)


def cpu_inputs(seqlen_q=7, head_dim=16, **shape):
    """attention_cases.make_inputs, small, on the CPU and without gradients: the six tensors only."""
    inputs, _ = make_inputs(seqlen_q=seqlen_q, head_dim=head_dim, device="cpu", requires_grad=False, **shape)
    return inputs


def unfused(q, k, v, prefix_k, prefix_v, gate, *, causal=True, softmax_scale=None):
    """Batched layout only. Main attention through SDPA, prefix attention with plain matmuls."""
    heads, kv_heads, head_dim = q.shape[2], k.shape[2], q.shape[3]
    group = heads // kv_heads
    scale = head_dim**-0.5 if softmax_scale is None else softmax_scale
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))  # (B, heads, L, D)
    len_q, len_k = qh.shape[2], kh.shape[2]
    mask, is_causal = None, False
    if causal and len_q == len_k:
        is_causal = True
    elif causal:  # bottom-right aligned: query i sees key j iff j <= i + (len_k - len_q)
        mask = torch.ones(len_q, len_k, dtype=torch.bool).tril(diagonal=len_k - len_q)
    out_main = F.scaled_dot_product_attention(
        qh, kh, vh, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=group > 1
    )
    # Prefix: (N, H_kv, D) or (B, N, H_kv, D) -> (1 or B, heads, N, D); query head h reads kv head h // group.
    kv_head_of = torch.arange(heads) // group
    pk, pv = (x if x.dim() == 4 else x[None] for x in (prefix_k, prefix_v))
    pk, pv = (x[:, :, kv_head_of].transpose(1, 2) for x in (pk, pv))
    probs = torch.softmax(scale * qh @ pk.transpose(-1, -2), dim=-1)
    out_prefix = probs @ pv
    gate = gate if gate.dim() == 2 else gate[None]  # (1 or B, heads)
    out = out_main + gate.to(out_main.dtype)[:, :, None, None] * out_prefix
    return out.transpose(1, 2)


def pack(*tensors):
    """(B, L, ...) -> (B * L, ...)."""
    return tuple(x.reshape(-1, *x.shape[2:]) for x in tensors)


def cu_seqlens(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


# --- against the unfused formulation -------------------------------------------------------


@pytest.mark.parametrize("group", GROUPS.keys())
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("num_prefix", [1, 3, 17])
@pytest.mark.parametrize("per_sequence", [False, True], ids=["shared", "per_seq"])
@pytest.mark.parametrize("lengths", [(7, 7), (4, 9)], ids=["square", "lq<lk"])
def test_matches_unfused(group, causal, num_prefix, per_sequence, lengths):
    heads, kv_heads = GROUPS[group]
    inputs = cpu_inputs(
        seqlen_q=lengths[0], seqlen_k=lengths[1], heads=heads, kv_heads=kv_heads, num_tokens=num_prefix,
        per_sequence=per_sequence,
    )  # fmt: skip
    out = aligner_attention_reference(*inputs, causal=causal)
    assert out.shape == inputs[0].shape and out.dtype == torch.float32
    torch.testing.assert_close(out, unfused(*inputs, causal=causal), **F32)


@pytest.mark.parametrize("softmax_scale", [0.05, 0.5, 1.7])
@pytest.mark.parametrize("num_prefix", [1, 5])
def test_custom_softmax_scale(softmax_scale, num_prefix):
    inputs = cpu_inputs(seqlen_q=5, seqlen_k=8, num_tokens=num_prefix)
    out = aligner_attention_reference(*inputs, softmax_scale=softmax_scale)
    torch.testing.assert_close(out, unfused(*inputs, softmax_scale=softmax_scale), **F32)
    # The scale applies to the prefix scores too: a different scale changes the output.
    assert not torch.allclose(out, aligner_attention_reference(*inputs), **F32)


def test_default_scale_is_inverse_sqrt_head_dim():
    inputs = cpu_inputs(head_dim=16, num_tokens=4)
    torch.testing.assert_close(
        aligner_attention_reference(*inputs),
        aligner_attention_reference(*inputs, softmax_scale=0.25),
        rtol=0,
        atol=0,
    )


def test_prefix_softmax_is_separate():
    """A prefix with huge scores does not steal probability mass from the sequence (no joint softmax)."""
    q, k, v, prefix_k, prefix_v, gate = cpu_inputs(num_tokens=3)
    zero_gate = torch.zeros_like(gate)
    base = aligner_attention_reference(q, k, v, prefix_k, prefix_v, zero_gate)
    loud = aligner_attention_reference(q, k, v, 1e3 * prefix_k, prefix_v, zero_gate)
    torch.testing.assert_close(loud, base, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_computed_in_float32(dtype):
    inputs = cpu_inputs(num_tokens=3, dtype=dtype)
    out = aligner_attention_reference(*inputs)
    assert out.dtype == dtype
    upcast = [x.float() for x in inputs]
    # The math runs in float32 and is rounded once at the end.
    torch.testing.assert_close(out, aligner_attention_reference(*upcast).to(dtype), rtol=0, atol=0)
    torch.testing.assert_close(out, unfused(*upcast).to(dtype))


def test_public_op_reference_backend_is_the_reference():
    inputs = cpu_inputs(seqlen_q=5, seqlen_k=8, num_tokens=3)
    torch.testing.assert_close(
        aligner_attention(*inputs, backend="reference"), aligner_attention_reference(*inputs), rtol=0, atol=0
    )


# --- per-sequence gates (B, H) -------------------------------------------------------------


@pytest.mark.parametrize("num_prefix", [1, 3])
@pytest.mark.parametrize("per_sequence", [False, True], ids=["shared_prefix", "per_seq_prefix"])
def test_per_sequence_gate_matches_unfused(num_prefix, per_sequence):
    inputs = cpu_inputs(
        batch=3,
        seqlen_q=4,
        seqlen_k=9,
        num_tokens=num_prefix,
        per_sequence=per_sequence,
        gate_per_sequence=True,
    )
    torch.testing.assert_close(aligner_attention_reference(*inputs), unfused(*inputs), **F32)


def test_per_sequence_gate_row_equals_that_row_alone():
    q, k, v, pk, pv, gate = cpu_inputs(batch=3, num_tokens=3, per_sequence=True, gate_per_sequence=True)
    out = aligner_attention_reference(q, k, v, pk, pv, gate)
    packed = aligner_attention_reference(
        *pack(q, k, v), pk, pv, gate, cu_seqlens_q=cu_seqlens([7] * 3), cu_seqlens_k=cu_seqlens([7] * 3)
    )
    for b in range(3):
        alone = aligner_attention_reference(q[b : b + 1], k[b : b + 1], v[b : b + 1], pk[b], pv[b], gate[b])
        torch.testing.assert_close(out[b : b + 1], alone, **F32)
        torch.testing.assert_close(packed[7 * b : 7 * b + 7], alone[0], **F32)


@pytest.mark.parametrize("num_prefix", [1, 3])
def test_zero_gate_row_is_plain_attention_exactly(num_prefix):
    """A sequence without an Aligner in a batch of Aligners (gate row 0): the base model's bits."""
    q, k, v, pk, pv, gate = cpu_inputs(batch=3, num_tokens=num_prefix, gate_per_sequence=True)
    gate[1] = 0.0
    out = aligner_attention_reference(q, k, v, pk, pv, gate)
    plain = aligner_attention_reference(q, k, v)
    assert torch.equal(out[1], plain[1])
    assert not torch.equal(out[0], plain[0])


def test_gradcheck_per_sequence_gate():
    inputs = cpu_inputs(
        batch=2, seqlen_q=3, seqlen_k=4, heads=2, kv_heads=1, head_dim=4, num_tokens=2,
        gate_per_sequence=True, dtype=torch.float64,
    )  # fmt: skip
    assert torch.autograd.gradcheck(aligner_attention_reference, _require_grad(inputs))


# --- gradients -----------------------------------------------------------------------------


def _require_grad(inputs):
    return tuple(x.detach().clone().requires_grad_() for x in inputs)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("num_prefix", [1, 3])
@pytest.mark.parametrize("per_sequence", [False, True], ids=["shared", "per_seq"])
def test_gradcheck_batched(causal, num_prefix, per_sequence):
    inputs = cpu_inputs(
        batch=2, seqlen_q=3, seqlen_k=4, heads=2, kv_heads=1, head_dim=4, num_tokens=num_prefix,
        per_sequence=per_sequence, dtype=torch.float64,
    )  # fmt: skip
    assert torch.autograd.gradcheck(
        lambda *xs: aligner_attention_reference(*xs, causal=causal), _require_grad(inputs)
    )


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("num_prefix", [1, 3])
def test_gradcheck_packed(causal, num_prefix):
    inputs, varlen = make_inputs(
        seqlens=[(2, 3), (3, 3)], heads=4, kv_heads=2, head_dim=4, num_tokens=num_prefix, dtype=torch.float64,
        seed=1, device="cpu",
    )  # fmt: skip
    assert torch.autograd.gradcheck(
        lambda *xs: aligner_attention_reference(*xs, causal=causal, softmax_scale=0.7, **varlen), inputs
    )


def test_gradients_match_unfused():
    """Backward through the reference == backward through the unfused formulation (fp64)."""
    inputs = cpu_inputs(seqlen_q=5, seqlen_k=8, num_tokens=3, per_sequence=True, dtype=torch.float64)
    a, b = _require_grad(inputs), _require_grad(inputs)
    dout = torch.randn(inputs[0].shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    grads_ref = torch.autograd.grad(aligner_attention_reference(*a), a, dout)
    grads_unfused = torch.autograd.grad(unfused(*b), b, dout)
    for got, want in zip(grads_ref, grads_unfused):
        torch.testing.assert_close(got, want, **F64)


# --- N = 1: the closed form ----------------------------------------------------------------


@pytest.mark.parametrize("group", GROUPS.keys())
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("per_sequence", [False, True], ids=["shared", "per_seq"])
def test_single_token_closed_form(group, causal, per_sequence):
    heads, kv_heads = GROUPS[group]
    q, k, v, prefix_k, prefix_v, gate = cpu_inputs(
        seqlen_q=5, seqlen_k=6, heads=heads, kv_heads=kv_heads, num_tokens=1, per_sequence=per_sequence
    )
    out = aligner_attention_reference(q, k, v, prefix_k, prefix_v, gate, causal=causal)
    out_main = aligner_attention_reference(q, k, v, prefix_k, prefix_v, torch.zeros_like(gate), causal=causal)
    # O = O_main + gate_h * PV_g: the prefix softmax over one token is exactly 1.
    pv = prefix_v[..., 0, :, :] if per_sequence else prefix_v[0].expand(q.shape[0], kv_heads, -1)
    pv = pv.repeat_interleave(heads // kv_heads, dim=1)  # (B, H, D)
    closed = torch.addcmul(out_main, gate[None, None, :, None], pv[:, None])  # one rounding, as the reference
    torch.testing.assert_close(out, closed, rtol=0, atol=0)
    # and the prefix key does not matter at all
    torch.testing.assert_close(
        aligner_attention_reference(q, k, v, 100 * prefix_k + 3, prefix_v, gate, causal=causal),
        out,
        rtol=0,
        atol=0,
    )


# --- gate = 0 is plain attention -----------------------------------------------------------


@pytest.mark.parametrize("group", GROUPS.keys())
@pytest.mark.parametrize("num_prefix", [1, 3, 17])
def test_zero_gate_is_plain_causal_attention(group, num_prefix):
    heads, kv_heads = GROUPS[group]
    q, k, v, prefix_k, prefix_v, gate = cpu_inputs(heads=heads, kv_heads=kv_heads, num_tokens=num_prefix)
    zero = torch.zeros_like(gate)
    out = aligner_attention_reference(q, k, v, prefix_k, prefix_v, zero)
    sdpa = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=heads != kv_heads
    ).transpose(1, 2)
    torch.testing.assert_close(out, sdpa, rtol=1e-6, atol=1e-6)
    # Bit-identical whatever the prefix is.
    other = aligner_attention_reference(q, k, v, torch.randn_like(prefix_k), torch.randn_like(prefix_v), zero)
    assert torch.equal(out, other)


# --- packed / per-sequence == each sequence alone ------------------------------------------


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("num_prefix", [1, 4])
@pytest.mark.parametrize("per_sequence", [False, True], ids=["shared", "per_seq"])
def test_packed_equals_each_sequence_alone(causal, num_prefix, per_sequence):
    heads, kv_heads, head_dim = 4, 2, 8
    len_q, len_k = [3, 1, 6, 4], [5, 1, 6, 9]  # L_q <= L_k in every sequence
    batch = len(len_q)
    q, k, v, prefix_k, prefix_v, gate = cpu_inputs(
        batch=1, seqlen_q=sum(len_q), seqlen_k=sum(len_k), heads=heads, kv_heads=kv_heads, head_dim=head_dim,
        num_tokens=num_prefix, seed=5,
    )  # fmt: skip
    q, k, v = q[0], k[0], v[0]
    if per_sequence:
        prefix_k = torch.randn(batch, num_prefix, kv_heads, head_dim)
        prefix_v = torch.randn(batch, num_prefix, kv_heads, head_dim)
    cu_q, cu_k = cu_seqlens(len_q), cu_seqlens(len_k)
    packed = aligner_attention_reference(
        q, k, v, prefix_k, prefix_v, gate, causal=causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k
    )
    assert packed.shape == q.shape
    alone, alone_reference = [], []
    for b in range(batch):
        qs, ks, vs = q[cu_q[b] : cu_q[b + 1]], k[cu_k[b] : cu_k[b + 1]], v[cu_k[b] : cu_k[b + 1]]
        pk, pv = (prefix_k[b], prefix_v[b]) if per_sequence else (prefix_k, prefix_v)
        alone.append(unfused(qs[None], ks[None], vs[None], pk, pv, gate, causal=causal)[0])
        alone_reference.append(
            aligner_attention_reference(qs[None], ks[None], vs[None], pk, pv, gate, causal=causal)[0]
        )
    torch.testing.assert_close(packed, torch.cat(alone_reference), rtol=0, atol=0)
    torch.testing.assert_close(packed, torch.cat(alone), **F32)
    # and the public op, with the computed and with explicit max_seqlen
    torch.testing.assert_close(
        aligner_attention(
            q, k, v, prefix_k, prefix_v, gate, causal=causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
            max_seqlen_q=max(len_q), max_seqlen_k=max(len_k), backend="reference",
        ),
        packed, rtol=0, atol=0,
    )  # fmt: skip


@pytest.mark.parametrize("num_prefix", [1, 3])
def test_per_sequence_prefix_equals_each_sequence_alone(num_prefix):
    q, k, v, prefix_k, prefix_v, gate = cpu_inputs(
        batch=3, seqlen_q=4, seqlen_k=6, num_tokens=num_prefix, per_sequence=True
    )
    out = aligner_attention_reference(q, k, v, prefix_k, prefix_v, gate)
    for b in range(3):
        alone = aligner_attention_reference(
            q[b : b + 1], k[b : b + 1], v[b : b + 1], prefix_k[b], prefix_v[b], gate
        )
        torch.testing.assert_close(out[b : b + 1], alone, rtol=0, atol=0)
    # A per-sequence prefix that repeats one shared prefix == that shared prefix.
    shared = aligner_attention_reference(q, k, v, prefix_k[0], prefix_v[0], gate)
    repeated = aligner_attention_reference(
        q, k, v, prefix_k[:1].expand(3, -1, -1, -1), prefix_v[:1].expand(3, -1, -1, -1), gate
    )
    torch.testing.assert_close(repeated, shared, rtol=0, atol=0)


def test_batched_equals_packed_of_equal_lengths():
    inputs = cpu_inputs(batch=3, seqlen_q=4, seqlen_k=6, num_tokens=3)
    q, k, v, prefix_k, prefix_v, gate = inputs
    batched = aligner_attention_reference(*inputs)
    packed = aligner_attention_reference(
        *pack(q, k, v),
        prefix_k,
        prefix_v,
        gate,
        cu_seqlens_q=cu_seqlens([4] * 3),
        cu_seqlens_k=cu_seqlens([6] * 3),
    )
    torch.testing.assert_close(packed.view_as(batched), batched, rtol=0, atol=0)


# --- decoding ------------------------------------------------------------------------------


@pytest.mark.parametrize("group", GROUPS.keys())
@pytest.mark.parametrize("num_prefix", [1, 5])
def test_decoding_matches_full_recompute(group, num_prefix):
    heads, kv_heads = GROUPS[group]
    length = 9
    q, k, v, prefix_k, prefix_v, gate = cpu_inputs(
        seqlen_q=length, heads=heads, kv_heads=kv_heads, num_tokens=num_prefix, seed=7
    )
    full = aligner_attention_reference(q, k, v, prefix_k, prefix_v, gate)
    for t in range(length):  # one new token attends to the KV cache [0, t]
        step = aligner_attention_reference(
            q[:, t : t + 1], k[:, : t + 1], v[:, : t + 1], prefix_k, prefix_v, gate
        )
        torch.testing.assert_close(step[:, 0], full[:, t], **F32)
    # A chunk of 3 new queries on a cache of 7 == rows 4..6 of the full recompute.
    chunk = aligner_attention_reference(q[:, 4:7], k[:, :7], v[:, :7], prefix_k, prefix_v, gate)
    torch.testing.assert_close(chunk, full[:, 4:7], **F32)


def test_decoding_packed_varlen():
    """Packed decoding: one query per sequence against caches of different lengths."""
    heads, kv_heads, head_dim = 4, 2, 8
    cache = [3, 7, 5]
    q, k, v, prefix_k, prefix_v, gate = cpu_inputs(
        batch=1, seqlen_q=len(cache), seqlen_k=sum(cache), heads=heads, kv_heads=kv_heads, head_dim=head_dim,
        num_tokens=3, seed=8,
    )  # fmt: skip
    q, k, v = q[0], k[0], v[0]
    cu_k = cu_seqlens(cache)
    out = aligner_attention_reference(
        q, k, v, prefix_k, prefix_v, gate, cu_seqlens_q=cu_seqlens([1] * 3), cu_seqlens_k=cu_k
    )
    for b in range(3):
        ks, vs = k[cu_k[b] : cu_k[b + 1]], v[cu_k[b] : cu_k[b + 1]]
        # The last query of a full causal recompute sees the whole cache: non-causal for one query.
        want = unfused(q[None, b : b + 1], ks[None], vs[None], prefix_k, prefix_v, gate, causal=False)[0, 0]
        torch.testing.assert_close(out[b], want, **F32)


# --- property test -------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(
    batch=st.integers(1, 3),
    len_q=st.integers(1, 9),
    extra_k=st.integers(0, 5),
    kv_heads=st.integers(1, 3),
    group=st.integers(1, 3),
    head_dim=st.sampled_from([1, 4, 8, 16]),
    num_prefix=st.integers(1, 20),
    causal=st.booleans(),
    per_sequence=st.booleans(),
    softmax_scale=st.one_of(st.none(), st.floats(0.01, 2.0)),
    seed=st.integers(0, 2**16),
)
def test_property_matches_unfused(
    batch, len_q, extra_k, kv_heads, group, head_dim, num_prefix, causal, per_sequence, softmax_scale, seed
):
    inputs = cpu_inputs(
        batch=batch, seqlen_q=len_q, seqlen_k=len_q + extra_k, heads=kv_heads * group, kv_heads=kv_heads,
        head_dim=head_dim, num_tokens=num_prefix, per_sequence=per_sequence, seed=seed,
    )  # fmt: skip
    out = aligner_attention(*inputs, causal=causal, softmax_scale=softmax_scale, backend="reference")
    torch.testing.assert_close(out, unfused(*inputs, causal=causal, softmax_scale=softmax_scale), **F32)
