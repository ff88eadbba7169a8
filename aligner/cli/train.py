"""``aligner train``, ``dpo`` and ``distill``: their flags (generated from ``TrainConfig``), the checks
made before the model loads (data, base model, --init-aligner, output directory, --resume), the run,
and the command that continues a run stopped with Ctrl-C."""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..config import AlignerConfig
from ..options import OptionError
from . import loading
from .arguments import (
    add_command,
    add_fields,
    check_revision,
    model_arguments,
    output_arguments,
    revision_argument,
)
from .console import Console, console_callback, number

DPO_HELP = """Direct Preference Optimization of an Aligner on preference pairs.

Rows: {"prompt": ..., "chosen": ..., "rejected": ...}. PKU-SafeRLHF-style rows
{"prompt", "response_0", "response_1", "safer_response_id"} are read directly: chosen is
response_<safer_response_id> and rejected the other response (use better_response_id instead by
renaming it to safer_response_id). The reference policy is the same model with its Aligner
disabled (aligner.disabled), so no second copy of the base model is held in memory. Start from an
SFT Aligner with --init-aligner (otherwise the fresh Aligner equals the reference at step 0).
"""

DISTILL_HELP = """Bake a system prompt into an Aligner (context distillation).

The base model first answers every instruction WITH the system prompt: greedy by default (or
--samples-per-prompt answers each, sampled at --temperature), never repeating a run of
--no-repeat-ngram-size tokens (a small model's prompted answers otherwise often loop: "Ahoy! Ahoy!
Ahoy! ..."); the pairs are kept in OUTPUT_DIR/distilled.jsonl. The Aligner is then trained so
that the model WITHOUT the system prompt matches the prompted model on those answers:

  --loss kl   (default) KL(teacher || student) over the whole vocabulary at every answer token;
              the teacher is the same model with the Aligner disabled plus the system prompt
  --loss sft  cross-entropy on the answers' tokens only (SFT on the prompted model's answers)

Instructions: JSON/JSONL rows with "instruction" (+ optional "input") or "prompt".
"""


# Training flags that, when not given, take the --init-aligner Aligner's value (an Aligner's N and
# layers cannot change); given, they must agree with it: AlignerConfig's flags.
INHERITED = tuple(item.name for item in dataclasses.fields(AlignerConfig) if item.metadata.get("cli", True))


def _training_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """The training flags, generated from TrainConfig's fields and their help metadata (defaults: the
    command's own, ``COMMAND_DEFAULTS``, else TrainConfig's); added when the command's parser is
    first used (importing TrainConfig takes seconds)."""
    parser.defer(lambda parser: _add_training_arguments(parser, command))


def _add_training_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """Imports the training stack: called when the command's parser is first used."""
    from ..training import TrainConfig
    from ..training.config import COMMAND_DEFAULTS

    defaults = COMMAND_DEFAULTS.get(command, {})
    add_fields(parser.add_argument_group("training"), TrainConfig, command, defaults, inherited=INHERITED)


def add_commands(commands: Any) -> None:
    """``train``, ``dpo`` and ``distill``; their training flags are added when each is first used."""
    train = add_command(
        commands,
        "train",
        "supervised fine-tuning of an Aligner",
        "Supervised fine-tuning of an Aligner on JSON/JSONL rows in Alpaca format (instruction,\n"
        "optional input, output) or chat format (messages; the last one, the assistant's, is the\n"
        "target). Prompt tokens are masked out of the loss.",
    )
    model_arguments(train)
    train.add_argument("--data", required=True, help="training data (.json or .jsonl)")
    revision_argument(train, "--init-aligner")
    output_arguments(train, progress=False)
    _training_arguments(train, "train")

    dpo = add_command(commands, "dpo", "DPO of an Aligner on preference pairs", DPO_HELP)
    model_arguments(dpo)
    dpo.add_argument("--data", required=True, help="preference pairs (.json or .jsonl)")
    revision_argument(dpo, "--init-aligner")
    output_arguments(dpo, progress=False)
    _training_arguments(dpo, "dpo")

    distill = add_command(commands, "distill", "bake a system prompt into an Aligner", DISTILL_HELP)
    model_arguments(distill)
    distill.add_argument("--data", required=True, help="instructions (.json or .jsonl)")
    source = distill.add_mutually_exclusive_group(required=True)
    source.add_argument("--system-prompt", help="the system prompt to bake in")
    source.add_argument("--system-prompt-file", help="file holding the system prompt")
    distill.add_argument("--loss", default="kl", choices=["kl", "sft"], help="distillation loss (see above)")
    revision_argument(distill, "--init-aligner")
    output_arguments(distill, progress=False)
    _training_arguments(distill, "distill")


