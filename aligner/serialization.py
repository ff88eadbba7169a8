"""Save and load Aligners: a small JSON config plus a safetensors file of a few KB.

A saved Aligner is a directory with two files:

- ``aligner_config.json``: an :class:`aligner.config.AlignerConfig` (format name and version, the
  fingerprint of the base model it was trained on, ``num_tokens``, ``start_layer``) plus the save's
  record of the weights file, its parameter count and SHA-256 (:mod:`aligner.config` reads and
  writes this file's text);
- ``aligner_model.safetensors``: the Aligner parameters only, fp32, under the names of
  :func:`aligner.hf_patch.aligner_parameters` (``prefix`` (N, hidden) and ``gate.{layer}`` (H,)).

Files are written atomically (a temporary file in the same directory, then ``os.replace``;
weights first, config last), and loading never unpickles: weights go through
``safetensors.torch.load`` (of the very bytes whose SHA-256 was checked). On an FSDP2-sharded model
``save`` gathers the shards and ``load`` gives each rank its own. The paper's Lit-LLaMA checkpoints
are converted by :mod:`aligner.official`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from torch import Tensor

from .config import (
    CONFIG_NAME,
    FINGERPRINT_KEYS,
    FORMAT_NAME,
    FORMAT_VERSION,
    WEIGHTS_NAME,
    AlignerConfig,
    base_fingerprint,
    config_file_text,
    read_config,
    read_config_file,
)
from .files import sync_directory, write_temporary
from .hf_patch import aligner_parameters, get_state, patch, unpatch

# The config's names are also importable from here, where they lived before aligner.config.
__all__ = [
    "CONFIG_NAME",
    "FINGERPRINT_KEYS",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "WEIGHTS_NAME",
    "AlignerConfig",
    "aligner_parameter_count",
    "base_fingerprint",
    "check_base",
    "is_sharded",
    "load",
    "read_aligner",
    "read_config",
    "read_config_file",
    "save",
    "write_aligner",
]


def check_base(directory: str | os.PathLike, base: Any, config: AlignerConfig | None = None) -> AlignerConfig:
    """Raise ValueError, naming the base the Aligner in ``directory`` was made for, unless ``base`` (a
    :func:`base_fingerprint`, e.g. of a model's config alone, or the ``PretrainedConfig``) matches it;
    returns the Aligner's config (``config``: the one already read from ``directory``, if any)."""
    config = AlignerConfig.from_pretrained(directory) if config is None else config
    config.check_compatible(
        base, name=f"Aligner in {directory}", advice="; use it with the base model it was made for"
    )
    return config


# --------------------------------------------------------------------------------------------
# Writing


def write_aligner(directory: str | os.PathLike, tensors: dict[str, Tensor], config: AlignerConfig) -> Path:
    """Write an Aligner's two files into ``directory`` (created if needed) atomically: serialise both,
    write each to a temporary file, then replace the weights and then the config. A failure before
    the renames leaves the directory as it was; the config records the weights' SHA-256, so a crash
    between the two renames is caught by ``load``. ``tensors``: fp32, contiguous, on the CPU."""
    directory = Path(directory)
    weights = safetensors_save(tensors, metadata={"format": "pt"})
    config_text = config_file_text(
        config,
        num_parameters=sum(t.numel() for t in tensors.values()),
        weights_sha256=hashlib.sha256(weights).hexdigest(),
    )
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
    # The base and its name as the model's config has them now; a trained Aligner is no longer the
    # checkpoint it may have been converted from.
    config = dataclasses.replace(state.config, converted_from=None).for_model(model.config)
    return write_aligner(Path(directory).expanduser(), tensors, config)


# --------------------------------------------------------------------------------------------
# Reading


def _read_weights(directory: Path, record: Mapping[str, Any]) -> dict[str, Tensor]:
    path = directory / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no Aligner weights at {path}")
    data = path.read_bytes()
    digest = record.get("weights_sha256")
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


def _read_tensors(directory: Path, config: AlignerConfig, record: Mapping[str, Any]) -> dict[str, Tensor]:
    """The checks of :func:`load` that need no model: SHA-256, keys, shapes, finite values."""
    tensors = _read_weights(directory, record)
    weights_path = directory / WEIGHTS_NAME
    _check_tensors(tensors, config.parameter_shapes(), weights_path)
    if record.get("num_parameters") not in (None, sum(t.numel() for t in tensors.values())):
        raise ValueError(
            f"{directory / CONFIG_NAME}: 'num_parameters' does not match the tensors in {weights_path}"
        )
    return tensors


def read_aligner(directory: str | os.PathLike) -> tuple[AlignerConfig, dict[str, Tensor]]:
    """A saved Aligner's validated config and fp32 tensors (``prefix`` (N, hidden), ``gate.{layer}``
    (H,)), without a model: the checks of :func:`load` that need no model (SHA-256, keys, shapes,
    finite values)."""
    directory = Path(directory)
    config, record = read_config_file(directory)
    return config, _read_tensors(directory, config, record)


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
    from .hub import resolve_aligner  # lazily: huggingface_hub is imported only for a repo id

    directory = resolve_aligner(directory, revision=revision)
    config, record = read_config_file(directory)
    check_base(directory, model.config, config)
    tensors = _read_tensors(directory, config, record)
    weights_path = directory / WEIGHTS_NAME

    state = getattr(model, "aligner_state", None)
    if state is not None:
        state.config.check_compatible(
            config,
            name="the model's Aligner",
            other_name=f"the Aligner in {directory}",
            advice="; call aligner.unpatch(model) first",
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
        patch(model, config=config, backend=backend)
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


def aligner_parameter_count(directory: str | os.PathLike) -> int:
    """The number of Aligner parameters saved in ``directory`` (from its config; N*hidden + layers*heads)."""
    config, record = read_config_file(directory)
    return int(record.get("num_parameters", config.num_parameters))
