"""Does a distilled Aligner follow its system prompt WITHOUT the prompt? SmolLM2-135M-Instruct, CPU.

For each system prompt (a language, a format rule, a persona) the base model answers the training
instructions WITH the prompt (greedy), then two Aligners are trained from those answers, with
the same steps, learning rate and tokens: ``sft`` (cross-entropy on the answers' tokens, the old
``distill``) and ``kl`` (KL to the prompted model's full next-token distribution, the new
default). Every model then answers held-out instructions (other topics and wordings, written
for this benchmark) greedily, and an automatic check per prompt says whether each reply follows
the rule. Reported per prompt: the fraction of held-out replies that follow it for the base model
without the prompt, the base model with it, and both Aligners without it; trainable parameters,
steps and training wall time. Target: the KL Aligner >= 0.9 x the prompted base model.

    PYTHONPATH=. python benchmarks/bench_distill.py --threads 1                 # all prompts
    PYTHONPATH=. python benchmarks/bench_distill.py --threads 1 --prompts french --steps 40

Each prompt costs 4 x 20 held-out replies, 40 teacher answers and two trainings of --steps steps;
on a CPU shared with other jobs one training step took about a minute, so run it in the
background. Results go to benchmarks/results/distill-cpu-smollm2.{json,md}, rewritten after each
prompt; rows of prompts not in this run are kept (each row records its own settings and date).
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from aligner.files import write_atomic

try:  # as a module of the benchmarks package, or as a script
    from .answer_forms import SMOLLM2_GGUF, smollm2_directory
    from .common import RESULTS_DIR, environment
except ImportError:
    from answer_forms import SMOLLM2_GGUF, smollm2_directory
    from common import RESULTS_DIR, environment

# Written for this benchmark: varied kinds (explain, how-to, advice, describe, compare, creative,
# list, opinion, definition), one a line. The held-out ones have other topics and wordings.
TRAIN_INSTRUCTIONS = """
Explain how a rainbow forms.
How do I plant tomato seeds?
Give me advice for a job interview.
Describe a busy market in the morning.
What is the difference between a lake and a river?
Write a short poem about the moon.
List three things to pack for a picnic.
Do you think cities should have more parks?
What does the word "generous" mean?
Why do leaves change colour in autumn?
How can I save money on groceries?
Tell me a short story about a lost key.
Describe the taste of a lemon.
How does a bicycle work?
What should I do if I cannot sleep?
Compare cats and dogs as pets.
Write a birthday message for my grandmother.
Explain what a volcano is.
How do I make a cup of tea?
What are good habits for studying?
Describe your ideal holiday.
Why is reading important?
Give me three ideas for a rainy afternoon.
What is a library for?
How do birds find their way when they migrate?
Write two sentences about the ocean.
What makes a good friend?
Explain why we need sleep.
How do I clean a wooden table?
Describe a thunderstorm.
What is the best way to learn a new word?
Tell me about the history of bread.
How can I stay calm before an exam?
What do firefighters do?
Write a thank-you note to a teacher.
Explain how plants drink water.
What are the benefits of walking every day?
Describe a snowy village.
How do I fold a paper airplane?
Why do people keep diaries?
""".strip().splitlines()

HELDOUT_INSTRUCTIONS = """
Why is the sea salty?
How do I bake simple cookies?
Give me tips for running my first race.
Describe a quiet forest at night.
What is the difference between weather and climate?
Write a short poem about winter.
List three uses for an old jar.
Do you think children should learn to swim early?
What does the word "curious" mean?
How does a refrigerator keep food cold?
What should I bring to a friend's dinner party?
Tell me a short story about a brave mouse.
Describe the sound of rain on a roof.
How can I keep my houseplants healthy?
Compare trains and planes for travel.
Explain what an island is.
What are good ways to make new friends?
Why do we have seasons?
Write a short welcome message for a new neighbour.
How do bees help flowers?
""".strip().splitlines()

FRENCH_WORDS = set(
    "le la les de des du un une et est en que qui pour dans sur avec pas ce cette il elle nous vous "
    "sont au aux son sa ses leur par plus mais ou je tu on très comme être avoir fait peut".split()
)
ENGLISH_WORDS = set(
    "the a an and is are of to in that it for with on as this be you i was by not or but have can "
    "your they we my their will".split()
)
PIRATE_WORDS = set(
    "arr arrr arrrr ahoy matey mateys ye yer aye hearty hearties landlubber landlubbers scallywag "
    "scallywags booty plunder grog shiver timbers pirate pirates buccaneer buccaneers avast yo-ho "
    "seadog swashbuckler me-hearties".split()
)


def words(text: str) -> list[str]:
    return re.findall(r"[a-zà-ÿ'-]+", text.lower().replace("’", "'"))


def is_french(reply: str) -> bool:
    """More French than English function words (elided l'/d'/c'/qu' count as French), at least 2."""
    tokens = words(reply)
    french = sum(t in FRENCH_WORDS or re.match(r"^(l|d|c|qu|j|n|s)'", t) is not None for t in tokens)
    english = sum(t in ENGLISH_WORDS for t in tokens)
    return french >= 2 and french > english


def speaks_pirate(reply: str) -> bool:
    """At least one word from the pirate lexicon (possessives included)."""
    return any(re.sub(r"'s$", "", t).strip("'-") in PIRATE_WORDS for t in words(reply))


GREETING = re.compile(
    r"^\W*(hello|hi|hey|greetings|good (morning|afternoon|evening|day)|welcome)\b", re.IGNORECASE
)


def starts_with_greeting(reply: str) -> bool:
    """The reply opens with a greeting (hello, hi, hey, greetings, good morning/afternoon/..., welcome)."""
    return GREETING.match(reply) is not None


# name: (system prompt, check on a reply)
PROMPTS: dict[str, tuple[str, Callable[[str], bool]]] = {
    "french": ("Always answer in French.", is_french),
    "format": ("Always begin your answer with a friendly greeting such as 'Hello!'.", starts_with_greeting),
    "pirate": ("You are a pirate. Always talk like a pirate, saying 'Arr' and 'matey'.", speaks_pirate),
}


def user(instruction: str, system: str | None = None) -> list[dict[str, str]]:
    return [
        *([{"role": "system", "content": system}] if system else []),
        {"role": "user", "content": instruction},
    ]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompts", nargs="+", default=list(PROMPTS), choices=list(PROMPTS))
    parser.add_argument(
        "--steps",
        type=int,
        default=30,
        help="training steps of each Aligner (0: only base and prompted base)",
    )
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--num-tokens", type=int, default=10)
    parser.add_argument("--start-layer", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--gen-batch-size", type=int, default=20, help="prompts per generate call")
    parser.add_argument("--answer-tokens", type=int, default=32, help="length of the teacher's answers")
    parser.add_argument("--reply-tokens", type=int, default=24, help="length of evaluated replies")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="distill-cpu-smollm2")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    return parser.parse_args(argv)


def run(args: argparse.Namespace, record: Callable[[dict, dict], None]) -> None:
    """Measure every prompt of ``args.prompts``; ``record(row, samples)`` after each one."""
    import aligner
    from aligner.training import TrainConfig, distill_examples, generate, load_model, train_distill

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(str(smollm2_directory()), gguf_file=SMOLLM2_GGUF)

    def replies(system: str | None, name: str) -> list[str]:
        start = time.perf_counter()
        out = generate(
            model, tokenizer, [user(i, system) for i in HELDOUT_INSTRUCTIONS],
            max_new_tokens=args.reply_tokens, batch_size=args.gen_batch_size, progress=False,
        )  # fmt: skip
        print(f"  {name}: {len(out)} replies in {time.perf_counter() - start:.0f} s", flush=True)
        return out

    base = replies(None, "base")
    for name in args.prompts:
        system, check = PROMPTS[name]
        print(f"{name}: {system!r}", flush=True)
        rate = {"base": sum(map(check, base)) / len(base)}
        answers = {"base": base, "prompted base": replies(system, "prompted base")}
        rate["prompted base"] = sum(map(check, answers["prompted base"])) / len(base)
        if args.steps == 0:  # only how often the base model follows the rule, with and without it
            row = {"prompt": name, "system_prompt": system, "held_out": len(HELDOUT_INSTRUCTIONS),
                   "base": rate["base"], "prompted_base": rate["prompted base"], "steps": 0}  # fmt: skip
            record(row, {key: _scored(value, check) for key, value in answers.items()})
            continue
        start = time.perf_counter()
        examples = distill_examples(
            model, tokenizer, TRAIN_INSTRUCTIONS, system, max_new_tokens=args.answer_tokens,
            batch_size=args.gen_batch_size, progress=False,
        )  # fmt: skip
        teacher_seconds = time.perf_counter() - start
        teacher_rate = sum(check(a) for _, a in examples) / len(examples)
        runs = {}
        for loss in ("sft", "kl"):
            with tempfile.TemporaryDirectory() as out:
                config = TrainConfig(
                    output_dir=out, num_tokens=args.num_tokens, start_layer=args.start_layer, lr=args.lr,
                    max_steps=args.steps, batch_size=args.batch_size, logging_steps=args.steps,
                    save_steps=10**9, seed=args.seed, progress=False,
                )  # fmt: skip
                start = time.perf_counter()
                summary = train_distill(model, tokenizer, examples, system, config, loss=loss)
                seconds = time.perf_counter() - start
            key = f"{loss} distill"
            answers[key] = replies(None, key)
            aligner.unpatch(model)
            rate[key] = sum(map(check, answers[key])) / len(base)
            runs[loss] = {"seconds": seconds, "train_loss": summary["train_loss"], "steps": summary["steps"]}
            print(f"  {key}: {rate[key]:.2f} after {summary['steps']} steps, {seconds:.0f} s", flush=True)
        ratio = rate["kl distill"] / rate["prompted base"] if rate["prompted base"] else None
        row = {
            "prompt": name,
            "system_prompt": system,
            "held_out": len(HELDOUT_INSTRUCTIONS),
            "base": rate["base"],
            "prompted_base": rate["prompted base"],
            "sft_distill": rate["sft distill"],
            "kl_distill": rate["kl distill"],
            "kl_over_prompted": ratio,
            "target_met": ratio is not None and ratio >= 0.9,
            "trainable_parameters": summary["trainable_parameters"],
            "steps": args.steps,
            "sft_seconds": runs["sft"]["seconds"],
            "kl_seconds": runs["kl"]["seconds"],
            "sft_train_loss": runs["sft"]["train_loss"],
            "kl_train_loss": runs["kl"]["train_loss"],
            "teacher_answers": len(examples),
            "teacher_follows": teacher_rate,
            "teacher_seconds": teacher_seconds,
            "settings": {
                k: getattr(args, k)
                for k in (
                    "lr",
                    "num_tokens",
                    "start_layer",
                    "batch_size",
                    "gen_batch_size",
                    "threads",
                    "answer_tokens",
                    "reply_tokens",
                    "seed",
                )
            },
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        record(row, {key: _scored(value, check) for key, value in answers.items()})


def _scored(replies: list[str], check: Callable[[str], bool]) -> list[dict]:
    return [
        {"instruction": i, "reply": r, "follows": check(r)} for i, r in zip(HELDOUT_INSTRUCTIONS, replies)
    ]


def _cell(row: dict, key: str, form: str, unit: str = "") -> str:
    """A table cell; "not run" where the row has no such measurement (--steps 0, or no ratio)."""
    value = row.get(key)
    return "not run" if value is None else f"{value:{form}}{unit}"


def markdown(rows: list[dict], env: dict) -> str:
    lines = [
        f"Device: {env['device']}; torch {env['torch']}, transformers {env['transformers']}\n",
        "SmolLM2-135M-Instruct; fraction of held-out instructions whose greedy reply follows the "
        "system prompt's rule (base and distilled Aligners WITHOUT the prompt).\n",
        "| system prompt | check | base | prompted base | SFT distill (old) | KL distill (new) "
        "| KL / prompted | trainable params | steps | SFT time | KL time |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        cells = [
            row["system_prompt"],
            row["prompt"],
            _cell(row, "base", ".2f"),
            _cell(row, "prompted_base", ".2f"),
        ]
        cells += [_cell(row, key, ".2f") for key in ("sft_distill", "kl_distill", "kl_over_prompted")]
        cells += [_cell(row, "trainable_parameters", ","), str(row["steps"])]
        cells += [_cell(row, "sft_seconds", ".0f", " s"), _cell(row, "kl_seconds", ".0f", " s")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def record_row(args: argparse.Namespace, row: dict, samples: dict) -> None:
    """Add (or replace) ``row``'s prompt in the results files, written atomically; the rows of
    other prompts, from earlier runs, are kept."""
    json_path = args.results_dir / f"{args.output}.json"
    previous = json.loads(json_path.read_text(encoding="utf-8")) if json_path.is_file() else {}
    rows = [r for r in previous.get("rows", []) if r["prompt"] != row["prompt"]] + [row]
    rows.sort(key=lambda r: list(PROMPTS).index(r["prompt"]))
    all_samples = previous.get("samples", {}) | {row["prompt"]: samples}
    env = environment()
    args.results_dir.mkdir(parents=True, exist_ok=True)
    payload = {"environment": env, "rows": rows, "samples": all_samples}
    write_atomic(json_path, json.dumps(payload, indent=2, ensure_ascii=False) + "\n")
    md_path = write_atomic(args.results_dir / f"{args.output}.md", markdown(rows, env))
    print(markdown(rows, env))
    print(f"wrote {json_path} and {md_path}", flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    run(args, lambda row, samples: record_row(args, row, samples))


if __name__ == "__main__":
    main()
