"""aligner.serving.vllm end to end: a vLLM engine (the multiprocess engine, torch.compile on, as
vLLM runs by default) serving a bank, checked token for token against Hugging Face transformers
with aligner.load per row."""

from __future__ import annotations

import os

import pytest
from conftest import ENGINE, hf_greedy, random_aligners
from vllm import LLM, SamplingParams
from vllm.exceptions import VLLMValidationError

from aligner.bank import AlignerBank
from aligner.serving import vllm as serving

TOKENS = 16
PROMPTS = [
    "The capital of France is",
    "Write a haiku about rain.",
    "List three fruits:",
    "The capital of France is",
    "Hello, my name is",
    "Explain gravity in one sentence.",
    "The capital of France is",
    "Once upon a time",
    "List three fruits:",
    "2 + 2 =",
    "My favourite season is",
]
# Three Aligners and base rows, mixed; the same prompt under different Aligners and the base model.
ALIGNERS = ["json", "caps", "pirate", None, "json", "caps", "pirate", None, None, "json", "caps"]
LONG = (
    "Here is a long shared context about the history of bread, which bakers in many countries have "
    "made for thousands of years from flour, water, salt and yeast, in ovens of stone and clay. "
)


@pytest.fixture(scope="module")
def llm(model_dir, bank_file):
    engine = LLM(**serving.engine_args(str(model_dir), bank_file, **ENGINE, enable_prefix_caching=True))
    # vLLM's default engine: the engine core and its worker in processes of their own.
    assert type(engine.llm_engine.engine_core).__name__ == "SyncMPClient"
    yield engine
    engine.llm_engine.engine_core.shutdown()


def greedy(**kwargs) -> SamplingParams:
    return SamplingParams(max_tokens=TOKENS, temperature=0, **kwargs)


def tokens_of(outputs) -> list[list[int]]:
    return [list(output.outputs[0].token_ids) for output in outputs]


def test_mixed_batch_matches_transformers_row_by_row(llm, model_dir, bank_file):
    prompts, params = serving.requests(PROMPTS, ALIGNERS, greedy())
    served = tokens_of(llm.generate(prompts, params))
    expected = hf_greedy(model_dir, PROMPTS, ALIGNERS, bank_file.parent, TOKENS)
    assert served == expected
    # The Aligners matter: the same prompt gives a different answer under each, and under the base.
    france = {ALIGNERS[i]: tuple(served[i]) for i in (0, 3, 6)}
    assert len(set(france.values())) == 3, france


def test_prefix_caching_never_shares_blocks_between_aligners(llm, model_dir, bank_file):
    prompt = LONG * 8 + "So the first bread was"  # over two of vLLM's 128-token CPU blocks
    base = llm.generate([prompt], greedy())[0]
    again = llm.generate([prompt], greedy())[0]
    assert again.num_cached_tokens > 0  # the cache is on and holds the base model's blocks
    prompts, params = serving.requests([prompt, prompt], ["json", "caps"], greedy())
    first = llm.generate(prompts, params)
    assert [o.num_cached_tokens for o in first] == [0, 0]  # salted: nothing of the base model's reused
    repeat = llm.generate(prompts, params)
    assert all(o.num_cached_tokens > 0 for o in repeat)  # the same Aligner reuses its own blocks
    expected = hf_greedy(model_dir, [prompt] * 3, [None, "json", "caps"], bank_file.parent, TOKENS)
    assert tokens_of([base, *first]) == expected
    assert tokens_of(repeat) == expected[1:]


def test_unknown_aligner_fails_that_request_only(llm):
    prompts, params = serving.requests(["Hello"], ["no-such-aligner"], greedy())
    with pytest.raises(VLLMValidationError, match="no Aligner named 'no-such-aligner'.*json"):
        llm.generate(prompts, params)
    with pytest.raises(VLLMValidationError, match="must be the name of an Aligner"):
        llm.generate(["Hello"], greedy(extra_args={serving.REQUEST_KEY: 3}))
    prompts, params = serving.requests(["Hello", "Hello"], ["json", None], greedy())
    assert len(llm.generate(prompts, params)) == 2  # the engine serves on


def test_engine_args_serves_the_bank_without_touching_the_environment(model_dir, bank_file, monkeypatch):
    monkeypatch.delenv(serving.BANK_ENV, raising=False)
    monkeypatch.setattr(serving, "_SERVED_BANKS", set())
    args = serving.engine_args(str(model_dir), bank_file, dtype="float32")
    assert serving.BANK_ENV not in os.environ
    assert args["hf_overrides"] == {
        "architectures": ["AlignerLlamaForCausalLM"],
        "aligner_bank": str(bank_file),
    }
    assert args["logits_processors"] == [serving.LOGITS_PROCESSOR] and args["dtype"] == "float32"
    assert serving.request_aligner(SamplingParams(extra_args={"aligner": "caps"})) == "caps"
    with pytest.raises(ValueError, match="no Aligner named 'capz'"):
        serving.request_aligner(SamplingParams(extra_args={"aligner": "capz"}))


def test_bank_for_another_base_is_refused_before_an_engine_starts(model_dir, tmp_path):
    other = _other_bank(tmp_path)
    with pytest.raises(ValueError, match="was made for .* but the model .* is .*differs in hidden_size"):
        serving.engine_args(str(model_dir), other)


def _other_bank(directory):
    """A bank made for a different (tiny) LLaMA."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    tiny = directory / "tiny"
    LlamaForCausalLM(config).save_pretrained(tiny)
    saved = random_aligners(tiny, directory, num_tokens=1, names=("a",))
    return AlignerBank.from_aligners(saved).save(directory / "other.safetensors")


def test_requests_give_one_salt_per_aligner():
    prompts, params = serving.requests(
        ["a", {"prompt": "b", "cache_salt": "user"}, "c"], ["json", "json", None], greedy()
    )
    assert prompts[0]["cache_salt"] == serving.cache_salt("json")
    assert prompts[1]["cache_salt"] == serving.cache_salt("json", "user") != prompts[0]["cache_salt"]
    assert "cache_salt" not in prompts[2]
    assert [p.extra_args for p in params] == [{"aligner": "json"}, {"aligner": "json"}, None]
    with pytest.raises(ValueError, match="2 prompts but 1 aligners"):
        serving.requests(["a", "b"], ["json"])
