"""Loading a base model and its tokenizer (local directory, GGUF file or hub name) and batched generation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .data import Messages, format_prompt

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(ValueError):
    """The model or tokenizer could not be loaded; the message names what was asked for."""


def resolve_model(model: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """(directory or hub name, GGUF file name) from the CLI's ``model`` and ``--gguf-file``;
    ``model`` may also be the path of a ``.gguf`` file."""
    path = Path(model)
    if gguf_file is None and path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {path} does not exist")
        return str(path.parent), path.name
    if gguf_file is not None and path.is_dir() and not (path / gguf_file).is_file():
        raise ModelLoadError(f"GGUF file {gguf_file} is not in {path}")
    looks_local = model.startswith((".", "/", "~")) or model.count("/") > 1
    if not path.exists() and looks_local:
        raise ModelLoadError(
            f"model {model} does not exist (expected a local directory, a .gguf file or a hub name)"
        )
    return model, gguf_file


def load_model(
    model: str, *, gguf_file: str | None = None, dtype: str = "float32", device: str | None = None
) -> tuple[Any, Any]:
    """(model, tokenizer) for a causal LM; the tokenizer gets a pad token (the EOS token) if it has none."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, gguf = resolve_model(model, gguf_file)
    if dtype not in DTYPES:
        raise ModelLoadError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    extra = {"gguf_file": gguf} if gguf else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **extra)
        network = AutoModelForCausalLM.from_pretrained(source, dtype=DTYPES[dtype], **extra)
    except (OSError, ValueError, ImportError) as error:
        where = f"{source} (GGUF file {gguf})" if gguf else source
        raise ModelLoadError(f"could not load model {where}: {error}") from error
    if gguf and all(p.is_floating_point() for p in network.parameters()):
        _drop_gguf_tag(network)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if device is not None:
        network.to(device)
    network.eval()
    return network, tokenizer


def _drop_gguf_tag(model: Any) -> None:
    """transformers dequantises GGUF weights into ordinary tensors on load but still tags the model
    as quantized, and then ``Trainer`` refuses to fine-tune it and ``save_pretrained`` to save it.
    The weights are plain floating point, so the tag is removed."""
    model.hf_quantizer = None
    if "is_quantized" in vars(model):
        model.is_quantized = False
    if "quantization_method" in vars(model):
        model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


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
) -> list[str]:
    """Answers to chat prompts, in batches with left padding; greedy when ``temperature`` is 0.
    ``aligner_index``: one bank index per prompt (-1: base model) for a model with a bank attached."""
    from tqdm.auto import tqdm

    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    device = model.get_input_embeddings().weight.device
    options: dict[str, Any] = {"max_new_tokens": max_new_tokens, "pad_token_id": tokenizer.pad_token_id}
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
