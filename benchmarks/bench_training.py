"""One training step (forward, backward, AdamW step) per method: tokens/s and peak memory.

Methods: Aligner N = 1 and N = 10 (this project), PEFT AdaptionPrompt N = 10, PEFT LoRA r = 8 on
q/v, and the floor: the frozen model's forward plus the backward down to the input of layer
``start_layer`` (one zero trainable vector added there), the least work any method that trains
something at that layer must do. Methods run in a round-robin whose order reverses every round
(a fixed order biases whichever runs last); the median step of each is reported.

    python benchmarks/bench_training.py                       # CPU: real SmolLM2-135M, batch 4 x 256
    python benchmarks/bench_training.py --model llama2-7b --layers 4 --batch 8 --seqlen 2048   # GPU
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

try:
    from .common import benchmark_parser, run_and_record
    from .models import TRAINING_METHODS, load_model, with_method
except ImportError:
    from common import benchmark_parser, run_and_record
    from models import TRAINING_METHODS, load_model, with_method


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def training_step(model, optimizer, ids: torch.Tensor) -> None:
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def run_benchmark(args: argparse.Namespace) -> list[dict]:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    base = load_model(args.model, args.layers, device, dtype)
    ids = torch.randint(0, base.config.vocab_size, (args.batch, args.seqlen), device=device)
    runs = {}
    for method in args.methods:
        model = with_method(base, method, args.start_layer).train()
        params = [p for p in model.parameters() if p.requires_grad]
        runs[method] = (model, torch.optim.AdamW(params, lr=1e-4), sum(p.numel() for p in params))
    del base
    times = {method: [] for method in args.methods}
    peaks = {}
    for round_index in range(args.warmup + args.rounds):
        order = args.methods if round_index % 2 == 0 else args.methods[::-1]
        for method in order:
            model, optimizer, _ = runs[method]
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            _sync(device)
            start = time.perf_counter()
            training_step(model, optimizer, ids)
            _sync(device)
            if round_index >= args.warmup:
                times[method].append(time.perf_counter() - start)
            if device.type == "cuda":
                peaks[method] = torch.cuda.max_memory_allocated() / 2**20
        print(f"round {round_index + 1}/{args.warmup + args.rounds} done", flush=True)
    floor = statistics.median(times["floor"]) if "floor" in times else None
    rows = []
    for method in args.methods:
        step = statistics.median(times[method])
        rows.append({
            "model": f"{args.model}" + ("" if args.model == "smollm2" else f"-{args.layers}layers"),
            "method": method,
            "trainable": runs[method][2],
            "batch": f"{args.batch}x{args.seqlen}",
            "step_s": step,
            "tokens_per_s": args.batch * args.seqlen / step,
            "vs_floor": step / floor if floor else None,
            "peak_mib": peaks.get(method),
        })  # fmt: skip
    return rows


def parser() -> argparse.ArgumentParser:
    cuda = torch.cuda.is_available()
    p = benchmark_parser(__doc__, output="training")
    p.add_argument(
        "--model", default="llama2-7b" if cuda else "smollm2", help="smollm2, llama2-7b, llama3-8b or tiny"
    )
    p.add_argument("--layers", type=int, default=4, help="layers of the config-built models")
    p.add_argument("--batch", type=int, default=8 if cuda else 4)
    p.add_argument("--seqlen", type=int, default=2048 if cuda else 256)
    p.add_argument("--start-layer", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1, help="rounds not timed")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--methods", nargs="+", default=list(TRAINING_METHODS), choices=TRAINING_METHODS)
    return p


def main(argv=None) -> list[dict]:
    return run_and_record(run_benchmark, parser(), argv)


if __name__ == "__main__":
    main()
