"""A patched model behaves as transformers' own tests expect of a model (tests/test_modeling_common.py,
tests/generation/test_utils.py in transformers): static cache, compilation, every attention
implementation a user can set, output_attentions, assisted decoding. LLaMA, Qwen2 and Mistral (with
a sliding window shorter than the sequences), tiny random configs, Aligners from layer 0.

With zero gates a patched model must equal the unpatched one exactly; with non-zero gates the
implementations and caches must agree with each other.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from tiny_models import DEFAULTS, randomize_aligner, tiny_model

import aligner

FAMILIES = {
    "llama": dict(family="llama"),
    "qwen2": dict(family="qwen2"),
    # Mistral's sliding window of 4 is shorter than the prompts: the main attention's mask has it.
    "mistral": dict(family="mistral", sliding_window=4),
}
VOCAB = DEFAULTS["vocab_size"]
GENERATE = dict(
    max_new_tokens=5, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True
)


def base_model(family: str, implementation: str = "sdpa") -> transformers.PreTrainedModel:
    model = tiny_model(**FAMILIES[family])
    model.generation_config.eos_token_id = None  # always generate max_new_tokens
    model.set_attn_implementation(implementation)
    # Frozen like a patched model's base: on CPU, torch's linear on a strided input (logits_to_keep)
    # takes another path when the weight requires grad, even under no_grad (last-bit differences).
    return model.requires_grad_(False)


def patched(model: transformers.PreTrainedModel, gates: bool, num_tokens: int = 3, **options):
    model = aligner.patch(copy.deepcopy(model), num_tokens=num_tokens, start_layer=0, **options)
    return randomize_aligner(model, scale=0.5) if gates else model


def batch(padded: bool, length: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(1, VOCAB, (2, length), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    if padded:  # left padding, as generate expects
        mask[0, :4] = 0
        ids = ids.masked_fill(mask == 0, 0)
    return ids, mask


def generated(model, ids, mask, **options):
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, **GENERATE, **options)
    return out.sequences, torch.stack(out.scores)


def assert_same_generation(actual, expected, exact: bool) -> None:
    assert torch.equal(actual[0], expected[0])
    if exact:
        assert torch.equal(actual[1], expected[1])
    else:
        torch.testing.assert_close(actual[1], expected[1], atol=1e-5, rtol=1e-5)


# -- 1. Static cache ------------------------------------------------------------------------------


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
@pytest.mark.parametrize("family", FAMILIES)
def test_static_cache_with_zero_gates_equals_the_unpatched_model(family, padded):
    base = base_model(family)
    ids, mask = batch(padded)
    expected = generated(base, ids, mask, cache_implementation="static")
    assert_same_generation(expected, generated(base, ids, mask), exact=False)  # the base's own check
    actual = generated(patched(base, gates=False), ids, mask, cache_implementation="static")
    assert_same_generation(actual, expected, exact=True)


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
@pytest.mark.parametrize("family", FAMILIES)
def test_static_cache_equals_dynamic_cache_with_an_aligner(family, padded):
    model = patched(base_model(family), gates=True)
    ids, mask = batch(padded)
    dynamic = generated(model, ids, mask)
    assert not torch.equal(dynamic[0], generated(base_model(family), ids, mask)[0])  # the Aligner steers
    assert_same_generation(generated(model, ids, mask, cache_implementation="static"), dynamic, exact=False)


# -- 4. Every attention implementation; set_attn_implementation after patch ---------------------


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("family", FAMILIES)
def test_zero_gates_equal_the_unpatched_model_in_every_implementation(family, implementation):
    base = base_model(family, implementation)
    ids, mask = batch(padded=True)
    model = patched(base, gates=False)
    assert model.config._attn_implementation == f"aligner_{implementation}"
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask).logits, base(ids, attention_mask=mask).logits)
    assert_same_generation(generated(model, ids, mask), generated(base, ids, mask), exact=True)


def test_zero_gates_equal_the_unpatched_model_with_flex_attention():
    """FlexAttention (its BlockMask from transformers' own flex mask function); LLaMA only: each
    model compiles its flex kernels on first use (about 20 s on 2 cores)."""
    base = base_model("llama", "flex_attention")
    ids, mask = batch(padded=True)
    model = patched(base, gates=False)
    assert model.config._attn_implementation == "aligner_flex_attention"
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask).logits, base(ids, attention_mask=mask).logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_eager_equals_sdpa_equals_the_kernels_with_an_aligner(family):
    """Non-zero gates: the main attention from eager or SDPA, the prefix term from the PyTorch
    reference or our Triton kernels (the interpreter on CPU) give the same model."""
    base = base_model(family)
    ids, mask = batch(padded=True)
    logits = {}
    for name, implementation, backend in [
        ("sdpa", "sdpa", None), ("eager", "eager", None), ("kernels", "sdpa", "fused"),
    ]:  # fmt: skip
        model = patched(base, gates=True, backend=backend)
        model.set_attn_implementation(implementation)
        with torch.no_grad():
            logits[name] = model(ids, attention_mask=mask).logits * mask[..., None]
    torch.testing.assert_close(logits["eager"], logits["sdpa"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits["kernels"], logits["sdpa"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_set_attn_implementation_after_patch_keeps_the_aligner(family):
    """transformers' eager-vs-SDPA tests switch a loaded model's implementation: the Aligner stays,
    the switch changes only the main attention."""
    base = base_model(family)
    ids, mask = batch(padded=True)
    model = patched(base, gates=True)
    with torch.no_grad():
        sdpa_logits = model(ids, attention_mask=mask).logits
        model.set_attn_implementation("eager")
        eager_logits = model(ids, attention_mask=mask).logits
        assert model.config._attn_implementation == "aligner_eager"
        assert model.aligner_state.main_attn_implementation == "eager"
        real = mask[..., None].bool()  # padding rows differ between implementations, in the base too
        torch.testing.assert_close(eager_logits * real, sdpa_logits * real, atol=1e-5, rtol=1e-5)
        base.set_attn_implementation("eager")
        assert not torch.allclose(
            eager_logits * real, base(ids, attention_mask=mask).logits * real, atol=1e-3
        )
        model.set_attn_implementation("sdpa")
        assert torch.equal(model(ids, attention_mask=mask).logits, sdpa_logits)
    aligner.unpatch(model)
    assert model.config._attn_implementation == "sdpa"


# -- 3. output_attentions -------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_output_attentions_are_the_main_attention_probabilities(family):
    base = base_model(family, "eager")
    ids, mask = batch(padded=True)
    with torch.no_grad():
        expected = base(ids, attention_mask=mask, output_attentions=True).attentions
        zero = patched(base, gates=False)(ids, attention_mask=mask, output_attentions=True).attentions
        steered = patched(base, gates=True)(ids, attention_mask=mask, output_attentions=True).attentions
    assert len(zero) == len(expected) == len(steered) == DEFAULTS["num_hidden_layers"]
    assert all(torch.equal(a, b) for a, b in zip(zero, expected))
    # Layer 0 sees the same hidden states with or without the Aligner: the same probabilities.
    assert torch.equal(steered[0], expected[0])
    assert not torch.allclose(steered[-1], expected[-1])
    torch.testing.assert_close(steered[-1].sum(-1), torch.ones_like(steered[-1].sum(-1)))


def test_output_attentions_without_weights_is_a_clear_error():
    model = patched(base_model("llama", "sdpa"), gates=True)
    ids, mask = batch(padded=False)
    with pytest.raises(ValueError, match=r"output_attentions=True needs attention weights.*'sdpa'.*eager"):
        model(ids, attention_mask=mask, output_attentions=True)


def test_prefix_attention_weights_are_readable():
    model = patched(base_model("llama"), gates=True, num_tokens=3)
    attn = model.aligner_state.layers[1]
    q = torch.randn(2, 5, 4, 16)
    prefix_k, _ = aligner.project_prefix(
        model.aligner_prefix.tokens, attn.k_proj, attn.v_proj, attn.head_dim, torch.float32
    )
    weights = aligner.reference.prefix_attention_weights(q, prefix_k)
    assert weights.shape == (2, 4, 5, 3)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 5))


@pytest.mark.parametrize("family", FAMILIES)
def test_assisted_and_prompt_lookup_decoding_equal_greedy_with_attentions(family):
    model = patched(base_model(family, "eager"), gates=True)
    assistant = base_model(family, "eager")  # a different model: some drafts get rejected
    ids, mask = batch(padded=False)
    options = dict(output_attentions=True)
    greedy = generated(model, ids[:1], mask[:1], **options)
    assisted = generated(model, ids[:1], mask[:1], assistant_model=assistant, **options)
    lookup = generated(model, ids[:1], mask[:1], prompt_lookup_num_tokens=3, **options)
    assert_same_generation(assisted, greedy, exact=False)
    assert_same_generation(lookup, greedy, exact=False)


# -- 2. torch.compile(fullgraph=True) -------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_fullgraph_compile_inference_and_training_step(family):
    """Dynamo traces the whole patched model without a graph break (aot_eager: the graph that
    inductor would compile, without the C++ build), forward and backward."""
    base = base_model(family)
    ids, mask = batch(padded=True)
    model = patched(base, gates=True)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(
            compiled(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits
        )
    model.train()
    loss = compiled(ids, attention_mask=mask, labels=ids, use_cache=False).loss
    loss.backward()
    grads = {name: p.grad.clone() for name, p in aligner.aligner_parameters(model).items()}
    model.zero_grad()
    model(ids, attention_mask=mask, labels=ids, use_cache=False).loss.backward()
    for name, param in aligner.aligner_parameters(model).items():
        torch.testing.assert_close(grads[name], param.grad, atol=1e-6, rtol=1e-5)


def test_compiled_static_cache_generate_with_zero_gates_equals_the_unpatched_model():
    """What ``generate`` does for compiled decoding: a static cache and a forward compiled whole
    (aot_eager here: inductor's C++ build takes minutes on 2 cores; the GPU check runs inductor)."""
    base = base_model("llama")
    ids, mask = batch(padded=True)
    expected = generated(base, ids, mask, cache_implementation="static")
    model = patched(base, gates=False)
    model.forward = torch.compile(model.forward, fullgraph=True, backend="aot_eager")
    actual = generated(model, ids, mask, cache_implementation="static")
    assert_same_generation(actual, expected, exact=False)


# -- A model loaded with the Aligner's attention but no Aligner (TRL's reference copy) -------------


def test_a_model_without_an_aligner_runs_its_main_attention():
    base = base_model("llama")
    patched(base, gates=True)  # registers "aligner_sdpa"
    fresh = transformers.AutoModelForCausalLM.from_config(base.config, attn_implementation="aligner_sdpa")
    fresh.load_state_dict(base.state_dict())
    ids, mask = batch(padded=True)
    with torch.no_grad():
        assert torch.equal(
            fresh.eval()(ids, attention_mask=mask).logits, base(ids, attention_mask=mask).logits
        )
