"""Which training defaults work best for a first run of a few hundred rows? SmolLM2-135M-Instruct, CPU.

Four behaviours of different kinds, each taught to a fresh Aligner by ``train_sft`` with a
``TrainConfig`` (what ``aligner train`` runs), then checked automatically on held-out
instructions WITHOUT any system prompt:

- ``caps`` (a form): the base model's own greedy answer (first sentence) in ALL CAPS;
- ``signoff`` (a sign-off): the base model's own answer, a blank line, then ``SIGNOFF``;
  the reply must end with that line;
- ``pirate`` (a persona): the base model's greedy replies WITH a pirate system prompt, kept
  only where they pass the pirate check (a second wording of the prompt is tried for the
  instructions whose first reply fails);
- ``french`` (a language): the same with "Always answer in French.", kept where the reply is French.

Training rows come from ``prompts/train.txt``; evaluation on ``heldout.txt`` (like training) and
``carry.txt`` (kinds never seen in training), greedy. Each setting is a learning rate, a schedule
and a start layer (``--settings``); each run length is a number of steps or ``<E>ep`` (epochs, as
the ``epochs`` default does). Reported per (behaviour, setting, length): the fraction of held-out
replies following the behaviour on both sets, the base model's, training rows, steps and time.

    PYTHONPATH=. python benchmarks/bench_defaults.py --threads 1
    PYTHONPATH=. python benchmarks/bench_defaults.py --threads 1 --behaviours caps \
        --settings recipe --steps 1ep 120

Results go to benchmarks/results/defaults-cpu-smollm2.{json,md}, rewritten after each run (under a
lock, so that two processes measuring different behaviours can share them); rows of earlier runs
with other keys are kept, each recording its own settings and date.
"""

from __future__ import annotations

import argparse
import datetime
import fcntl
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from aligner.files import write_atomic

try:  # as a module of the benchmarks package, or as a script
    from .answer_forms import (
        CACHE_DIR,
        FORMS,
        BaseModelCache,
        cached_answers,
        instruction_sets,
        load_demo_model,
        messages,
        native_bf16,
    )
    from .bench_distill import is_french, words
    from .common import RESULTS_DIR, environment
except ImportError:
    from answer_forms import (
        CACHE_DIR,
        FORMS,
        BaseModelCache,
        cached_answers,
        instruction_sets,
        load_demo_model,
        messages,
        native_bf16,
    )
    from bench_distill import is_french, words
    from common import RESULTS_DIR, environment

SIGNOFF = "Hope this helps! - Smol"
PIRATE_PROMPTS = (
    "You are a pirate. Always talk like a pirate, saying 'Arr' and 'matey'.",
    "You are a pirate. Begin every reply with 'Arr, matey!' and talk like a pirate.",
)
FRENCH_PROMPTS = ("Always answer in French.", "Réponds toujours en français.")

# name: (lr, lr_scheduler, start_layer)
SETTINGS = {
    "old-default": (9e-3, "constant", 2),
    "recipe": (3e-2, "cosine", 0),
    "recipe-start2": (3e-2, "cosine", 2),
    "recipe-constant": (3e-2, "constant", 0),
}
SPLITS = ("heldout", "carry")


# The pirate persona's lexicon (what the 2026-11-30 rows were checked with; bench_distill's sailor
# persona checks a larger one).
PIRATE_WORDS = set(
    "arr arrr arrrr ahoy matey mateys ye yer aye hearty hearties landlubber landlubbers scallywag "
    "scallywags booty plunder grog shiver timbers pirate pirates buccaneer buccaneers avast yo-ho "
    "seadog swashbuckler me-hearties".split()
)


def speaks_pirate(reply: str) -> bool:
    """At least one word of the pirate lexicon (possessives included)."""
    return any(re.sub(r"'s$", "", t).strip("'-") in PIRATE_WORDS for t in words(reply))


def signs_off(reply: str) -> bool:
    """The reply ends with the sign-off line, after some answer."""
    reply = reply.strip()
    return reply.endswith(SIGNOFF) and bool(reply[: -len(SIGNOFF)].strip())


CHECKS: dict[str, tuple[str, Callable[[str], bool]]] = {
    "caps": ("form: the reply is in ALL CAPS", FORMS["caps"].check),
    "signoff": (f"sign-off: the reply ends with {SIGNOFF!r}", signs_off),
    "pirate": ("persona: talks like a pirate (pirate lexicon)", speaks_pirate),
    "french": ("language: the reply is in French", is_french),
}


def sentences(text: str, count: int = 2, max_words: int = 40) -> str:
    """The first ``count`` whole sentences of a reply's first paragraph (at most ``max_words``
    words; '' if no sentence ends there): a target that ends where an answer ends."""
    line = text.strip().split("\n")[0].strip()
    ends = [m.end() for m in re.finditer(r"[.!?](?=\s|$)", line)]
    for end in reversed(ends[:count]):
        if len(line[:end].split()) <= max_words:
            return line[:end]
    return ""


