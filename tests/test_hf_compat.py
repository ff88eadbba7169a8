"""Pins the transformers behaviour that aligner/hf_compat.py relies on (its non-public API): a
transformers release that changes any of it fails here, by name, rather than deep inside a model."""

from __future__ import annotations

import inspect

import pytest
import torch
import transformers
from tiny_models import tiny_model
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

from aligner import hf_compat


@pytest.fixture
def model():
    return tiny_model("llama", num_hidden_layers=1)


def test_attn_implementation_is_what_set_attn_implementation_set(model):
    assert hf_compat.attn_implementation(model) == "sdpa"
    model.set_attn_implementation("eager")
    assert hf_compat.attn_implementation(model) == hf_compat.attn_implementation(model.config) == "eager"


def test_supports_attention_interface(model):
    assert hf_compat.supports_attention_interface(model) is True


def test_eager_attention_is_what_an_eager_model_runs(model):
    """The modeling file's eager_attention_forward is the function transformers passes as the
    default of ``ALL_ATTENTION_FUNCTIONS.get_interface`` (what "eager" runs)."""
    attn = model.model.layers[0].self_attn
    function = hf_compat.eager_attention(attn)
    assert function is inspect.getmodule(type(attn)).eager_attention_forward
    assert "eager_attention_forward" in inspect.getsource(type(attn).forward)
    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return function(*args, **kwargs)

    transformers.AttentionInterface.register("pin_eager_spy", spy)
    AttentionMaskInterface.register("pin_eager_spy", ALL_MASK_ATTENTION_FUNCTIONS["eager"])
    model.set_attn_implementation("pin_eager_spy")
    ids = torch.randint(0, 97, (1, 5))
    with torch.no_grad():
        spied = model(ids).logits
        model.set_attn_implementation("eager")
        assert torch.equal(model(ids).logits, spied) and len(calls) == 1
    with pytest.raises(ValueError, match="has no eager_attention_forward"):
        hf_compat.eager_attention(torch.nn.Linear(2, 2))


def test_generate_refuses_unknown_kwargs_unless_accepted(model):
    """generate validates its model kwargs against the forward's signature and TransformersKwargs
    through ``_validate_model_kwargs``; accept_generate_kwarg lets one more name through."""
    ids = torch.randint(1, 97, (1, 4))
    options = dict(max_new_tokens=1, do_sample=False, pad_token_id=0)
    with pytest.raises(ValueError, match="not used by the model.*aligner_index"):
        model.generate(ids, aligner_index=torch.tensor([0]), **options)
    hf_compat.accept_generate_kwarg(model, "aligner_index")
    model.generate(ids, aligner_index=torch.tensor([0]), **options)  # reaches the attention's kwargs
    hf_compat.restore_generate_kwargs(model)
    with pytest.raises(ValueError, match="not used by the model"):
        model.generate(ids, aligner_index=torch.tensor([0]), **options)
