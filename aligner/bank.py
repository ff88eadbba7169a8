"""A bank of Aligners in one safetensors file, and a different Aligner for each row of a batch.

A bank stacks K saved Aligners that share a base model, ``num_tokens`` N and ``start_layer``:

- ``tokens``: (K, N, hidden), the prefix tokens of every Aligner;
- ``gates``: (K, layers, H), their gates, layers = num_hidden_layers - start_layer;
- header metadata: the :class:`~aligner.config.AlignerConfig` (base fingerprint, N, start layer;
  its ``to_dict``, read back with ``from_dict``, as in ``aligner_config.json``) and the names, a
  JSON list in bank order.

Loading memory-maps the file (safetensors' mmap backend): a bank of a million 1-token Aligners
opens in about a second and costs resident memory only for the rows a batch reads. Values are
checked for NaN / inf when an Aligner is added and again for the rows a batch selects, not for
the whole file on load (that would read every page).

Each row picks its Aligner with ``aligner_index`` (a (B,) int tensor of bank indices, -1: the
base model) passed to ``model(...)`` or ``model.generate(...)`` after :func:`attach_bank`::

    bank = AlignerBank.load("bank.safetensors")
    aligner.attach_bank(model, bank)
    model.generate(input_ids, attention_mask=mask, aligner_index=bank.indices(["json", None, "caps"]))

Code that calls the model without ``aligner_index`` (an evaluation harness, a pipeline) gets one
bank Aligner for every row inside :func:`selected`::

    with aligner.selected(model, "json"):
        model.generate(input_ids, attention_mask=mask)   # every row: the "json" Aligner
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from .config import AlignerConfig, fingerprint_text
from .files import replacing
from .hf_patch import get_state, patch
from .serialization import read_aligner

CONFIG_KEY = "aligner_config"
NAMES_KEY = "aligner_names"


class AlignerBank:
    """K Aligners stacked: ``tokens`` (K, N, hidden) and ``gates`` (K, layers, H), one name each.

    Build one with :meth:`from_aligners` or :meth:`load`; :meth:`add` and :meth:`remove` return a
    new bank, :meth:`save` writes it atomically. ``config``: the :class:`~aligner.config.AlignerConfig`
    its Aligners share (base fingerprint, ``num_tokens``, ``start_layer``; a dict is read with
    ``AlignerConfig.from_dict``); a bank keeps no base model name or other provenance.
    """

    def __init__(
        self, tokens: Tensor, gates: Tensor, names: Sequence[str], config: AlignerConfig | Mapping[str, Any]
    ) -> None:
        if not isinstance(config, AlignerConfig):
            config = AlignerConfig.from_dict(config, source="bank config")
        if config.base is None:
            raise ValueError(
                "a bank's config needs the base fingerprint ('base'; AlignerConfig.for_model fills it in)"
            )
        config = dataclasses.replace(config, base_model=None, converted_from=None)
        base, num_tokens = config.base, config.num_tokens
        expected = {
            "tokens": (len(names), num_tokens, base["hidden_size"]),
            "gates": (len(names), len(config.layers), base["num_attention_heads"]),
        }
        for key, tensor in (("tokens", tokens), ("gates", gates)):
            if not isinstance(tensor, Tensor) or not tensor.is_floating_point():
                raise ValueError(f"bank {key} must be a floating-point tensor, got {_describe_value(tensor)}")
            if tuple(tensor.shape) != expected[key]:
                raise ValueError(
                    f"bank {key} has shape {tuple(tensor.shape)}, expected {expected[key]} "
                    f"({len(names)} names, N={num_tokens}, start_layer={config.start_layer}, "
                    f"{fingerprint_text(base)})"
                )
        names = list(names)
        bad = [name for name in names if not isinstance(name, str) or not name]
        if bad:
            raise ValueError(f"bank names must be non-empty strings, got {bad[:3]}")
        self.tokens, self.gates, self.config = tokens, gates, config
        self._names = names
        self._lookup: dict[str, int] | None = None
        if len(self._index()) != len(names):
            seen, duplicates = set(), []
            for name in names:
                if name in seen:
                    duplicates.append(name)
                seen.add(name)
            raise ValueError(f"bank names must be unique; repeated: {duplicates[:5]}")

    # ----------------------------------------------------------------------------------------
    # Lookup

    def __len__(self) -> int:
        return len(self._names)

    def __repr__(self) -> str:
        return (
            f"AlignerBank({len(self)} Aligners, num_tokens={self.num_tokens}, "
            f"start_layer={self.start_layer}, {fingerprint_text(self.base)}, dtype={self.tokens.dtype})"
        )

    @property
    def names(self) -> list[str]:
        return list(self._names)

    @property
    def base(self) -> dict[str, Any]:
        return self.config.base

    @property
    def num_tokens(self) -> int:
        return self.config.num_tokens

    @property
    def start_layer(self) -> int:
        return self.config.start_layer

    def _index(self) -> dict[str, int]:
        if self._lookup is None:
            self._lookup = {name: i for i, name in enumerate(self._names)}
        return self._lookup

    def index(self, name: str) -> int:
        """The bank index of ``name``; a ValueError naming a few known names if it is absent."""
        try:
            return self._index()[name]
        except KeyError:
            known = ", ".join(repr(n) for n in self._names[:5])
            more = ", ..." if len(self) > 5 else ""
            raise ValueError(
                f"no Aligner named {name!r} in the bank ({len(self)} Aligners: {known}{more})"
            ) from None

    def indices(self, names: Sequence[str | None]) -> Tensor:
        """One index per row for ``aligner_index``: (B,) int64. A name is its Aligner; None is the
        base model (-1), as ``"aligner": null`` in a prompts file of ``aligner generate --bank``
        (where a row without the field takes ``--aligner``)."""
        for position, name in enumerate(names):
            if name is not None and not isinstance(name, str):
                raise TypeError(
                    f"names[{position}] must be an Aligner name (str) or None (the base model), "
                    f"got {type(name).__name__} {name!r}"
                )
        return torch.tensor([-1 if name is None else self.index(name) for name in names], dtype=torch.int64)

    def select(self, index: Tensor) -> tuple[Tensor, Tensor]:
        """The rows ``index`` (B,) selects: tokens (B, N, hidden) and gates (B, layers, H) as fp32
        on the bank's device, zeros where the index is -1. Only these B rows are read."""
        if not isinstance(index, Tensor) or index.dim() != 1 or index.is_floating_point():
            raise ValueError(f"index must be a 1-D integer tensor, got {_describe_value(index)}")
        index = index.to(device=self.tokens.device, dtype=torch.int64)
        if index.numel() and not -1 <= int(index.min()) <= int(index.max()) < len(self):
            raise ValueError(
                f"aligner_index must be in [-1, {len(self)}) for a bank of {len(self)} Aligners, got values "
                f"from {int(index.min())} "
                f"to {int(index.max())}"
            )
        keep = index >= 0
        rows = index.clamp(min=0)
        tokens = self.tokens.index_select(0, rows).float() * keep[:, None, None]
        gates = self.gates.index_select(0, rows).float() * keep[:, None, None]
        finite = tokens.isfinite().flatten(1).all(1) & gates.isfinite().flatten(1).all(1)
        if not finite.all():
            bad = sorted({int(i) for i in index[~finite]})
            raise ValueError(f"bank Aligners {bad[:5]} hold NaN or infinite values")
        return tokens, gates

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> AlignerBank:
        """A copy with the tensors on ``device`` / in ``dtype`` (e.g. the whole bank in GPU memory)."""
        return AlignerBank(
            self.tokens.to(device=device, dtype=dtype), self.gates.to(device=device, dtype=dtype),
            self._names, self.config,
        )  # fmt: skip

    # ----------------------------------------------------------------------------------------
    # Building

    @classmethod
    def from_aligners(
        cls, directories: Sequence[str | os.PathLike], names: Sequence[str] | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> AlignerBank:  # fmt: skip
        """Stack saved Aligners (directories written by :func:`aligner.save`); names default to
        the directory names. All must share base model, ``num_tokens`` and ``start_layer``."""
        directories = [Path(d) for d in directories]
        if not directories:
            raise ValueError("a bank needs at least one Aligner directory")
        names = [d.name for d in directories] if names is None else list(names)
        if len(names) != len(directories):
            raise ValueError(f"got {len(names)} names for {len(directories)} Aligner directories")
        config, tokens, gates = None, [], []
        for directory in directories:
            one, tensors = read_aligner(directory)
            if config is None:
                config = one
            else:
                one.check_compatible(config, name=str(directory), other_name=str(directories[0]))
            tokens.append(tensors["prefix"])
            gates.append(torch.stack([tensors[f"gate.{layer}"] for layer in config.layers]))
        return cls(torch.stack(tokens).to(dtype), torch.stack(gates).to(dtype), names, config)

    def add(self, directory: str | os.PathLike, name: str | None = None) -> AlignerBank:
        """A new bank with the saved Aligner in ``directory`` appended (name: the directory name)."""
        name = Path(directory).name if name is None else name
        if name in self._index():
            raise ValueError(f"the bank already holds an Aligner named {name!r}; remove it first")
        config, tensors = read_aligner(directory)
        config.check_compatible(self.config, name=str(directory), other_name="the bank")
        gates = torch.stack([tensors[f"gate.{layer}"] for layer in self.config.layers])
        return AlignerBank(
            torch.cat([self.tokens, tensors["prefix"][None].to(self.tokens)]),
            torch.cat([self.gates, gates[None].to(self.gates)]),
            [*self._names, name], self.config,
        )  # fmt: skip

    def remove(self, name: str) -> AlignerBank:
        """A new bank without the Aligner ``name`` (later indices shift down by one)."""
        i = self.index(name)
        keep = [*range(i), *range(i + 1, len(self))]
        if not keep:
            raise ValueError(
                f"cannot remove {name!r}: it is the bank's only Aligner (a bank holds at least one)"
            )
        rows = torch.tensor(keep, device=self.tokens.device)
        return AlignerBank(
            self.tokens.index_select(0, rows), self.gates.index_select(0, rows),
            [n for j, n in enumerate(self._names) if j != i], self.config,
        )  # fmt: skip

    # ----------------------------------------------------------------------------------------
    # Files

    def save(self, path: str | os.PathLike) -> Path:
        """Write the bank to ``path`` atomically (a temporary file beside it, then ``os.replace``): an
        existing file there is replaced only once the new one is complete. Returns ``path``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        metadata = {
            "format": "pt",
            CONFIG_KEY: json.dumps(self.config.to_dict()),
            NAMES_KEY: json.dumps(self._names, ensure_ascii=False),
        }
        tensors = {
            "tokens": self.tokens.detach().cpu().contiguous(),
            "gates": self.gates.detach().cpu().contiguous(),
        }
        with replacing(path) as tmp:
            save_file(tensors, tmp, metadata=metadata)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, *, revision: str | None = None) -> AlignerBank:
        """Open a bank file, memory-mapped (nothing but the header is read now). The config and
        names get the checks of :func:`aligner.load`; shapes must agree with them.

        ``path``: a local file, or on the Hugging Face Hub ``"owner/name"`` (the repository's
        ``bank.safetensors``) or ``"owner/name/FILE.safetensors"``, fetched alone through the local
        cache (``revision``: branch, tag or commit). A local path that exists wins; a ``Path`` is
        always local (:mod:`aligner.hub`)."""
        from .hub import resolve_bank

        path = resolve_bank(path, revision=revision)
        if not path.is_file():
            raise FileNotFoundError(f"no bank file at {path}")
        try:
            with safe_open(path, framework="pt") as file:
                metadata = file.metadata() or {}
                keys = set(file.keys())
            tensors = load_file(path)  # mmap backend: tensors view the mapped file
        except (SafetensorError, OSError) as error:
            raise ValueError(f"{path} is not a readable safetensors file: {error}") from error
        if CONFIG_KEY not in metadata or NAMES_KEY not in metadata:
            raise ValueError(
                f"{path} is not an Aligner bank: its header has no {CONFIG_KEY!r} / {NAMES_KEY!r}"
            )
        if keys != {"tokens", "gates"}:
            raise ValueError(
                f"{path}: an Aligner bank holds exactly 'tokens' and 'gates', found {sorted(keys)}"
            )
        try:
            config = json.loads(metadata[CONFIG_KEY])
            names = json.loads(metadata[NAMES_KEY])
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: the bank header is not valid JSON: {error}") from error
        if not isinstance(names, list):
            raise ValueError(f"{path}: {NAMES_KEY!r} must be a JSON list of names")
        config = AlignerConfig.from_dict(config, source=path)
        try:
            return cls(tensors["tokens"], tensors["gates"], names, config)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from error


def _describe_value(x: Any) -> str:
    return f"shape {tuple(x.shape)} dtype {x.dtype}" if isinstance(x, Tensor) else type(x).__name__


def attach_bank(model: Any, bank: AlignerBank, *, backend: str | None = None) -> Any:
    """Let ``model(..., aligner_index=...)`` and ``model.generate(..., aligner_index=...)`` give each
    row its own Aligner from ``bank``; returns the model.

    The model is patched first if needed (its own Aligner then has zero gates: rows without
    ``aligner_index`` run the base model). An already patched model must have the bank's
    ``num_tokens`` and ``start_layer`` and not be merged; the base must match the bank's
    fingerprint. The bank stays where it is (CPU, memory-mapped, by default); the B selected rows
    move to the model's device once per forward or generate call.
    """
    if not isinstance(bank, AlignerBank):
        raise TypeError(f"bank must be an AlignerBank, got {type(bank).__name__}")
    bank.config.check_compatible(model.config, name="the bank")
    state = getattr(model, "aligner_state", None)
    if state is None:
        patch(model, config=bank.config, backend=backend)
        state = get_state(model)
    else:
        _check_not_selected(state, "attach another bank")
        state.config.check_compatible(bank.config, name="the model's Aligner", other_name="the bank")
        if state.merged_biases is not None:
            raise ValueError(
                "model's Aligner is merged into o_proj biases; call aligner.unmerge(model) first"
            )
    state.bank = bank
    state.memo.clear()
    return model


def detach_bank(model: Any) -> Any:
    """Forget the model's bank (``aligner_index`` is then refused); returns the model."""
    state = get_state(model)
    _check_not_selected(state, "detach the bank")
    state.bank = None
    state.memo.clear()
    return model


def _check_not_selected(state: Any, action: str) -> None:
    if state.selected is not None:
        raise ValueError(f"cannot {action} inside aligner.selected(...): leave the with-block first")


@contextlib.contextmanager
def selected(model: Any, aligner: str | int) -> Iterator[Any]:
    """Inside the block, every forward and ``generate`` call of ``model`` runs the bank Aligner
    ``aligner`` (its name, or its bank index) on every row, as if it were loaded alone with
    :func:`aligner.load`: for code that calls the model without ``aligner_index``, such as an
    evaluation harness. A call that passes ``aligner_index`` still gets its own rows, and
    :func:`aligner.disabled` still runs the base model. The model's own Aligner parameters are not
    touched; leaving the block restores what was selected before (blocks nest).

    The model needs a bank (:func:`attach_bank`). The row is read and checked once, on entry, and
    kept on the devices of the model's own Aligner (tokens with the prefix, each gate with its layer).
    """
    state = get_state(model)
    bank = state.bank
    if bank is None:
        raise ValueError(
            "aligner.selected needs a bank on the model: call aligner.attach_bank(model, bank) first"
        )
    if isinstance(aligner, str):
        index = bank.index(aligner)
    elif isinstance(aligner, int) and not isinstance(aligner, bool):
        if not 0 <= aligner < len(bank):
            raise ValueError(f"aligner={aligner} is not an index of this bank of {len(bank)} Aligners")
        index = aligner
    else:
        raise TypeError(
            f"aligner must be an Aligner's name (str) or bank index (int), got {type(aligner).__name__}"
        )
    tokens, gates = bank.select(torch.tensor([index]))
    row = (
        tokens[0].to(model.aligner_prefix.tokens.device),
        {
            layer: gates[0, layer - state.start_layer].to(attn.aligner.gate.device)
            for layer, attn in state.layers.items()
        },
    )
    previous, state.selected = state.selected, row
    try:
        yield model
    finally:
        state.selected = previous
