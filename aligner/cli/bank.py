"""``aligner bank build|add|remove|list`` and the ``--bank`` option of ``generate`` and ``chat``.

Bank files are rewritten
atomically; ``build`` refuses to replace an existing file unless ``--overwrite`` is given. Everything
about ``--bank`` that can be checked without the model is checked before it loads: the bank was made
for the model's base (read from its config alone), ``--aligner`` and every row's ``"aligner"`` name
one of its Aligners.

A prompts file row chooses its Aligner with its ``"aligner"`` field: a name (an Aligner of the bank),
``null`` (the base model, as ``AlignerBank.indices([None])``), or no such field (``--aligner``, else
the base model).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..options import HelpFormatter

DTYPES = ("bfloat16", "float16", "float32")

BANK_HELP = """Build and edit a bank: many saved Aligners of one base model (same num_tokens and
start_layer) stacked in one safetensors file, memory-mapped when used. `aligner generate --bank
FILE --data prompts.jsonl` then answers each row with the Aligner its "aligner" field names."""

# The choice of a row without an "aligner" field (it takes --aligner); JSON null is None (the base model).
ABSENT = object()


def _aligners(count: int) -> str:
    return f"{count} Aligner" if count == 1 else f"{count} Aligners"


def add_commands(commands: Any) -> None:
    """Add ``bank`` and its subcommands to the ``aligner`` subparsers."""
    bank = commands.add_parser(
        "bank", help="build and edit a bank of Aligners", description=BANK_HELP, formatter_class=HelpFormatter
    )
    actions = bank.add_subparsers(dest="bank_command", required=True, metavar="ACTION")

    def action(name: str, help: str) -> argparse.ArgumentParser:
        return actions.add_parser(name, help=help, description=help, formatter_class=HelpFormatter)

    build = action("build", "stack saved Aligner directories into a new bank file")
    build.add_argument("bank", help="bank file to write (.safetensors)")
    build.add_argument("aligners", nargs="+", help="saved Aligner directories (aligner save / train)")
    build.add_argument(
        "--name",
        action="append",
        default=None,
        help="name of each Aligner, in order (default: the directory names)",
    )
    build.add_argument("--dtype", default="float32", choices=DTYPES, help="storage dtype")
    build.add_argument("--overwrite", action="store_true", help="replace an existing bank file")

    add = action("add", "add a saved Aligner to a bank (rewrites the file atomically)")
    add.add_argument("bank", help="bank file")
    add.add_argument("aligner", help="saved Aligner directory")
    add.add_argument("--name", help="its name in the bank (default: the directory name)")

    remove = action("remove", "remove an Aligner by name (rewrites the file atomically)")
    remove.add_argument("bank", help="bank file")
    remove.add_argument("name", help="name of the Aligner to remove")

    listing = action("list", "print the bank's base model, N, start layer and names")
    listing.add_argument("bank", help="bank file")
    for parser in (build, add, remove, listing):
        parser.add_argument("--json", action="store_true", help="JSON on stdout instead of text")


def add_bank_option(parser: argparse.ArgumentParser) -> None:
    """``--bank FILE`` for ``generate`` and ``chat`` (``--aligner`` then names an Aligner in it)."""
    parser.add_argument(
        "--bank",
        help="bank file: --aligner then names an Aligner in the bank; with generate --data, each row's "
        '"aligner" field names its own ("aligner": null: the base model; no such field: --aligner, '
        "else the base model)",
    )


def load_bank(path: str | Path, option: str = "", revision: str | None = None) -> Any:
    """``AlignerBank.load(path, revision=revision)``, with errors that say what was expected (``option``
    names the option that gave ``path``, if any)."""
    from ..bank import AlignerBank
    from ..hub import resolve_bank

    expected = "a .safetensors file written by `aligner bank build`"
    if Path(path).is_dir():
        raise ValueError(f"{option or 'bank file'} {path} is a directory; expected {expected}")
    path = resolve_bank(path, revision=revision, argument=option or "path")  # its errors name the option
    try:
        return AlignerBank.load(path)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{option + ': ' if option else ''}{error} (expected {expected})") from error


def cmd_bank(args: argparse.Namespace, console: Any) -> None:
    from ..outputs import check_output_file

    path = Path(args.bank)
    if args.bank_command == "build":  # the output is checked before any Aligner is read
        check_output_file(
            path, "bank file", overwrite=args.overwrite, make_parents=True, example="bank.safetensors"
        )
        import torch

        from ..bank import AlignerBank

        dtype = getattr(torch, args.dtype)
        bank = AlignerBank.from_aligners(args.aligners, names=args.name, dtype=dtype)
    elif args.bank_command == "add":
        bank = load_bank(path).add(args.aligner, name=args.name)
    elif args.bank_command == "remove":
        bank = load_bank(path).remove(args.name)
    else:
        _print_listing(load_bank(path), args.json)
        return
    bank.save(path)
    record = {"bank": str(path), "aligners": len(bank), "action": args.bank_command}
    console.emit(record, f"{args.bank_command}: {path} now holds {_aligners(len(bank))}")


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
        f"{_aligners(len(bank))}, num_tokens={bank.num_tokens}, start_layer={bank.start_layer}, "
        f"{info['dtype']}"
    )
    print(f"base: {base}")
    for index, name in enumerate(bank.names):
        print(f"{index}\t{name}")


def bank_file_header(path: str | Path) -> dict[str, str] | None:
    """The header metadata of a safetensors file (its tensors are not read), or None if ``path`` is
    not a safetensors file."""
    try:
        with open(path, "rb") as file:
            size = int.from_bytes(file.read(8), "little")
            if not 1 < size < 100_000_000:
                return None
            header = json.loads(file.read(size))
    except (OSError, ValueError):
        return None
    return (header.get("__metadata__") or {}) if isinstance(header, dict) else None


def is_bank_file(path: str | Path) -> bool:
    from ..bank import CONFIG_KEY, NAMES_KEY

    metadata = bank_file_header(path)
    return metadata is not None and CONFIG_KEY in metadata and NAMES_KEY in metadata


# --------------------------------------------------------------------------------------------
# generate / chat --bank: checked before the model loads


def open_bank(path: str, base: dict[str, Any], aligner: str | None, revision: str | None = None) -> Any:
    """The ``--bank`` file (a Hub one at ``--revision``), checked against the model before it loads:
    made for ``base`` (the model's fingerprint, from its config alone) and, with ``--aligner NAME``,
    holding that Aligner."""
    bank = load_bank(path, "--bank", revision)
    bank.config.check_compatible(
        base,
        name=f"--bank {path}",
        advice="; use the bank with the base model its Aligners were trained on, or build one for this "
        "model from Aligners trained on it (aligner bank build)",
    )
    if aligner is not None:
        _index(bank, aligner, "--aligner: ")
    return bank


def _index(bank: Any, name: str, where: str) -> int:
    """``bank.index(name)``; ``where`` (the option or the row) starts the error."""
    try:
        return bank.index(name)
    except ValueError:
        known = ", ".join(repr(n) for n in bank.names[:5]) + (", ..." if len(bank) > 5 else "")
        raise ValueError(
            f"{where}no Aligner named {name!r} in the bank ({_aligners(len(bank))}: {known}); "
            "`aligner bank list` shows them all"
        ) from None


def row_aligners(path: str | Path) -> list[Any]:
    """The ``"aligner"`` field of every row of a prompts file, in order: a name, None (JSON null: the
    base model) or ABSENT (no such field: ``--aligner``). Any other value, the empty name included,
    is an error naming the row. A file that is not a prompts file gives [] (``prompt_examples``, which
    reads it next, says what is wrong with it)."""
    from ..prompts import DataError, read_json_rows

    try:
        rows = read_json_rows(path)
    except DataError:
        return []
    choices = []
    for number, row in enumerate(rows, start=1):
        choice = row.get("aligner", ABSENT) if isinstance(row, dict) else ABSENT
        if choice is not ABSENT and choice is not None and not (isinstance(choice, str) and choice):
            raise ValueError(
                f"{path}: row {number}: field 'aligner' must be the name of an Aligner in the --bank, or "
                f"null for the base model; got {json.dumps(choice)}"
            )
        choices.append(choice)
    return choices


def check_rows_without_bank(path: str | Path, choices: list[Any], aligner: str | None) -> None:
    """Without ``--bank`` every row is answered with ``--aligner`` (else the base model): a row that
    asks for something else is an error naming it, not silently answered otherwise."""
    for number, choice in enumerate(choices, start=1):
        if choice is ABSENT or (choice is None and aligner is None):
            continue
        asks = (
            f"names the Aligner {choice!r}"
            if choice is not None
            else 'asks for the base model ("aligner": null)'
        )
        raise ValueError(
            f"{path}: row {number} {asks}, but without --bank every row is answered with "
            f"{'--aligner ' + aligner if aligner else 'the base model'}; pass --bank FILE (a bank holding "
            'the Aligners the rows name: aligner bank build), or remove the rows\' "aligner" fields'
        )


def bank_index(bank: Any, aligner: str | None, prompts: int, choices: list[Any], path: str | None) -> Any:
    """One bank index per prompt of ``generate``, in its order: the ``prompts`` --prompt prompts, then
    the rows of ``path`` (their ``choices``, :func:`row_aligners`). A name is its Aligner, None the
    base model (-1), ABSENT ``--aligner`` (else the base model). Checked before the model loads: an
    unknown name is an error naming its row."""
    import torch

    default = -1 if aligner is None else bank.index(aligner)
    index = [default] * prompts
    for number, choice in enumerate(choices, start=1):
        if choice is ABSENT or choice is None:
            index.append(default if choice is ABSENT else -1)
        else:
            index.append(_index(bank, choice, f"{path}: row {number}: "))
    return torch.tensor(index, dtype=torch.int64)


def apply_bank(model: Any, bank: Any, aligner: str | None) -> Any:
    """Attach ``bank`` to ``model``; with ``--aligner NAME`` that Aligner also becomes the model's own
    (what chat, and rows without a choice of their own, use). Returns the bank."""
    import torch

    from ..bank import attach_bank
    from ..hf_patch import aligner_parameters

    attach_bank(model, bank)
    if aligner:
        tokens, gates = bank.select(torch.tensor([bank.index(aligner)]))
        params = aligner_parameters(model)
        with torch.no_grad():
            params["prefix"].copy_(tokens[0])
            for offset, layer in enumerate(range(bank.start_layer, bank.start_layer + gates.shape[1])):
                params[f"gate.{layer}"].copy_(gates[0, offset])
    return bank


def with_aligner_names(bank: Any, index: Any, rows: list[dict]) -> list[dict]:
    """``rows`` with the name of each row's Aligner first (None: the base model)."""
    names = bank.names
    return [{"aligner": names[i] if i >= 0 else None, **row} for i, row in zip(index.tolist(), rows)]


COMMANDS = {"bank": cmd_bank}
