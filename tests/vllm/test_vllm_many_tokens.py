"""N > 1 in vLLM: the prefix softmax over the Aligner's tokens per query (the closed form covers only
N = 1), in vLLM's eager mode (no torch.compile), against transformers with aligner.load."""

from __future__ import annotations

import pytest
from conftest import ENGINE, hf_greedy, random_aligners
from vllm import LLM, SamplingParams

from aligner.bank import AlignerBank
from aligner.serving import vllm as serving

TOKENS = 12
PROMPTS = ["The capital of France is", "List three fruits:", "The capital of France is", "Once upon a time"]
ALIGNERS = ["json", "caps", None, "pirate"]


@pytest.fixture(scope="module")
def three_token_bank(model_dir, tmp_path_factory):
    directory = tmp_path_factory.mktemp("three-token")
    saved = random_aligners(model_dir, directory, num_tokens=3)
    return AlignerBank.from_aligners(saved).save(directory / "bank.safetensors")


def test_three_token_aligners_match_transformers(model_dir, three_token_bank):
    llm = LLM(**serving.engine_args(str(model_dir), three_token_bank, **ENGINE, enforce_eager=True))
    try:
        prompts, params = serving.requests(
            PROMPTS, ALIGNERS, SamplingParams(max_tokens=TOKENS, temperature=0)
        )
        served = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params)]
    finally:
        llm.llm_engine.engine_core.shutdown()
    assert served == hf_greedy(model_dir, PROMPTS, ALIGNERS, three_token_bank.parent, TOKENS)
    assert served[0] != served[2]  # the Aligner changes the answer
