"""Generation throughput (new tokens/s, greedy, KV cache): the base model, a 1-token Aligner merged
into the o_proj biases and unmerged, and a 10-token Aligner, at batch 1 and 32.

    python benchmarks/bench_decode.py                            # CPU: SmolLM2-135M
    python benchmarks/bench_decode.py --model llama2-7b --layers 8   # GPU

With ``--kernel``: one decode step of the attention alone (L_q = 1 against a KV cache of L_k;
B = 1, 8, 32; L_k = 2k, 8k, 32k; H = 32, H_kv = 8, D = 128; N = 0, 1, 10): the split-KV kernel
that ``aligner_attention`` runs without a gradient, the fused forward it replaces, and SDPA
without a prefix (the GPU target: N = 10 within 1.1x of SDPA). GPU rows; on the CPU only toy
sizes (the interpreter), for the smoke test.

    python benchmarks/bench_decode.py --kernel
"""

from __future__ import annotations

import argparse
import functools
import itertools
import statistics
import sys

import torch
import torch.nn.functional as F

import aligner

try:
    from .common import benchmark_parser, median_ms, run_and_record, timed_call
    from .models import load_model
except ImportError:
    from common import benchmark_parser, median_ms, run_and_record, timed_call
    from models import load_model

DECODE_METHODS = ("base", "aligner-1-merged", "aligner-1", "aligner-10")


def _setup(model, method: str):
    """Unpatch ``model`` and re-patch it as ``method`` needs (non-zero gates, merged or not)."""
    if hasattr(model, "aligner_state"):
        aligner.unpatch(model)
    if method == "base":
        return model
    aligner.patch(model, num_tokens=10 if method == "aligner-10" else 1)
    with torch.no_grad():  # a trained-looking Aligner: non-zero gates
        for name, param in aligner.aligner_parameters(model).items():
            if name.startswith("gate"):
                param.normal_(std=0.05)
    if method == "aligner-1-merged":
        aligner.merge(model)
    return model


def _decode_step(args: argparse.Namespace, batch: int, cache: int) -> dict:
    """One decode step's callables for a (B, L_k) cache: SDPA without a prefix, and per N the
    split-KV kernel and the fused forward it replaces (one program per query block and head)."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    heads, kv_heads, head_dim = args.heads, args.kv_heads, args.head_dim
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=dtype)

    q = rand(batch, 1, heads, head_dim)
    k, v = rand(batch, cache, kv_heads, head_dim), rand(batch, cache, kv_heads, head_dim)
    packed = [x.flatten(0, 1) for x in (q, k, v)]
    cu_q = torch.arange(0, batch + 1, dtype=torch.int32, device=device)
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    steps = {("sdpa", 0): lambda: F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True)}
    for num_tokens in args.num_tokens:
        prefix = (None, None, None)
        if num_tokens:
            gate = torch.randn(heads, generator=gen, device=device)
            prefix = (rand(num_tokens, kv_heads, head_dim), rand(num_tokens, kv_heads, head_dim), gate)
        split = [q, k, v, *prefix] if num_tokens else [q, k, v]
        steps["aligner-split-kv", num_tokens] = functools.partial(
            aligner.aligner_attention, *split, backend="fused"
        )
        steps["aligner-fused", num_tokens] = functools.partial(
            torch.ops.aligner.fused_attention_forward,
            *packed, *prefix, cu_q, cu_q * cache, 1, cache, head_dim**-0.5, True,
        )  # fmt: skip
    return steps


def run_kernel_rows(args: argparse.Namespace) -> list[dict]:
    """Milliseconds per decode step of the attention alone, per (B, L_k, method, N)."""
    device = torch.device(args.device)
    rows = []
    for batch, cache in itertools.product(args.batches, args.cache_lengths):
        times = {}
        with torch.no_grad():
            for (method, num_tokens), step in _decode_step(args, batch, cache).items():
                times[method, num_tokens] = median_ms(step, device, warmup=1, repeats=args.rounds)
        for (method, num_tokens), ms in times.items():
            rows.append({
                "method": method, "batch": batch, "cache": cache, "num_tokens": num_tokens, "ms": ms,
                "vs_sdpa_no_prefix": ms / times["sdpa", 0],
            })  # fmt: skip
    return rows


def run_benchmark(args: argparse.Namespace) -> list[dict]:
    if args.kernel:
        return run_kernel_rows(args)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    model = load_model(args.model, args.layers, device, dtype).eval()
    model.generation_config.eos_token_id = None  # always generate exactly new_tokens
    rows = []
    for batch in args.batches:
        prompt = torch.randint(0, model.config.vocab_size, (batch, args.prompt_length), device=device)
        wall = {method: [] for method in args.methods}
        cpu = {method: [] for method in args.methods}
        for round_index in range(args.rounds + 1):  # round 0 warms up
            order = args.methods if round_index % 2 == 0 else args.methods[::-1]
            for method in order:
                _setup(model, method)
                run = functools.partial(
                    model.generate, prompt, max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0
                )
                wall_s, cpu_s = timed_call(run, device)
                if round_index:
                    wall[method].append(wall_s)
                    if cpu_s is not None:
                        cpu[method].append(cpu_s)
        rows += [_throughput_row(args, method, batch, wall, cpu) for method in args.methods]
    return rows


def _throughput_row(args, method: str, batch: int, wall: dict, cpu: dict) -> dict:
    """Tokens/s of ``method`` and, against the base model, the tokens/s ratio by wall time and (on
    the CPU) by process CPU time, the one that does not move with other jobs' load."""
    elapsed = statistics.median(wall[method])
    row = {"model": args.model, "method": method, "batch": batch, "new_tokens": args.new_tokens,
           "tokens_per_s": batch * args.new_tokens / elapsed}  # fmt: skip
    if "base" in wall:
        row["vs_base"] = statistics.median(wall["base"]) / elapsed
        if cpu[method]:
            row["vs_base_cpu_time"] = statistics.median(cpu["base"]) / statistics.median(cpu[method])
    return row


def parser() -> argparse.ArgumentParser:
    cuda = torch.cuda.is_available()
    p = benchmark_parser(__doc__, output="decode")
    p.add_argument("--model", default="llama2-7b" if cuda else "smollm2")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--prompt-length", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64 if cuda else 16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--methods", nargs="+", default=list(DECODE_METHODS), choices=DECODE_METHODS)
    kernel = p.add_argument_group("kernel-level rows (--kernel)")
    kernel.add_argument("--kernel", action="store_true", help="time one attention decode step instead")
    kernel.add_argument("--cache-lengths", type=int, nargs="+", default=[2048, 8192, 32768] if cuda else [40])
    kernel.add_argument("--heads", type=int, default=32 if cuda else 4)
    kernel.add_argument("--kv-heads", type=int, default=8 if cuda else 2)
    kernel.add_argument("--head-dim", type=int, default=128 if cuda else 32)
    kernel.add_argument("--num-tokens", type=int, nargs="+", default=[0, 1, 10])
    return p


def main(argv=None) -> list[dict]:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--kernel" in argv and "--output" not in argv:
        argv += ["--output", "decode_kernel"]
    if "--kernel" in argv and "--batches" not in argv and torch.cuda.is_available():
        argv += ["--batches", "1", "8", "32"]
    return run_and_record(run_benchmark, parser(), argv)


if __name__ == "__main__":
    main()
