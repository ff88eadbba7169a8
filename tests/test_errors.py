"""Bad input to :func:`aligner.aligner_attention` gives a clear error naming the argument; odd but
valid input (non-contiguous views, an fp32 gate with half-precision q) just works.

The Triton cases run under the Triton interpreter on CPU, on tiny shapes; on a GPU machine
(``ALIGNER_TEST_DEVICE=cuda``) ``call`` and the non-contiguous cases move their inputs to the GPU
with their strides kept, so the compiled kernels read the same strided views.
"""

from __future__ import annotations

import pytest
import torch
from attention_cases import DEVICE, make_inputs

from aligner import aligner_attention

B, L, H, H_KV, D, N = 2, 5, 4, 2, 16, 3
ARGUMENTS = ("q", "k", "v", "prefix_k", "prefix_v", "gate")


def batched(batch=B, len_q=L, len_k=L, heads=H, kv_heads=H_KV, head_dim=D, num_prefix=N, dtype=torch.float32):
    """CPU inputs without gradients (attention_cases.make_inputs), by argument name."""
    inputs, _ = make_inputs(
        batch=batch, seqlen_q=len_q, seqlen_k=len_k, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
        num_tokens=num_prefix, dtype=dtype, device="cpu", requires_grad=False,
    )  # fmt: skip
    return dict(zip(ARGUMENTS, inputs))


def cu(*values):
    return torch.tensor(values, dtype=torch.int32)


def packed(len_q=(3, 4), len_k=(3, 5)):
    """Packed CPU inputs and their cu_seqlens, by argument name."""
    inputs, varlen = make_inputs(
        seqlens=list(zip(len_q, len_k)), heads=H, kv_heads=H_KV, head_dim=D, num_tokens=N, device="cpu",
        requires_grad=False,
    )  # fmt: skip
    return {**dict(zip(ARGUMENTS, inputs)), **varlen}


def _to_test_device(x):
    """x on DEVICE with the same strides (a non-contiguous view stays non-contiguous)."""
    if not isinstance(x, torch.Tensor) or x.device == DEVICE or x.device.type == "meta":
        return x
    return torch.empty_strided(x.size(), x.stride(), dtype=x.dtype, device=DEVICE).copy_(x)


def call(args, **overrides):
    kwargs = {"backend": "reference", **args, **overrides}
    on_gpu = kwargs["backend"] == "fused" and DEVICE.type == "cuda"
    if on_gpu:
        kwargs = {name: _to_test_device(x) for name, x in kwargs.items()}
    positional = [kwargs.pop(name) for name in ("q", "k", "v", "prefix_k", "prefix_v", "gate")]
    out = aligner_attention(*positional, **kwargs)
    return out.cpu() if on_gpu else out


# Strided and contiguous copies of the same values: the Triton kernels read them through strides
# and give identical bits; PyTorch's CPU SDPA (inside the reference) picks different code paths
# by layout, which moves the last bit of fp32 (seen: 4.8e-7).
SAME_VALUES = {"fused": dict(rtol=0, atol=0), "reference": dict(rtol=1e-6, atol=1e-6)}


def test_valid_inputs_work():
    """The bases every error case below starts from are themselves valid."""
    assert call(batched()).shape == (B, L, H, D)
    assert call(packed()).shape == (7, H, D)
    assert call(batched(len_q=2, len_k=5)).shape == (B, 2, H, D)


def _per_sequence_prefix(batch):
    return {"prefix_k": torch.randn(batch, N, H_KV, D), "prefix_v": torch.randn(batch, N, H_KV, D)}


def case(name, base, overrides, error, match):
    return pytest.param(base, overrides, error, match, id=name)


