"""``aligner info``: a saved Aligner in short, or a model (from its config alone) and what an Aligner
on it costs."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from ..config import AlignerConfig
from . import bank as bank_options
from .arguments import add_command, add_fields, output_arguments
from .console import Console


def add_commands(commands: Any) -> None:
    """``info``."""
    info = add_command(
        commands,
        "info",
        "describe a saved Aligner or a model",
        "For a saved Aligner: its base, tokens, layers and parameter count. For a model (directory,\n"
        ".gguf file or hub name; only its config is read): its layers, heads and what an Aligner on it\n"
        "costs.",
        takes_model=False,
    )
    info.add_argument("path", help="saved Aligner directory, or a model")
    info.add_argument("--gguf-file", help="which GGUF file of the model directory to read")
    add_fields(info.add_argument_group("the Aligner to price"), AlignerConfig, "info", {})
    output_arguments(info, progress=False)


def cmd_info(args: argparse.Namespace, console: Console) -> None:
    from ..config import CONFIG_NAME
    from ..models import base_config_fingerprint

    path = Path(args.path)
    if path.is_file() and path.suffix == ".safetensors":
        if bank_options.is_bank_file(path):
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
    from ..serialization import aligner_parameter_count

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


COMMANDS = {"info": cmd_info}
