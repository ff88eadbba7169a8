"""``AlignerConfig``: what an Aligner is (N tokens, the first layer it steers, the base model it was
made for), with one validating constructor from a dict and one compatibility check, as PEFT's tuner
configs are. ``patch``, ``save`` / ``load``, the bank and the command line all take it; its fields
(help text in their metadata) are the source of the ``--num-tokens`` / ``--start-layer`` flags.

It is also the ``aligner_config.json`` of a saved Aligner, which holds the config's fields plus:

- ``format`` (``"aligner"``) and ``format_version``, also in a bank file's header;
- the save's record of its weights file (``num_parameters``, ``weights_sha256``; :data:`RECORD_KEYS`),
  which :mod:`aligner.serialization` writes and checks: not config, so not fields.

Nothing heavy is imported here: ``aligner --help`` builds flags from this module.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .options import OptionError

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
# What two Aligners on one base must share to be swapped for each other (a bank, a load into a patched model).
SHAPE_KEYS = ("num_tokens", "start_layer")
RECORD_KEYS = ("num_parameters", "weights_sha256")
_FORMAT_KEYS = ("format", "format_version")


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


def fingerprint_text(base: Mapping[str, Any]) -> str:
    """A base fingerprint in one line: ``llama hidden_size=32 num_attention_heads=4 ...``."""
    return f"{base['model_type']} " + " ".join(f"{key}={base[key]}" for key in FINGERPRINT_KEYS[1:])


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_fingerprint(base: Any) -> dict[str, Any]:
    """``base`` as a fingerprint dict (its FINGERPRINT_KEYS only); OptionError naming ``{base}``."""
    if not isinstance(base, Mapping):
        raise OptionError(
            f"{{base}} must be an object with {', '.join(FINGERPRINT_KEYS)}, got {type(base).__name__}"
        )
    missing = [key for key in FINGERPRINT_KEYS if key not in base]
    if missing:
        raise OptionError(f"{{base}} lacks {', '.join(missing)}")
    if not isinstance(base["model_type"], str) or not base["model_type"]:
        raise OptionError(f"{{base}} model_type must be a non-empty string, got {base['model_type']!r}")
    for key in FINGERPRINT_KEYS[1:]:
        if not _is_int(base[key]) or base[key] < 1:
            raise OptionError(f"{{base}} {key} must be a positive integer, got {base[key]!r}")
    return {key: base[key] for key in FINGERPRINT_KEYS}


@dataclass(frozen=True)
class AlignerConfig:
    """An Aligner's shape and the base model it was made for. Validated on construction (an
    ``OptionError``, a ``ValueError``, naming the field); frozen, so that a patched model's config
    cannot drift from its parameters (``dataclasses.replace`` makes a changed copy, validated too).

    Fields with ``cli`` metadata unset are command-line flags (``--num-tokens``, ``--start-layer``).
    ``base`` is None until the config meets a model (:meth:`for_model`, done by ``patch``)."""

    num_tokens: int = field(default=1, metadata={"help": "Aligner prefix tokens N"})
    start_layer: int = field(default=2, metadata={"help": "first layer with an Aligner"})
    base: dict[str, Any] | None = field(
        default=None,
        metadata={
            "help": f"fingerprint of the base model ({', '.join(FINGERPRINT_KEYS)}); None: not yet known",
            "cli": False,
        },
    )
    base_model: str | None = field(
        default=None, metadata={"help": "name or path of the base model it was trained on", "cli": False}
    )
    converted_from: str | None = field(
        default=None, metadata={"help": "the paper's checkpoint file it was converted from", "cli": False}
    )

    def __post_init__(self) -> None:
        if not _is_int(self.num_tokens) or self.num_tokens < 1:
            raise OptionError(f"{{num_tokens}} must be a positive integer, got {self.num_tokens!r}")
        if self.base is not None:
            object.__setattr__(self, "base", _check_fingerprint(self.base))  # frozen: set once, here
        layers = None if self.base is None else self.base["num_hidden_layers"]
        if not _is_int(self.start_layer) or self.start_layer < 0:
            raise OptionError(f"{{start_layer}} must be an integer >= 0, got {self.start_layer!r}")
        if layers is not None and self.start_layer >= layers:
            raise OptionError(
                f"{{start_layer}} must be in [0, {layers}) for a {layers}-layer model, got {self.start_layer}"
            )
        for name in ("base_model", "converted_from"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise OptionError(f"{{{name}}} must be a string or null, got {value!r}")

    # ----------------------------------------------------------------------------------------
    # What follows from the fields

    @property
    def layers(self) -> range:
        """The layers that carry an Aligner (needs ``base``)."""
        return range(self.start_layer, self._base()["num_hidden_layers"])

    @property
    def num_parameters(self) -> int:
        """N * hidden + layers * heads (needs ``base``)."""
        base = self._base()
        return self.num_tokens * base["hidden_size"] + len(self.layers) * base["num_attention_heads"]

    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape of every Aligner parameter by its saved name: ``prefix`` (N, hidden) and
        ``gate.{layer}`` (H,) (needs ``base``)."""
        base = self._base()
        shapes: dict[str, tuple[int, ...]] = {"prefix": (self.num_tokens, base["hidden_size"])}
        shapes.update({f"gate.{layer}": (base["num_attention_heads"],) for layer in self.layers})
        return shapes

    def _base(self) -> dict[str, Any]:
        if self.base is None:
            raise ValueError("this AlignerConfig has no base fingerprint yet: use config.for_model(...)")
        return self.base

    def for_model(self, model_config: Any) -> AlignerConfig:
        """This config on the base whose ``PretrainedConfig`` is ``model_config``: its fingerprint and
        name (``_name_or_path``) filled in. A config that already names a base must match it."""
        self.check_compatible(model_config, name="the Aligner config")
        name = getattr(model_config, "_name_or_path", "") or None
        return dataclasses.replace(self, base=base_fingerprint(model_config), base_model=name)

    # ----------------------------------------------------------------------------------------
    # The one compatibility check

    def check_compatible(
        self, other: Any, *, name: str = "the Aligner", other_name: str | None = None, advice: str = ""
    ) -> None:
        """Raise ValueError unless an Aligner of this config fits ``other``:

        - a base model (a ``PretrainedConfig``, or a :func:`base_fingerprint` dict): same fingerprint;
        - another ``AlignerConfig`` (an Aligner and a bank, a model's Aligner and a saved one): same
          fingerprint, ``num_tokens`` and ``start_layer``.

        A side without a fingerprint matches any base. ``name`` / ``other_name`` (default "the model"
        or "the other Aligner") name the two in the message; ``advice`` ends it."""
        is_config = isinstance(other, AlignerConfig)
        if is_config:
            other_base, verb, other_name = other.base, "was made for", other_name or "the other Aligner"
        else:
            other_base = dict(other) if isinstance(other, Mapping) else base_fingerprint(other)
            verb, other_name = "is", other_name or "the model"
        if self.base is not None and other_base is not None:
            differing = [key for key in FINGERPRINT_KEYS if self.base[key] != other_base[key]]
            if differing:
                theirs = other._made_for() if is_config else fingerprint_text(other_base)
                raise ValueError(
                    f"{name} was made for {self._made_for()} but {other_name} {verb} {theirs} "
                    f"(differs in {', '.join(differing)}){advice}"
                )
        if is_config:
            differing = [key for key in SHAPE_KEYS if getattr(self, key) != getattr(other, key)]
            if differing:
                raise ValueError(
                    f"{name} has {self._shape()}, but {other_name} has {other._shape()} "
                    f"(differs in {', '.join(differing)}){advice}"
                )

    def _made_for(self) -> str:
        text = fingerprint_text(self._base())
        return f"{self.base_model} ({text})" if self.base_model else text

    def _shape(self) -> str:
        return f"num_tokens={self.num_tokens}, start_layer={self.start_layer}"

    # ----------------------------------------------------------------------------------------
    # Dicts and files

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of ``aligner_config.json`` and of a bank's header (without the save's
        record): format, version and every field; optional fields only when set."""
        data: dict[str, Any] = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION}
        items = sorted(dataclasses.fields(self), key=lambda item: item.name != "base")  # base first, as ever
        for item in items:
            value = getattr(self, item.name)
            if value is not None or item.default is not None:
                data[item.name] = dict(value) if isinstance(value, dict) else value
        return data

    @classmethod
    def from_dict(cls, data: Any, *, source: str | os.PathLike = "Aligner config") -> AlignerConfig:
        """The config that :meth:`to_dict` (or any earlier version of this library) wrote, validated:
        a ValueError starting with ``source`` (the file) names the field and what was expected.

        ``format`` must be ``"aligner"`` and ``format_version`` at most :data:`FORMAT_VERSION`;
        ``num_tokens`` and ``start_layer`` are required (and ``base`` in a saved Aligner's or a bank's
        config, which their readers check). The save's record
        (:data:`RECORD_KEYS`) is skipped. Other keys are ignored with a warning naming them: keys
        added within one format version are optional, so an older reader must not refuse them
        (an incompatible change raises ``format_version`` instead)."""

        def error(message: str) -> ValueError:
            return ValueError(f"{source}: {message}")

        if not isinstance(data, Mapping):
            raise ValueError(f"{source} must hold a JSON object, got {type(data).__name__}")
        if data.get("format") != FORMAT_NAME:
            raise ValueError(
                f"{source} is not an Aligner config: 'format' is {data.get('format')!r}, not {FORMAT_NAME!r}"
            )
        version = data.get("format_version")
        if not _is_int(version) or version < 1:
            raise error(f"'format_version' must be a positive integer, got {version!r}")
        if version > FORMAT_VERSION:
            raise ValueError(
                f"{source} has format_version {version}, newer than this library reads "
                f"({FORMAT_VERSION}); upgrade the aligner package"
            )
        names = [item.name for item in dataclasses.fields(cls)]
        missing = [key for key in SHAPE_KEYS if key not in data]
        try:
            if "base" in data:  # first: the base is what start_layer is checked against
                _check_fingerprint(data["base"])
            if missing:
                raise OptionError(f"lacks {', '.join(f'{{{key}}}' for key in missing)}")
            config = cls(**{name: data[name] for name in names if name in data})
        except OptionError as problem:
            raise error(problem.render(repr)) from None
        unknown = set(data) - {*names, *_FORMAT_KEYS, *RECORD_KEYS}
        base = data.get("base")
        if isinstance(base, Mapping):
            unknown |= {f"base.{key}" for key in set(base) - set(FINGERPRINT_KEYS)}
        if unknown:
            unknown_keys = ", ".join(sorted(unknown))
            warnings.warn(
                f"{source}: ignoring keys this version of aligner does not know: {unknown_keys}", stacklevel=2
            )
        return config

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> AlignerConfig:
        """The config of the Aligner saved in ``directory`` (``aligner_config.json``; no weights are
        read). See :func:`read_config_file` for the errors."""
        return read_config_file(directory)[0]


def read_config_file(directory: str | os.PathLike) -> tuple[AlignerConfig, dict[str, Any]]:
    """The config of the Aligner saved in ``directory`` and the save's record of its weights file
    (``num_parameters``, ``weights_sha256``: those present). FileNotFoundError for a missing
    directory or file; ValueError, naming the file, for anything malformed."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"no Aligner directory at {directory}")
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no Aligner config at {path} (expected {CONFIG_NAME} beside {WEIGHTS_NAME})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    config = AlignerConfig.from_dict(data, source=path)
    if config.base is None:
        raise ValueError(f"{path}: lacks 'base', the fingerprint of the base model it was made for")
    record = {key: data[key] for key in RECORD_KEYS if data.get(key) is not None}
    count, digest = record.get("num_parameters"), record.get("weights_sha256")
    if count is not None and (not _is_int(count) or count < 1):
        raise ValueError(f"{path}: 'num_parameters' must be a positive integer, got {count!r}")
    if digest is not None and not isinstance(digest, str):
        raise ValueError(f"{path}: 'weights_sha256' must be a hex string, got {digest!r}")
    return config, record


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
    """A saved Aligner's ``aligner_config.json`` as a dict, validated (:func:`read_config_file`): the
    config's :meth:`AlignerConfig.to_dict` plus the save's record."""
    config, record = read_config_file(directory)
    return {**config.to_dict(), **record}


def config_file_text(config: AlignerConfig, *, num_parameters: int, weights_sha256: str) -> str:
    """The text of ``aligner_config.json`` for ``config`` and its weights file (what
    :func:`read_config_file` reads back)."""
    if config.base is None:
        raise ValueError("an Aligner config is saved with its base fingerprint: use config.for_model(...)")
    data = {**config.to_dict(), "num_parameters": num_parameters, "weights_sha256": weights_sha256}
    return json.dumps(data, indent=2) + "\n"