# (base builder, overrides, exception type, regex the message must match)
BAD_INPUTS = [
    # ranks
    case(
        "q rank 3 without cu_seqlens",
        batched,
        {"q": torch.randn(L, H, D)},
        ValueError,
        r"q must have shape \(batch",
    ),
    case("k rank 3", batched, {"k": torch.randn(L, H_KV, D)}, ValueError, r"k must have shape \(batch"),
    case(
        "v rank 5", batched, {"v": torch.randn(1, B, L, H_KV, D)}, ValueError, r"(v must have shape|k and v)"
    ),
    case(
        "q rank 4 when packed",
        packed,
        {"q": torch.randn(1, 7, H, D)},
        ValueError,
        r"q must have shape \(total",
    ),
    case(
        "k rank 4 when packed",
        packed,
        {"k": torch.randn(1, 8, H_KV, D)},
        ValueError,
        r"k must have shape \(total",
    ),
    # shapes
    case("k/v shape mismatch", batched, {"v": torch.randn(B, L + 1, H_KV, D)}, ValueError, r"k and v"),
    case("k/v heads mismatch", batched, {"v": torch.randn(B, L, H_KV * 2, D)}, ValueError, r"k and v"),
    case(
        "k head_dim mismatch",
        batched,
        {"k": torch.randn(B, L, H_KV, 8), "v": torch.randn(B, L, H_KV, 8)},
        ValueError,
        r"head_dim",
    ),
    case(
        "heads not divisible",
        batched,
        {"k": torch.randn(B, L, 3, D), "v": torch.randn(B, L, 3, D)},
        ValueError,
        r"divisible",
    ),
    case(
        "q/k batch mismatch",
        batched,
        {"k": torch.randn(B + 1, L, H_KV, D), "v": torch.randn(B + 1, L, H_KV, D)},
        ValueError,
        r"batch",
    ),
    case(
        "causal with L_q > L_k",
        batched,
        {"q": torch.randn(B, L + 2, H, D)},
        ValueError,
        r"seqlen_q <= seqlen_k",
    ),
    # prefix
    case(
        "N = 0 prefix",
        batched,
        {"prefix_k": torch.randn(0, H_KV, D), "prefix_v": torch.randn(0, H_KV, D)},
        ValueError,
        r"prefix_k needs at least one token",
    ),
    case(
        "N = 0 per-sequence prefix",
        batched,
        {"prefix_k": torch.randn(B, 0, H_KV, D), "prefix_v": torch.randn(B, 0, H_KV, D)},
        ValueError,
        r"prefix_k needs at least one token",
    ),
    case(
        "prefix with q's heads instead of k's",
        batched,
        {"prefix_k": torch.randn(N, H, D), "prefix_v": torch.randn(N, H, D)},
        ValueError,
        r"prefix_k must end in \(kv_heads, head_dim\) = \(2, 16\)",
    ),
    case(
        "prefix with wrong head_dim",
        batched,
        {"prefix_k": torch.randn(N, H_KV, 8), "prefix_v": torch.randn(N, H_KV, 8)},
        ValueError,
        r"prefix_k must end in \(kv_heads, head_dim\)",
    ),
    case(
        "prefix rank 2",
        batched,
        {"prefix_k": torch.randn(H_KV, D), "prefix_v": torch.randn(H_KV, D)},
        ValueError,
        r"prefix_k must have shape",
    ),
    case(
        "prefix rank 5",
        batched,
        {"prefix_k": torch.randn(1, B, N, H_KV, D), "prefix_v": torch.randn(1, B, N, H_KV, D)},
        ValueError,
        r"prefix_k must have shape",
    ),
    case(
        "prefix_v shape differs from prefix_k",
        batched,
        {"prefix_v": torch.randn(N + 1, H_KV, D)},
        ValueError,
        r"prefix_v must have the shape of prefix_k",
    ),
    case(
        "per-sequence prefix with wrong batch",
        batched,
        _per_sequence_prefix(B + 1),
        ValueError,
        r"per-sequence prefix_k has batch 3, expected 2",
    ),
    case(
        "per-sequence prefix with wrong batch, packed",
        packed,
        _per_sequence_prefix(3),
        ValueError,
        r"per-sequence prefix_k has batch 3, expected 2",
    ),
    # gate
    case(
        "gate of kv heads",
        batched,
        {"gate": torch.zeros(H_KV)},
        ValueError,
        r"gate must have shape \(heads,\)",
    ),
    case(
        "gate shaped like the paper's (1, H, 1, 1)",
        batched,
        {"gate": torch.zeros(1, H, 1, 1)},
        ValueError,
        r"gate must have shape \(heads,\) = \(4,\)",
    ),
    case("scalar gate", batched, {"gate": torch.tensor(0.0)}, ValueError, r"gate must have shape"),
    case(
        "per-sequence gate with wrong batch",
        batched,
        {"gate": torch.zeros(B + 1, H)},
        ValueError,
        r"gate must have shape \(heads,\) = \(4,\) .* or \(batch, heads\) = \(2, 4\)",
    ),
    case(
        "per-sequence gate of kv heads",
        batched,
        {"gate": torch.zeros(B, H_KV)},
        ValueError,
        r"gate must have shape .*\(batch, heads\) = \(2, 4\)",
    ),
    case(
        "per-sequence gate with wrong batch, packed",
        packed,
        {"gate": torch.zeros(3, H)},
        ValueError,
        r"\(batch, heads\) = \(2, 4\) one row per sequence, got \(3, 4\)",
    ),
    case(
        "integer gate",
        batched,
        {"gate": torch.zeros(H, dtype=torch.int64)},
        ValueError,
        r"gate must be a floating",
    ),
    # types and dtypes
    case("q not a tensor", batched, {"q": [[0.0]]}, TypeError, r"q must be a torch.Tensor"),
    case(
        "prefix_v not a tensor", batched, {"prefix_v": [[0.0]]}, TypeError, r"prefix_v must be a torch.Tensor"
    ),
    case(
        "prefix_v missing",
        batched,
        {"prefix_v": None},
        ValueError,
        r"prefix_v is None but prefix_k, gate given",
    ),
    case(
        "integer q",
        batched,
        {"q": torch.zeros(B, L, H, D, dtype=torch.int64)},
        ValueError,
        r"q must be a floating",
    ),
    case(
        "k float16 with q float32",
        batched,
        {"k": torch.randn(B, L, H_KV, D, dtype=torch.float16)},
        ValueError,
        r"k has dtype torch.float16 but q has torch.float32",
    ),
    case(
        "v bfloat16 with q float32",
        batched,
        {"v": torch.randn(B, L, H_KV, D, dtype=torch.bfloat16)},
        ValueError,
        r"v has dtype torch.bfloat16",
    ),
    case(
        "prefix_k float64 with q float32",
        batched,
        {"prefix_k": torch.randn(N, H_KV, D, dtype=torch.float64)},
        ValueError,
        r"prefix_k has dtype",
    ),
    case(
        "prefix_v float16 with q float32",
        batched,
        {"prefix_v": torch.randn(N, H_KV, D, dtype=torch.float16)},
        ValueError,
        r"prefix_v has dtype",
    ),
    # devices (the meta device stands in for a GPU)
    case(
        "k on another device",
        batched,
        {"k": torch.randn(B, L, H_KV, D, device="meta")},
        ValueError,
        r"k is on meta but q is on cpu",
    ),
    case(
        "prefix_v on another device",
        batched,
        {"prefix_v": torch.randn(N, H_KV, D, device="meta")},
        ValueError,
        r"prefix_v is on meta",
    ),
    case(
        "gate on another device",
        batched,
        {"gate": torch.zeros(H, device="meta")},
        ValueError,
        r"gate is on meta",
    ),
    case(
        "cu_seqlens_k on another device",
        packed,
        {"cu_seqlens_k": torch.tensor([0, 3, 8], dtype=torch.int32, device="meta")},
        ValueError,
        r"cu_seqlens_k is on meta but q is on cpu",
    ),
    # cu_seqlens
    case(
        "int64 cu_seqlens_q",
        packed,
        {"cu_seqlens_q": torch.tensor([0, 3, 7])},
        ValueError,
        r"cu_seqlens_q must be torch.int32",
    ),
    case(
        "float cu_seqlens_k",
        packed,
        {"cu_seqlens_k": torch.tensor([0.0, 3.0, 8.0])},
        ValueError,
        r"cu_seqlens_k must be torch.int32",
    ),
    case(
        "cu_seqlens_q not starting at 0",
        packed,
        {"cu_seqlens_q": cu(1, 3, 7)},
        ValueError,
        r"cu_seqlens_q must start at 0",
    ),
    case(
        "cu_seqlens_k decreasing",
        packed,
        {"cu_seqlens_k": cu(0, 6, 3, 8), "cu_seqlens_q": cu(0, 3, 3, 7)},
        ValueError,
        r"cu_seqlens_k must be non-decreasing",
    ),
    case(
        "cu_seqlens_q not ending at total",
        packed,
        {"cu_seqlens_q": cu(0, 3, 6)},
        ValueError,
        r"cu_seqlens_q must end at the number of packed tokens 7",
    ),
    case(
        "cu_seqlens_k past the end",
        packed,
        {"cu_seqlens_k": cu(0, 3, 9)},
        ValueError,
        r"cu_seqlens_k must end at the number of packed tokens 8",
    ),
    case(
        "cu_seqlens of different lengths",
        packed,
        {"cu_seqlens_k": cu(0, 3, 5, 8)},
        ValueError,
        r"cu_seqlens_q and cu_seqlens_k must have the same length",
    ),
    case(
        "2-D cu_seqlens", packed, {"cu_seqlens_q": cu(0, 3, 7)[None]}, ValueError, r"cu_seqlens_q must be 1-D"
    ),
    case(
        "cu_seqlens of one entry",
        packed,
        {"cu_seqlens_q": cu(7), "cu_seqlens_k": cu(8)},
        ValueError,
        r"cu_seqlens_q must be 1-D",
    ),
    case(
        "max_seqlen_q too small",
        packed,
        {"max_seqlen_q": 3},
        ValueError,
        r"max_seqlen_q=3 is shorter than the longest sequence in cu_seqlens_q",
    ),
    case("max_seqlen_k too small", packed, {"max_seqlen_k": 4}, ValueError, r"max_seqlen_k=4 is shorter"),
    case(
        "only cu_seqlens_q",
        packed,
        {"cu_seqlens_k": None},
        ValueError,
        r"packed inputs need both cu_seqlens_q and cu_seqlens_k",
    ),
    case(
        "only cu_seqlens_k",
        packed,
        {"cu_seqlens_q": None},
        ValueError,
        r"packed inputs need both cu_seqlens_q and cu_seqlens_k",
    ),
    case(
        "cu_seqlens with batched 4-D tensors",
        batched,
        {"cu_seqlens_q": cu(0, 5, 10), "cu_seqlens_k": cu(0, 5, 10)},
        ValueError,
        r"q must have shape \(total",
    ),
    # options
    case(
        "negative softmax_scale",
        batched,
        {"softmax_scale": -0.5},
        ValueError,
        r"softmax_scale must be a positive",
    ),
    case(
        "zero softmax_scale", batched, {"softmax_scale": 0.0}, ValueError, r"softmax_scale must be a positive"
    ),
    case(
        "NaN softmax_scale",
        batched,
        {"softmax_scale": float("nan")},
        ValueError,
        r"softmax_scale must be a positive",
    ),
    case("unknown backend", batched, {"backend": "cuda"}, ValueError, r"backend must be one of .*got 'cuda'"),
    case("backend with wrong case", batched, {"backend": "Triton"}, ValueError, r"backend must be one of"),
]