def training_rows(
    behaviour: str, model: Any, tokenizer: Any, answers: dict[str, str], args: argparse.Namespace,
    cache: BaseModelCache,
) -> tuple[list[tuple[str, str]], dict[str, Any]]:  # fmt: skip
    """(instruction, target) pairs for ``behaviour`` from the training instructions, and how
    they were made."""
    from aligner.training import generate

    train = instruction_sets()["train"]
    if behaviour == "caps":
        rows = [(i, FORMS["caps"].apply(answers[i])) for i in train if answers[i]]
        return rows, {"source": "rule on the base model's greedy first sentence", "candidates": len(train)}
    if behaviour == "signoff":
        rows = [(i, f"{answers[i]}\n\n{SIGNOFF}") for i in train if answers[i]]
        return rows, {"source": "rule on the base model's greedy first sentence", "candidates": len(train)}
    prompts = PIRATE_PROMPTS if behaviour == "pirate" else FRENCH_PROMPTS
    check = CHECKS[behaviour][1]
    kept: dict[str, str] = {}
    passed = []
    for system in prompts:
        todo = [i for i in train if i not in kept]
        replies = cache.get(
            "prompted-replies", {"instructions": todo, "system": system, "tokens": args.teacher_tokens},
            lambda todo=todo, system=system: generate(
                model, tokenizer, [messages(i, system) for i in todo], max_new_tokens=args.teacher_tokens,
                batch_size=args.gen_batch_size, progress=False,
            ),
        )  # fmt: skip
        count = 0
        for instruction, reply in zip(todo, replies):
            target = sentences(reply)
            if target and check(target):
                kept[instruction] = target
                count += 1
        passed.append({"system_prompt": system, "asked": len(todo), "passed": count})
    rows = [(i, kept[i]) for i in train if i in kept]
    made = {"source": "prompted base model's greedy replies that pass the check", "candidates": len(train)}
    return rows, {**made, "teacher": passed}


def parse_length(text: str) -> dict[str, Any]:
    """``120`` -> 120 steps; ``4ep`` -> 4 epochs."""
    if text.endswith("ep"):
        return {"epochs": float(text[:-2]), "max_steps": -1}
    return {"epochs": 1.0, "max_steps": int(text)}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--behaviours", nargs="+", default=list(CHECKS), choices=list(CHECKS))
    parser.add_argument("--settings", nargs="+", default=["old-default", "recipe", "recipe-start2"],
                        choices=list(SETTINGS))  # fmt: skip
    parser.add_argument("--steps", nargs="+", default=["120"], help="run lengths: steps, or <E>ep for epochs")
    parser.add_argument(
        "--num-tokens", type=int, default=None, help="Aligner tokens (default: TrainConfig's)"
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                        help="training precision; auto: bfloat16 autocast where the CPU has it")  # fmt: skip
    parser.add_argument("--answer-tokens", type=int, default=32, help="length of the base model's answers")
    parser.add_argument("--teacher-tokens", type=int, default=48, help="length of the prompted replies")
    parser.add_argument("--reply-tokens", type=int, default=48, help="length of evaluated replies")
    parser.add_argument("--gen-batch-size", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=str(CACHE_DIR), help="where the base model's results are kept")
    parser.add_argument("--model", help="model directory instead of SmolLM2 (e.g. a tiny test model)")
    parser.add_argument("--output", default="defaults-cpu-smollm2")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    return parser.parse_args(argv)


