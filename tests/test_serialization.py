"""save / load / convert_official: round trips, atomic writes, refusals and the paper's checkpoints."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import llama2_7b_on_meta, randomize_aligner, tiny_model

from aligner import files, serialization
from aligner.cli.info import describe_aligner, describe_base
from aligner.hf_patch import aligner_parameters, merge, patch
from aligner.official import convert_official
from aligner.serialization import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    aligner_parameter_count,
    load,
    read_config,
    save,
)
from aligner.training.trainer import read_metrics

OFFICIAL_DIR = Path(__file__).parents[2] / "shared/reference/official-aligner-checkpoints"


# The base the Aligners here are made for: a 4-layer LLaMA of width 32, 4 heads of 8 over 2 KV heads.
BASE = dict(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, max_position_embeddings=64
)


def base_model(**fields):
    return tiny_model(**{**BASE, **fields})


def trained(model, num_tokens: int = 1, start_layer: int = 2, seed: int = 1):
    """A patched model whose prefix and gates hold random non-zero values (as after training)."""
    return randomize_aligner(patch(model, num_tokens, start_layer), seed=seed)


def snapshot(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


def rewrite_config(directory: Path, **changes) -> None:
    path = directory / CONFIG_NAME
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config))


# ----------------------------------------------------------------------------------------------
# Round trips and the files


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize(("num_tokens", "start_layer"), [(1, 2), (3, 0)])
def test_round_trip_is_bit_identical(tmp_path, kv_heads, num_tokens, start_layer):
    source = trained(base_model(num_key_value_heads=kv_heads), num_tokens, start_layer)
    assert save(source, tmp_path / "aligner") == tmp_path / "aligner"

    target = load(base_model(num_key_value_heads=kv_heads, seed=7), tmp_path / "aligner")
    assert (target.aligner_state.num_tokens, target.aligner_state.start_layer) == (num_tokens, start_layer)
    saved, loaded = aligner_parameters(source), aligner_parameters(target)
    assert saved.keys() == loaded.keys()
    for name in saved:
        assert loaded[name].dtype == torch.float32
        assert torch.equal(loaded[name], saved[name]), name
        assert loaded[name].abs().min() > 0  # really copied, not the fresh (zero) gates
    # Every layer shares the one loaded prefix.
    layer = target.aligner_state.layers[max(target.aligner_state.layers)]
    assert torch.equal(layer.aligner.shared_prefix(), saved["prefix"])


def test_files_hold_only_the_aligner(tmp_path):
    model = trained(base_model(num_key_value_heads=2), num_tokens=2)
    save(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]  # no temp files
    assert (tmp_path / WEIGHTS_NAME).stat().st_size < 4096
    assert (tmp_path / CONFIG_NAME).stat().st_size < 2048

    tensors = load_file(tmp_path / WEIGHTS_NAME)
    assert set(tensors) == {"prefix", "gate.2", "gate.3"}
    assert {k: (tuple(t.shape), t.dtype) for k, t in tensors.items()} == {
        "prefix": ((2, 32), torch.float32),
        "gate.2": ((4,), torch.float32),
        "gate.3": ((4,), torch.float32),
    }
    config = read_config(tmp_path)
    assert config["format"] == "aligner" and config["format_version"] == 1
    assert config["base"] == {
        "model_type": "llama",
        "hidden_size": 32,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_hidden_layers": 4,
        "head_dim": 8,
    }
    assert (config["num_tokens"], config["start_layer"]) == (2, 2)
    assert aligner_parameter_count(tmp_path) == 2 * 32 + 2 * 4
    # Permissions as for any file the user creates (not a temp file's 0600).
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / WEIGHTS_NAME).stat().st_mode & 0o777 == 0o666 & ~umask


def test_load_overwrites_an_already_patched_model(tmp_path):
    save(trained(base_model(), num_tokens=2), tmp_path)
    target = trained(base_model(), num_tokens=2, seed=5)
    prefix_module = target.aligner_prefix
    assert load(target, tmp_path) is target
    assert target.aligner_prefix is prefix_module  # same modules, values replaced in place
    assert torch.equal(target.aligner_prefix.tokens, load_file(tmp_path / WEIGHTS_NAME)["prefix"])


def test_save_overwrites_a_previous_aligner(tmp_path):
    save(trained(base_model(), seed=1), tmp_path)
    second = trained(base_model(), seed=2)
    save(second, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    loaded = load(base_model(), tmp_path)
    assert torch.equal(loaded.aligner_prefix.tokens, second.aligner_prefix.tokens)


# ----------------------------------------------------------------------------------------------
# Atomic writes


def test_failed_weights_write_leaves_previous_files(tmp_path, monkeypatch):
    save(trained(base_model(), seed=1), tmp_path)
    before = snapshot(tmp_path)

    real_write = serialization.write_temporary

    def fail_on_config(path, data):
        if Path(path).name == CONFIG_NAME:  # the weights' temporary file is already written
            raise OSError("disk full")
        return real_write(path, data)

    monkeypatch.setattr(serialization, "write_temporary", fail_on_config)
    with pytest.raises(OSError, match="disk full"):
        save(trained(base_model(), seed=2), tmp_path)
    assert snapshot(tmp_path) == before  # unchanged, and no temp file left
    load(base_model(), tmp_path)


def test_failed_serialisation_leaves_previous_files(tmp_path, monkeypatch):
    save(trained(base_model(), seed=1), tmp_path)
    before = snapshot(tmp_path)
    monkeypatch.setattr(serialization, "safetensors_save", lambda *args, **kwargs: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        save(trained(base_model(), seed=2), tmp_path)
    assert snapshot(tmp_path) == before


def test_torn_temporary_file_is_removed(tmp_path, monkeypatch):
    """A write that fails halfway through the temporary file leaves neither it nor a changed file."""
    save(trained(base_model(), seed=1), tmp_path)
    before = snapshot(tmp_path)

    def failing_fsync(fd):
        raise OSError("I/O error")

    monkeypatch.setattr(files.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="I/O error"):
        save(trained(base_model(), seed=2), tmp_path)
    monkeypatch.undo()
    assert snapshot(tmp_path) == before


def test_append_line_adds_whole_lines(tmp_path, monkeypatch):
    """files.append_line (metrics.jsonl): creates the file, appends, finishes a short os.write."""
    path = tmp_path / "metrics.jsonl"
    files.append_line(path, '{"step": 1}')
    files.append_line(path, '{"step": 2}')
    real_write = os.write
    monkeypatch.setattr(files.os, "write", lambda fd, data: real_write(fd, data[:3]))
    files.append_line(path, '{"note": "ünïcode"}')
    assert path.read_text(encoding="utf-8") == '{"step": 1}\n{"step": 2}\n{"note": "ünïcode"}\n'
    new_file = tmp_path / "new-file"
    new_file.touch()
    assert path.stat().st_mode & 0o777 == new_file.stat().st_mode & 0o777  # the usual mode of a new file


def test_torn_metrics_line_is_ended_and_skipped(tmp_path):
    """A crash mid-append leaves a last line without its newline: the next append starts a new
    line, and read_metrics keeps every whole record and warns about the torn one."""
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "lo', encoding="utf-8")
    files.append_line(path, '{"step": 3}')
    assert path.read_text(encoding="utf-8") == '{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n'
    with pytest.warns(UserWarning, match=r"metrics.jsonl:2: not JSON \(torn by a crash\?\), skipped"):
        assert read_metrics(path) == [{"step": 1}, {"step": 3}]


def test_torn_pair_of_files_is_detected(tmp_path, monkeypatch):
    """A crash between the two renames leaves new weights beside the old config: load refuses it."""
    save(trained(base_model(), seed=1), tmp_path)
    real_replace = os.replace

    def crash_on_config(source, destination):
        if Path(destination).name == CONFIG_NAME:
            raise OSError("power cut")
        real_replace(source, destination)

    monkeypatch.setattr(serialization.os, "replace", crash_on_config)
    with pytest.raises(OSError, match="power cut"):
        save(trained(base_model(), seed=2), tmp_path)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    with pytest.raises(ValueError, match="SHA-256"):
        load(base_model(), tmp_path)


# ----------------------------------------------------------------------------------------------
# Refusals


def test_save_refuses_an_unpatched_model(tmp_path):
    with pytest.raises(ValueError, match="carries no Aligner"):
        save(base_model(), tmp_path)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("differs", "value"),
    [("hidden_size", 48), ("num_hidden_layers", 5), ("num_key_value_heads", 4), ("num_attention_heads", 8)],
)
def test_mismatched_base_is_refused(tmp_path, differs, value):
    save(trained(base_model()), tmp_path)
    other = base_model(**{differs: value})
    with pytest.raises(ValueError) as error:
        load(other, tmp_path)
    message = str(error.value)
    assert "made for llama hidden_size=32 num_attention_heads=4 num_key_value_heads=2" in message
    assert "num_hidden_layers=4 head_dim=8 but the model is llama" in message
    assert f"{differs}={value}" in message and f"differs in {differs}" in message
    assert not hasattr(other, "aligner_state")  # refused before anything was patched


def test_mismatched_base_error_names_the_base_and_needs_only_its_config(tmp_path):
    model = trained(base_model())
    model.config._name_or_path = "org/my-base"
    save(model, tmp_path)
    assert read_config(tmp_path)["base_model"] == "org/my-base"
    other = base_model(hidden_size=48).config
    with pytest.raises(
        ValueError, match=r"made for org/my-base \(llama hidden_size=32 .*differs in hidden_size"
    ):
        serialization.check_base(tmp_path, serialization.base_fingerprint(other))
    assert serialization.check_base(tmp_path, serialization.base_fingerprint(model.config)).num_tokens == 1


def test_describe_aligner_gives_a_layer_range(tmp_path):
    save(trained(base_model(num_hidden_layers=6), start_layer=2), tmp_path)
    info = describe_aligner(tmp_path)
    assert (info["layers"], info["num_layers"], info["parameters"]) == ("2-5", 4, 32 + 4 * 4)
    cost = describe_base(serialization.base_fingerprint(base_model().config), 10, 1)["aligner"]
    assert cost == {"num_tokens": 10, "layers": "1-3", "parameters": 10 * 32 + 3 * 4}


def test_mismatched_model_type_is_refused(tmp_path):
    save(trained(base_model()), tmp_path)
    rewrite_config(tmp_path, base={**read_config(tmp_path)["base"], "model_type": "mistral"})
    with pytest.raises(ValueError, match="made for mistral .* but the model is llama"):
        load(base_model(), tmp_path)


def test_already_patched_with_other_shape_is_refused(tmp_path):
    save(trained(base_model(), num_tokens=1), tmp_path)
    with pytest.raises(ValueError, match="num_tokens=3, start_layer=2, but .* num_tokens=1"):
        load(trained(base_model(), num_tokens=3), tmp_path)
    with pytest.raises(ValueError, match="start_layer=1, but .* start_layer=2"):
        load(trained(base_model(), num_tokens=1, start_layer=1), tmp_path)


def test_merged_model_is_refused(tmp_path):
    save(trained(base_model()), tmp_path)
    with pytest.raises(ValueError, match="unmerge"):
        load(merge(trained(base_model())), tmp_path)


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        load(base_model(), tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        load(base_model(), tmp_path)
    save(trained(base_model()), tmp_path)
    (tmp_path / WEIGHTS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=WEIGHTS_NAME):
        load(base_model(), tmp_path)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("{not json", "is not valid JSON"),
        ("[1, 2]", "must hold a JSON object"),
        ('{"format": "peft"}', "is not an Aligner config"),
        ('{"format": "aligner", "format_version": 99}', "newer than this library"),
        ('{"format": "aligner", "format_version": 1, "base": {}}', "'base' lacks model_type"),
    ],
)
def test_garbled_config(tmp_path, text, match):
    save(trained(base_model()), tmp_path)
    (tmp_path / CONFIG_NAME).write_text(text)
    model = base_model()
    with pytest.raises(ValueError, match=match) as error:
        load(model, tmp_path)
    assert str(tmp_path / CONFIG_NAME) in str(error.value)
    assert not hasattr(model, "aligner_state")


def test_bad_config_values(tmp_path):
    save(trained(base_model()), tmp_path)
    rewrite_config(tmp_path, num_tokens=0)
    with pytest.raises(ValueError, match="'num_tokens' must be a positive integer"):
        load(base_model(), tmp_path)
    rewrite_config(tmp_path, num_tokens=1, start_layer=4)
    with pytest.raises(ValueError, match=r"'start_layer' must be in \[0, 4\) for a 4-layer model, got 4"):
        load(base_model(), tmp_path)


def test_garbled_weights(tmp_path):
    save(trained(base_model()), tmp_path)
    (tmp_path / WEIGHTS_NAME).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    with pytest.raises(ValueError, match="SHA-256"):  # the config's checksum catches it first
        load(base_model(), tmp_path)
    rewrite_config(tmp_path, weights_sha256=None)
    with pytest.raises(ValueError, match=f"{WEIGHTS_NAME} is not a readable safetensors file"):
        load(base_model(), tmp_path)


def _tamper(directory: Path, tensors: dict) -> None:
    save_file(tensors, directory / WEIGHTS_NAME)
    rewrite_config(directory, weights_sha256=None, num_parameters=None)


def test_missing_unexpected_and_misshapen_tensors(tmp_path):
    save(trained(base_model()), tmp_path)
    good = load_file(tmp_path / WEIGHTS_NAME)

    _tamper(tmp_path, {k: v for k, v in good.items() if k != "gate.3"})
    with pytest.raises(ValueError, match=r"missing keys \['gate.3'\]"):
        load(base_model(), tmp_path)

    _tamper(tmp_path, {**good, "gate.1": torch.zeros(4), "lora_A": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match=r"unexpected keys \['gate.1', 'lora_A'\]"):
        load(base_model(), tmp_path)

    _tamper(tmp_path, {**good, "gate.2": torch.zeros(8)})
    with pytest.raises(ValueError, match=r"'gate.2' has shape \(8,\) but the model expects \(4,\)"):
        load(base_model(), tmp_path)

    _tamper(tmp_path, {**good, "prefix": torch.zeros(2, 32)})  # the config says num_tokens=1
    with pytest.raises(ValueError, match=r"'prefix' has shape \(2, 32\) but the model expects \(1, 32\)"):
        load(base_model(), tmp_path)

    _tamper(tmp_path, {**good, "gate.2": torch.tensor([1.0, float("nan"), 0.0, 0.0])})
    with pytest.raises(ValueError, match="'gate.2' holds NaN"):
        load(base_model(), tmp_path)

    _tamper(tmp_path, {**good, "gate.2": torch.zeros(4, dtype=torch.int32)})
    with pytest.raises(ValueError, match="'gate.2' has dtype torch.int32"):
        load(base_model(), tmp_path)


def test_meta_device(tmp_path):
    save(trained(base_model()), tmp_path)
    with torch.device("meta"):
        model = base_model()
    with pytest.raises(ValueError, match="meta device"):
        save(patch(model), tmp_path / "other")
    with pytest.raises(ValueError, match="meta device"):  # patched, Aligner still on meta
        load(model, tmp_path)


# ----------------------------------------------------------------------------------------------
# The paper's official (Lit-LLaMA) checkpoints


def official_checkpoint(num_tokens=1, hidden=32, heads=4, layers=4, start_layer=2, seed=0):
    """A dict laid out like the paper's checkpoints: bf16 prefix, (1, H, 1, 1) gates, per-layer copies."""
    generator = torch.Generator().manual_seed(seed)
    prefix = torch.randn(num_tokens, hidden, generator=generator).to(torch.bfloat16)
    checkpoint = {"global_value_embedding.weight": prefix}
    for layer in range(start_layer, layers):
        gate = torch.randn(1, heads, 1, 1, generator=generator).to(torch.bfloat16)
        checkpoint[f"transformer.h.{layer}.attn.gating_factor"] = gate
        checkpoint[f"transformer.h.{layer}.attn.adapter_wte.weight"] = prefix.clone()
    return checkpoint


