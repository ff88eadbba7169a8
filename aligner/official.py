"""The paper's own Aligner checkpoints (Lit-LLaMA ``*.pth`` files) converted into this project's format.

They are the only files this project reads with ``torch.load``, and then with ``weights_only=True``:
loading this project's own format never unpickles (:mod:`aligner.serialization`).
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from .config import AlignerConfig
from .serialization import write_aligner

_OFFICIAL_PREFIX = "global_value_embedding.weight"
_OFFICIAL_GATE = re.compile(r"transformer\.h\.(\d+)\.attn\.gating_factor")
_OFFICIAL_COPY = re.compile(r"transformer\.h\.(\d+)\.attn\.adapter_wte\.weight")


def convert_official(path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Convert one of the paper's Lit-LLaMA Aligner checkpoints (``*.pth``) into what
    :func:`aligner.load` reads, in ``out_dir`` (see :func:`read_official`); returns ``out_dir``."""
    tensors, config = read_official(path)
    return write_aligner(out_dir, tensors, config)


def read_official(path: str | os.PathLike) -> tuple[dict[str, Tensor], AlignerConfig]:
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
    config = AlignerConfig(int(num_tokens), start_layer, base=base, converted_from=path.name)
    return tensors, config
