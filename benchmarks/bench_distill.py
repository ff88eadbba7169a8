"""Does a distilled Aligner follow its system prompt WITHOUT the prompt? SmolLM2-135M-Instruct, CPU.

Three system prompts of different kinds that SmolLM2-135M-Instruct follows when prompted: a
language ("Always answer in French."), a length rule ("Answer in exactly one short sentence.") and
a persona (a grumpy old sailor who starts every reply with "Ahoy!"), each with an automatic check
of a reply. For each prompt the base model answers the training instructions WITH the prompt (the
teacher's continuations, made with ``aligner distill``'s teacher defaults: ``TrainConfig``'s
``max_new_tokens``, ``temperature``, ``repetition_penalty``, ``no_repeat_ngram_size`` and
``samples_per_prompt``, unless given here), then an Aligner is trained with the KL loss (the
default of ``aligner distill``). The base model without the prompt, the base model with it and the
distilled Aligner without it then answer held-out instructions greedily, and the check says
whether each reply follows the rule. Target: the Aligner >= 0.9 x the prompted base model.

Training instructions: the 234 of ``prompts/train.txt`` (questions and short tasks of many kinds)
and the 40 longer-answer ones below (explain, how-to, advice, describe, compare, creative, list,
opinion, definition). Held-out: the 20 below (other topics and wordings), ``prompts/heldout.txt``
(30, like training) and ``prompts/carry.txt`` (30, kinds never in training): 80 in all.

    PYTHONPATH=. python benchmarks/bench_distill.py --threads 1                  # all prompts
    PYTHONPATH=. python benchmarks/bench_distill.py --threads 1 --prompts french --steps 40

Reported per prompt: the three rates, the teacher's answers (how many, how often they follow the
rule, how many repeat themselves, mean length), trainable parameters, steps, teacher and training
wall time. Results go to benchmarks/results/distill-cpu-smollm2.{json,md}, rewritten after each
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
from aligner.training.distill import TEACHER_OPTIONS

try:  # as a module of the benchmarks package, or as a script
    from .answer_forms import CARRY_INSTRUCTIONS, SMOLLM2_GGUF, smollm2_directory
    from .answer_forms import HELDOUT_INSTRUCTIONS as LIKE_TRAINING
    from .answer_forms import TRAIN_INSTRUCTIONS as SHORT_TRAINING
    from .common import RESULTS_DIR, environment
except ImportError:
    from answer_forms import CARRY_INSTRUCTIONS, SMOLLM2_GGUF, smollm2_directory
    from answer_forms import HELDOUT_INSTRUCTIONS as LIKE_TRAINING
    from answer_forms import TRAIN_INSTRUCTIONS as SHORT_TRAINING
    from common import RESULTS_DIR, environment

# Written for this benchmark: varied kinds (explain, how-to, advice, describe, compare, creative,
# list, opinion, definition), one a line. The held-out ones have other topics and wordings.
LONG_TRAINING = """
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