@pytest.mark.parametrize(("num_tokens", "start_layer"), [(1, 2), (3, 1)])
def test_convert_synthetic_official_checkpoint(tmp_path, num_tokens, start_layer):
    checkpoint = official_checkpoint(num_tokens, start_layer=start_layer)
    torch.save(checkpoint, tmp_path / "ckpt.pth")
    out = convert_official(tmp_path / "ckpt.pth", tmp_path / "converted")
    assert out == tmp_path / "converted"
    config = read_config(out)
    assert config["base"] == {
        "model_type": "llama",
        "hidden_size": 32,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "num_hidden_layers": 4,
        "head_dim": 8,
    }
    assert (config["num_tokens"], config["start_layer"]) == (num_tokens, start_layer)
    assert config["converted_from"] == "ckpt.pth"
    assert aligner_parameter_count(out) == num_tokens * 32 + (4 - start_layer) * 4

    model = load(base_model(num_key_value_heads=4), out)
    params = aligner_parameters(model)
    assert torch.equal(params["prefix"], checkpoint["global_value_embedding.weight"].float())
    for layer in range(start_layer, 4):
        expected = checkpoint[f"transformer.h.{layer}.attn.gating_factor"].float().flatten()
        assert torch.equal(params[f"gate.{layer}"], expected)

    with pytest.raises(
        ValueError, match="num_key_value_heads=4 .* but the model is llama .*num_key_value_heads=2"
    ):
        load(base_model(num_key_value_heads=2), out)  # the paper's LLaMA-2 7B/13B are multi-head attention