@pytest.mark.parametrize("base, overrides, error, match", BAD_INPUTS)
def test_bad_input_names_the_argument(base, overrides, error, match):
    with pytest.raises(error, match=match):
        call(base(), **overrides)


@pytest.mark.parametrize("backend", ["reference", "fused"])
def test_per_sequence_gate_is_accepted(backend):
    """A (batch, heads) gate: one row per sequence, padded and packed; dgate has the gate's shape."""
    for base in (batched, packed):
        args = base()
        args["gate"] = torch.randn(B, H, generator=torch.Generator().manual_seed(5)).requires_grad_()
        if backend == "fused":
            args = {name: _to_test_device(x) for name, x in args.items()}
            args["gate"] = args["gate"].detach().requires_grad_()
        out = call(args, backend=backend)
        assert out.shape == args["q"].shape
        (dgate,) = torch.autograd.grad(out.sum(), args["gate"])
        assert dgate.shape == (B, H)


def test_causal_false_allows_l_q_greater_than_l_k():
    assert call(batched(len_q=L + 2), causal=False).shape == (B, L + 2, H, D)


def test_unknown_backend_from_environment(monkeypatch):
    monkeypatch.setenv("ALIGNER_BACKEND", "fast")
    args = batched()
    with pytest.raises(ValueError, match=r"backend must be one of .*got 'fast'"):
        call(args, backend=None)


