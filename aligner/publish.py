"""Publishing Aligners and banks on the Hugging Face Hub, with a generated model card.

:func:`push_to_hub` writes the Aligner with :func:`aligner.save` into a temporary directory (or takes
the files of a saved Aligner's directory), adds a generated ``README.md`` (model card: ``library_name``,
base model and its fingerprint, N, layers, how to load) and uploads the folder in one commit.
:func:`push_bank_to_hub` does the same for a bank: its one safetensors file (uploaded as it is, however
large; an :class:`aligner.AlignerBank` is saved first) as ``bank.safetensors``, which
``AlignerBank.load("owner/name")`` fetches (:mod:`aligner.hub`), and a card listing its Aligners.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from .config import CONFIG_NAME, FINGERPRINT_KEYS, WEIGHTS_NAME, read_config
from .files import write_atomic
from .hub import BANK_FILENAME, is_repo_id
from .serialization import read_aligner, save

LIBRARY_NAME = "aligner-kernels"
CARD_NAME = "README.md"


def _hub_base_model(name: str | None) -> str | None:
    """``name`` if it can be a Hub model id (not a local path): what the card's ``base_model`` may hold."""
    if not name or Path(name).expanduser().exists():
        return None
    return name if is_repo_id(name) else None


def _versions() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    lines = []
    for package in (LIBRARY_NAME, "transformers", "torch"):
        try:
            lines.append(f"- {package} {version(package)}")
        except PackageNotFoundError:
            pass
    return lines


def _base_model_text(named_base: str | None, check: str) -> tuple[str | None, str, str, str]:
    """For a card: the base's Hub id (or None), how to name it, what ``from_pretrained`` loads
    (``BASE_MODEL`` when it is not a Hub id) and a note explaining that placeholder (``check``: the
    function that checks the fingerprint)."""
    hub_base = _hub_base_model(named_base)
    if hub_base:
        return hub_base, f"[{hub_base}](https://huggingface.co/{hub_base})", hub_base, ""
    note = (
        "\n`BASE_MODEL`: the base model it was trained on"
        + (f" (`{named_base}`)" if named_base else "")
        + f"; `{check}` checks its fingerprint (below).\n"
    )
    return None, f"`{named_base}`" if named_base else "its base model", "BASE_MODEL", note


def _card_data(hub_base: str | None, tags: Sequence[str]) -> str:
    from huggingface_hub import ModelCardData

    data = ModelCardData(
        library_name=LIBRARY_NAME, base_model=hub_base, pipeline_tag="text-generation", tags=sorted(tags)
    )
    return data.to_yaml()


def _closing_sections(base: Mapping[str, Any], what: str, **shape: Any) -> str:
    """The cards' last sections: the base model's fingerprint, ``what``'s shape, framework versions."""
    rows = "\n".join(f"| {key} | {base[key]} |" for key in FINGERPRINT_KEYS)
    shape_rows = "\n".join(f"| {key} | {value} |" for key, value in shape.items())
    versions = "\n".join(_versions())
    return f"""## Base model fingerprint

| field | value |
|---|---|
{rows}

| {what} | value |
|---|---|
{shape_rows}

## Framework versions

{versions}
"""


def model_card(
    config: dict[str, Any], repo_id: str, *, base_model: str | None = None, tags: Sequence[str] = ()
) -> str:
    """The ``README.md`` of an Aligner repository: YAML metadata (``library_name``, ``base_model`` when
    it is a Hub id, tags), what the Aligner is, its base model's fingerprint and how to load it.
    ``config``: the saved ``aligner_config.json``; ``base_model`` defaults to its ``base_model``."""
    base = config["base"]
    named_base = base_model or config.get("base_model")
    hub_base, made_for, load_base, note = _base_model_text(named_base, "aligner.load")
    tokens, start, last = config["num_tokens"], config["start_layer"], base["num_hidden_layers"] - 1
    parameters = config.get("num_parameters", "?")
    return f"""---
{_card_data(hub_base, {"aligner", *tags})}
---

# {repo_id.split("/")[-1]}

An Aligner for {made_for}: {tokens} learnable token(s) shared by every layer, read through a gated
prefix attention in layers {start}-{last}; {parameters} parameters in `{WEIGHTS_NAME}` (fp32), described
by `{CONFIG_NAME}`. The base model's weights are not in this repository.

## How to load

```python
import aligner
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained("{load_base}")
aligner.load(model, "{repo_id}")  # patches the model; refuses a base with another fingerprint
```
{note}
{_closing_sections(base, "Aligner", num_tokens=tokens, start_layer=start, parameters=parameters)}"""


