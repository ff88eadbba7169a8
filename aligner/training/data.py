"""Reading and tokenising training data: JSON / JSONL files through Hugging Face ``datasets``.

Supported row formats (one format per file; other fields are ignored):

- Alpaca: ``instruction``, optional ``input``, ``output``;
- chat: ``messages``, a list of ``{"role", "content"}``; the last message must be the assistant's
  and is the completion, everything before it is the prompt;
- preference pairs (``aligner dpo``): ``prompt``, ``chosen``, ``rejected``;
- PKU-SafeRLHF style pairs: ``prompt``, ``response_0``, ``response_1``, ``safer_response_id``
  (0 or 1): ``chosen`` = ``response_{safer_response_id}``, ``rejected`` = the other response;
- prompts only (``aligner distill``, ``aligner generate``): read by :mod:`aligner.prompts`, which also
  holds the checks every data file goes through first.

Every example becomes a list of prompt messages plus a completion string; prompts go through
the tokenizer's chat template when it has one (:func:`aligner.prompts.format_prompt`), otherwise
through a plain "### Role:" layout.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..prompts import DataError, Messages, check_data_file, format_prompt, row_format, text_field, user_prompt

ALPACA = ("instruction", "output")
CHAT = ("messages",)
PREFERENCE = ("prompt", "chosen", "rejected")
SAFE_RLHF = ("prompt", "response_0", "response_1", "safer_response_id")


def read_rows(path: str | os.PathLike, *, what: str = "data file") -> Any:
    """Read a JSON (array of objects) or JSONL file into a ``datasets.Dataset``; clear errors otherwise."""
    import datasets

    path = check_data_file(path, what=what)
    shown = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # a small local file: no bars, then the caller's setting again
    try:
        dataset = datasets.load_dataset("json", data_files=str(path), split="train")
    except Exception as error:  # datasets raises several types (ArrowInvalid, DatasetGenerationError)
        cause = error.__cause__ or error
        raise DataError(f"{what} {path} could not be read as a table of rows: {cause}") from error
    finally:
        if shown:
            datasets.enable_progress_bars()
    if len(dataset) == 0:
        raise DataError(f"{what} {path} is empty: it holds no rows")
    return dataset


def sft_examples(path: str | os.PathLike) -> list[tuple[Messages, str]]:
    """(prompt messages, completion) pairs from an Alpaca or chat file."""
    path = Path(path)
    dataset = read_rows(path)
    kind = row_format(path, dataset.column_names, {"alpaca": ALPACA, "chat": CHAT})
    examples = []
    for index, row in enumerate(dataset):
        if kind == "alpaca":
            output = text_field(path, index, row, "output")
            examples.append(([{"role": "user", "content": user_prompt(path, index, row)}], output))
            continue
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{path}: row {index + 1}: 'messages' must be a non-empty list")
        for message in messages:
            if not isinstance(message, dict) or not {"role", "content"} <= set(message):
                raise DataError(f"{path}: row {index + 1}: every message needs 'role' and 'content'")
        if messages[-1]["role"] != "assistant":
            raise DataError(f"{path}: row {index + 1}: the last message must be the assistant's (the target)")
        prompt = [{"role": m["role"], "content": m["content"]} for m in messages[:-1]]
        examples.append((prompt, messages[-1]["content"]))
    return examples


def preference_examples(path: str | os.PathLike) -> list[tuple[Messages, str, str]]:
    """(prompt messages, chosen, rejected) triples; PKU-SafeRLHF rows map through ``safer_response_id``."""
    path = Path(path)
    dataset = read_rows(path)
    kind = row_format(path, dataset.column_names, {"pairs": PREFERENCE, "safe-rlhf": SAFE_RLHF})
    examples = []
    for index, row in enumerate(dataset):
        prompt = [{"role": "user", "content": text_field(path, index, row, "prompt")}]
        if kind == "pairs":
            chosen, rejected = (text_field(path, index, row, side) for side in ("chosen", "rejected"))
        else:
            safer = row["safer_response_id"]
            if safer not in (0, 1):
                raise DataError(f"{path}: row {index + 1}: 'safer_response_id' must be 0 or 1, got {safer!r}")
            responses = [text_field(path, index, row, f"response_{i}") for i in (0, 1)]
            chosen, rejected = responses[safer], responses[1 - safer]
        examples.append((prompt, chosen, rejected))
    return examples


# --------------------------------------------------------------------------------------------
# Tokenisation


def end_of_answer(tokenizer: Any) -> str:
    """What closes an answer in training targets: the end-of-turn / end-of-sequence token."""
    return tokenizer.eos_token or ""


def tokenize_pair(
    tokenizer: Any, prompt: str, completion: str, max_length: int
) -> dict[str, list[int]] | None:
    """input_ids and labels (prompt tokens -100) for prompt + completion, cut to ``max_length``;
    None when no completion token survives the cut."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(completion + end_of_answer(tokenizer), add_special_tokens=False)["input_ids"]
    input_ids = (prompt_ids + completion_ids)[:max_length]
    labels = ([-100] * len(prompt_ids) + completion_ids)[:max_length]
    if all(label == -100 for label in labels):
        return None
    return {"input_ids": input_ids, "labels": labels}


def tokenize_sft(
    tokenizer: Any, examples: list[tuple[Messages, str]], max_length: int
) -> tuple[list[dict[str, list[int]]], int]:
    """Tokenised examples and how many were dropped because their prompt fills ``max_length``."""
    rows = [tokenize_pair(tokenizer, format_prompt(tokenizer, p), c, max_length) for p, c in examples]
    kept = [row for row in rows if row is not None]
    return kept, len(rows) - len(kept)


def tokenize_preferences(
    tokenizer: Any, examples: list[tuple[Messages, str, str]], max_length: int
) -> tuple[list[dict[str, list[int]]], int]:
    """Rows with chosen_/rejected_ input_ids and labels; and the number dropped (prompt too long)."""
    kept = []
    for prompt, chosen, rejected in examples:
        text = format_prompt(tokenizer, prompt)
        pair = (
            tokenize_pair(tokenizer, text, chosen, max_length),
            tokenize_pair(tokenizer, text, rejected, max_length),
        )
        if pair[0] is None or pair[1] is None:
            continue
        kept.append(
            {
                f"{side}_{key}": value
                for side, row in zip(("chosen", "rejected"), pair)
                for key, value in row.items()
            }
        )
    return kept, len(examples) - len(kept)


def pad_batch(rows: list[dict[str, list[int]]], pad_id: int, prefix: str = "") -> dict[str, Tensor]:
    """Right-pad ``{prefix}input_ids`` / ``{prefix}labels`` into input_ids, attention_mask and labels."""
    length = max(len(row[f"{prefix}input_ids"]) for row in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row[f"{prefix}input_ids"])
        ids[i, :n] = torch.tensor(row[f"{prefix}input_ids"])
        labels[i, :n] = torch.tensor(row[f"{prefix}labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def sft_collator(pad_id: int) -> Callable[[list[dict]], dict[str, Tensor]]:
    """Collate SFT rows (right padding, -100 labels on padding)."""
    return lambda rows: pad_batch(rows, pad_id)


def preference_collator(pad_id: int) -> Callable[[list[dict]], dict[str, Tensor]]:
    """Collate preference rows into one batch: the B chosen sequences, then the B rejected ones."""

    def collate(rows: list[dict]) -> dict[str, Tensor]:
        pairs = [
            {"input_ids": r[f"{side}_input_ids"], "labels": r[f"{side}_labels"]}
            for side in ("chosen", "rejected")
            for r in rows
        ]
        return pad_batch(pairs, pad_id)

    return collate
