"""Random Hugging Face models for the tests, built from configs (nothing is downloaded): tiny ones,
whose every config field can be overridden by its Hugging Face name, a tokenizer trained in memory,
and the LLaMA-2-7B shape on the meta device.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

import aligner

FAMILIES = {
    "llama": transformers.LlamaConfig,
    "mistral": transformers.MistralConfig,
    "qwen2": transformers.Qwen2Config,
}
# 3 layers, 4 query heads of 16 over 2 KV heads (GQA).
DEFAULTS = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    tie_word_embeddings=False,
)
# The model save_tiny_model writes (the training and command-line tests): 4 layers of width 32, and
# token id 0 (the tokenizer's <eos>) as BOS, EOS and padding.
SAVED = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    max_position_embeddings=256,
    bos_token_id=0,
    eos_token_id=0,
    pad_token_id=0,
)
# What the tokenizer is trained on: the words of the tests' prompts and replies.
WORDS = (
    "the a cat dog sat on mat what is capital of france paris name color red blue green answer yes no "
    "how many legs does spider have eight bees make honey good bad safe unsafe reply please tell me"
).split()


def tiny_config(family: str = "llama", **fields) -> transformers.PretrainedConfig:
    """The config of a tiny ``family`` model: DEFAULTS with ``fields`` (Hugging Face names) applied;
    head_dim is hidden_size / num_attention_heads unless given."""
    fields = {**DEFAULTS, **fields}
    fields.setdefault("head_dim", fields["hidden_size"] // fields["num_attention_heads"])
    return FAMILIES[family](**fields)


def tiny_model(
    family: str = "llama", *, seed: int = 0, dtype: torch.dtype = torch.float32, device=None, **fields
) -> transformers.PreTrainedModel:
    """A tiny random causal LM (tiny_config's), initialised from ``torch.manual_seed(seed)``, in eval
    mode, with SDPA attention; moved to ``device`` if given (else built on the default device, so
    that ``with torch.device("meta")`` works)."""
    config = tiny_config(family, **fields)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    return model if device is None else model.to(device)


def llama2_7b_on_meta() -> transformers.LlamaForCausalLM:
    """LLaMA-2-7B's architecture on the meta device: its shapes and parameter count, no weights."""
    config = transformers.LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=32000,
    )  # fmt: skip
    with torch.device("meta"):
        return transformers.LlamaForCausalLM(config)


def tiny_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained in memory on WORDS, with ``<eos>`` (id 0) as EOS and padding."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(
        [" ".join(WORDS)] * 4 + ["### User:\n### Assistant:\n### System:\n"], trainer
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<eos>", pad_token="<eos>"
    )


def save_tiny_model(directory: Path, *, seed: int = 0, **fields) -> Path:
    """A tiny LLaMA (SAVED, then ``fields``) and tiny_tokenizer, saved with ``save_pretrained`` in
    ``directory`` (what ``aligner.training.load_model`` and the CLI read); returns ``directory``."""
    tokenizer = tiny_tokenizer()
    tiny_model(seed=seed, **{**SAVED, "vocab_size": len(tokenizer), **fields}).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def randomize_aligner(model, seed: int = 1, scale: float = 1.0, gate_scale: float | None = None):
    """Fill the Aligner's parameters (in ``aligner_parameters`` order) with ``scale`` (gates:
    ``gate_scale``, default ``scale``) times standard normal values drawn from ``seed``, as after
    training: non-zero gates, so that the prefix changes the output. Returns ``model``."""
    generator = torch.Generator().manual_seed(seed)
    gate_scale = scale if gate_scale is None else gate_scale
    with torch.no_grad():
        for name, param in aligner.aligner_parameters(model).items():
            value = torch.randn(param.shape, generator=generator)
            param.copy_((gate_scale if name.startswith("gate") else scale) * value)
    return model
