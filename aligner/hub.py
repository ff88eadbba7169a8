"""Aligners and banks on the Hugging Face Hub: loading by repo id, and publishing with a model card.

:func:`aligner.load` and :meth:`aligner.AlignerBank.load` take a local path or a Hub repo id
(``"user/my-aligner"``, with an optional ``revision=``: branch, tag or commit). A local path that
exists always wins; a ``str`` that does not exist locally and is a valid repo id ``owner/name`` is
resolved through ``huggingface_hub`` (the local cache first, so ``HF_HUB_OFFLINE=1`` works for
anything downloaded before), fetching only the Aligner's two files, or the bank's one file. A
``pathlib.Path`` is always local. Anything else gets a ``FileNotFoundError`` that names the argument.

:func:`push_to_hub` writes the Aligner with :func:`aligner.save` into a temporary directory, adds a
generated ``README.md`` (model card: ``library_name``, base model and its fingerprint, N, layers,
how to load) and uploads the folder in one commit.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .files import write_atomic
from .serialization import CONFIG_NAME, FINGERPRINT_KEYS, WEIGHTS_NAME, read_config, save

LIBRARY_NAME = "aligner-kernels"
BANK_FILENAME = "bank.safetensors"  # the file a bank repo id without a file path names
CARD_NAME = "README.md"


def is_repo_id(text: str) -> bool:
    """Whether ``text`` is a Hub repo id of the form ``owner/name`` (exactly one slash, characters
    the Hub allows). Bare names (``gpt2``) are not accepted: an Aligner always lives under an owner,
    and a bare word is far more often a mistyped local directory."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if text.count("/") != 1:
        return False
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def _local(source: str | os.PathLike, revision: str | None, argument: str) -> Path | None:
    """``source`` as a local path when it exists or is a ``Path`` (always local), else None."""
    path = Path(source).expanduser()
    if path.exists() or not isinstance(source, str):
        if revision is not None:
            # Worded for whoever gave it: --revision on the command line, revision= in Python.
            given = f"--revision {revision}" if argument.startswith("--") else f"revision={revision!r}"
            raise ValueError(
                f"{argument}={str(source)!r} is a local path; {given} applies to Hub repo ids only"
            )
        return path
    return None


def _not_found(source: str, argument: str, what: str, forms: str = "'owner/name'") -> FileNotFoundError:
    return FileNotFoundError(
        f"{argument}={source!r}: no such local {what}, and not a Hugging Face Hub repo id of the form {forms}"
    )


def _hub_error(error: Exception, source: str, revision: str | None, argument: str) -> OSError:
    """A clear error for a failed Hub look-up of ``source``; the Hub's own error is its cause."""
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    at = f" at revision {revision!r}" if revision is not None else ""
    start = f"{argument}={source!r} is not a local path, and"
    if isinstance(error, GatedRepoError):
        return PermissionError(
            f"{start} the Hub repository {source} is gated: request access on its page, then log in"
        )
    if isinstance(error, RepositoryNotFoundError):
        return FileNotFoundError(
            f"{start} the Hub has no repository {source} (or it is private: log in with `hf auth login` "
            "or set HF_TOKEN)"
        )
    if isinstance(error, RevisionNotFoundError):
        return FileNotFoundError(f"{start} the Hub repository {source} has no revision {revision!r}")
    if isinstance(error, LocalEntryNotFoundError):  # offline, or the Hub unreachable, and not cached
        return FileNotFoundError(
            f"{start} the Hub repository {source}{at} is not in the local Hugging Face cache and cannot be "
            f"downloaded now ({type(error).__name__}: {error})"
        )
    return OSError(f"{start} fetching {source}{at} from the Hub failed: {type(error).__name__}: {error}")


