"""Attention kernels side by side: forward, backward and forward+backward time, TFLOP/s, peak memory.

TFLOP/s count only the main attention (4·B·H·L_q·L_k·D for the forward, halved when causal;
the backward 2.5x that), the same formula for every method, so a prefix shows up as lost
throughput. Methods (each where it runs):

- ``fused``: this project's fused kernels (N = 0 is their plain flash attention);
- ``split``: SDPA (or flash-attn) for the main attention plus this project's prefix kernels;
- ``auto``: ``aligner_attention``'s default, the faster of the two as measured on first use
  (the ``chose`` column; on CPU auto is the PyTorch reference);
- ``sdpa-flash`` / ``sdpa-efficient`` / ``sdpa-cudnn``: PyTorch SDPA without a prefix, one backend
  each: the ceiling to meet;
- ``unfused``: what the paper's code and LLaMA-Adapter do: SDPA over the sequence, a second SDPA
  over the prefix, gated add;
- ``peft-eager``: SDPA over the sequence plus PEFT AdaptionPrompt's eager prefix math (matmul,
  fp32 softmax, matmul);
- ``flex``: FlexAttention (compiled, causal block mask), ``flash-attn``: the flash-attn package
  when importable; both without a prefix.

    python benchmarks/bench_attention.py --seqlens 2048 8192 --head-dims 128 --num-tokens 0 1 10
"""

from __future__ import annotations

import argparse
import itertools
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from aligner import aligner_attention, backend_choice

try:  # make `python benchmarks/bench_attention.py` and `import benchmarks.bench_attention` both work
    from .common import benchmark_parser, median_ms, peak_memory_mb, run_and_record
except ImportError:
    from common import benchmark_parser, median_ms, peak_memory_mb, run_and_record


@dataclass(frozen=True)
class Shape:
    batch: int
    seqlen: int
    heads: int
    kv_heads: int
    head_dim: int
    num_tokens: int
    causal: bool = True

    def main_attention_flops(self) -> float:
        """Forward FLOPs of the main attention (two matmuls), causal counted as half."""
        return 4 * self.batch * self.heads * self.seqlen**2 * self.head_dim * (0.5 if self.causal else 1.0)


class Unsupported(Exception):
    """The method cannot run this shape on this machine (no prefix support, package missing...)."""


def make_inputs(shape: Shape, dtype: torch.dtype, device: torch.device) -> dict:
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(*size, scale=1.0):
        return (scale * torch.randn(*size, generator=gen)).to(device, dtype).requires_grad_()

    b, length, h, hk, d, n = (
        shape.batch,
        shape.seqlen,
        shape.heads,
        shape.kv_heads,
        shape.head_dim,
        shape.num_tokens,
    )
    inputs = {"q": rand(b, length, h, d), "k": rand(b, length, hk, d), "v": rand(b, length, hk, d)}
    if n:
        inputs.update(prefix_k=rand(n, hk, d), prefix_v=rand(n, hk, d))
        inputs["gate"] = (0.1 * torch.randn(h, generator=gen)).to(device).requires_grad_()
    return inputs


def _heads_first(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2)


def _prefix_heads_first(prefix: torch.Tensor, batch: int) -> torch.Tensor:  # (N, Hk, D) -> (B, Hk, N, D)
    return prefix.transpose(0, 1).unsqueeze(0).expand(batch, -1, -1, -1)


def _sdpa(backend_name: str | None):
    def run(inputs: dict, shape: Shape) -> torch.Tensor:
        if shape.num_tokens:
            raise Unsupported("no prefix")
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, backend_name)
        with sdpa_kernel(backend):
            q, k, v = (_heads_first(inputs[name]) for name in "qkv")
            return F.scaled_dot_product_attention(q, k, v, is_causal=shape.causal, enable_gqa=True)

    return run


def _aligner(backend: str):
    def run(inputs: dict, shape: Shape) -> torch.Tensor:
        prefix = [inputs[name] for name in ("prefix_k", "prefix_v", "gate")] if shape.num_tokens else []
        return aligner_attention(
            inputs["q"], inputs["k"], inputs["v"], *prefix, causal=shape.causal, backend=backend
        )

    return run


def _auto_choice(inputs: dict, shape: Shape, needs_grad: bool) -> str | None:
    """What auto runs for these inputs: the measured choice (None where auto does not measure)."""
    if not inputs["q"].is_cuda:
        return "reference"
    key = backend_choice.choice_key(
        inputs["q"], inputs["k"], inputs.get("prefix_k"), causal=shape.causal, packed=False,
        max_seqlen_q=shape.seqlen, max_seqlen_k=shape.seqlen, needs_grad=needs_grad,
    )  # fmt: skip
    timings = backend_choice.default_chooser().timings().get(key)
    if timings is None:
        return None
    return min(backend_choice.allowed_backends(needs_grad), key=timings.__getitem__)


def _unfused(inputs: dict, shape: Shape, eager_prefix: bool = False) -> torch.Tensor:
    if not shape.num_tokens:
        raise Unsupported("prefix methods need N >= 1")
    q, k, v = (_heads_first(inputs[name]) for name in "qkv")
    out = F.scaled_dot_product_attention(q, k, v, is_causal=shape.causal, enable_gqa=True)
    group = shape.heads // shape.kv_heads
    pk, pv = (
        _prefix_heads_first(inputs[name], shape.batch).repeat_interleave(group, 1)
        for name in ("prefix_k", "prefix_v")
    )
    if eager_prefix:  # PEFT AdaptionPrompt: matmul, softmax in fp32, matmul
        scores = (q @ pk.transpose(-1, -2)) / math.sqrt(shape.head_dim)
        prefix_out = scores.float().softmax(-1).to(q.dtype) @ pv
    else:
        prefix_out = F.scaled_dot_product_attention(q, pk, pv)
    return out + inputs["gate"].to(q.dtype)[None, :, None, None] * prefix_out


