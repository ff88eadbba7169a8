"""Save, load and convert Aligners: a small JSON config plus a safetensors file of a few KB.

A saved Aligner is a directory with two files:

- ``aligner_config.json``: the format name and version, a fingerprint of the base model it was
  trained on (model type, hidden size, heads, KV heads, layers, head dim), ``num_tokens``,
  ``start_layer``, the parameter count and the SHA-256 of the weights file;
- ``aligner_model.safetensors``: the Aligner parameters only, fp32, under the names of
  :func:`aligner.hf_patch.aligner_parameters` (``prefix`` (N, hidden) and ``gate.{layer}`` (H,)).

Files are written atomically (a temporary file in the same directory, then ``os.replace``;
weights first, config last), and loading never unpickles: weights go through
``safetensors.torch.load`` (of the very bytes whose SHA-256 was checked). Only
:func:`convert_official`, which imports the paper's own Lit-LLaMA checkpoints, calls
``torch.load``, and then with ``weights_only=True``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from torch import Tensor, nn

from .files import sync_directory, write_temporary
from .hf_patch import aligner_parameters, attention_layers, get_state, merge, patch, unpatch
from .options import OptionError
from .outputs import OutputDir

CONFIG_NAME = "aligner_config.json"
WEIGHTS_NAME = "aligner_model.safetensors"
FORMAT_NAME = "aligner"
FORMAT_VERSION = 1
FINGERPRINT_KEYS = (
    "model_type",
    "hidden_size",
    "num_attention_heads",
    "num_key_value_heads",
    "num_hidden_layers",
    "head_dim",
)

_OFFICIAL_PREFIX = "global_value_embedding.weight"
_OFFICIAL_GATE = re.compile(r"transformer\.h\.(\d+)\.attn\.gating_factor")
_OFFICIAL_COPY = re.compile(r"transformer\.h\.(\d+)\.attn\.adapter_wte\.weight")


# --------------------------------------------------------------------------------------------
# Fingerprints and the config file


def base_fingerprint(config: Any) -> dict[str, Any]:
    """What an Aligner depends on in a base model's config (a ``PretrainedConfig``)."""
    heads = config.num_attention_heads
    return {
        "model_type": getattr(config, "model_type", None) or type(config).__name__,
        "hidden_size": int(config.hidden_size),
        "num_attention_heads": int(heads),
        "num_key_value_heads": int(getattr(config, "num_key_value_heads", None) or heads),
        "num_hidden_layers": int(config.num_hidden_layers),
        "head_dim": int(getattr(config, "head_dim", None) or config.hidden_size // heads),
    }


def _describe(base: Mapping[str, Any]) -> str:
    return f"{base['model_type']} " + " ".join(f"{key}={base[key]}" for key in FINGERPRINT_KEYS[1:])


def check_base(directory: str | os.PathLike, base: Mapping[str, Any]) -> dict[str, Any]:
    """Raise ValueError, naming the base the Aligner in ``directory`` was made for, unless ``base`` (a
    :func:`base_fingerprint`, e.g. of a model's config alone) matches it; returns the Aligner's config."""
    config = read_config(directory)
    saved = config["base"]
    differing = [key for key in FINGERPRINT_KEYS if saved[key] != base[key]]
    if differing:
        made_for = (
            f"{config['base_model']} ({_describe(saved)})" if config.get("base_model") else _describe(saved)
        )
        raise ValueError(
            f"Aligner in {directory} was made for {made_for} but the model is {_describe(base)} "
            f"(differs in {', '.join(differing)}); use it with the base model it was made for"
        )
    return config


def _expected_shapes(base: Mapping[str, Any], num_tokens: int, start_layer: int) -> dict[str, tuple]:
    shapes = {"prefix": (num_tokens, base["hidden_size"])}
    for layer in range(start_layer, base["num_hidden_layers"]):
        shapes[f"gate.{layer}"] = (base["num_attention_heads"],)
    return shapes


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
    """Read and validate a saved Aligner's ``aligner_config.json`` (no weights are read).

    Raises FileNotFoundError for a missing directory or file and ValueError, naming the file,
    for anything malformed.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"no Aligner directory at {directory}")
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no Aligner config at {path} (expected {CONFIG_NAME} beside {WEIGHTS_NAME})")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    return check_config(config, path)


def check_config(config: Any, path: str | os.PathLike) -> dict[str, Any]:
    """Validate an Aligner config (format, version, base fingerprint, num_tokens, start_layer) read
    from ``path`` (named in the errors); returns it."""
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(config).__name__}")
    if config.get("format") != FORMAT_NAME:
        raise ValueError(
            f"{path} is not an Aligner config: 'format' is {config.get('format')!r}, not 'aligner'"
        )
    version = config.get("format_version")
    if not _is_int(version) or version < 1:
        raise ValueError(f"{path}: 'format_version' must be a positive integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{path} has format_version {version}, newer than this library reads "
            f"({FORMAT_VERSION}); upgrade the aligner package"
        )
    base = config.get("base")
    if not isinstance(base, dict):
        raise ValueError(f"{path}: 'base' must be an object with {', '.join(FINGERPRINT_KEYS)}")
    missing = [key for key in FINGERPRINT_KEYS if key not in base]
    if missing:
        raise ValueError(f"{path}: 'base' lacks {', '.join(missing)}")
    if not isinstance(base["model_type"], str):
        raise ValueError(f"{path}: base model_type must be a string, got {base['model_type']!r}")
    for key in FINGERPRINT_KEYS[1:]:
        if not _is_int(base[key]) or base[key] < 1:
            raise ValueError(f"{path}: base {key} must be a positive integer, got {base[key]!r}")
    num_tokens, start_layer = config.get("num_tokens"), config.get("start_layer")
    if not _is_int(num_tokens) or num_tokens < 1:
        raise ValueError(f"{path}: 'num_tokens' must be a positive integer, got {num_tokens!r}")
    if not _is_int(start_layer) or not 0 <= start_layer < base["num_hidden_layers"]:
        raise ValueError(
            f"{path}: 'start_layer' must be an integer in [0, {base['num_hidden_layers']}), "
            f"got {start_layer!r}"
        )
    return config


# --------------------------------------------------------------------------------------------
# Writing


def _write(directory: str | os.PathLike, tensors: dict[str, Tensor], config: dict[str, Any]) -> Path:
    """Write both files atomically: serialise both, write each to a temporary file, then replace the
    weights and then the config. A failure before the renames leaves the directory as it was; the
    config records the weights' SHA-256, so a crash between the two renames is caught by ``load``."""
    directory = Path(directory)
    weights = safetensors_save(tensors, metadata={"format": "pt"})
    config = {
        **config,
        "num_parameters": sum(t.numel() for t in tensors.values()),
        "weights_sha256": hashlib.sha256(weights).hexdigest(),
    }
    config_text = json.dumps(config, indent=2) + "\n"
    directory.mkdir(parents=True, exist_ok=True)
    temporary = []
    try:
        temporary.append(write_temporary(directory / WEIGHTS_NAME, weights))
        temporary.append(write_temporary(directory / CONFIG_NAME, config_text))
        os.replace(temporary[0], directory / WEIGHTS_NAME)
        os.replace(temporary[1], directory / CONFIG_NAME)
    finally:
        for tmp in temporary:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
    sync_directory(directory)
    return directory


def _config(base: dict[str, Any], num_tokens: int, start_layer: int, **extra: Any) -> dict[str, Any]:
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "base": base,
        "num_tokens": num_tokens,
        "start_layer": start_layer,
        **extra,
    }


