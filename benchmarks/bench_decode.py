"""Generation throughput (new tokens/s, greedy, KV cache): the base model, a 1-token Aligner merged
into the o_proj biases and unmerged, and a 10-token Aligner, at batch 1 and 32.

    python benchmarks/bench_decode.py                            # CPU: SmolLM2-135M
    python benchmarks/bench_decode.py --model llama2-7b --layers 8   # GPU
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import aligner

try:
    from .common import benchmark_parser, run_and_record
    from .models import load_model
except ImportError:
    from common import benchmark_parser, run_and_record
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


def run_benchmark(args: argparse.Namespace) -> list[dict]:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    model = load_model(args.model, args.layers, device, dtype).eval()
    model.generation_config.eos_token_id = None  # always generate exactly new_tokens
    rows = []
    for batch in args.batches:
        prompt = torch.randint(0, model.config.vocab_size, (batch, args.prompt_length), device=device)
        times = {method: [] for method in args.methods}
        for round_index in range(args.rounds + 1):  # round 0 warms up
            order = args.methods if round_index % 2 == 0 else args.methods[::-1]
            for method in order:
                _setup(model, method)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                model.generate(prompt, max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if round_index:
                    times[method].append(time.perf_counter() - start)
        base = statistics.median(times["base"]) if "base" in times else None
        for method in args.methods:
            elapsed = statistics.median(times[method])
            rows.append({
                "model": args.model, "method": method, "batch": batch, "new_tokens": args.new_tokens,
                "tokens_per_s": batch * args.new_tokens / elapsed,
                "vs_base": elapsed / base if base else None,
            })  # fmt: skip
    return rows


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
    return p


def main(argv=None) -> list[dict]:
    return run_and_record(run_benchmark, parser(), argv)


if __name__ == "__main__":
    main()