def _flex(inputs: dict, shape: Shape) -> torch.Tensor:
    if shape.num_tokens:
        raise Unsupported("no prefix")
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    compiled = _flex.__dict__.setdefault("compiled", torch.compile(flex_attention))
    q, k, v = (_heads_first(inputs[name]) for name in "qkv")
    block_mask = None
    if shape.causal:
        block_mask = create_block_mask(
            lambda b, h, i, j: j <= i, None, None, shape.seqlen, shape.seqlen, device=q.device
        )
    return compiled(q, k, v, block_mask=block_mask, enable_gqa=True)


def _flash_attn(inputs: dict, shape: Shape) -> torch.Tensor:
    if shape.num_tokens:
        raise Unsupported("no prefix")
    try:
        from flash_attn import flash_attn_func
    except ImportError as error:
        raise Unsupported("flash-attn is not installed") from error
    return flash_attn_func(inputs["q"], inputs["k"], inputs["v"], causal=shape.causal)


METHODS = {
    "fused": _aligner("fused"),
    "split": _aligner("split"),
    "auto": _aligner("auto"),
    "sdpa-flash": _sdpa("FLASH_ATTENTION"),
    "sdpa-efficient": _sdpa("EFFICIENT_ATTENTION"),
    "sdpa-cudnn": _sdpa("CUDNN_ATTENTION"),
    "unfused": _unfused,
    "peft-eager": lambda inputs, shape: _unfused(inputs, shape, eager_prefix=True),
    "flex": _flex,
    "flash-attn": _flash_attn,
}


def measure(method: str, shape: Shape, dtype: torch.dtype, device: torch.device) -> dict:
    """One row: times (ms), TFLOP/s of forward+backward and peak memory (MiB) of forward+backward."""
    row = {"method": method, **asdict(shape), "dtype": str(dtype).removeprefix("torch.")}
    run = METHODS[method]
    inputs = make_inputs(shape, dtype, device)
    leaves = list(inputs.values())
    try:
        out = run(inputs, shape)  # also compiles / autotunes
    except Unsupported as reason:
        return {**row, "skipped": str(reason)}
    except RuntimeError as error:  # an SDPA backend that refuses this shape or dtype; out of memory
        return {**row, "skipped": str(error).splitlines()[0][:120]}
    dout = torch.randn_like(out)

    def forward():
        with torch.no_grad():
            run(inputs, shape)

    def forward_backward():
        torch.autograd.grad(run(inputs, shape), leaves, dout)

    forward()  # warm both modes: autotuning, auto's one-time measurement per key
    forward_backward()
    chose = {}
    if method == "auto":
        chose = {
            f"chose_{mode}": _auto_choice(inputs, shape, mode == "fwd_bwd") for mode in ("fwd", "fwd_bwd")
        }
    fwd_ms = median_ms(forward, device)
    fwd_bwd_ms = median_ms(forward_backward, device)
    flops = shape.main_attention_flops() * 3.5  # forward + backward (2.5x)
    return {
        **row,
        **chose,
        "fwd_ms": fwd_ms,
        "bwd_ms": fwd_bwd_ms - fwd_ms,
        "fwd_bwd_ms": fwd_bwd_ms,
        "tflops": flops / (fwd_bwd_ms * 1e-3) / 1e12,
        "peak_mib": peak_memory_mb(forward_backward, device),
    }


def shapes(tokens: int, seqlens, heads: int, kv_heads_list, head_dims, num_tokens_list) -> list[Shape]:
    return [
        Shape(max(1, tokens // seqlen), seqlen, heads, kv_heads, head_dim, n)
        for seqlen, kv_heads, head_dim, n in itertools.product(
            seqlens, kv_heads_list, head_dims, num_tokens_list
        )
    ]


def run_benchmark(args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    rows = []
    for shape in shapes(
        args.tokens, args.seqlens, args.heads, args.kv_heads, args.head_dims, args.num_tokens
    ):
        for method in args.methods:
            row = measure(method, shape, dtype, device)
            rows.append(row)
            print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def parser() -> argparse.ArgumentParser:
    cuda = torch.cuda.is_available()
    p = benchmark_parser(__doc__, output="attention")
    p.add_argument("--tokens", type=int, default=16384 if cuda else 512, help="B·L, tokens per batch")
    p.add_argument("--seqlens", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192] if cuda else [128])
    p.add_argument("--heads", type=int, default=32 if cuda else 4)
    p.add_argument("--kv-heads", type=int, nargs="+", default=[32, 8] if cuda else [2])
    p.add_argument("--head-dims", type=int, nargs="+", default=[64, 128] if cuda else [64])
    p.add_argument("--num-tokens", type=int, nargs="+", default=[0, 1, 10, 100] if cuda else [0, 1, 10])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    return p


def main(argv=None) -> list[dict]:
    return run_and_record(run_benchmark, parser(), argv)


if __name__ == "__main__":
    main()
