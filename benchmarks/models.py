"""Models the training and decoding benchmarks run on, and the training methods they compare."""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

import torch
import transformers
from torch import nn

import aligner
import aligner.models

try:  # as a module of the benchmarks package, or as a script
    from .answer_forms import SMOLLM2_GGUF, smollm2_directory
except ImportError:
    from answer_forms import SMOLLM2_GGUF, smollm2_directory

# LLaMA-2-7B and a Llama-3-8B-like GQA shape, with few layers (random weights, no download).
CONFIGS = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                 vocab_size=128, head_dim=16),
}  # fmt: skip


def smollm2_hf_directory() -> Path:
    """SmolLM2-135M-Instruct as a float32 Hugging Face directory (config, safetensors, tokenizer), for
    engines that do not read the package's Q4_1 GGUF file (vLLM). Dequantised once per machine into
    the user cache, keyed by the GGUF file's modification time, and moved into place complete."""
    source = smollm2_directory() / SMOLLM2_GGUF
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "aligner" / "models"
    target = cache / f"smollm2-135m-instruct-fp32-{int(source.stat().st_mtime)}"
    if not (target / "config.json").is_file():
        staging = cache / f".{target.name}.{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        model, tokenizer = aligner.models.load_model(str(source.parent), gguf_file=SMOLLM2_GGUF)  # float32
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    return target


def load_model(
    name: str, layers: int, device: torch.device, dtype: torch.dtype
) -> transformers.PreTrainedModel:
    """``smollm2`` (the real pretrained model) or a shape from CONFIGS with ``layers`` layers."""
    if name == "smollm2":
        model = transformers.AutoModelForCausalLM.from_pretrained(
            smollm2_directory(), gguf_file=SMOLLM2_GGUF, dtype=dtype, attn_implementation="sdpa"
        )
        return model.to(device)
    config = transformers.LlamaConfig(num_hidden_layers=layers, max_position_embeddings=8192, **CONFIGS[name])
    config._attn_implementation = "sdpa"
    with torch.device(device):
        return transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)


class _AddToHidden(nn.Module):
    """A trainable vector added to a layer's input: the floor's only parameter."""

    def __init__(self, hidden: int, device, dtype) -> None:
        super().__init__()
        self.vector = nn.Parameter(torch.zeros(hidden, device=device, dtype=dtype))

    def hook(self, module, args, kwargs):
        return (args[0] + self.vector, *args[1:]), kwargs


def with_method(base: transformers.PreTrainedModel, method: str, start_layer: int = 2) -> nn.Module:
    """A copy of ``base`` set up to train with ``method``; only that method's parameters train.

    ``floor``: the least work any method that trains something at ``start_layer`` must do: the
    frozen forward plus the backward down to that layer's input (one zero vector added there).
    """
    model = copy.deepcopy(base)
    model.requires_grad_(False)
    if method == "floor":
        weight = model.get_input_embeddings().weight
        adder = _AddToHidden(model.config.hidden_size, weight.device, weight.dtype)
        model.floor_vector = adder
        model.model.layers[start_layer].register_forward_pre_hook(adder.hook, with_kwargs=True)
        return model
    if method.startswith("aligner-"):
        return aligner.patch(model, num_tokens=int(method.removeprefix("aligner-")), start_layer=start_layer)
    import peft

    if method == "adaption-prompt-10":
        layers = model.config.num_hidden_layers - start_layer
        config = peft.AdaptionPromptConfig(adapter_len=10, adapter_layers=layers, task_type="CAUSAL_LM")
    elif method == "lora-8":
        config = peft.LoraConfig(
            r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"
        )
    else:
        raise ValueError(f"unknown method {method!r}")
    return peft.get_peft_model(model, config)


TRAINING_METHODS = ("floor", "aligner-1", "aligner-10", "adaption-prompt-10", "lora-8")
