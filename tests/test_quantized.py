"""Aligners on quantized base models: bitsandbytes 8-bit (LLM.int8) and 4-bit (NF4), loaded through
transformers' ``BitsAndBytesConfig`` onto the CPU (bitsandbytes' CPU backend), on a tiny random LLaMA.

The reference for each quantized model is the same checkpoint loaded quantized and then
``dequantize()``-d: a full-precision model with exactly the quantized weights. 4-bit layers
dequantize their weights and multiply in the compute dtype, so the two agree exactly; 8-bit layers
also quantize the activations, so there the Aligner may differ from the reference only by the
int8 noise that the unpatched models already show.

The ``compute_dtype`` tests use stand-in layers and run without bitsandbytes.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import SAVED, randomize_aligner, tiny_model
from torch import nn

import aligner
from aligner.modules import compute_dtype, is_quantized

VOCAB = 300
KINDS = ["8bit", "4bit"]


# --------------------------------------------------------------------------------------------
# The dtype logic, with stand-in layers


class StandIn(nn.Module):
    """A linear layer with a quantized (integer) weight, like bitsandbytes' layers."""

    def __init__(self, weight_dtype, compute=None, bias_dtype=None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(8, 4, dtype=weight_dtype), requires_grad=False)
        self.compute_dtype = compute
        self.bias = None if bias_dtype is None else nn.Parameter(torch.zeros(8, dtype=bias_dtype))


@pytest.mark.parametrize(
    ("layer", "expected"),
    [
        (nn.Linear(4, 8, dtype=torch.bfloat16), torch.bfloat16),
        (StandIn(torch.uint8, compute=torch.float16), torch.float16),  # bnb Linear4bit
        (StandIn(torch.int8, bias_dtype=torch.bfloat16), torch.bfloat16),  # bnb Linear8bitLt with a bias
        (StandIn(torch.float8_e4m3fn, compute=torch.bfloat16), torch.bfloat16),  # FP8 schemes
    ],
)
def test_compute_dtype(layer, expected):
    assert compute_dtype(layer) == expected
    assert is_quantized(layer) == (layer.weight.dtype != expected)


def test_compute_dtype_falls_back_to_the_activations_dtype():
    layer = StandIn(torch.int8)  # bnb Linear8bitLt without a bias: takes any float input
    assert compute_dtype(layer, torch.float16) == torch.float16
    assert compute_dtype(nn.Linear(4, 8), torch.float16) == torch.float32  # full precision: the weights
    with pytest.raises(ValueError, match=r"StandIn computes in.*int8.*activations' dtype"):
        compute_dtype(layer)
    with pytest.raises(ValueError, match="activations' dtype"):
        aligner.project_prefix(torch.randn(2, 4), layer, layer, head_dim=4)


# --------------------------------------------------------------------------------------------
# bitsandbytes on a tiny LLaMA


@pytest.fixture(scope="module")
def bnb():
    """bitsandbytes, if installed and able to run here (its CPU backend needs no GPU)."""
    module = pytest.importorskip("bitsandbytes", reason="needs the quant extra: pip install -e '.[quant]'")
    try:
        layer = module.nn.Linear4bit(4, 4, compute_dtype=torch.float32)
        layer.weight = module.nn.Params4bit(torch.randn(4, 4), requires_grad=False)
        layer.to("cpu")(torch.randn(1, 4))
    except Exception as error:  # noqa: BLE001 - any failure means: no usable backend here
        pytest.skip(f"bitsandbytes {module.__version__} cannot run on this machine: {error}")
    return module


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("quantized") / "model"
    tiny_model(**{**SAVED, "vocab_size": VOCAB}).save_pretrained(directory)
    return directory


def load_quantized(model_dir, kind: str):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = {
        "8bit": BitsAndBytesConfig(load_in_8bit=True),
        "4bit": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32),
    }[kind]
    return AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=config, device_map="cpu")


def batch(seed: int = 0) -> torch.Tensor:
    return torch.randint(1, VOCAB, (2, 10), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", KINDS)
def test_patched_forward_equals_dequantized_model(bnb, model_dir, kind):
    quantized = load_quantized(model_dir, kind)
    k_proj = quantized.model.layers[2].self_attn.k_proj
    assert is_quantized(k_proj) and k_proj.weight.dtype in (torch.int8, torch.uint8)
    reference = load_quantized(model_dir, kind).dequantize()
    assert not is_quantized(reference.model.layers[2].self_attn.k_proj)
    ids = batch()
    base_noise = (quantized(input_ids=ids).logits - reference(input_ids=ids).logits).abs().max()

    logits = randomize_aligner(aligner.patch(quantized, num_tokens=2), gate_scale=0.5)(input_ids=ids).logits
    expected = randomize_aligner(aligner.patch(reference, num_tokens=2), gate_scale=0.5)(input_ids=ids).logits
    if kind == "4bit":
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    else:  # int8 activations: no more than the unpatched models' own difference (x2 margin)
        assert 0 < base_noise < 0.01
        assert (logits - expected).abs().max() <= 2 * base_noise
    with aligner.disabled(reference):
        aligner_effect = (expected - reference(input_ids=ids).logits).abs().max()
    assert aligner_effect > max(0.05, 20 * base_noise), (
        "the Aligner must change the output, well above the noise"
    )


@pytest.mark.parametrize("kind", KINDS)
def test_training_steps_lower_the_loss_and_leave_the_base_alone(bnb, model_dir, kind):
    model = randomize_aligner(aligner.patch(load_quantized(model_dir, kind), num_tokens=2), gate_scale=0.5)
    base = {
        name: param.detach().clone() for name, param in model.named_parameters() if not param.requires_grad
    }
    params = aligner.aligner_parameters(model)
    optimizer = torch.optim.AdamW(list(params.values()), lr=0.05)
    ids = batch()
    losses = []
    for _ in range(4):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        for name, param in params.items():
            assert param.grad is not None and torch.isfinite(param.grad).all(), name
            assert param.grad.abs().sum() > 0, f"{name} got no gradient"
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(after < before for before, after in zip(losses, losses[1:])), losses
    for name, param in model.named_parameters():
        if name in base:
            assert torch.equal(param, base[name]), f"base parameter {name} changed"


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip(bnb, model_dir, kind, tmp_path):
    model = randomize_aligner(aligner.patch(load_quantized(model_dir, kind), num_tokens=2), gate_scale=0.5)
    ids = batch(3)
    expected = model(input_ids=ids).logits
    aligner.save(model, tmp_path / "aligner")
    loaded = aligner.load(load_quantized(model_dir, kind), tmp_path / "aligner")
    for name, param in aligner.aligner_parameters(model).items():
        assert torch.equal(aligner.aligner_parameters(loaded)[name], param), name
    torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_merge_into_a_quantized_o_proj_is_refused(bnb, model_dir, kind):
    model = aligner.patch(load_quantized(model_dir, kind), num_tokens=1)
    with pytest.raises(ValueError, match=r"full-precision o_proj.*load the base without quantization"):
        aligner.merge(model)
    assert model.aligner_state.merged_biases is None
    assert all(attn.o_proj.bias is None for attn in model.aligner_state.layers.values())