def push_to_hub(
    model: Any,
    repo_id: str,
    *,
    commit_message: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    base_model: str | None = None,
    card: bool | str = True,
) -> Any:
    """Upload the Aligner of a patched ``model`` (or of a directory written by :func:`aligner.save`) to
    the Hub repository ``repo_id`` (created if needed, ``private`` as given) in one commit; returns the
    ``CommitInfo``.

    The files are those :func:`aligner.save` writes, plus ``README.md``: by default a generated card
    (see :func:`model_card`; ``base_model`` names the base's Hub id when the model was loaded from a
    local directory), or ``card`` itself when it is a string, or none when False (an existing
    README in the repository is then kept). Other files in the repository are left as they are.
    Call it on one process: on an FSDP2-sharded model, run :func:`aligner.save` on every rank (a
    collective) and upload that folder from one.
    """
    from huggingface_hub import HfApi

    _check_repo_id(repo_id)
    directory = Path(model) if isinstance(model, (str, os.PathLike)) else None
    if directory is not None:
        read_aligner(directory)  # a saved Aligner, intact (checksum, shapes), before anything is sent
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="aligner-push-") as folder:
        if directory is None:
            save(model, folder)
        else:
            for name in (CONFIG_NAME, WEIGHTS_NAME):
                shutil.copyfile(directory / name, Path(folder) / name)
        if card is not False:
            text = card if isinstance(card, str) else _card(model, folder, repo_id, base_model)
            write_atomic(Path(folder) / CARD_NAME, text)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            commit_message=commit_message or "Upload Aligner",
            revision=revision,
            create_pr=create_pr,
            repo_type="model",
        )


def _check_repo_id(repo_id: str) -> None:
    if not isinstance(repo_id, str) or not is_repo_id(repo_id):
        raise ValueError(f"repo_id={repo_id!r} is not a Hugging Face Hub repo id of the form 'owner/name'")


def _card(model: Any, folder: str, repo_id: str, base_model: str | None) -> str:
    tags = getattr(model, "model_tags", None) or ()  # e.g. "trl", "sft", "dpo", added by TRL's trainers
    return model_card(read_config(folder), repo_id, base_model=base_model, tags=tags)


# --------------------------------------------------------------------------------------------
# Banks

NAMES_SHOWN = 100  # a bank card lists this many names at most (a bank may hold millions)


