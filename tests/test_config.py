"""AlignerConfig: validation that names the field, dict and file round trips, the one compatibility
check, files written before it existed, and patch(config=...) being patch(num_tokens=..., start_layer=...)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings

import pytest
import torch
from safetensors.torch import save as safetensors_save
from tiny_models import randomize_aligner, tiny_model

import aligner
from aligner import AlignerBank, AlignerConfig
from aligner.config import CONFIG_NAME, WEIGHTS_NAME, base_fingerprint, read_config_file
from aligner.options import OptionError, cli_flag

# A 4-layer LLaMA of width 32, 4 heads of 8 over 2 KV heads.
BASE = dict(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, max_position_embeddings=64
)
FINGERPRINT = {
    "model_type": "llama",
    "hidden_size": 32,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 4,
    "head_dim": 8,
}


def base_model(**fields):
    return tiny_model(**{**BASE, **fields})


# ----------------------------------------------------------------------------------------------
# Construction and validation


def test_defaults_are_the_papers():
    config = AlignerConfig()
    assert (config.num_tokens, config.start_layer, config.base) == (1, 2, None)
    with pytest.raises(ValueError, match="no base fingerprint yet"):
        config.num_parameters  # noqa: B018 (a property that needs the base)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"num_tokens": 0}, "num_tokens must be a positive integer, got 0"),
        ({"num_tokens": True}, "num_tokens must be a positive integer, got True"),
        ({"num_tokens": 1.5}, "num_tokens must be a positive integer, got 1.5"),
        ({"start_layer": -1}, "start_layer must be an integer >= 0, got -1"),
        ({"start_layer": "2"}, "start_layer must be an integer >= 0, got '2'"),
        ({"start_layer": 4, "base": FINGERPRINT}, "start_layer must be in [0, 4) for a 4-layer model, got 4"),
        ({"base": {"model_type": "llama"}}, "base lacks hidden_size, num_attention_heads"),
        ({"base": {**FINGERPRINT, "hidden_size": 0}}, "base hidden_size must be a positive integer, got 0"),
        ({"base": [1, 2]}, "base must be an object with model_type, hidden_size"),
        ({"base_model": 3}, "base_model must be a string or null, got 3"),
    ],
)
def test_bad_values_name_the_field(fields, message):
    with pytest.raises(OptionError) as error:
        AlignerConfig(**fields)
    assert message in str(error.value)
    # The command line names the flag, a file the key (see test_from_dict_errors_name_the_file_and_key).
    field = next(iter(fields))
    assert cli_flag(field) in error.value.render(cli_flag)


def test_frozen_and_replace_validates():
    config = AlignerConfig(num_tokens=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.num_tokens = 3
    assert dataclasses.replace(config, num_tokens=3).num_tokens == 3
    with pytest.raises(ValueError, match="num_tokens must be a positive integer"):
        dataclasses.replace(config, num_tokens=0)


def test_derived_values():
    config = AlignerConfig(num_tokens=3, start_layer=1, base=FINGERPRINT)
    assert config.layers == range(1, 4)
    assert config.num_parameters == 3 * 32 + 3 * 4
    assert config.parameter_shapes() == {"prefix": (3, 32), "gate.1": (4,), "gate.2": (4,), "gate.3": (4,)}
    # Extra fingerprint keys (a run's embedding hash) are not the config's.
    assert AlignerConfig(base={**FINGERPRINT, "embedding_sha256": "x"}).base == FINGERPRINT


# ----------------------------------------------------------------------------------------------
# Dicts and files


@pytest.mark.parametrize(
    "config",
    [
        AlignerConfig(),
        AlignerConfig(num_tokens=10, start_layer=0),
        AlignerConfig(num_tokens=2, start_layer=3, base=FINGERPRINT, base_model="org/base"),
        AlignerConfig(base=FINGERPRINT, converted_from="aligner.pth"),
    ],
)
def test_dict_round_trip(config):
    data = config.to_dict()
    assert (data["format"], data["format_version"]) == ("aligner", 1)
    assert AlignerConfig.from_dict(json.loads(json.dumps(data))) == config
    # Optional fields are written only when set (a bank's header has none of them).
    assert ("base_model" in data) == (config.base_model is not None)


def test_from_dict_requires_what_every_saved_config_has(tmp_path):
    with pytest.raises(ValueError, match="x.json: lacks 'start_layer'"):
        AlignerConfig.from_dict({"format": "aligner", "format_version": 1, "num_tokens": 1}, source="x.json")
    # A saved Aligner's config and a bank's name their base.
    (tmp_path / CONFIG_NAME).write_text(json.dumps(AlignerConfig().to_dict()))
    with pytest.raises(ValueError, match=f"{CONFIG_NAME}: lacks 'base', the fingerprint of the base model"):
        AlignerConfig.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="a bank's config needs the base fingerprint"):
        AlignerBank(torch.zeros(1, 1, 32), torch.zeros(1, 2, 4), ["a"], AlignerConfig().to_dict())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_tokens": 0}, "x.json: 'num_tokens' must be a positive integer, got 0"),
        ({"start_layer": 9}, "x.json: 'start_layer' must be in [0, 4) for a 4-layer model, got 9"),
        ({"base": {**FINGERPRINT, "head_dim": "8"}}, "x.json: 'base' head_dim must be a positive integer"),
        ({"format": "peft"}, "x.json is not an Aligner config: 'format' is 'peft', not 'aligner'"),
        ({"format_version": 2}, "x.json has format_version 2, newer than this library reads (1)"),
        ({"format_version": "1"}, "x.json: 'format_version' must be a positive integer, got '1'"),
    ],
)
def test_from_dict_errors_name_the_file_and_key(change, message):
    data = {**AlignerConfig(base=FINGERPRINT).to_dict(), **change}
    with pytest.raises(ValueError) as error:
        AlignerConfig.from_dict(data, source="x.json")
    assert not isinstance(error.value, OptionError)  # about a file, not an option
    assert message in str(error.value)


def test_unknown_keys_are_ignored_with_a_warning():
    data = {**AlignerConfig(base=FINGERPRINT).to_dict(), "init_std": 0.5, "num_parameters": 40}
    data["base"] = {**FINGERPRINT, "rope_theta": 1e4}
    with pytest.warns(UserWarning, match=r"x.json: ignoring keys .*: base.rope_theta, init_std$"):
        config = AlignerConfig.from_dict(data, source="x.json")
    assert config == AlignerConfig(base=FINGERPRINT)
    with warnings.catch_warnings():  # the save's record is known: no warning
        warnings.simplefilter("error")
        AlignerConfig.from_dict({**config.to_dict(), "num_parameters": 40, "weights_sha256": "ab"})


def test_saved_config_round_trips_through_the_file(tmp_path):
    model = base_model()
    model.config._name_or_path = "org/my-base"
    model = randomize_aligner(aligner.patch(model, num_tokens=2, start_layer=1))
    aligner.save(model, tmp_path)
    config, record = read_config_file(tmp_path)
    assert config == AlignerConfig(2, 1, base=FINGERPRINT, base_model="org/my-base")
    assert config == AlignerConfig.from_pretrained(tmp_path) == model.aligner_state.config
    assert record["num_parameters"] == config.num_parameters == 2 * 32 + 3 * 4
    assert record["weights_sha256"] == hashlib.sha256((tmp_path / WEIGHTS_NAME).read_bytes()).hexdigest()
    assert aligner.read_config(tmp_path) == {**config.to_dict(), **record}


# Exactly what aligner.save and AlignerBank.save wrote before AlignerConfig existed (base_model was
# always written, null too; a bank's header has the config without it).
OLD_CONFIG = """{
  "format": "aligner",
  "format_version": 1,
  "base": {
    "model_type": "llama",
    "hidden_size": 32,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 4,
    "head_dim": 8
  },
  "num_tokens": 2,
  "start_layer": 1,
  "base_model": null,
  "num_parameters": 76,
  "weights_sha256": "SHA"
}
"""
OLD_BANK_CONFIG = (
    '{"format": "aligner", "format_version": 1, "base": {"model_type": "llama", "hidden_size": 32, '
    '"num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 4, "head_dim": 8}, '
    '"num_tokens": 2, "start_layer": 1}'
)


def old_tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    tensors = {"prefix": torch.randn(2, 32, generator=generator)}
    tensors.update({f"gate.{layer}": torch.randn(4, generator=generator) for layer in (1, 2, 3)})
    return tensors


def test_files_written_before_aligner_config_still_load(tmp_path):
    tensors = old_tensors()
    weights = safetensors_save(tensors, metadata={"format": "pt"})
    (tmp_path / WEIGHTS_NAME).write_bytes(weights)
    (tmp_path / CONFIG_NAME).write_text(OLD_CONFIG.replace("SHA", hashlib.sha256(weights).hexdigest()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing in an old file is unknown
        model = aligner.load(base_model(), tmp_path)
    assert model.aligner_state.config == AlignerConfig(2, 1, base=FINGERPRINT)
    for name, param in aligner.aligner_parameters(model).items():
        assert torch.equal(param, tensors[name]), name

    # Saving it again writes the same JSON object, less the null base_model.
    aligner.save(model, tmp_path / "again")
    old = json.loads((tmp_path / CONFIG_NAME).read_text())
    del old["base_model"]
    assert json.loads((tmp_path / "again" / CONFIG_NAME).read_text()) == old
    assert (tmp_path / "again" / WEIGHTS_NAME).read_bytes() == weights

    from safetensors.torch import save_file

    bank_path = tmp_path / "bank.safetensors"
    stacked = {
        "tokens": tensors["prefix"][None],
        "gates": torch.stack([tensors[f"gate.{layer}"] for layer in (1, 2, 3)])[None],
    }
    metadata = {"format": "pt", "aligner_config": OLD_BANK_CONFIG, "aligner_names": '["a"]'}
    save_file(stacked, bank_path, metadata=metadata)
    bank = AlignerBank.load(bank_path)
    assert bank.config == AlignerConfig(2, 1, base=FINGERPRINT)
    bank.save(tmp_path / "bank-again.safetensors")
    from safetensors import safe_open

    with safe_open(tmp_path / "bank-again.safetensors", framework="pt") as file:
        assert json.loads(file.metadata()["aligner_config"]) == json.loads(OLD_BANK_CONFIG)


def test_a_converted_aligner_saved_again_is_no_longer_converted(tmp_path):
    config = AlignerConfig(2, 1, base=FINGERPRINT, converted_from="aligner.pth")
    from aligner.serialization import write_aligner

    write_aligner(tmp_path / "converted", old_tensors(), config)
    assert AlignerConfig.from_pretrained(tmp_path / "converted") == config
    model = aligner.load(base_model(), tmp_path / "converted")
    aligner.save(model, tmp_path / "trained")
    assert AlignerConfig.from_pretrained(tmp_path / "trained").converted_from is None


# ----------------------------------------------------------------------------------------------
# The compatibility check


def test_compatibility_with_a_base():
    config = AlignerConfig(base=FINGERPRINT, base_model="org/base")
    model_config = base_model().config
    config.check_compatible(model_config)  # a PretrainedConfig ...
    config.check_compatible(base_fingerprint(model_config))  # ... or its fingerprint
    AlignerConfig().check_compatible(model_config)  # no base yet: fits any
    other = base_model(num_key_value_heads=4, num_hidden_layers=6).config
    with pytest.raises(ValueError) as error:
        config.check_compatible(other, name="Aligner in x", advice="; use another")
    assert str(error.value) == (
        "Aligner in x was made for org/base (llama hidden_size=32 num_attention_heads=4 "
        "num_key_value_heads=2 num_hidden_layers=4 head_dim=8) but the model is llama hidden_size=32 "
        "num_attention_heads=4 num_key_value_heads=4 num_hidden_layers=6 head_dim=8 "
        "(differs in num_key_value_heads, num_hidden_layers); use another"
    )


def test_compatibility_between_aligners():
    one = AlignerConfig(1, 2, base=FINGERPRINT)
    one.check_compatible(AlignerConfig(1, 2, base=FINGERPRINT, base_model="org/base"))  # names differ
    with pytest.raises(ValueError) as error:
        one.check_compatible(AlignerConfig(3, 1, base=FINGERPRINT), name="a", other_name="the bank")
    assert str(error.value) == (
        "a has num_tokens=1, start_layer=2, but the bank has num_tokens=3, start_layer=1 "
        "(differs in num_tokens, start_layer)"
    )
    wider = AlignerConfig(1, 2, base={**FINGERPRINT, "hidden_size": 64, "head_dim": 16})
    with pytest.raises(
        ValueError, match=r"^a was made for llama .* but b was made for llama hidden_size=64 "
    ):
        one.check_compatible(wider, name="a", other_name="b")


# ----------------------------------------------------------------------------------------------
# patch, and where the config is used


def test_patch_with_a_config_equals_patch_with_keywords():
    keywords = randomize_aligner(aligner.patch(base_model(), num_tokens=3, start_layer=1))
    configured = randomize_aligner(aligner.patch(base_model(), config=AlignerConfig(3, 1)))
    assert keywords.aligner_state.config == configured.aligner_state.config
    assert configured.aligner_state.config == AlignerConfig(3, 1, base=FINGERPRINT)
    assert (configured.aligner_state.num_tokens, configured.aligner_state.start_layer) == (3, 1)
    shapes = {name: tuple(p.shape) for name, p in aligner.aligner_parameters(configured).items()}
    assert shapes == AlignerConfig(3, 1, base=FINGERPRINT).parameter_shapes()
    assert {k: tuple(p.shape) for k, p in aligner.aligner_parameters(keywords).items()} == shapes
    ids = torch.randint(1, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(keywords(ids).logits, configured(ids).logits)
    # Keywords that agree with the config are fine; the defaults are the config's defaults.
    aligner.patch(base_model(), 3, 1, config=AlignerConfig(3, 1))
    assert aligner.patch(base_model()).aligner_state.config == AlignerConfig(base=FINGERPRINT)


def test_patch_refuses_a_config_that_does_not_fit():
    with pytest.raises(ValueError, match=r"num_tokens=2 conflicts with config.num_tokens=3"):
        aligner.patch(base_model(), num_tokens=2, config=AlignerConfig(3, 1))
    with pytest.raises(TypeError, match="config must be an AlignerConfig, got dict"):
        aligner.patch(base_model(), config={"num_tokens": 1})
    model = base_model()
    other = AlignerConfig(base={**FINGERPRINT, "num_hidden_layers": 6})
    with pytest.raises(
        ValueError, match=r"the Aligner config was made for .* \(differs in num_hidden_layers\)"
    ):
        aligner.patch(model, config=other)
    with pytest.raises(ValueError, match=r"start_layer must be in \[0, 4\) for a 4-layer model, got 4"):
        aligner.patch(model, config=AlignerConfig(start_layer=4))
    assert not hasattr(model, "aligner_state")


def test_train_config_and_command_line_take_the_aligner_fields_from_it(capsys):
    from aligner.cli import main
    from aligner.cli.train import INHERITED
    from aligner.training import TrainConfig

    fields = {item.name: item for item in dataclasses.fields(TrainConfig)}
    for item in dataclasses.fields(AlignerConfig):
        if item.metadata.get("cli", True):
            assert item.name in INHERITED
            assert fields[item.name].default == item.default
            assert fields[item.name].metadata["help"] == item.metadata["help"]
    with pytest.raises(OptionError, match="num_tokens must be a positive integer, got 0"):
        TrainConfig(output_dir="out", num_tokens=0)
    assert TrainConfig(output_dir="out", num_tokens=3, start_layer=0).aligner_config() == AlignerConfig(3, 0)
    with pytest.raises(SystemExit):
        main(["info", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--num-tokens NUM_TOKENS Aligner prefix tokens N (default: 1)" in out
    assert "--start-layer START_LAYER first layer with an Aligner (default: 2)" in out
    assert "--base" not in out
