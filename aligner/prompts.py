"""Chat prompts: the text a model sees before its answer, and JSON / JSONL files of rows (prompts files,
and the checks every data file goes through first). Plain ``json``, no ``datasets``: ``aligner generate
--data`` needs no training extra.

A prompts file holds rows with ``instruction`` (+ optional ``input``) or ``prompt``; other fields are
ignored. A file is one JSON array of objects (.json) or one object per line (.jsonl).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

Messages = list[dict[str, str]]

SUFFIXES = (".json", ".jsonl")


class DataError(ValueError):
    """A data file that cannot be used; the message names the file (and the line where known)."""


def format_prompt(tokenizer: Any, messages: Messages) -> str:
    """The text the model sees before its answer: the chat template, or '### Role:' blocks without one."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    blocks = [f"### {m['role'].capitalize()}:\n{m['content']}\n\n" for m in messages]
    return "".join(blocks) + "### Assistant:\n"


# --------------------------------------------------------------------------------------------
# Data files


def _locate_json_error(path: Path) -> str | None:
    """What is wrong with the JSON in ``path`` (the first syntax error and its line, or the first row
    that is not an object), or None if it is a JSON array or JSON Lines of objects."""
    text = path.read_text(encoding="utf-8", errors="replace")
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as error:
            return f"malformed JSON at line {error.lineno}: {error.msg}"
        for number, item in enumerate(items, start=1):
            if not isinstance(item, dict):
                return f"item {number} of the array: rows must be JSON objects, got {json_type(item)}"
        return None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            return f"malformed JSON at line {number}: {error.msg} (column {error.colno})"
        if not isinstance(row, dict):
            return f"line {number}: rows must be JSON objects, got {json_type(row)}"
    return None


def json_type(value: Any) -> str:
    """The JSON name of a parsed value's type, with the value when short (for error messages)."""
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "an array"}
    name = "null" if value is None else names.get(type(value), type(value).__name__)
    shown = json.dumps(value)
    return f"{name} ({shown})" if len(shown) <= 40 else name


def check_data_file(path: str | os.PathLike, *, what: str = "data file") -> Path:
    """``path`` as a Path once it is known to be a non-empty .json / .jsonl file of JSON objects; a
    DataError naming the file, and the line where known, otherwise."""
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"{what} {path} does not exist" if not path.exists() else f"{what} {path} is not a file"
        )
    if path.suffix.lower() not in SUFFIXES:
        raise DataError(
            f"{what} {path}: {path.suffix or 'a name without extension'} is not a format aligner reads; "
            "give JSON Lines (.jsonl: one object per line) or JSON (.json: an array of objects)"
        )
    if path.stat().st_size == 0 or not path.read_text(encoding="utf-8", errors="replace").strip():
        raise DataError(f"{what} {path} is empty: it holds no rows")
    located = _locate_json_error(path)
    if located is not None:
        raise DataError(f"{what} {path}: {located}")
    return path


def read_json_rows(path: str | os.PathLike, *, what: str = "data file") -> list[dict[str, Any]]:
    """The rows of a checked (:func:`check_data_file`) JSON or JSON Lines file, as dicts."""
    text = check_data_file(path, what=what).read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def row_format(path: Path, columns: Iterable[str], formats: dict[str, tuple[str, ...]]) -> str:
    """The first format in ``formats`` whose fields are all in ``columns``, or a DataError naming what
    is missing."""
    present = set(columns)
    for name, fields in formats.items():
        if set(fields) <= present:
            return name
    wanted = "; ".join(f"{name}: {', '.join(fields)}" for name, fields in formats.items())
    closest, fields = min(formats.items(), key=lambda item: len(set(item[1]) - present))
    missing = ", ".join(repr(f) for f in fields if f not in present)
    raise DataError(
        f"{path}: rows have fields {sorted(present)}, expected one of the formats ({wanted}); "
        f"for the {closest} format, {missing} is missing"
    )


def text_field(path: Path, index: int, row: dict, field: str) -> str:
    """Row ``index``'s string ``field``; a DataError naming the row when it is missing or not a string."""
    value = row.get(field)
    if value is None:  # a field that some rows lack reads as None (also through datasets)
        raise DataError(f"{path}: row {index + 1}: field {field!r} is missing")
    if not isinstance(value, str):
        raise DataError(f"{path}: row {index + 1}: field {field!r} must be a string, got {json_type(value)}")
    return value


def user_prompt(path: Path, index: int, row: dict) -> str:
    """A row's user prompt: ``instruction`` plus, after a blank line, ``input`` when given; else
    ``prompt``."""
    if "instruction" in row and row["instruction"] is not None:
        prompt = text_field(path, index, row, "instruction")
        extra = row.get("input")
        if extra:
            if not isinstance(extra, str):
                raise DataError(f"{path}: row {index + 1}: field 'input' must be a string")
            prompt = f"{prompt}\n\n{extra}"
        return prompt
    return text_field(path, index, row, "prompt")


def prompt_examples(path: str | os.PathLike) -> list[str]:
    """User prompts from rows with ``instruction`` (+ ``input``) or ``prompt``."""
    path = Path(path)
    rows = read_json_rows(path)
    columns = {name for row in rows for name in row}
    row_format(path, columns, {"alpaca": ("instruction",), "prompt": ("prompt",)})
    return [user_prompt(path, index, row) for index, row in enumerate(rows)]
