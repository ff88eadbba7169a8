"""The aligner command line: train, dpo, distill, generate, chat, eval, merge, convert, info, bank, push,
serve.

Every subcommand has --help. Models come from a local directory, a GGUF file (the .gguf path, or
a directory holding one; --gguf-file NAME picks one of several) or a hub name when the machine has
network. Multi-process training: torchrun --nproc_per_node K -m aligner.cli train ... (Trainer
wraps the model in DDP). Output: human-readable lines on stdout, or JSON lines with --json; progress
bars on stderr (none with --no-progress). Errors are one line on stderr and a non-zero exit: 2 for
bad arguments or input, 130 for Ctrl-C.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

# Only what parsing the command line needs is imported here and by the command modules at their top:
# torch, transformers and the training stack are imported by the command that uses them, when it
# runs, so that --help and argument errors are fast and generate or chat never load the training stack.
from ..options import HelpFormatter, OptionError, cli_flag
from . import bank, convert, evaluate, generate, info, merge, push, serve, train
from .arguments import LazyParser
from .console import Console, progress_bars, without_bitsandbytes_kernel_warning

__all__ = ["EXIT_ERROR", "EXIT_INTERRUPTED", "build_parser", "main"]

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130

# The command modules in the order their commands appear in --help; each has add_commands(subparsers)
# and COMMANDS, its command names and their functions (args, console).
_GROUPS = (train, generate, bank, evaluate, merge, convert, info, push, serve)
COMMANDS = {name: run for group in _GROUPS for name, run in group.COMMANDS.items()}


def build_parser() -> argparse.ArgumentParser:
    """The ``aligner`` parser with every subcommand (the training flags are added on first use)."""
    parser = LazyParser(prog="aligner", description=__doc__, formatter_class=HelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in _GROUPS:
        group.add_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the aligner command line; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    with without_bitsandbytes_kernel_warning():
        parser = build_parser()
        args, rest = parser.parse_known_args(argv)
        if rest and not getattr(args, "passes_through", None):
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        args.passed_through = rest  # a command that hands its other options on (serve: to vllm serve)
        return _run(args, argv)


def _run(args: argparse.Namespace, argv: list[str]) -> int:
    console = Console(getattr(args, "json", False))
    try:
        with progress_bars(getattr(args, "progress", True)):
            COMMANDS[args.command](args, console)
    except KeyboardInterrupt as interrupt:
        train.report_interrupt(args.command, interrupt, argv, getattr(args, "resume", None))
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