def test_convert_rejects_other_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.pth"):
        convert_official(tmp_path / "nothing.pth", tmp_path / "out")

    (tmp_path / "text.pth").write_text("hello")
    with pytest.raises(ValueError, match="text.pth is not a PyTorch checkpoint"):
        convert_official(tmp_path / "text.pth", tmp_path / "out")

    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="holds a list, not a dict"):
        convert_official(tmp_path / "list.pth", tmp_path / "out")

    torch.save({"model.layers.0.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="has no 'global_value_embedding.weight'"):
        convert_official(tmp_path / "other.pth", tmp_path / "out")

    checkpoint = official_checkpoint()
    gates_only = {k: v for k, v in checkpoint.items() if "gating_factor" not in k}
    torch.save(gates_only, tmp_path / "nogates.pth")
    with pytest.raises(ValueError, match="has no 'transformer.h.{l}.attn.gating_factor'"):
        convert_official(tmp_path / "nogates.pth", tmp_path / "out")

    torch.save({**checkpoint, "transformer.h.3.attn.gating_factor": torch.zeros(4)}, tmp_path / "shape.pth")
    with pytest.raises(ValueError, match=r"gating_factor' has shape \(4,\), expected \(1, heads, 1, 1\)"):
        convert_official(tmp_path / "shape.pth", tmp_path / "out")

    gap = official_checkpoint(layers=5)
    del gap["transformer.h.3.attn.gating_factor"]
    torch.save(gap, tmp_path / "gap.pth")
    with pytest.raises(ValueError, match=r"layers \[3\] have no gating_factor"):
        convert_official(tmp_path / "gap.pth", tmp_path / "out")

    assert not (tmp_path / "out").exists()


def test_convert_refuses_pickled_code(tmp_path):
    """Only plain tensors are read: an arbitrary pickled object is refused, never executed."""
    torch.save({"global_value_embedding.weight": torch.zeros(1, 4), "x": Path("a")}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="without unpickling code") as error:
        convert_official(tmp_path / "evil.pth", tmp_path / "out")
    assert "weights_only=False" not in str(error.value)  # torch's advice would run the file's code


def test_convert_warns_on_differing_copies(tmp_path):
    checkpoint = official_checkpoint()
    checkpoint["transformer.h.3.attn.adapter_wte.weight"] = torch.zeros(1, 32, dtype=torch.bfloat16)
    torch.save(checkpoint, tmp_path / "ckpt.pth")
    with pytest.warns(UserWarning, match=r"layers \[3\] differ"):
        out = convert_official(tmp_path / "ckpt.pth", tmp_path / "out")
    params = aligner_parameters(load(base_model(num_key_value_heads=4), out))
    assert torch.equal(params["prefix"], checkpoint["global_value_embedding.weight"].float())


OFFICIAL = {
    # file: (N, hidden, heads, layers, parameters)
    "alpaca-sft-1token-llama2-7b.pth": (1, 4096, 32, 32, 5_056),
    "beaver-dpo-1token-llama2-7b.pth": (1, 4096, 32, 32, 5_056),
    "metamath-sft-10token-llama2-7b.pth": (10, 4096, 32, 32, 41_920),
    "alpaca-sft-1token-llama2-13b.pth": (1, 5120, 40, 40, 5_120 + 38 * 40),
    "alpaca-sft-10token-llama2-13b.pth": (10, 5120, 40, 40, 51_200 + 38 * 40),
}


def official_file(name: str) -> Path:
    path = OFFICIAL_DIR / name
    if not path.is_file():
        pytest.skip(f"official checkpoint {path} not present")
    return path


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_convert_official_checkpoints(tmp_path, name):
    num_tokens, hidden, heads, layers, count = OFFICIAL[name]
    out = convert_official(official_file(name), tmp_path)
    config = read_config(out)
    assert config["base"] == {
        "model_type": "llama",
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "num_hidden_layers": layers,
        "head_dim": 128,
    }
    assert (config["num_tokens"], config["start_layer"]) == (num_tokens, 2)
    tensors = load_file(out / WEIGHTS_NAME)
    assert sum(t.numel() for t in tensors.values()) == count == aligner_parameter_count(out)
    assert all(t.dtype == torch.float32 for t in tensors.values())
    assert (out / WEIGHTS_NAME).stat().st_size < 4 * count + 8192


@pytest.mark.parametrize("name", ["alpaca-sft-1token-llama2-7b.pth", "metamath-sft-10token-llama2-7b.pth"])
def test_load_official_into_llama2_7b_shape(tmp_path, name):
    """Into a LLaMA-2-7B-shaped model on the meta device (no 13 GB of weights): the fingerprint
    matches, and once the Aligner's own parameters are materialised the values load exactly."""
    path = official_file(name)
    out = convert_official(path, tmp_path)
    model = llama2_7b_on_meta()
    with pytest.raises(ValueError, match="meta device"):  # values would be silently lost on meta
        load(model, out)
    assert not hasattr(model, "aligner_state")

    num_tokens = OFFICIAL[name][0]
    patch(model, num_tokens, 2)
    model.aligner_prefix.to_empty(device="cpu")
    for attn in model.aligner_state.layers.values():
        attn.aligner.to_empty(device="cpu")
    load(model, out)

    original = torch.load(path, map_location="cpu", weights_only=True)
    params = aligner_parameters(model)
    assert torch.equal(params["prefix"], original["global_value_embedding.weight"].float())
    for layer in range(2, 32):
        gate = original[f"transformer.h.{layer}.attn.gating_factor"].float().flatten()
        assert torch.equal(params[f"gate.{layer}"], gate)
    layer_31 = model.model.layers[31].self_attn.aligner
    assert torch.equal(layer_31.shared_prefix(), params["prefix"])