def bank_card(
    bank: Any,
    repo_id: str,
    *,
    path_in_repo: str = BANK_FILENAME,
    base_model: str | None = None,
    tags: Sequence[str] = (),
) -> str:
    """The ``README.md`` of a bank repository: YAML metadata as :func:`model_card`'s, what the bank
    holds (its Aligners' names, the first 100), its base model's fingerprint and how to use it.
    ``bank``: an :class:`aligner.AlignerBank`; ``base_model``: the base's Hub id, if it has one."""
    base = bank.base
    hub_base, made_for, load_base, note = _base_model_text(base_model, "aligner.attach_bank")
    tokens, start, last = bank.num_tokens, bank.start_layer, base["num_hidden_layers"] - 1
    count, names = len(bank), bank.names
    source = repo_id if path_in_repo == BANK_FILENAME else f"{repo_id}/{path_in_repo}"
    listed = "\n".join(f"{index}. `{name}`" for index, name in enumerate(names[:NAMES_SHOWN]))
    if count > NAMES_SHOWN:
        listed += f"\n\n... and {count - NAMES_SHOWN:,} more (`AlignerBank.load(...).names` lists them all)."
    dtype = str(bank.tokens.dtype).removeprefix("torch.")
    return f"""---
{_card_data(hub_base, {"aligner", "aligner-bank", *tags})}
---

# {repo_id.split("/")[-1]}

A bank of {count:,} Aligners for {made_for} in `{path_in_repo}`, one safetensors file: each Aligner is
{tokens} learnable token(s) shared by every layer, read through a gated prefix attention in layers
{start}-{last} (`tokens` ({count}, {tokens}, {base["hidden_size"]}) and `gates` ({count}, {last - start + 1},
{base["num_attention_heads"]}), {dtype}). Every row of a batch can use a different one. The base model's
weights are not in this repository.

## How to use

```python
import aligner
from aligner import AlignerBank
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained("{load_base}")
bank = AlignerBank.load("{source}")  # memory-mapped
aligner.attach_bank(model, bank)  # refuses a base with another fingerprint
# batch: the tokenizer's output for two prompts; one Aligner per row (None: the base model)
model.generate(**batch, aligner_index=bank.indices([{names[0]!r}, None]))
with aligner.selected(model, {names[0]!r}):  # or one Aligner for every row
    model.generate(**batch)
```
{note}
## Aligners

{listed}

{_closing_sections(base, "bank", Aligners=count, num_tokens=tokens, start_layer=start)}"""


def push_bank_to_hub(
    bank: Any,
    repo_id: str,
    *,
    path_in_repo: str = BANK_FILENAME,
    commit_message: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    base_model: str | None = None,
    card: bool | str = True,
) -> Any:
    """Upload a bank to the Hub repository ``repo_id`` (created if needed, ``private`` as given) in one
    commit; returns the ``CommitInfo``.

    ``bank``: a bank file (checked, then uploaded as it is: nothing is copied, however large) or an
    :class:`aligner.AlignerBank` (saved into a temporary file first). It goes to ``path_in_repo``
    (default ``bank.safetensors``, what ``AlignerBank.load("owner/name")`` fetches; another path is
    loaded as ``"owner/name/PATH"``). ``README.md``: a generated card (:func:`bank_card`;
    ``base_model``: the base's Hub id), ``card`` itself when it is a string, or none when False (an
    existing README is then kept). Other files in the repository are left as they are.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    from .bank import AlignerBank

    _check_repo_id(repo_id)
    parts = PurePosixPath(path_in_repo).parts if isinstance(path_in_repo, str) else ("/",)
    if not parts or parts[0] == "/" or ".." in parts or not path_in_repo.endswith(".safetensors"):
        raise ValueError(
            f"path_in_repo={path_in_repo!r} must be a relative path in the repository ending in .safetensors"
        )
    if isinstance(bank, (str, os.PathLike)):
        file = Path(bank)
        if not file.is_file():
            raise FileNotFoundError(f"bank={str(bank)!r}: no such bank file")
        loaded = AlignerBank.load(file)  # a bank, checked, before anything is sent (memory-mapped)
    elif isinstance(bank, AlignerBank):
        file, loaded = None, bank
    else:
        raise TypeError(f"bank must be an AlignerBank or the path of a bank file, got {type(bank).__name__}")
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="aligner-push-") as folder:
        if file is None:
            file = loaded.save(Path(folder) / BANK_FILENAME)
        operations = [CommitOperationAdd(path_in_repo=path_in_repo, path_or_fileobj=str(file))]
        if card is not False:
            text = (
                card
                if isinstance(card, str)
                else bank_card(loaded, repo_id, path_in_repo=path_in_repo, base_model=base_model)
            )
            operations.append(CommitOperationAdd(path_in_repo=CARD_NAME, path_or_fileobj=text.encode()))
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        return api.create_commit(
            repo_id=repo_id,
            operations=operations,
            commit_message=commit_message or "Upload Aligner bank",
            revision=revision,
            create_pr=create_pr,
            repo_type="model",
        )
