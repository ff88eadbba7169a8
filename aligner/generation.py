"""Batched generation from chat prompts (what ``aligner generate`` and ``chat`` run)."""

from __future__ import annotations

from typing import Any

import torch

from .prompts import Messages, format_prompt


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: Any,
    prompts: list[Messages],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    temperature: float = 0.0,
    progress: bool = True,
    desc: str = "generating",
    aligner_index: torch.Tensor | None = None,
    repetition_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
) -> list[str]:
    """Answers to chat prompts, in batches with left padding; greedy when ``temperature`` is 0.
    ``aligner_index``: one bank index per prompt (-1: base model) for a model with a bank attached.
    ``repetition_penalty`` (> 1 discourages tokens already in the prompt or answer) and
    ``no_repeat_ngram_size`` (> 0: no n-gram of that size twice) are ``transformers``' own; 1.0 and
    0 leave them off."""
    from tqdm.auto import tqdm

    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    device = model.get_input_embeddings().weight.device
    options: dict[str, Any] = {"max_new_tokens": max_new_tokens, "pad_token_id": tokenizer.pad_token_id}
    if repetition_penalty != 1.0:
        options["repetition_penalty"] = repetition_penalty
    if no_repeat_ngram_size:
        options["no_repeat_ngram_size"] = no_repeat_ngram_size
    options.update(
        {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    )
    if temperature == 0:  # silence the generation config's sampling defaults
        options.update({"temperature": None, "top_p": None, "top_k": None})
    answers: list[str] = []
    try:
        for start in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=not progress, leave=False):
            texts = [format_prompt(tokenizer, p) for p in prompts[start : start + batch_size]]
            batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            rows = (
                {} if aligner_index is None else {"aligner_index": aligner_index[start : start + batch_size]}
            )
            out = model.generate(**batch, **options, **rows)
            new = out[:, batch["input_ids"].shape[1] :]
            answers.extend(t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
    return answers
