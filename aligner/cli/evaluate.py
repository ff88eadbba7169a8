"""``aligner eval``: the base model, or it plus an Aligner (or a bank's Aligner by name), through
lm-evaluation-harness (the ``eval`` extra, imported when the command runs)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from . import loading
from .arguments import add_command, check_revision, model_arguments, output_arguments, revision_argument
from .console import Console, number

EVAL_HELP = """Evaluate the base model, or the base model plus an Aligner, with EleutherAI's
lm-evaluation-harness (lm_eval 0.4.x: pip install 'aligner-kernels[eval]').

--tasks takes lm_eval task, group or tag names or task YAML files; --include-path adds a folder of
task YAML files of your own. A task can read a local JSON Lines file:
  dataset_path: json
  dataset_kwargs: {data_files: {test: /data/my_task.jsonl}}
With --bank, --aligner names the bank's Aligner, which every call lm_eval makes runs. Prints one line
per task (--json: a JSON object per task); --output writes lm_eval's full results as JSON.
"""


def add_commands(commands: Any) -> None:
    """``eval``."""
    evaluation = add_command(commands, "eval", "evaluate with lm-evaluation-harness", EVAL_HELP)
    model_arguments(evaluation)
    evaluation.add_argument(
        "--tasks", required=True, help="lm_eval task, group or tag names, or task YAML files, comma-separated"
    )
    evaluation.add_argument(
        "--aligner",
        help="saved Aligner directory or Hub repo id (none: the base model); with --bank, the name of the "
        "bank's Aligner to evaluate",
    )
    evaluation.add_argument("--bank", help="bank file or Hub reference: --aligner then names its Aligner")
    revision_argument(evaluation, "--aligner or --bank")
    evaluation.add_argument(
        "--include-path", action="append", help="a folder of task YAML files of your own (repeatable)"
    )
    evaluation.add_argument(
        "--no-builtin-tasks",
        dest="builtin_tasks",
        action="store_false",
        help="look tasks up in --include-path only (skips indexing lm_eval's built-in tasks, about 10 s)",
    )
    evaluation.add_argument(
        "--limit", type=float, help="evaluate only this many examples per task (below 1: this fraction)"
    )
    evaluation.add_argument(
        "--num-fewshot", type=int, help="few-shot examples per prompt (default: the task's)"
    )
    evaluation.add_argument(
        "--batch-size", type=int, default=8, help="sequences per forward or generate call"
    )
    evaluation.add_argument(
        "--output", help="write lm_eval's full results (JSON) to this file (new, or with --overwrite)"
    )
    evaluation.add_argument("--overwrite", action="store_true", help="replace the --output file if it exists")
    evaluation.add_argument(
        "--log-samples", action="store_true", help="include every sample's inputs and outputs in --output"
    )
    output_arguments(evaluation)


def _eval_limit(limit: float | None) -> int | float | None:
    """--limit as lm_eval takes it: a whole number of examples per task, or a fraction below 1."""
    if limit is None:
        return None
    if not limit > 0 or (limit >= 1 and limit != int(limit)):
        raise ValueError(
            f"--limit must be a whole number of examples per task or a fraction in (0, 1), got {limit:g}"
        )
    return int(limit) if limit >= 1 else limit


def _metrics_text(task: str, values: dict[str, Any]) -> str:
    """``task: acc 0.4 ± 0.2449, acc_norm 0.6 ± 0.2449``, from lm_eval's ``"acc,none"``-style keys."""
    shown = []
    for key, value in values.items():
        metric, _, filtering = key.partition(",")
        if not filtering or metric.endswith("_stderr"):
            continue  # name, alias, sample_len; stderrs go beside their metric
        name = metric if filtering == "none" else key
        stderr = values.get(f"{metric}_stderr,{filtering}")
        spread = f" ± {number(float(stderr))}" if isinstance(stderr, (int, float)) else ""
        shown.append(f"{name} {number(float(value)) if isinstance(value, (int, float)) else value}{spread}")
    return f"{task}: " + ", ".join(shown)


def cmd_eval(args: argparse.Namespace, console: Console) -> None:
    from ..evaluation import check_tasks, require_lm_eval, task_manager

    require_lm_eval()  # before anything else: without it the command cannot run at all
    from lm_eval.utils import handle_non_serializable

    from ..outputs import check_output_file, write_results

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise ValueError(f"--num-fewshot must be >= 0, got {args.num_fewshot}")
    limit = _eval_limit(args.limit)
    if args.output:
        check_output_file(args.output, "--output", overwrite=args.overwrite, example="results.json")
    if args.bank and not args.aligner:
        raise ValueError(
            "--bank needs --aligner NAME, the bank's Aligner to evaluate (lm_eval's batches cannot choose "
            "one per row); without --bank, --aligner is a saved Aligner"
        )
    check_revision(args, "aligner", "bank")  # before the task index (seconds), like every cheap check
    include = "--include-path"
    manager = task_manager(args.include_path, include_defaults=args.builtin_tasks, argument=include)
    tasks = check_tasks(manager, args.tasks, "--tasks", include)
    source = {"aligner": None if args.bank else args.aligner, "bank": args.bank}
    bank = loading.check_aligner(args)
    model, tokenizer = loading.with_aligner(args) if bank is None else loading.load_base(args)

    from ..evaluation import evaluate

    results = evaluate(
        model, tokenizer, tasks, bank=bank, aligner_name=args.aligner if bank is not None else None,
        manager=manager, limit=limit, num_fewshot=args.num_fewshot, batch_size=args.batch_size,
        log_samples=args.log_samples, progress=args.progress,
    )  # fmt: skip
    results["aligner"].update(source, revision=args.revision)  # what was given, not the cache path
    # lm_eval's results hold NumPy numbers and a few other objects: JSON as lm_eval writes them.
    results = json.loads(json.dumps(results, default=handle_non_serializable))
    for task, values in results["results"].items():
        console.emit({"task": task, **values}, _metrics_text(task, values))
    if args.output:
        write_results(args.output, json.dumps(results, indent=2, ensure_ascii=False) + "\n", "--output")


COMMANDS = {"eval": cmd_eval}
