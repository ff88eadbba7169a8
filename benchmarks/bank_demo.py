"""``make bank-demo``: three 1-token Aligners, three answer forms, one batch, on CPU.

Trains a 1-token Aligner on SmolLM2-135M-Instruct for each form of :mod:`aligner.forms` (a JSON
object ``{"answer": ...}``, ALL CAPS, an ``Answer:`` prefix) on the same varied instructions, builds
a bank of the three plus ``--random-aligners`` random ones (100,000 by default), loads it
memory-mapped and answers ONE batch of held-out prompts of kinds never trained on, every row with
a different one of the three, printing each row with its form check. Then it measures each form on
both held-out sets (questions like the training ones, and the unseen kinds) in mixed batches and
writes everything to ``--output-dir`` (``metrics.json``, the Aligners, ``bank.safetensors``).

``--model DIR`` runs the same on another model (the tests use a tiny random one).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from answer_forms import (
    FORMS,
    START_LAYER,
    base_model_cache,
    bf16_training,
    cached_answers,
    compliance,
    demo_parser,
    instruction_sets,
    load_demo_model,
    messages,
)

from aligner.files import write_atomic


def _random_bank(bank: Any, count: int, seed: int) -> Any:
    """``bank`` plus ``count`` random Aligners (tokens N(0, 1) like a fresh Aligner, gates N(0, 0.05)
    like a trained one), named random-000000, ..."""
    from aligner import AlignerBank

    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randn(count, *bank.tokens.shape[1:], generator=gen).to(bank.tokens.dtype)
    gates = (0.05 * torch.randn(count, *bank.gates.shape[1:], generator=gen)).to(bank.gates.dtype)
    names = [*bank.names, *(f"random-{i:06d}" for i in range(count))]
    return AlignerBank(torch.cat([bank.tokens, tokens]), torch.cat([bank.gates, gates]), names, bank.config)


def _write_json(path: Path, value: Any) -> None:
    write_atomic(path, json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from aligner import AlignerBank, attach_bank, save, unpatch
    from aligner.training import TrainConfig, generate, train_sft

    start = time.time()
    torch.manual_seed(args.seed)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_demo_model(args.model)
    sets = instruction_sets(args.limit or None)
    cache = base_model_cache(args, model)
    answers = cached_answers(
        cache, model, tokenizer, limit=args.limit, tokens=args.answer_tokens, batch_size=args.gen_batch_size
    )
    train = [i for i in sets["train"] if answers[i]]  # drop empty answers

    summaries = {}
    for name, form in FORMS.items():
        print(f"training the {name!r} Aligner ({form.description}): {len(train)} instructions, "
              f"{args.steps} steps", flush=True)  # fmt: skip
        config = TrainConfig(
            output_dir=str(out / name), num_tokens=1, start_layer=START_LAYER, lr=args.lr,
            lr_scheduler="cosine", max_steps=args.steps, batch_size=args.batch_size, logging_steps=10,
            save_steps=args.steps, save_total_limit=1, seed=args.seed, max_length=256, progress=False,
            overwrite=True,  # the demo's own folders: a rerun replaces its earlier run
            bf16=bf16_training(args),
        )  # fmt: skip
        examples = [(messages(i), form.apply(answers[i])) for i in train]
        summaries[name] = train_sft(model, tokenizer, examples, config, f"{name} form")
        save(model, out / name)
        unpatch(model)
    model.eval()

    bank = AlignerBank.from_aligners([out / name for name in FORMS], names=list(FORMS))
    bank = _random_bank(bank, args.random_aligners, args.seed)
    bank.save(out / "bank.safetensors")
    del bank
    load_start = time.time()
    bank = AlignerBank.load(out / "bank.safetensors")
    load_seconds = time.time() - load_start
    attach_bank(model, bank)
    print(f"\nbank: {bank} loaded in {load_seconds:.2f} s", flush=True)

    # One batch of unseen kinds of prompts; row r uses form r mod 3.
    names = list(FORMS)
    prompts = sets["carry"]
    row_forms = [names[r % len(names)] for r in range(len(prompts))]
    replies = generate(
        model, tokenizer, [messages(i) for i in prompts], max_new_tokens=args.reply_tokens,
        batch_size=len(prompts), aligner_index=bank.indices(row_forms), desc="one mixed batch",
    )  # fmt: skip
    print(f"\none batch of {len(prompts)} held-out prompts of unseen kinds, each row with its own Aligner:")
    for prompt, name, reply in zip(prompts, row_forms, replies):
        mark = "ok  " if FORMS[name].check(reply) else "FAIL"
        print(f"[{name:>6} {mark}] {prompt}\n                {reply!r}")

    # Every form on both held-out sets (all rows of every form in mixed batches), and the base model.
    results: dict[str, dict[str, float]] = {}
    samples: dict[str, list] = {}
    for split in ("heldout", "carry"):
        rows = [(i, name) for name in [*names, None] for i in sets[split]]
        got = generate(
            model, tokenizer, [messages(i) for i, _ in rows], max_new_tokens=args.reply_tokens,
            batch_size=args.gen_batch_size, aligner_index=bank.indices([n for _, n in rows]),
            desc=f"evaluating ({split})",
        )  # fmt: skip
        for name in [*names, None]:
            picked = [reply for (_, n), reply in zip(rows, got) if n == name]
            if name is None:  # the base model, checked against every form
                for form in names:
                    results.setdefault(f"base vs {form}", {})[split] = compliance(FORMS[form], picked)
            else:
                results.setdefault(name, {})[split] = compliance(FORMS[name], picked)
        samples[split] = [{"instruction": i, "aligner": n, "reply": r} for (i, n), r in zip(rows, got)]

    metrics = {
        "task": "three answer forms (JSON object, ALL CAPS, 'Answer:' prefix), one 1-token Aligner each",
        "compliance": results,
        "one_batch": [
            {"instruction": p, "aligner": n, "reply": r, "has_form": FORMS[n].check(r)}
            for p, n, r in zip(prompts, row_forms, replies)
        ],
        "bank_aligners": len(bank),
        "bank_load_seconds": load_seconds,
        "train_instructions": len(train),
        "heldout_instructions": len(sets["heldout"]),
        "carry_instructions": len(sets["carry"]),
        "steps": args.steps,
        "training_precision": "bf16 autocast" if bf16_training(args) else "fp32",
        "train_seconds": {name: s["seconds"] for name, s in summaries.items()},
        "wall_seconds": time.time() - start,
        "samples": samples,
    }
    _write_json(out / "metrics.json", metrics)
    print("\n| Aligner | held-out like training | held-out unseen kinds |\n|---|---|---|")
    for name, row in results.items():
        print(f"| {name} | {row['heldout']:.0%} | {row['carry']:.0%} |")
    print(f"\nsaved: {out}/metrics.json, {out}/bank.safetensors; wall time {time.time() - start:.0f} s")
    return metrics


def main(argv: Sequence[str] | None = None) -> int:
    parser = demo_parser("bank_demo.py", __doc__.split("\n\n")[0], "bank-demo-output")
    parser.add_argument("--random-aligners", type=int, default=100_000)
    args = parser.parse_args(argv)
    metrics = run(args)
    low = [
        f"{name} {split} {value:.0%}"
        for name, row in metrics["compliance"].items()
        if not name.startswith("base")
        for split, value in row.items()
        if value < args.min_compliance
    ]
    if low:
        print(f"below {args.min_compliance:.0%}: {', '.join(low)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
