"""``aligner generate`` and ``aligner chat``: answers from the base model, an Aligner, or a bank's
Aligners (one per prompt). Neither imports the training stack."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from . import bank as bank_options
from . import loading
from .arguments import add_command, check_generation, model_arguments, output_arguments, revision_argument
from .console import Console


def _generation_arguments(parser: argparse.ArgumentParser) -> None:
    """--aligner and the sampling options of generate and chat."""
    parser.add_argument("--aligner", help="saved Aligner directory to apply (none: the base model)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="length limit of each answer")
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0: greedy")
    parser.add_argument("--system", help="system prompt")


def add_commands(commands: Any) -> None:
    """``generate`` and ``chat``."""
    gen = add_command(
        commands,
        "generate",
        "answer prompts",
        "Answer prompts with the base model or the base model plus an Aligner. Prompts file rows:\n"
        '{"prompt": "..."} or {"instruction": "...", "input": "..."}; with --bank, a row\'s "aligner"\n'
        'field picks its Aligner ("aligner": null: the base model; no field: --aligner).',
    )
    model_arguments(gen)
    _generation_arguments(gen)
    gen.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    gen.add_argument("--data", help="prompts file (.json or .jsonl; rows with instruction or prompt)")
    gen.add_argument("--batch-size", type=int, default=8, help="prompts answered together")
    gen.add_argument(
        "--output", help="also write JSON lines {prompt, answer} to this file (new, or with --overwrite)"
    )
    gen.add_argument("--overwrite", action="store_true", help="replace the --output file if it exists")
    output_arguments(gen)

    chat = add_command(
        commands,
        "chat",
        "interactive chat",
        "Interactive chat on stdin; /reset clears the history, /exit or end of input quits.",
    )
    model_arguments(chat)
    _generation_arguments(chat)
    output_arguments(chat)
    bank_options.add_bank_option(gen)  # --bank: aligner/cli/bank.py
    bank_options.add_bank_option(chat)
    revision_argument(gen, "--aligner or --bank")
    revision_argument(chat, "--aligner or --bank")


def cmd_generate(args: argparse.Namespace, console: Console) -> None:
    from ..outputs import check_output_file, write_results

    check_generation(args)
    if not args.prompt and not args.data:
        raise ValueError("nothing to answer: give --prompt TEXT (repeatable) or --data FILE")
    if args.output:
        check_output_file(args.output, "--output", overwrite=args.overwrite, example="answers.jsonl")
    from ..generation import generate
    from ..prompts import prompt_examples

    choices = bank_options.row_aligners(args.data) if args.data else []
    prompts = [*args.prompt, *(prompt_examples(args.data) if args.data else [])]
    bank = loading.check_aligner(args)
    if bank is None:
        bank_options.check_rows_without_bank(args.data, choices, args.aligner)
        index = None
    else:  # one Aligner per row
        index = bank_options.bank_index(bank, args.aligner, len(args.prompt), choices, args.data)
    model, tokenizer = loading.with_aligner(args, bank)
    system = [{"role": "system", "content": args.system}] if args.system else []
    answers = generate(
        model,
        tokenizer,
        [[*system, {"role": "user", "content": p}] for p in prompts],
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        temperature=args.temperature,
        progress=args.progress,
        aligner_index=index,
    )
    rows = [{"prompt": p, "answer": a} for p, a in zip(prompts, answers)]
    if index is not None:
        rows = bank_options.with_aligner_names(bank, index, rows)
    for row in rows:
        console.emit(row, f"> {row['prompt']}\n{row['answer']}\n")
    if args.output:
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        write_results(args.output, text, "--output")


def cmd_chat(args: argparse.Namespace, console: Console) -> None:
    check_generation(args)
    from ..generation import generate

    model, tokenizer = loading.with_aligner(args, loading.check_aligner(args))
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict[str, str]] = []
    interactive = sys.stdin.isatty()
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        if line.strip() == "/exit":
            break
        if line.strip() == "/reset":
            history = []
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        answer = generate(
            model,
            tokenizer,
            [[*system, *history]],
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            progress=False,
        )[0]
        history.append({"role": "assistant", "content": answer})
        console.emit(
            {"event": "reply", "prompt": line, "reply": answer},
            f"aligner> {answer}" if interactive else answer,
        )


COMMANDS = {"generate": cmd_generate, "chat": cmd_chat}