def run(args: argparse.Namespace, record: Callable[[dict], None]) -> None:
    import aligner
    from aligner.training import TrainConfig, generate, train_sft

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_demo_model(args.model)
    cache = BaseModelCache(args.cache_dir, model)
    answers = cached_answers(
        cache, model, tokenizer, limit=None, tokens=args.answer_tokens, batch_size=args.gen_batch_size
    )
    sets = instruction_sets()

    def replies(name: str) -> dict[str, list[str]]:
        start = time.perf_counter()
        out = {
            split: generate(
                model,
                tokenizer,
                [messages(i) for i in sets[split]],
                max_new_tokens=args.reply_tokens,
                batch_size=args.gen_batch_size,
                progress=False,
            )  # fmt: skip
            for split in SPLITS
        }
        print(
            f"  {name}: {sum(map(len, out.values()))} replies in {time.perf_counter() - start:.0f} s",
            flush=True,
        )
        return out

    base = cache.get("replies", {"sets": {s: sets[s] for s in SPLITS}, "tokens": args.reply_tokens},
                     lambda: replies("base"))  # fmt: skip
    bf16 = args.precision == "bf16" or (args.precision == "auto" and native_bf16())
    for behaviour in args.behaviours:
        description, check = CHECKS[behaviour]
        rows, made = training_rows(behaviour, model, tokenizer, answers, args, cache)
        print(f"{behaviour}: {len(rows)} training rows ({made})", flush=True)
        base_rate = {s: sum(map(check, base[s])) / len(base[s]) for s in SPLITS}
        examples = [(messages(i), target) for i, target in rows]
        for length in args.steps:
            for name in args.settings:
                lr, scheduler, start_layer = SETTINGS[name]
                extra = {} if args.num_tokens is None else {"num_tokens": args.num_tokens}
                with tempfile.TemporaryDirectory() as out:
                    config = TrainConfig(
                        output_dir=out, lr=lr, lr_scheduler=scheduler, start_layer=start_layer,
                        batch_size=args.batch_size, seed=args.seed, bf16=bf16, progress=False,
                        save_steps=10**9, logging_steps=10, **parse_length(length), **extra,
                    )  # fmt: skip
                    print(f"  {behaviour} / {name} / {length}: training", flush=True)
                    summary = train_sft(model, tokenizer, examples, config, f"bench_defaults {behaviour}")
                model.eval()
                got = replies(f"{behaviour} / {name} / {length}")
                aligner.unpatch(model)
                rate = {s: sum(map(check, got[s])) / len(got[s]) for s in SPLITS}
                row = {
                    "behaviour": behaviour,
                    "check": description,
                    "setting": name,
                    "lr": lr,
                    "lr_scheduler": scheduler,
                    "start_layer": start_layer,
                    "length": length,
                    "num_tokens": config.num_tokens,
                    "steps": summary["steps"],
                    "train_rows": len(rows),
                    "rows_made": made,
                    "follows": rate,
                    "base_follows": base_rate,
                    "train_loss": summary["train_loss"],
                    "train_seconds": summary["seconds"],
                    "trainable_parameters": summary["trainable_parameters"],
                    "training_precision": "bf16 autocast" if bf16 else "fp32",
                    "settings": {
                        k: getattr(args, k)
                        for k in (
                            "batch_size",
                            "answer_tokens",
                            "teacher_tokens",
                            "reply_tokens",
                            "gen_batch_size",
                            "threads",
                            "seed",
                        )
                    },  # fmt: skip
                    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    "samples": {
                        s: [
                            {"instruction": i, "reply": r, "follows": check(r)}
                            for i, r in zip(sets[s], got[s])
                        ]
                        for s in SPLITS
                    },
                }
                print(f"  -> {rate} after {summary['steps']} steps, {summary['seconds']:.0f} s", flush=True)
                record(row)


def key(row: dict) -> tuple:
    return (row["behaviour"], row["setting"], row["length"], row["num_tokens"])


def markdown(rows: list[dict], env: dict) -> str:
    lines = [
        f"Device: {env['device']} (shared with other jobs; times are under contention); "
        f"torch {env['torch']}, transformers {env['transformers']}\n",
        "SmolLM2-135M-Instruct; fraction of held-out greedy replies (no system prompt) that follow the "
        "behaviour: heldout.txt (30, like training) / carry.txt (30, unseen kinds). Base: the base model.\n",
        "| behaviour | setting | lr | schedule | start layer | steps | heldout | carry "
        "| base heldout / carry | train rows | train time | trainable params |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        steps = f"{r['steps']}" + (f" ({r['length']})" if r["length"].endswith("ep") else "")
        lines.append(
            f"| {r['behaviour']} | {r['setting']} | {r['lr']:g} | {r['lr_scheduler']} | {r['start_layer']} "
            f"| {steps} | {r['follows']['heldout']:.0%} | {r['follows']['carry']:.0%} "
            f"| {r['base_follows']['heldout']:.0%} / {r['base_follows']['carry']:.0%} | {r['train_rows']} "
            f"| {r['train_seconds']:.0f} s | {r['trainable_parameters']:,} |"
        )
    return "\n".join(lines) + "\n"


def record_row(args: argparse.Namespace, row: dict) -> None:
    """Add (or replace) ``row`` in the results files, written atomically under a lock; rows of
    other keys, from earlier runs or another process, are kept."""
    args.results_dir.mkdir(parents=True, exist_ok=True)
    json_path = args.results_dir / f"{args.output}.json"
    lock = os.open(args.results_dir, os.O_RDONLY)  # the folder itself: no lock file left behind
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        previous = json.loads(json_path.read_text(encoding="utf-8")) if json_path.is_file() else {}
        rows = [r for r in previous.get("rows", []) if key(r) != key(row)] + [row]
        order = list(CHECKS), list(SETTINGS)
        rows.sort(key=lambda r: (order[0].index(r["behaviour"]), r["steps"], order[1].index(r["setting"])))
        env = environment()
        write_atomic(
            json_path, json.dumps({"environment": env, "rows": rows}, indent=2, ensure_ascii=False) + "\n"
        )
        md_path = write_atomic(args.results_dir / f"{args.output}.md", markdown(rows, env))
    finally:
        os.close(lock)  # closing releases the lock
    print(f"wrote {json_path} and {md_path}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    run(args, lambda row: record_row(args, row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