def resolve_aligner(
    source: str | os.PathLike, *, revision: str | None = None, argument: str = "directory", token: Any = None
) -> Path:
    """The local directory of a saved Aligner given as a local path or a Hub repo id (downloading only
    ``aligner_config.json`` and ``aligner_model.safetensors``, into the Hugging Face cache).
    ``argument`` names the argument in the errors (e.g. ``"--aligner"``)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    local = _local(source, revision, argument)
    if local is not None:
        return local
    if not is_repo_id(source):
        raise _not_found(source, argument, "directory")
    files = [CONFIG_NAME, WEIGHTS_NAME]
    try:
        directory = Path(snapshot_download(source, revision=revision, allow_patterns=files, token=token))
    except (HfHubHTTPError, LocalEntryNotFoundError) as error:
        raise _hub_error(error, source, revision, argument) from error
    if not (directory / CONFIG_NAME).is_file():
        at = f" at revision {revision!r}" if revision is not None else ""
        raise FileNotFoundError(
            f"{argument}={source!r}: the Hub repository {source}{at} holds no {CONFIG_NAME}; it is not an "
            "Aligner saved with aligner.save / aligner.push_to_hub"
        )
    return directory


def resolve_bank(
    source: str | os.PathLike, *, revision: str | None = None, argument: str = "path", token: Any = None
) -> Path:
    """The local file of a bank given as a local path or a Hub reference: ``"owner/name"`` (the repo's
    ``bank.safetensors``) or ``"owner/name/path/in/repo.safetensors"``; only that file is downloaded."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    local = _local(source, revision, argument)
    if local is not None:
        return local
    parts = source.split("/", 2)
    repo_id, filename = "/".join(parts[:2]), parts[2] if len(parts) == 3 else BANK_FILENAME
    if not is_repo_id(repo_id):
        raise _not_found(source, argument, "file", "'owner/name' or 'owner/name/FILE.safetensors'")
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision, token=token))
    except LocalEntryNotFoundError as error:  # offline or unreachable, and not cached
        raise _hub_error(error, repo_id, revision, argument) from error
    except EntryNotFoundError as error:
        raise FileNotFoundError(
            f"{argument}={source!r}: the Hub repository {repo_id} has no file {filename} "
            f"(name another with '{repo_id}/FILE.safetensors')"
        ) from error
    except HfHubHTTPError as error:
        raise _hub_error(error, repo_id, revision, argument) from error


# --------------------------------------------------------------------------------------------
# Publishing


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


def model_card(
    config: dict[str, Any], repo_id: str, *, base_model: str | None = None, tags: Sequence[str] = ()
) -> str:
    """The ``README.md`` of an Aligner repository: YAML metadata (``library_name``, ``base_model`` when
    it is a Hub id, tags), what the Aligner is, its base model's fingerprint and how to load it.
    ``config``: the saved ``aligner_config.json``; ``base_model`` defaults to its ``base_model``."""
    from huggingface_hub import ModelCardData

    base = config["base"]
    named_base = base_model or config.get("base_model")
    hub_base = _hub_base_model(named_base)
    data = ModelCardData(
        library_name=LIBRARY_NAME,
        base_model=hub_base,
        pipeline_tag="text-generation",
        tags=sorted({"aligner", *tags}),
    )
    tokens, start, last = config["num_tokens"], config["start_layer"], base["num_hidden_layers"] - 1
    parameters = config.get("num_parameters", "?")
    load_base = hub_base or "BASE_MODEL"
    if hub_base:
        made_for = f"[{hub_base}](https://huggingface.co/{hub_base})"
        note = ""
    else:
        made_for = f"`{named_base}`" if named_base else "its base model"
        note = (
            "\n`BASE_MODEL`: the base model it was trained on"
            + (f" (`{named_base}`)" if named_base else "")
            + "; `aligner.load` checks its fingerprint (below).\n"
        )
    rows = "\n".join(f"| {key} | {base[key]} |" for key in FINGERPRINT_KEYS)
    versions = "\n".join(_versions())
    return f"""---
{data.to_yaml()}
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
## Base model fingerprint

| field | value |
|---|---|
{rows}

| Aligner | value |
|---|---|
| num_tokens | {tokens} |
| start_layer | {start} |
| parameters | {parameters} |

## Framework versions

{versions}
"""


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
    """Upload the Aligner of a patched ``model`` to the Hub repository ``repo_id`` (created if needed,
    ``private`` as given) in one commit; returns the ``CommitInfo``.

    The files are those :func:`aligner.save` writes, plus ``README.md``: by default a generated card
    (see :func:`model_card`; ``base_model`` names the base's Hub id when the model was loaded from a
    local directory), or ``card`` itself when it is a string, or none when False (an existing
    README in the repository is then kept). Other files in the repository are left as they are.
    Call it on one process: on an FSDP2-sharded model, run :func:`aligner.save` on every rank (a
    collective) and upload that folder from one.
    """
    from huggingface_hub import HfApi

    if not is_repo_id(repo_id):
        raise ValueError(f"repo_id={repo_id!r} is not a Hugging Face Hub repo id of the form 'owner/name'")
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="aligner-push-") as folder:
        save(model, folder)
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


def _card(model: Any, folder: str, repo_id: str, base_model: str | None) -> str:
    tags = getattr(model, "model_tags", None) or ()  # e.g. "trl", "sft", "dpo", added by TRL's trainers
    return model_card(read_config(folder), repo_id, base_model=base_model, tags=tags)
