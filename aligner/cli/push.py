"""``aligner push``: a saved Aligner or a bank uploaded to a Hugging Face Hub repository with a model
card (the ``hub`` extra, imported when the command runs)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from . import bank as bank_options
from .arguments import add_command, output_arguments
from .console import Console

PUSH_HELP = """Upload a saved Aligner (its two files) or a bank (its one file, as it is) to a Hugging Face Hub
repository, with a generated model card (README.md), in one commit. Log in first (hf auth login, or
set HF_TOKEN). Load them back with aligner.load(model, "owner/name") / --aligner owner/name, and
AlignerBank.load("owner/name") / --bank owner/name.
"""


def add_commands(commands: Any) -> None:
    """``push``."""
    push = add_command(
        commands,
        "push",
        "upload a saved Aligner or a bank to the Hugging Face Hub",
        PUSH_HELP,
        takes_model=False,
    )
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
    output_arguments(push, progress=False)


def cmd_push(args: argparse.Namespace, console: Console) -> None:
    from ..hub import BANK_FILENAME, is_repo_id
    from ..publish import push_bank_to_hub, push_to_hub
    from ..serialization import CONFIG_NAME

    source = Path(args.source)
    if not is_repo_id(args.repo_id):
        raise ValueError(f"REPO_ID {args.repo_id!r} is not a Hugging Face Hub repo id (owner/name)")
    if (source / CONFIG_NAME).is_file():
        if args.path_in_repo != BANK_FILENAME:
            raise ValueError("--path-in-repo applies to a bank; an Aligner's files keep their names")
        kind, push = "Aligner", push_to_hub
        options = {}
    elif source.is_file() and bank_options.is_bank_file(source):
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


COMMANDS = {"push": cmd_push}