def is_sharded(model) -> bool:
    """Whether the Aligner of ``model`` is sharded by FSDP2 (``fully_shard``): saving it then gathers
    the shards, a collective that every rank must take part in."""
    return any(hasattr(param, "device_mesh") for param in aligner_parameters(model).values())


def _whole(tensor: Tensor) -> Tensor:
    """The whole tensor. FSDP2 (``fully_shard``) holds each rank's shard of a parameter in a DTensor;
    gathering it is a collective, so on a sharded model every rank must call ``save``."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _like(param: Tensor, tensor: Tensor) -> Tensor:
    """``tensor`` laid out like ``param``: for a DTensor (FSDP2) this rank's shard, cut locally from
    the whole tensor that every rank read from the same file (no communication)."""
    if not hasattr(param, "device_mesh"):
        return tensor
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(tensor, param.device_mesh, param.placements, src_data_rank=None)


def save(model, directory: str | os.PathLike) -> Path:
    """Save the Aligner of a patched ``model`` to ``directory`` (created if needed); returns the directory.

    Writes ``aligner_config.json`` and ``aligner_model.safetensors`` (fp32, a few KB), each
    atomically, weights first and config last. A previous Aligner in ``directory`` is replaced;
    if writing fails, it is left as it was. On an FSDP2-sharded model (``fully_shard``) the
    parameters are gathered first, a collective: call ``save`` on every rank (each writes the same
    bytes, atomically).
    """
    state = get_state(model)
    tensors = {}
    for name, param in aligner_parameters(model).items():
        if param.is_meta:
            raise ValueError(f"Aligner parameter {name!r} is on the meta device and holds no values to save")
        tensors[name] = _whole(param.detach()).to(device="cpu", dtype=torch.float32).contiguous()
    name = getattr(model.config, "_name_or_path", "") or None
    config = _config(base_fingerprint(model.config), state.num_tokens, state.start_layer, base_model=name)
    return _write(Path(directory).expanduser(), tensors, config)


def merged_model(model: Any) -> list[int]:
    """Turn a model carrying a 1-token Aligner into a plain transformers model: the Aligner is folded
    into the o_proj biases, the patch is removed, and zero q/k/v biases are added with
    ``config.attention_bias = True`` so that ``from_pretrained`` rebuilds it without this package.
    Returns the layers whose bias changed. The model is changed in place."""
    state = get_state(model)
    if state.num_tokens != 1:
        raise ValueError(f"the model's Aligner has {state.num_tokens} tokens; only a 1-token Aligner merges")
    if not hasattr(model.config, "attention_bias"):
        raise ValueError(
            f"model type {model.config.model_type!r} has no attention_bias setting, so a merged o_proj bias "
            "could not be saved as a plain transformers model"
        )
    layers = dict(state.layers)
    merge(model)
    biases = {index: attn.o_proj.bias.detach().clone() for index, attn in layers.items()}
    unpatch(model)  # restores the original biases; the merged ones are put back below as plain parameters
    with torch.no_grad():
        for index, attn in attention_layers(model).items():
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                linear = getattr(attn, name)
                if linear.bias is None:
                    weight = linear.weight
                    linear.bias = nn.Parameter(
                        torch.zeros(linear.out_features, dtype=weight.dtype, device=weight.device)
                    )
            if index in biases:
                attn.o_proj.bias.copy_(biases[index])
    model.config.attention_bias = True
    return sorted(biases)


def save_pretrained_owned(output: OutputDir, *savers: Any) -> list[str]:
    """``save_pretrained`` every one of ``savers`` (model, tokenizer) into ``output``'s directory without
    deleting anything there: they write into a staging directory, then each file is recorded in the
    manifest and renamed into place (each replaced atomically). Returns the file names."""
    staging_name = f".staging-{secrets.token_hex(4)}"
    output.own(staging_name)
    staging = output.path / staging_name
    try:
        for saver in savers:
            saver.save_pretrained(staging)
        names = sorted(p.name for p in staging.iterdir())
        nested = [name for name in names if (staging / name).is_dir()]
        if nested:
            raise ValueError(f"save_pretrained wrote directories ({', '.join(nested)}); expected files only")
        output.own(*names)
        for name in names:
            os.replace(staging / name, output.path / name)
        sync_directory(output.path)
    finally:
        output.remove(staging_name)
    return names


def describe_aligner(directory: str | os.PathLike) -> dict[str, Any]:
    """A saved Aligner in short: its base, tokens, layers (as a range "first-last") and parameter count."""
    config = read_config(directory)
    base = config["base"]
    last = base["num_hidden_layers"] - 1
    return {
        "aligner": str(directory),
        "base_model": config.get("base_model"),
        "base": base,
        "num_tokens": config["num_tokens"],
        "layers": f"{config['start_layer']}-{last}" if config["start_layer"] < last else str(last),
        "num_layers": last + 1 - config["start_layer"],
        "parameters": aligner_parameter_count(directory),
    }


def describe_base(base: Mapping[str, Any], num_tokens: int = 1, start_layer: int = 2) -> dict[str, Any]:
    """A base model (its :func:`base_fingerprint`) and what an Aligner of ``num_tokens`` tokens from
    layer ``start_layer`` on costs in parameters."""
    layers = base["num_hidden_layers"]
    if not 0 <= start_layer < layers:
        raise OptionError(
            f"{{start_layer}} must be in [0, {layers}) for a {layers}-layer model, got {start_layer}"
        )
    if num_tokens < 1:
        raise OptionError(f"{{num_tokens}} must be >= 1, got {num_tokens}")
    return {
        **base,
        "aligner": {
            "num_tokens": num_tokens,
            "layers": f"{start_layer}-{layers - 1}",
            "parameters": num_tokens * base["hidden_size"]
            + (layers - start_layer) * base["num_attention_heads"],
        },
    }


# --------------------------------------------------------------------------------------------
# Reading


def _read_weights(directory: Path, config: Mapping[str, Any]) -> dict[str, Tensor]:
    path = directory / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no Aligner weights at {path}")
    data = path.read_bytes()
    digest = config.get("weights_sha256")
    if digest is not None and hashlib.sha256(data).hexdigest() != digest:
        raise ValueError(
            f"{path} does not match the SHA-256 recorded in {directory / CONFIG_NAME}: the file is corrupt "
            "or the two files come from different saves"
        )
    try:
        return safetensors_load(data)
    except Exception as error:  # safetensors' own SafetensorError, among others
        raise ValueError(f"{path} is not a readable safetensors file: {error}") from error


def _check_tensors(tensors: Mapping[str, Tensor], expected: Mapping[str, tuple], path: Path) -> None:
    missing = [key for key in expected if key not in tensors]
    unexpected = sorted(key for key in tensors if key not in expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {missing}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected}")
        raise ValueError(f"{path} does not match its config: {'; '.join(parts)}")
    for key, shape in expected.items():
        tensor = tensors[key]
        if tuple(tensor.shape) != tuple(shape):
            raise ValueError(
                f"{path}: {key!r} has shape {tuple(tensor.shape)} but the model expects {tuple(shape)}"
            )
        if not tensor.is_floating_point():
            raise ValueError(f"{path}: {key!r} has dtype {tensor.dtype}, expected a floating-point tensor")
        if not torch.isfinite(tensor).all():
            raise ValueError(f"{path}: {key!r} holds NaN or infinite values")


def read_aligner(
    directory: str | os.PathLike, config: dict[str, Any] | None = None
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """A saved Aligner's validated config and fp32 tensors (``prefix`` (N, hidden), ``gate.{layer}``
    (H,)), without a model: the checks of :func:`load` that need no model (SHA-256, keys, shapes,
    finite values). ``config``: the already read config, if any."""
    directory = Path(directory)
    config = read_config(directory) if config is None else config
    tensors = _read_weights(directory, config)
    weights_path = directory / WEIGHTS_NAME
    expected = _expected_shapes(config["base"], config["num_tokens"], config["start_layer"])
    _check_tensors(tensors, expected, weights_path)
    if config.get("num_parameters") not in (None, sum(t.numel() for t in tensors.values())):
        raise ValueError(
            f"{directory / CONFIG_NAME}: 'num_parameters' does not match the tensors in {weights_path}"
        )
    return config, tensors


def load(model, directory: str | os.PathLike, *, backend: str | None = None, revision: str | None = None):
    """Load a saved Aligner into ``model`` (patching it first if needed) and return the model.

    ``directory``: a local directory written by :func:`save`, or a Hugging Face Hub repo id
    (``"user/my-aligner"``; ``revision``: a branch, tag or commit) from which only the two Aligner
    files are fetched, through the local cache (:mod:`aligner.hub`). A local path that exists wins
    over a repo id of the same name; a ``Path`` is always local.

    The base model must match the fingerprint the Aligner was saved with. Everything is checked
    before the model is touched: a failing load leaves an unpatched model unpatched. An already
    patched model must carry an Aligner of the same ``num_tokens`` and ``start_layer`` and not
    be merged; its parameters are overwritten in place. ``backend`` goes to
    :func:`aligner.hf_patch.patch`. Aligner parameters on the meta device are refused (copying into
    them would silently do nothing).
    """
    from .hub import resolve_aligner  # aligner.hub imports this module

    directory = resolve_aligner(directory, revision=revision)
    config = read_config(directory)
    check_base(directory, base_fingerprint(model.config))
    num_tokens, start_layer = config["num_tokens"], config["start_layer"]
    _, tensors = read_aligner(directory, config)
    weights_path = directory / WEIGHTS_NAME

    state = getattr(model, "aligner_state", None)
    if state is not None:
        if (state.num_tokens, state.start_layer) != (num_tokens, start_layer):
            raise ValueError(
                f"model already carries an Aligner with num_tokens={state.num_tokens}, "
                f"start_layer={state.start_layer}, but {directory} holds num_tokens={num_tokens}, "
                f"start_layer={start_layer}; call aligner.unpatch(model) first"
            )
        if state.merged_biases is not None:
            raise ValueError(
                "model's Aligner is merged into o_proj biases; call aligner.unmerge(model) first"
            )
        if backend is not None and backend != state.backend:
            raise ValueError(
                f"model is already patched with backend={state.backend!r}; unpatch it to load with "
                f"backend={backend!r}, or pass backend=None"
            )
    else:
        patch(model, num_tokens, start_layer, backend=backend)
    params = aligner_parameters(model)
    meta = [name for name, param in params.items() if param.is_meta]
    if meta:  # copy_ into a meta tensor silently does nothing
        if state is None:
            unpatch(model)
        raise ValueError(
            f"{len(meta)} Aligner parameters ({', '.join(meta[:3])}{', ...' if len(meta) > 3 else ''}) are "
            "on the meta device, where loaded values would be lost; "
            "materialise them first (e.g. model.aligner_prefix.to_empty(device=...) and the same for "
            "each layer's .aligner), or load the base weights before the Aligner"
        )
    _check_tensors(tensors, {name: tuple(p.shape) for name, p in params.items()}, weights_path)
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(_like(param, tensors[name]))
    return model


# --------------------------------------------------------------------------------------------
# The paper's official checkpoints


def convert_official(path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Convert one of the paper's Lit-LLaMA Aligner checkpoints (``*.pth``) into what :func:`load`
    reads, in ``out_dir`` (see :func:`read_official`); returns ``out_dir``."""
    tensors, config = read_official(path)
    return _write(out_dir, tensors, config)


