"""Aligners and banks on the Hugging Face Hub: where a repo id's files are (publishing them with a
model card is :mod:`aligner.publish`).

:func:`aligner.load` and :meth:`aligner.AlignerBank.load` take a local path or a Hub repo id
(``"user/my-aligner"``, with an optional ``revision=``: branch, tag or commit). A local path that
exists always wins; a ``str`` that does not exist locally and is a valid repo id ``owner/name`` is
resolved through ``huggingface_hub`` (the local cache first, so ``HF_HUB_OFFLINE=1`` works for
anything downloaded before), fetching only the Aligner's two files, or the bank's one file. A
``pathlib.Path`` is always local. Anything else gets a ``FileNotFoundError`` that names the argument.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .config import CONFIG_NAME, WEIGHTS_NAME

BANK_FILENAME = "bank.safetensors"  # the file a bank repo id without a file path names


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