def test_checks_run_before_any_kernel_for_fused():
    """A shape error is reported as such under backend='fused' too, not as a kernel failure."""
    with pytest.raises(ValueError, match=r"k and v"):
        call(batched(head_dim=32), v=torch.randn(B, L + 1, H_KV, 32), backend="fused")


# --- backend='fused': unsupported configurations ------------------------------------------


def test_fused_unsupported_head_dim():
    with pytest.raises(ValueError, match=r"backend='fused'.*head_dim 48"):
        call(batched(head_dim=48), backend="fused")


def test_fused_float64():
    with pytest.raises(ValueError, match=r"backend='fused'.*float64"):
        call(batched(head_dim=32, dtype=torch.float64), backend="fused")


def test_auto_backend_on_cpu_uses_reference_for_any_head_dim():
    args = batched(head_dim=48, dtype=torch.float64)
    torch.testing.assert_close(call(args, backend="auto"), call(args), rtol=0, atol=0)


# --- non-contiguous inputs just work -------------------------------------------------------


def _noncontiguous_batched(batch, length, heads, kv_heads, head_dim, num_prefix, per_sequence):
    """Inputs made as transposed views, plus contiguous copies of them."""
    gen = torch.Generator().manual_seed(1)

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    q = randn(batch, heads, length, head_dim).transpose(1, 2)
    k = randn(batch, kv_heads, length, head_dim).transpose(1, 2)
    # v: a slice of a wider head_dim (last dim contiguous, other strides odd)
    v = randn(batch, length, kv_heads, 2 * head_dim)[..., head_dim:]
    if per_sequence:
        prefix_k = randn(batch, kv_heads, num_prefix, head_dim).transpose(1, 2)
        prefix_v = randn(num_prefix, batch, kv_heads, head_dim).transpose(0, 1)
    else:
        prefix_k = randn(kv_heads, num_prefix, head_dim).transpose(0, 1)
        prefix_v = randn(head_dim, num_prefix, kv_heads).permute(1, 2, 0)  # last dim strided
    gate = randn(heads)
    views = (q, k, v, prefix_k, prefix_v, gate)
    assert not any(x.is_contiguous() for x in views[:3])  # (a 1-token prefix view may be contiguous)
    return views, tuple(x.contiguous() for x in views)


