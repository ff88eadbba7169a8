"""``aligner convert``: one of the paper's Lit-LLaMA checkpoints in this project's format."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .arguments import add_command, output_arguments
from .console import Console


def add_commands(commands: Any) -> None:
    """``convert``."""
    convert = add_command(
        commands,
        "convert",
        "convert one of the paper's .pth checkpoints",
        "Convert one of the paper's Lit-LLaMA Aligner checkpoints (.pth) into this project's format\n"
        "(read with torch.load(weights_only=True): no code in the file is run).",
        takes_model=False,
    )
    convert.add_argument("checkpoint", help="the .pth file")
    convert.add_argument("--output-dir", required=True, help="where the Aligner goes (new or empty)")
    convert.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier aligner output in OUTPUT_DIR (other files are kept)",
    )
    output_arguments(convert, progress=False)


def cmd_convert(args: argparse.Namespace, console: Console) -> None:
    from ..config import CONFIG_NAME, WEIGHTS_NAME
    from ..official import convert_official, read_official
    from ..outputs import OutputDir, check_output_dir
    from ..serialization import aligner_parameter_count

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


COMMANDS = {"convert": cmd_convert}