def read_official(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read and check one of the paper's Lit-LLaMA Aligner checkpoints (``*.pth``).

    The file holds ``global_value_embedding.weight`` (N, hidden), one
    ``transformer.h.{l}.attn.gating_factor`` (1, H, 1, 1) per layer with an Aligner, and
    redundant per-layer copies ``transformer.h.{l}.attn.adapter_wte.weight`` of the prefix
    (ignored; a warning is given if one differs). The start layer is the first layer with a gate
    and the model is assumed to end at the last one (true of the paper's checkpoints). The base
    fingerprint is LLaMA with multi-head attention (LLaMA-2 7B / 13B). Values are stored as fp32
    (exact from bf16). Returns the tensors and the config that :func:`convert_official` writes.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling errors come in many types
        # torch's message advises weights_only=False, which would run whatever code the file holds
        raise ValueError(
            f"{path} is not a PyTorch checkpoint of plain tensors (it could not be read safely, without "
            f"unpickling code: {type(error).__name__}); give one of the paper's Aligner .pth checkpoints"
        ) from None
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"{path} holds a {type(checkpoint).__name__}, not a dict of tensors")
    if _OFFICIAL_PREFIX not in checkpoint:
        raise ValueError(f"{path} is not an official Aligner checkpoint: it has no {_OFFICIAL_PREFIX!r}")
    prefix = checkpoint[_OFFICIAL_PREFIX]
    if not isinstance(prefix, Tensor) or prefix.dim() != 2 or not prefix.is_floating_point():
        raise ValueError(f"{path}: {_OFFICIAL_PREFIX!r} must be a floating-point (N, hidden) tensor")
    num_tokens, hidden = prefix.shape

    gates: dict[int, Tensor] = {}
    copies: dict[int, Tensor] = {}
    ignored = []
    for key, value in checkpoint.items():
        if key == _OFFICIAL_PREFIX:
            continue
        if match := _OFFICIAL_GATE.fullmatch(key):
            gates[int(match.group(1))] = value
        elif match := _OFFICIAL_COPY.fullmatch(key):
            copies[int(match.group(1))] = value
        else:
            ignored.append(key)
    if not gates:
        raise ValueError(
            f"{path} is not an official Aligner checkpoint: "
            "it has no 'transformer.h.{l}.attn.gating_factor'"
        )
    start_layer, last = min(gates), max(gates)
    absent = [layer for layer in range(start_layer, last + 1) if layer not in gates]
    if absent:
        raise ValueError(
            f"{path}: layers {absent} have no gating_factor (expected every layer {start_layer}..{last})"
        )
    heads = None
    for layer in sorted(gates):
        gate = gates[layer]
        if not isinstance(gate, Tensor) or gate.dim() != 4 or gate.shape[0] != 1 or gate.shape[2:] != (1, 1):
            shape = tuple(gate.shape) if isinstance(gate, Tensor) else type(gate).__name__
            raise ValueError(
                f"{path}: 'transformer.h.{layer}.attn.gating_factor' has shape {shape}, "
                "expected (1, heads, 1, 1)"
            )
        heads = gate.shape[1] if heads is None else heads
        if gate.shape[1] != heads:
            raise ValueError(
                f"{path}: 'transformer.h.{layer}.attn.gating_factor' has {gate.shape[1]} heads, "
                f"layer {start_layer} has {heads}"
            )
    if hidden % heads:
        raise ValueError(f"{path}: hidden size {hidden} is not a multiple of the {heads} heads")
    differing = [
        layer
        for layer, copy in sorted(copies.items())
        if not isinstance(copy, Tensor) or copy.shape != prefix.shape or not torch.equal(copy, prefix)
    ]
    if differing:
        warnings.warn(
            f"{path}: the per-layer prefix copies (adapter_wte) of layers {differing} differ from "
            f"{_OFFICIAL_PREFIX!r}; using the global one",
            stacklevel=2,
        )
    if ignored:
        warnings.warn(
            f"{path}: ignoring {len(ignored)} keys that are not Aligner parameters, e.g. {ignored[:3]}",
            stacklevel=2,
        )

    tensors = {"prefix": prefix.to(torch.float32).contiguous()}
    for layer in range(start_layer, last + 1):
        tensors[f"gate.{layer}"] = gates[layer].reshape(heads).to(torch.float32).contiguous()
    base = {
        "model_type": "llama",
        "hidden_size": int(hidden),
        "num_attention_heads": int(heads),
        "num_key_value_heads": int(heads),
        "num_hidden_layers": last + 1,
        "head_dim": int(hidden // heads),
    }
    return tensors, _config(base, int(num_tokens), start_layer, converted_from=path.name)


def aligner_parameter_count(directory: str | os.PathLike) -> int:
    """The number of Aligner parameters saved in ``directory`` (from its config; N*hidden + layers*heads)."""
    config = read_config(directory)
    count = config.get("num_parameters")
    if count is None:
        base = config["base"]
        count = (
            config["num_tokens"] * base["hidden_size"]
            + (base["num_hidden_layers"] - config["start_layer"]) * base["num_attention_heads"]
        )
    return int(count)