def _noncontiguous_packed(len_q, len_k, heads, kv_heads, head_dim, num_prefix):
    gen = torch.Generator().manual_seed(2)

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    q = randn(heads, sum(len_q), head_dim).transpose(0, 1)
    k = randn(kv_heads, sum(len_k), head_dim).transpose(0, 1)
    v = randn(sum(len_k), kv_heads, head_dim, 2)[..., 1]  # last dim strided
    prefix_k = randn(kv_heads, num_prefix, head_dim).transpose(0, 1)
    prefix_v = randn(num_prefix, head_dim, kv_heads).transpose(1, 2)
    views = (q, k, v, prefix_k, prefix_v, randn(heads))
    assert not any(x.is_contiguous() for x in views[:3])  # (a 1-token prefix view may be contiguous)
    return views, tuple(x.contiguous() for x in views)


def _cu(lengths):
    return cu(0, *torch.tensor(lengths).cumsum(0).tolist())


def _for_backend(tensors, backend):
    """The Triton cases run on the test device (strides kept); the reference stays on the CPU."""
    return tuple(_to_test_device(x) for x in tensors) if backend == "fused" else tensors


@pytest.mark.parametrize("backend", ["reference", "fused"])
@pytest.mark.parametrize("num_prefix", [1, 3])
@pytest.mark.parametrize("per_sequence", [False, True], ids=["shared", "per_seq"])
def test_noncontiguous_batched(backend, num_prefix, per_sequence):
    views, contiguous = _noncontiguous_batched(2, 20, 4, 2, 32, num_prefix, per_sequence)
    out = aligner_attention(*_for_backend(views, backend), backend=backend).cpu()
    want = aligner_attention(*_for_backend(contiguous, backend), backend=backend).cpu()
    assert out.shape == views[0].shape
    torch.testing.assert_close(out, want, **SAME_VALUES[backend])
    if backend == "fused":  # and it agrees with the reference
        torch.testing.assert_close(
            out, aligner_attention(*contiguous, backend="reference"), rtol=1e-5, atol=1e-5
        )