OTHER_TOPICS = """
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

TRAIN_INSTRUCTIONS = SHORT_TRAINING + LONG_TRAINING
HELDOUT_INSTRUCTIONS = OTHER_TOPICS + LIKE_TRAINING + CARRY_INSTRUCTIONS

FRENCH_WORDS = set(
    "le la les de des du un une et est en que qui pour dans sur avec pas ce cette il elle nous vous "
    "sont au aux son sa ses leur par plus mais ou je tu on très comme être avoir fait peut".split()
)
ENGLISH_WORDS = set(
    "the a an and is are of to in that it for with on as this be you i was by not or but have can "
    "your they we my their will".split()
)
# An old sea dog's words (not plain nouns such as sea or ship, which any answer about the sea has)
SAILOR_WORDS = set(
    "arr arrr arrrr ahoy matey mateys ye yer aye hearty hearties landlubber landlubbers scallywag "
    "scallywags booty plunder grog shiver timbers pirate pirates buccaneer buccaneers avast yo-ho "
    "seadog swashbuckler me-hearties sailor sailors seafarer seafaring lad lads lass blimey".split()
)


def words(text: str) -> list[str]:
    return re.findall(r"[a-zà-ÿ'-]+", text.lower().replace("’", "'"))


def is_french(reply: str) -> bool:
    """More French than English function words (elided l'/d'/c'/qu' count as French), at least 2."""
    tokens = words(reply)
    french = sum(t in FRENCH_WORDS or re.match(r"^(l|d|c|qu|j|n|s)'", t) is not None for t in tokens)
    english = sum(t in ENGLISH_WORDS for t in tokens)
    return french >= 2 and french > english


def speaks_sailor(reply: str) -> bool:
    """In character: at least one word of an old sea dog's (ahoy, aye, matey, ye, ...; possessives
    included)."""
    return any(re.sub(r"'s$", "", t).strip("'-") in SAILOR_WORDS for t in words(reply))


def one_sentence(reply: str) -> bool:
    """Exactly one sentence, finished within the reply's token budget: it ends with . ! or ? and
    has no other sentence end (a full stop followed by a space or a line break) before that."""
    text = reply.strip()
    return text[-1:] in (".", "!", "?") and re.search(r"[.!?]\s", text) is None


def repeats_itself(answer: str) -> bool:
    """A degenerate answer: some run of three words occurs twice (``Ahoy! Ahoy! Ahoy! Ahoy!``)."""
    tokens = words(answer)
    grams = [tuple(tokens[i : i + 3]) for i in range(len(tokens) - 2)]
    return len(grams) != len(set(grams))


# name: (system prompt, check on a reply)
PROMPTS: dict[str, tuple[str, Callable[[str], bool]]] = {
    "french": ("Always answer in French.", is_french),
    "sentence": ("Answer in exactly one short sentence.", one_sentence),
    "sailor": ("You are a grumpy old sailor. Start every reply with 'Ahoy!'", speaks_sailor),
}


def user(instruction: str, system: str | None = None) -> list[dict[str, str]]:
    return [
        *([{"role": "system", "content": system}] if system else []),
        {"role": "user", "content": instruction},
    ]


TEACHER = TEACHER_OPTIONS


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompts", nargs="+", default=list(PROMPTS), choices=list(PROMPTS))
    parser.add_argument(
        "--steps",
        type=int,
        default=-1,
        help="training steps of each Aligner (-1: aligner distill's epochs, one pass over the teacher's "
        "answers; 0: only base and prompted base)",
    )
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default: aligner distill's)")
    parser.add_argument("--lr-scheduler", default=None, help="schedule (default: aligner distill's)")
    parser.add_argument("--epochs", type=float, default=None, help="epochs (default: aligner distill's)")
    parser.add_argument("--num-tokens", type=int, default=None, help="N (default: TrainConfig's)")
    parser.add_argument("--start-layer", type=int, default=None, help="first layer (default: TrainConfig's)")
    parser.add_argument("--batch-size", type=int, default=8)
    for name in TEACHER:  # the teacher's options: aligner distill's defaults unless given
        kind = float if name in ("temperature", "repetition_penalty") else int
        parser.add_argument(
            "--" + name.replace("_", "-"), type=kind, default=None, help="default: TrainConfig's"
        )
    parser.add_argument("--train-limit", type=int, default=None, help="use the first N training instructions")
    parser.add_argument("--gen-batch-size", type=int, default=40, help="prompts per generate call")
    parser.add_argument("--reply-tokens", type=int, default=40, help="length of evaluated replies")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="distill-cpu-smollm2")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    return parser.parse_args(argv)


def settings(args: argparse.Namespace) -> dict:
    """The run's recipe: `aligner distill`'s defaults where this run gives no value."""
    from dataclasses import fields

    from aligner.training import TrainConfig
    from aligner.training.config import COMMAND_DEFAULTS

    default = {item.name: item.default for item in fields(TrainConfig)} | COMMAND_DEFAULTS["distill"]
    names = ("lr", "lr_scheduler", "epochs", "num_tokens", "start_layer", *TEACHER)
    chosen = {name: default[name] if getattr(args, name) is None else getattr(args, name) for name in names}
    return chosen | {"batch_size": args.batch_size, "steps": args.steps, "seed": args.seed}


def teacher_statistics(answers: list[str], check: Callable[[str], bool], tokenizer) -> dict:
    """How the teacher's answers look: how many, the share that follows the rule, the share that
    repeats itself (:func:`repeats_itself`), their mean length in tokens."""
    lengths = [len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers]
    return {
        "answers": len(answers),
        "follows": sum(map(check, answers)) / len(answers),
        "repeats_itself": sum(map(repeats_itself, answers)) / len(answers),
        "mean_tokens": sum(lengths) / len(lengths),
    }


def run(args: argparse.Namespace, record: Callable[[dict, dict], None]) -> None:
    """Measure every prompt of ``args.prompts``; ``record(row, samples)`` after each one."""
    import aligner
    from aligner.training import TrainConfig, distill_examples, generate, load_model, train_distill

    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = settings(args)
    model, tokenizer = load_model(str(smollm2_directory()), gguf_file=SMOLLM2_GGUF)
    train_instructions = TRAIN_INSTRUCTIONS[: args.train_limit]

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
        answers = {"base": base, "prompted base": replies(system, "prompted base")}
        row = {"prompt": name, "system_prompt": system, "held_out": len(HELDOUT_INSTRUCTIONS)}
        row["base"] = sum(map(check, base)) / len(base)
        row["prompted_base"] = sum(map(check, answers["prompted base"])) / len(base)
        if args.steps == 0:  # only how often the base model follows the rule, with and without it
            record(row | {"steps": 0}, {key: _scored(value, check) for key, value in answers.items()})
            continue
        start = time.perf_counter()
        examples = distill_examples(
            model, tokenizer, train_instructions, system, batch_size=args.gen_batch_size, seed=args.seed,
            progress=False, **{key: recipe[key] for key in TEACHER},
        )  # fmt: skip
        teacher_seconds = time.perf_counter() - start
        teacher = teacher_statistics([a for _, a in examples], check, tokenizer)
        print(f"  teacher: {teacher} in {teacher_seconds:.0f} s", flush=True)
        with tempfile.TemporaryDirectory() as out:
            config = TrainConfig(
                output_dir=out, num_tokens=recipe["num_tokens"], start_layer=recipe["start_layer"],
                lr=recipe["lr"], lr_scheduler=recipe["lr_scheduler"], epochs=recipe["epochs"],
                max_steps=args.steps,
                batch_size=args.batch_size, logging_steps=10, save_steps=10**9,
                seed=args.seed, progress=False,
            )  # fmt: skip
            start = time.perf_counter()
            summary = train_distill(model, tokenizer, examples, system, config)
            seconds = time.perf_counter() - start
            metrics = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
        answers["distilled"] = replies(None, "distilled")
        aligner.unpatch(model)
        row["distilled"] = sum(map(check, answers["distilled"])) / len(base)
        print(
            f"  distilled: {row['distilled']:.2f} after {summary['steps']} steps, {seconds:.0f} s", flush=True
        )
        ratio = row["distilled"] / row["prompted_base"] if row["prompted_base"] else None
        row |= {
            "distilled_over_prompted": ratio,
            "target_met": ratio is not None and ratio >= 0.9,
            "trainable_parameters": summary["trainable_parameters"],
            "steps": summary["steps"],
            "train_seconds": seconds,
            "train_loss": summary["train_loss"],
            "log": [
                {k: r[k] for k in ("step", "loss", "top1_agreement") if k in r}
                for r in metrics
                if "loss" in r
            ],
            "teacher": teacher,
            "teacher_seconds": teacher_seconds,
            "train_instructions": len(train_instructions),
            "settings": recipe | {"threads": args.threads, "reply_tokens": args.reply_tokens},
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        record(row, {key: _scored(value, check) for key, value in answers.items()})
        teacher_rows = [{"instruction": p[0]["content"], "answer": a} for p, a in examples]
        record_teacher(args, name, teacher_rows)


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
        f"Device: {env['device']}, shared with other jobs (timings under contention); "
        f"torch {env['torch']}, transformers {env['transformers']}\n",
        "SmolLM2-135M-Instruct; fraction of the held-out instructions whose greedy reply follows the "
        "system prompt's rule: the base model without and with the prompt, the distilled Aligner "
        "(KL) WITHOUT the prompt. Teacher: its answers to the training instructions (how many, "
        "share that follows the rule, share that repeats itself).\n",
        "| system prompt | check | held-out | base | prompted base | distilled | distilled / prompted "
        "| teacher answers (follow, repeat) | trainable params | steps | teacher time | train time |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        teacher = row.get("teacher")
        cells = [row["system_prompt"], row["prompt"], str(row["held_out"])]
        cells += [_cell(row, key, ".2f") for key in ("base", "prompted_base", "distilled")]
        cells.append(_cell(row, "distilled_over_prompted", ".2f"))
        cells.append(
            "not run" if teacher is None
            else f"{teacher['answers']} ({teacher['follows']:.2f}, {teacher['repeats_itself']:.2f})"
        )  # fmt: skip
        cells += [_cell(row, "trainable_parameters", ","), str(row["steps"])]
        cells += [_cell(row, "teacher_seconds", ".0f", " s"), _cell(row, "train_seconds", ".0f", " s")]
        lines.append("| " + " | ".join(cells) + " |")
    recipes = {json.dumps(row["settings"], sort_keys=True) for row in rows if "settings" in row}
    for recipe in sorted(recipes):
        lines.append(f"\nRecipe: `{recipe}`")
    return "\n".join(lines) + "\n"


def record_teacher(args: argparse.Namespace, name: str, rows: list[dict]) -> None:
    """The teacher's answers of prompt ``name`` (what the Aligner was trained on), one JSON a line."""
    path = args.results_dir / f"{args.output}-teacher-{name}.jsonl"
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


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