def _is_main_process() -> bool:
    """Under torchrun only rank 0 checks and claims the output directory (the others would race it)."""
    return int(os.environ.get("RANK", "0")) == 0


def _check_training(args: argparse.Namespace, config: Any, command: str) -> None:
    """Before the model loads: the base model (and --init-aligner made for it, or --start-layer within
    it), the output directory, and the checkpoint --resume names."""
    from ..outputs import check_output_dir
    from ..training import check_checkpoint, resume_checkpoint

    base = loading.check_model(args, config.init_aligner)
    if config.init_aligner is None:  # the OptionError says, e.g., that --start-layer is past the last layer
        AlignerConfig(config.num_tokens, config.start_layer, base=base)
    if _is_main_process():
        checkpoint = resume_checkpoint(config)
        resumes_here = checkpoint is not None and checkpoint.parent == Path(config.output_dir)
        check_output_dir(
            config.output_dir,
            command,
            overwrite=config.overwrite,
            resume=resumes_here,
            inputs=[config.init_aligner, args.model],
        )
        if checkpoint is not None:
            check_checkpoint(checkpoint, command, config)


def _inherit_from_init_aligner(
    values: dict[str, Any], defaults: dict[str, Any], revision: str | None = None
) -> None:
    """The INHERITED options not given take the --init-aligner Aligner's values (else ``defaults``);
    given, they must agree with it: an explicit --num-tokens 2 is never silently replaced. A Hub
    --init-aligner is fetched at ``revision``."""
    init = values.get("init_aligner")
    saved = None
    if init is not None:
        init = values["init_aligner"] = loading.local_aligner(init, "--init-aligner", revision)
        saved = AlignerConfig.from_pretrained(init)
    for name in INHERITED:
        if values.get(name) is None:
            values[name] = defaults[name] if saved is None else getattr(saved, name)
        elif saved is not None and values[name] != getattr(saved, name):
            raise OptionError(
                f"{{{name}}} {values[name]} conflicts with {{init_aligner}} {init}: that Aligner has "
                f"{name} {getattr(saved, name)}; leave {{{name}}} out to use the Aligner's, or drop "
                "{init_aligner} to train a fresh Aligner"
            )


def _config(args: argparse.Namespace, console: Console) -> Any:
    """The run's TrainConfig from the flags (and --init-aligner), its logs going to ``console``."""
    from ..training import TrainConfig

    fields = {field.name: field.default for field in dataclasses.fields(TrainConfig)}
    values = {name: value for name, value in vars(args).items() if name in fields}
    check_revision(args, "init_aligner")
    _inherit_from_init_aligner(values, fields, args.revision)
    return TrainConfig(**values, callbacks=[console_callback(console)])


def _report(console: Console, summary: dict[str, Any], output_dir: str) -> None:
    """The run's last line: steps, loss, parameters, time and where the Aligner is."""
    if not _is_main_process():  # under torchrun one summary, from the rank that wrote the Aligner
        return
    text = (
        f"done: {summary['steps']} steps, train loss {number(summary['train_loss'])}, "
        f"{summary['trainable_parameters']} trainable parameters, {number(summary.get('seconds'))} s; "
        f"the Aligner is in {output_dir}"
    )
    console.emit({"event": "done", "output_dir": output_dir, **summary}, text)


# --------------------------------------------------------------------------------------------
# Commands


