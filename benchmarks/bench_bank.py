"""A bank of a million 1-token Aligners, a different one for every row of a batch.

Greedy generation of ``--new-tokens`` for ``--prompts`` chat prompts in one left-padded batch,
each row with its own Aligner drawn from a bank of ``--bank-size`` random 1-token Aligners, against
the base model on the same prompts (the same model object, its Aligner path switched off with
``aligner.disabled``), the two runs alternating. Also: the bank's load time (memory-mapped) and
resident memory, against the raw size of its tensors.

    python benchmarks/bench_bank.py                                  # CPU: SmolLM2-135M
    python benchmarks/bench_bank.py --model llama2-7b --layers 4     # GPU (bank moved to the GPU)
"""

from __future__ import annotations

import argparse
import functools
import statistics
import tempfile
import time
from pathlib import Path

import torch
from answer_forms import (
    CARRY_INSTRUCTIONS,
    HELDOUT_INSTRUCTIONS,
    SMOLLM2_GGUF,
    TRAIN_INSTRUCTIONS,
    messages,
    smollm2_directory,
)

import aligner
from aligner import AlignerBank, AlignerConfig

try:
    from .common import benchmark_parser, run_and_record, timed_call
    from .models import load_model
except ImportError:
    from common import benchmark_parser, run_and_record, timed_call
    from models import load_model


def resident_mb() -> float:
    """This process's resident set (anonymous + file-backed pages, e.g. a mapped bank), MiB."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def random_bank(model, size: int, dtype: torch.dtype, seed: int = 0) -> AlignerBank:
    """``size`` random 1-token Aligners for ``model`` (tokens N(0, 1), gates N(0, 0.05)), in chunks."""
    config = model.config
    start_layer, heads = 2, config.num_attention_heads
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.empty(size, 1, config.hidden_size, dtype=dtype)
    gates = torch.empty(size, config.num_hidden_layers - start_layer, heads, dtype=dtype)
    for begin in range(0, size, 65536):
        end = min(begin + 65536, size)
        tokens[begin:end] = torch.randn(end - begin, *tokens.shape[1:], generator=gen)
        gates[begin:end] = 0.05 * torch.randn(end - begin, *gates.shape[1:], generator=gen)
    bank_config = AlignerConfig(num_tokens=1, start_layer=start_layer).for_model(config)
    return AlignerBank(tokens, gates, [f"user-{i:07d}" for i in range(size)], bank_config)


def prompts(tokenizer, count: int) -> list[str]:
    from aligner.training.data import format_prompt

    pool = HELDOUT_INSTRUCTIONS + CARRY_INSTRUCTIONS + TRAIN_INSTRUCTIONS
    return [format_prompt(tokenizer, messages(pool[i % len(pool)])) for i in range(count)]


def run_benchmark(args: argparse.Namespace) -> list[dict]:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    model = load_model(args.model, args.layers, device, dtype).eval()
    model.generation_config.eos_token_id = None  # always generate exactly new_tokens
    if args.model == "smollm2":
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(smollm2_directory(), gguf_file=SMOLLM2_GGUF)
        tokenizer.padding_side = "left"
        batch = tokenizer(prompts(tokenizer, args.prompts), return_tensors="pt", padding=True).to(device)
    else:  # random weights: random prompts of one length
        ids = torch.randint(0, model.config.vocab_size, (args.prompts, args.prompt_length), device=device)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    path = args.bank_file or Path(tempfile.mkdtemp()) / "bank.safetensors"
    if not Path(path).exists():
        start = time.perf_counter()
        random_bank(model, args.bank_size, getattr(torch, args.bank_dtype)).save(path)
        print(
            f"built and saved a bank of {args.bank_size:,} in {time.perf_counter() - start:.1f} s", flush=True
        )
    before = resident_mb()
    start = time.perf_counter()
    bank = AlignerBank.load(path)
    load_seconds = time.perf_counter() - start
    loaded = resident_mb()
    if device.type == "cuda":  # serving: the whole bank in GPU memory beside the model
        bank = bank.to(device)
    raw_mb = (bank.tokens.nbytes + bank.gates.nbytes) / 2**20
    aligner.attach_bank(model, bank)
    gen = torch.Generator().manual_seed(1)
    index = torch.randperm(len(bank), generator=gen)[: args.prompts].to(device)
    options = {"max_new_tokens": args.new_tokens, "do_sample": False, "pad_token_id": 0}

    def generate(method: str) -> None:
        if method == "base":
            with aligner.disabled(model):
                model.generate(**batch, **options)
        else:
            model.generate(**batch, **options, aligner_index=index)

    wall: dict[str, list[float]] = {"base": [], "bank": []}
    cpu: dict[str, list[float]] = {"base": [], "bank": []}
    for round_index in range(args.rounds + 1):  # round 0 warms up
        order = ("base", "bank") if round_index % 2 == 0 else ("bank", "base")
        for method in order:
            wall_s, cpu_s = timed_call(functools.partial(generate, method), device)
            if round_index:
                wall[method].append(wall_s)
                if cpu_s is not None:
                    cpu[method].append(cpu_s)
    after = resident_mb()
    rows = []
    for method in ("base", "bank"):
        elapsed = statistics.median(wall[method])
        row = {
            "model": args.model, "method": method, "batch": args.prompts, "new_tokens": args.new_tokens,
            "bank_size": args.bank_size if method == "bank" else None,
            "tokens_per_s": args.prompts * args.new_tokens / elapsed,
            "vs_base": statistics.median(wall["base"]) / elapsed,
        }  # fmt: skip
        if cpu[method]:  # tokens/s by process CPU time: the ratio that other jobs' load does not move
            row["vs_base_cpu_time"] = statistics.median(cpu["base"]) / statistics.median(cpu[method])
        rows.append(row)
    rows.append({
        "model": args.model, "method": "bank memory", "bank_size": args.bank_size,
        "bank_dtype": args.bank_dtype, "bank_load_s": load_seconds, "bank_raw_mb": raw_mb,
        "rss_after_load_mb": loaded - before, "rss_after_generate_mb": after - before,
    })  # fmt: skip
    return rows


def parser() -> argparse.ArgumentParser:
    cuda = torch.cuda.is_available()
    p = benchmark_parser(__doc__, output="bank")
    p.add_argument("--model", default="llama2-7b" if cuda else "smollm2")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--prompts", type=int, default=32, help="rows of the batch, each with its own Aligner")
    p.add_argument("--prompt-length", type=int, default=64, help="random-weight models only")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--bank-size", type=int, default=1_000_000)
    p.add_argument(
        "--bank-dtype",
        default="bfloat16" if cuda else "float32",
        choices=["float32", "bfloat16", "float16"],
        help="bfloat16 on a GPU: a million 4096-wide tokens are 8 GB",
    )
    p.add_argument("--bank-file", type=Path, help="bank file to reuse (built there if missing)")
    return p


def main(argv=None) -> list[dict]:
    return run_and_record(run_benchmark, parser(), argv)


if __name__ == "__main__":
    main()
