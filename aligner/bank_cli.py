"""``aligner bank build|add|remove|list`` and the ``--bank`` option of ``generate`` and ``chat``.

Kept apart from :mod:`aligner.cli`, which calls the functions below. Bank files are rewritten
atomically; ``build`` refuses to replace an existing file unless ``--overwrite`` is given.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

BANK_HELP = """Build and edit a bank: many saved Aligners of one base model (same num_tokens and
start_layer) stacked in one safetensors file, memory-mapped when used. `aligner generate --bank
FILE --data prompts.jsonl` then answers each row with the Aligner its "aligner" field names."""


def add_bank_commands(commands: Any) -> None:
    """Add ``bank`` and its subcommands to the ``aligner`` subparsers."""
    bank = commands.add_parser("bank", help="build and edit a bank of Aligners", description=BANK_HELP)
    actions = bank.add_subparsers(dest="bank_command", required=True, metavar="ACTION")

    build = actions.add_parser("build", help="stack saved Aligner directories into a new bank file")
    build.add_argument("bank", help="bank file to write (.safetensors)")
    build.add_argument("aligners", nargs="+", help="saved Aligner directories (aligner save / train)")
    build.add_argument(
        "--name",
        action="append",
        default=None,
        help="name of each Aligner, in order (default: directory names)",
    )
    build.add_argument(
        "--dtype", default="float32", choices=sorted(DTYPES), help="storage dtype (default float32)"
    )
    build.add_argument("--overwrite", action="store_true", help="replace an existing bank file")

    add = actions.add_parser("add", help="add a saved Aligner to a bank (rewrites the file atomically)")
    add.add_argument("bank", help="bank file")
    add.add_argument("aligner", help="saved Aligner directory")
    add.add_argument("--name", help="its name in the bank (default: the directory name)")

    remove = actions.add_parser("remove", help="remove an Aligner by name (rewrites the file atomically)")
    remove.add_argument("bank", help="bank file")
    remove.add_argument("name", help="name of the Aligner to remove")

    listing = actions.add_parser("list", help="print the bank's base model, N, start layer and names")
    listing.add_argument("bank", help="bank file")
    for action in (build, add, remove, listing):
        action.add_argument("--json", action="store_true", help="JSON on stdout instead of text")


def add_bank_option(parser: argparse.ArgumentParser) -> None:
    """``--bank FILE`` for ``generate`` and ``chat`` (``--aligner`` then names an Aligner in it)."""
    parser.add_argument(
        "--bank",
        help="bank file: --aligner then names an Aligner in the bank; with generate --data, each row's "
        '"aligner" field names its own (absent or null: --aligner, else the base model)',
    )


def cmd_bank(args: argparse.Namespace, console: Any) -> None:
    from .bank import AlignerBank

    path = Path(args.bank)
    if args.bank_command == "build":
        if path.exists() and not args.overwrite:
            raise ValueError(f"{path} exists; pass --overwrite to replace it")
        bank = AlignerBank.from_aligners(args.aligners, names=args.name, dtype=DTYPES[args.dtype])
    elif args.bank_command == "add":
        bank = AlignerBank.load(path).add(args.aligner, name=args.name)
    elif args.bank_command == "remove":
        bank = AlignerBank.load(path).remove(args.name)
    else:
        _print_listing(AlignerBank.load(path), args.json)
        return
    bank.save(path)
    record = {"bank": str(path), "aligners": len(bank), "action": args.bank_command}
    console.emit(record, f"{args.bank_command}: {path} now holds {len(bank)} Aligners")


def _print_listing(bank: Any, as_json: bool) -> None:
    info = {
        "aligners": len(bank),
        "num_tokens": bank.num_tokens,
        "start_layer": bank.start_layer,
        "dtype": str(bank.tokens.dtype).removeprefix("torch."),
        "base": bank.base,
        "names": bank.names,
    }
    if as_json:
        print(json.dumps(info, ensure_ascii=False))
        return
    base = ", ".join(f"{key}={value}" for key, value in bank.base.items())
    print(
        f"{len(bank)} Aligners, num_tokens={bank.num_tokens}, start_layer={bank.start_layer}, {info['dtype']}"
    )
    print(f"base: {base}")
    for index, name in enumerate(bank.names):
        print(f"{index}\t{name}")


def apply_bank(model: Any, args: argparse.Namespace) -> Any:
    """Attach the ``--bank`` file to ``model``; with ``--aligner NAME`` that Aligner also becomes the
    model's own (what rows without a name of their own, and chat, use). Returns the bank."""
    from . import aligner_parameters
    from .bank import AlignerBank, attach_bank

    bank = AlignerBank.load(args.bank)
    attach_bank(model, bank)
    if args.aligner:
        tokens, gates = bank.select(torch.tensor([bank.index(args.aligner)]))
        params = aligner_parameters(model)
        with torch.no_grad():
            params["prefix"].copy_(tokens[0])
            for offset, layer in enumerate(range(bank.start_layer, bank.start_layer + gates.shape[1])):
                params[f"gate.{layer}"].copy_(gates[0, offset])
    return bank


def bank_index(model: Any, args: argparse.Namespace) -> torch.Tensor:
    """One index into the model's bank per prompt of ``generate``, in its order (the --prompt
    prompts, then the --data rows): a row's ``aligner`` field names its Aligner; --prompt prompts
    and rows without one (absent or null) use --aligner, else -1 (the base model)."""
    from .patch import get_state
    from .training.data import DataError, read_rows

    bank = get_state(model).bank
    names: list[str | None] = [None] * len(args.prompt)
    if args.data:
        for number, row in enumerate(read_rows(args.data), start=1):
            name = row.get("aligner")
            if name is not None and not isinstance(name, str):
                raise DataError(f"{args.data}: row {number}: field 'aligner' must be a name (string) or null")
            names.append(name)
    default = -1 if args.aligner is None else bank.index(args.aligner)
    return torch.tensor([default if n is None else bank.index(n) for n in names], dtype=torch.int64)


def with_aligner_names(model: Any, index: torch.Tensor, rows: list[dict]) -> list[dict]:
    """``rows`` with the name of each row's Aligner first (None: the base model)."""
    from .patch import get_state

    names = get_state(model).bank.names
    return [{"aligner": names[i] if i >= 0 else None, **row} for i, row in zip(index.tolist(), rows)]
