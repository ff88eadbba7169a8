"""Base models: where one is (local directory, GGUF file or hub name), its fingerprint from its config
or GGUF header alone, and loading it with its tokenizer. No training code is imported here: ``aligner
generate`` and ``aligner info`` use this module."""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any

import torch

from .config import base_fingerprint
from .options import OptionError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(OptionError):
    """The model or tokenizer could not be loaded; the message names what was asked for."""


def resolve_model(model: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """(directory or hub name, GGUF file name) for a model given as a directory (with ``config.json``,
    or with exactly one ``.gguf`` file), the path of a ``.gguf`` file, or a hub name. A hub name is
    checked to be in the local cache or reachable at once, instead of after a minute of retries."""
    path = Path(model).expanduser()
    if gguf_file is None and path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {path} does not exist")
        return str(path.parent), path.name
    if path.is_dir():
        if gguf_file is not None:
            if not (path / gguf_file).is_file():
                raise ModelLoadError(f"GGUF file {gguf_file} is not in {path}")
            return str(path), gguf_file
        if (path / "config.json").is_file():
            return str(path), None
        found = sorted(p.name for p in path.glob("*.gguf"))
        if len(found) == 1:
            return str(path), found[0]
        if found:
            raise ModelLoadError(
                f"model directory {path} holds {len(found)} GGUF files ({', '.join(found)}); "
                "choose one with {gguf_file}"
            )
        raise ModelLoadError(f"model directory {path} holds neither a config.json nor a .gguf file")
    looks_local = model.startswith((".", "/", "~")) or model.count("/") > 1 or path.suffix != ""
    if path.exists() or looks_local:
        raise ModelLoadError(
            f"model {model} does not exist (expected a local directory, a .gguf file or a hub name)"
            if not path.exists()
            else f"model {model} is a file but not a .gguf file"
        )
    _check_hub(model, gguf_file)
    return model, gguf_file


def _check_hub(name: str, gguf_file: str | None) -> None:
    """Fail at once when hub model ``name`` is neither cached nor reachable."""
    from huggingface_hub import constants, model_info, try_to_load_from_cache
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(try_to_load_from_cache(name, gguf_file or "config.json"), str):
        return
    if constants.HF_HUB_OFFLINE:
        raise ModelLoadError(
            f"model {name} is not a local path, nor in the Hugging Face cache, and the hub is offline "
            "(HF_HUB_OFFLINE); give a local directory or .gguf file"
        )
    try:
        model_info(name, timeout=10)
    except HfHubHTTPError:
        return  # the hub answered (gated or private repositories are for from_pretrained to report)
    except Exception as error:  # connection errors come from several libraries
        raise ModelLoadError(
            f"model {name} is not a local path, nor in the Hugging Face cache, and the hub cannot be "
            f"reached ({error}); give a local directory or .gguf file, or connect to the network"
        ) from error


_GGUF_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}


def gguf_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The scalar and string metadata of a GGUF file's header (arrays such as the vocabulary are
    skipped), read without touching the tensors: milliseconds, where transformers' reader takes seconds."""
    metadata: dict[str, Any] = {}
    with open(path, "rb") as file:

        def read(fmt: str) -> Any:
            size = struct.calcsize(fmt)
            return struct.unpack(fmt, file.read(size))[0]

        def string() -> str:
            return file.read(read("<Q")).decode("utf-8", errors="replace")

        def value(kind: int) -> Any:
            if kind in _GGUF_SCALARS:
                return read(_GGUF_SCALARS[kind])
            if kind == 8:
                return string()
            if kind == 9:
                item, count = read("<I"), read("<Q")
                if item in _GGUF_SCALARS:
                    file.seek(struct.calcsize(_GGUF_SCALARS[item]) * count, os.SEEK_CUR)
                else:
                    for _ in range(count):
                        value(item)
                return None
            raise ValueError(f"{path}: unknown GGUF value type {kind}")

        if file.read(4) != b"GGUF":
            raise ModelLoadError(f"{path} is not a GGUF file")
        read("<I")  # version
        read("<Q")  # tensor count
        for _ in range(read("<Q")):
            key = string()
            found = value(read("<I"))
            if found is not None:
                metadata[key] = found
    return metadata


def base_config_fingerprint(model: str, gguf_file: str | None = None) -> dict[str, Any]:
    """The base fingerprint (:func:`aligner.config.base_fingerprint`) of a model, from its
    config alone (``config.json``, or a GGUF header): no weights are loaded."""
    from transformers import AutoConfig

    source, gguf = resolve_model(model, gguf_file)
    if gguf is not None:
        meta = gguf_metadata(Path(source) / gguf) if Path(source).is_dir() else None
        if meta is not None:
            arch = meta.get("general.architecture", "")
            heads, hidden = meta.get(f"{arch}.attention.head_count"), meta.get(f"{arch}.embedding_length")
            layers = meta.get(f"{arch}.block_count")
            if heads and hidden and layers:
                return {
                    "model_type": arch,
                    "hidden_size": int(hidden),
                    "num_attention_heads": int(heads),
                    "num_key_value_heads": int(meta.get(f"{arch}.attention.head_count_kv") or heads),
                    "num_hidden_layers": int(layers),
                    "head_dim": int(meta.get(f"{arch}.attention.key_length") or hidden // heads),
                }
    try:
        config = AutoConfig.from_pretrained(source, **({"gguf_file": gguf} if gguf else {}))
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"could not read the config of model {model}: {error}") from error
    return base_fingerprint(config)


def load_model(
    model: str, *, gguf_file: str | None = None, dtype: str = "float32", device: str | None = None
) -> tuple[Any, Any]:
    """(model, tokenizer) for a causal LM; the tokenizer gets a pad token (the EOS token) if it has none."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, gguf = resolve_model(model, gguf_file)
    if dtype not in DTYPES:
        raise ModelLoadError(f"{{dtype}} must be one of {', '.join(DTYPES)}, got {dtype!r}")
    extra = {"gguf_file": gguf} if gguf else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **extra)
        network = AutoModelForCausalLM.from_pretrained(source, dtype=DTYPES[dtype], **extra)
    except (OSError, ValueError, ImportError) as error:
        where = f"{source} (GGUF file {gguf})" if gguf else source
        raise ModelLoadError(f"could not load model {where}: {error}") from error
    if gguf and all(p.is_floating_point() for p in network.parameters()):
        _drop_gguf_tag(network)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if device is not None:
        network.to(device)
    network.eval()
    return network, tokenizer


def _drop_gguf_tag(model: Any) -> None:
    """transformers dequantises GGUF weights into ordinary tensors on load but still tags the model
    as quantized, and then ``Trainer`` refuses to fine-tune it and ``save_pretrained`` to save it.
    The weights are plain floating point, so the tag is removed."""
    model.hf_quantizer = None
    if "is_quantized" in vars(model):
        model.is_quantized = False
    if "quantization_method" in vars(model):
        model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