def cmd_train(args: argparse.Namespace, console: Console) -> None:
    from ..training import sft_examples, train_sft

    config = _config(args, console)
    examples = sft_examples(args.data)
    _check_training(args, config, "train")
    model, tokenizer = loading.load_base(args)
    _report(console, train_sft(model, tokenizer, examples, config, args.data), args.output_dir)


def cmd_dpo(args: argparse.Namespace, console: Console) -> None:
    from ..training import preference_examples, train_dpo_file

    config = _config(args, console)
    preference_examples(args.data)
    _check_training(args, config, "dpo")
    model, tokenizer = loading.load_base(args)
    _report(console, train_dpo_file(model, tokenizer, args.data, config), args.output_dir)


def cmd_distill(args: argparse.Namespace, console: Console) -> None:
    from ..outputs import OutputDir, read_manifest
    from ..training import distill_examples, prompt_examples, train_distill, write_jsonl
    from ..training.distill import TEACHER_OPTIONS

    config = _config(args, console)
    if args.system_prompt_file:
        path = Path(args.system_prompt_file)
        if not path.is_file():
            raise FileNotFoundError(f"--system-prompt-file {path} does not exist")
        system = path.read_text(encoding="utf-8").strip()
    else:
        system = args.system_prompt.strip()
    if not system:
        raise ValueError("the system prompt is empty: give the text to bake in with --system-prompt")
    prompts = prompt_examples(args.data)
    _check_training(args, config, "distill")
    model, tokenizer = loading.load_base(args)
    examples = distill_examples(
        model,
        tokenizer,
        prompts,
        system,
        batch_size=config.batch_size,
        **{name: getattr(config, name) for name in TEACHER_OPTIONS},
        seed=config.seed,
        progress=config.progress,
    )
    if not examples:
        raise ValueError(f"the model gave no answer to any instruction in {args.data}")
    rows = [{"system": system, "messages": [*p, {"role": "assistant", "content": a}]} for p, a in examples]
    try:
        summary = train_distill(model, tokenizer, examples, system, config, loss=args.loss, source=args.data)
    finally:  # the teacher's answers are kept, also after Ctrl-C, beside the run that owns them
        claimed = Path(args.output_dir).is_dir() and read_manifest(args.output_dir)
        if _is_main_process() and claimed and claimed.get("command") == "distill":
            output = OutputDir.claim(args.output_dir, "distill", resume=True)
            output.own("distilled.jsonl")
            write_jsonl(Path(args.output_dir) / "distilled.jsonl", rows)
    _report(console, summary, args.output_dir)


def _rerun_command(argv: Sequence[str], resume: Any, flag: str) -> str:
    """The command line that goes on after Ctrl-C: the same one without --overwrite and --resume,
    plus ``flag``: --resume to continue from the checkpoint, --overwrite to start again."""
    words, skip = ["aligner"], False
    for index, word in enumerate(argv):
        if skip:
            skip = False
            continue
        if word == "--overwrite" or word.startswith("--resume="):
            continue
        if word == "--resume":
            skip = isinstance(resume, str) and index + 1 < len(argv) and argv[index + 1] == resume
            continue
        words.append(word)
    return shlex.join([*words, flag])


def report_interrupt(command: str, interrupt: KeyboardInterrupt, argv: Sequence[str], resume: Any) -> None:
    """What Ctrl-C prints on stderr: for a training run, where its Aligner is and the command line that
    continues it (--resume) or starts it again (--overwrite); for anything else, that it was interrupted."""
    run = sys.modules.get("aligner.training.run")  # loaded if training was interrupted
    if run is None or not isinstance(interrupt, run.TrainingInterrupted):
        print(f"aligner {command}: interrupted", file=sys.stderr)
        return
    print(f"aligner {command}: {interrupt}", file=sys.stderr)
    if interrupt.checkpoint is not None:
        print(f"continue with: {_rerun_command(argv, resume, '--resume')}", file=sys.stderr)
    else:
        print(f"start again with: {_rerun_command(argv, resume, '--overwrite')}", file=sys.stderr)


COMMANDS = {"train": cmd_train, "dpo": cmd_dpo, "distill": cmd_distill}
