"""The base model and its Aligner as the commands take them (MODEL, --gguf-file, --dtype, --aligner,
--bank, --revision): checked against each other from the model's config alone before anything loads
(loading takes 20-25 s on SmolLM2), then loaded. Nothing of the training stack is imported here."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from . import bank as bank_options
from .arguments import check_revision


def check_model(args: argparse.Namespace, aligner: str | None = None) -> dict[str, Any]:
    """The base model's fingerprint from its config alone; ``aligner`` (a directory) must match it."""
    from ..models import base_config_fingerprint
    from ..serialization import check_base

    if aligner is not None and not Path(aligner).is_dir():
        raise FileNotFoundError(f"--aligner {aligner}: no such directory (expected a saved Aligner)")
    base = base_config_fingerprint(args.model, args.gguf_file)
    if aligner is not None:
        check_base(aligner, base)
    return base


def load_base(args: argparse.Namespace) -> tuple[Any, Any]:
    """The base model and its tokenizer, as MODEL, --gguf-file and --dtype give them."""
    from ..models import load_model

    return load_model(args.model, gguf_file=args.gguf_file, dtype=args.dtype)


def local_aligner(source: str, argument: str, revision: str | None = None) -> str:
    """An Aligner given as a local directory or a Hugging Face Hub repo id (at ``revision``), as a local
    directory (downloaded into the Hub cache if needed); a clear error naming ``argument`` otherwise."""
    from ..hub import resolve_aligner

    return str(resolve_aligner(source, argument=argument, revision=revision))


def check_aligner(args: argparse.Namespace) -> Any:
    """Before the model loads: its config, and the --aligner directory (made for it) or, with --bank,
    the bank file (made for it, holding --aligner NAME). Returns the bank (None without --bank)."""
    bank_file = getattr(args, "bank", None)
    check_revision(args, "aligner", "bank")
    if args.aligner and not bank_file:
        args.aligner = local_aligner(args.aligner, "--aligner", args.revision)
    base = check_model(args, None if bank_file else args.aligner)
    return bank_options.open_bank(bank_file, base, args.aligner, args.revision) if bank_file else None


def with_aligner(args: argparse.Namespace, bank: Any = None) -> tuple[Any, Any]:
    """The model and tokenizer, with the --aligner directory loaded, or ``bank`` attached."""
    from ..serialization import load

    model, tokenizer = load_base(args)
    if bank is not None:  # generate / chat --bank: --aligner names an Aligner in it
        bank_options.apply_bank(model, bank, args.aligner)
    elif args.aligner:
        load(model, args.aligner)
    return model, tokenizer
