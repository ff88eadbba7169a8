"""``aligner merge``: a 1-token Aligner folded into the model's o_proj biases, saved as a plain
transformers model."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..config import AlignerConfig
from . import loading
from .arguments import add_command, model_arguments, output_arguments, revision_argument
from .console import Console


def add_commands(commands: Any) -> None:
    """``merge``."""
    merge = add_command(
        commands,
        "merge",
        "fold a 1-token Aligner into the model's o_proj biases",
        "Fold a 1-token Aligner into o_proj biases and save a plain transformers model (config\n"
        "attention_bias=True, zero q/k/v biases) that from_pretrained loads without this package.\n"
        "Files already in OUTPUT_DIR that aligner did not write are never deleted.",
    )
    model_arguments(merge)
    merge.add_argument("--aligner", required=True, help="saved 1-token Aligner directory or Hub repo id")
    revision_argument(merge, "--aligner")
    merge.add_argument(
        "--output-dir", required=True, help="where the merged model and tokenizer go (new or empty)"
    )
    merge.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier aligner output in OUTPUT_DIR (other files are kept)",
    )
    output_arguments(merge)


def cmd_merge(args: argparse.Namespace, console: Console) -> None:
    from ..hf_patch import merged_model
    from ..outputs import OutputDir, check_output_dir

    args.aligner = loading.local_aligner(args.aligner, "--aligner", args.revision)
    num_tokens = AlignerConfig.from_pretrained(args.aligner).num_tokens
    if num_tokens != 1:
        raise ValueError(f"--aligner {args.aligner} has {num_tokens} tokens; only a 1-token Aligner merges")
    inputs = [args.aligner, args.model, Path(args.model).parent if args.model.endswith(".gguf") else None]
    check_output_dir(args.output_dir, "merge", overwrite=args.overwrite, inputs=inputs)
    args.revision = None  # --aligner is a local directory by now
    loading.check_aligner(args)
    model, tokenizer = loading.with_aligner(args)
    layers = merged_model(model)
    output = OutputDir.claim(args.output_dir, "merge", overwrite=args.overwrite, inputs=inputs)
    files = output.save_pretrained(model, tokenizer)
    output.give_usual_mode(*files)  # save_pretrained leaves model.safetensors 0600
    console.emit(
        {"output_dir": args.output_dir, "merged_layers": layers, "files": files},
        f"merged the Aligner into layers {layers[0]}-{layers[-1]}; the model is in {args.output_dir} "
        f"({len(files)} files)",
    )


COMMANDS = {"merge": cmd_merge}