@pytest.mark.parametrize("backend", ["reference", "fused"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_noncontiguous_packed(backend, causal):
    len_q, len_k = [5, 17, 1], [9, 17, 6]
    views, contiguous = _noncontiguous_packed(len_q, len_k, 4, 2, 64, 3)
    cu_seqlens = dict(zip(("cu_seqlens_q", "cu_seqlens_k"), _for_backend((_cu(len_q), _cu(len_k)), backend)))
    kwargs = {"causal": causal, **cu_seqlens, "backend": backend}
    out = aligner_attention(*_for_backend(views, backend), **kwargs).cpu()
    want = aligner_attention(*_for_backend(contiguous, backend), **kwargs).cpu()
    torch.testing.assert_close(out, want, **SAME_VALUES[backend])
    if backend == "fused":
        ref = aligner_attention(
            *contiguous, causal=causal, cu_seqlens_q=_cu(len_q), cu_seqlens_k=_cu(len_k), backend="reference"
        )
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_noncontiguous_fused_backward():
    """Gradients through the Triton backend with transposed inputs match the reference's."""
    views, _ = _noncontiguous_batched(2, 20, 4, 2, 32, 3, per_sequence=False)
    grads = {}
    # a non-contiguous upstream gradient as well
    dout = torch.randn(2, 4, 20, 32, generator=torch.Generator().manual_seed(3)).transpose(1, 2)
    for backend in ("fused", "reference"):
        leaves = tuple(x.detach().requires_grad_() for x in _for_backend(views, backend))
        out = aligner_attention(*leaves, backend=backend)
        grads[backend] = torch.autograd.grad(out, leaves, *_for_backend((dout,), backend))
    for got, want in zip(grads["fused"], grads["reference"]):
        torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ["reference", "fused"])
def test_noncontiguous_gate(backend):
    """A gate that is a strided view (e.g. one column of a table of per-layer gates)."""
    args = batched(head_dim=32, num_prefix=3)
    table = torch.randn(H, 3)
    table[:, 1] = args["gate"]
    gate_view = table[:, 1]
    assert not gate_view.is_contiguous()
    want = call(args, backend=backend)
    torch.testing.assert_close(call(args, gate=gate_view, backend=backend), want, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["reference", "fused"])
def test_noncontiguous_cu_seqlens(backend):
    args = packed(len_q=(3, 4), len_k=(3, 5))
    args = {name: (x.contiguous() if name in ("q", "k", "v") else x) for name, x in args.items()}
    for name in ("q", "k", "v", "prefix_k", "prefix_v"):
        args[name] = torch.nn.functional.pad(args[name], (0, 32 - D))  # head_dim 32 for Triton
    strided = {}
    for name in ("cu_seqlens_q", "cu_seqlens_k"):
        # Gaps repeat the previous boundary, so that a kernel reading it as contiguous stays in bounds.
        wide = args[name].repeat_interleave(2)[1:]
        strided[name] = wide[::2]
        assert not strided[name].is_contiguous()
    want = call(args, backend=backend)
    torch.testing.assert_close(call(args, **strided, backend=backend), want, rtol=0, atol=0)


# --- an fp32 gate with half-precision q ----------------------------------------------------


@pytest.mark.parametrize("num_prefix", [1, 3])
def test_float32_gate_with_float16_q_fused(num_prefix):
    args = batched(len_q=20, len_k=20, head_dim=32, num_prefix=num_prefix, dtype=torch.float16)
    assert args["gate"].dtype == torch.float32
    out = call(args, backend="fused")
    assert out.dtype == torch.float16 and out.shape == args["q"].shape
    ref = call(args, backend="reference")  # float32 math on the same fp16 inputs
    assert ref.dtype == torch.float16
    torch.testing.assert_close(out, ref, rtol=2e-3, atol=2e-3)


# --- argument types, non-finite scales and empty inputs -----------------------------------


def test_cu_seqlens_as_list_names_the_argument():
    args = packed()
    with pytest.raises(TypeError, match=r"cu_seqlens_q"):
        call(args, cu_seqlens_q=[0, 3, 7], cu_seqlens_k=[0, 3, 8])


def test_non_numeric_softmax_scale_names_the_argument():
    with pytest.raises(ValueError, match=r"softmax_scale"):
        call(batched(), softmax_scale="0.5")


def test_infinite_softmax_scale_is_rejected():
    with pytest.raises(ValueError, match=r"softmax_scale"):
        call(batched(), softmax_scale=float("inf"))


@pytest.mark.parametrize("backend", ["reference", "fused"])
def test_empty_batch_is_rejected(backend):
    with pytest.raises(ValueError, match=r"batch >= 1 and seqlen >= 1"):
        call(batched(batch=0, head_dim=32), backend=backend)


@pytest.mark.parametrize("backend", ["reference", "fused"])
def test_empty_sequences_are_rejected(backend):
    with pytest.raises(ValueError, match=r"batch >= 1 and seqlen >= 1"):
        call(batched(len_q=0, len_k=0, head_dim=32), backend=backend)
