"""Output directories that are never mixed up with, and never delete, files aligner did not write.

Every command that writes a directory (train, dpo, distill, merge, convert) records what it wrote in
``aligner_output.json`` inside it (the *manifest*)::

    {"format": "aligner-output", "version": 1, "command": "train",
     "files": ["aligner_config.json", "aligner_model.safetensors", "checkpoint-50", ...]}

An entry is added *before* the file is written, so that a crash leaves nothing unlisted. The rules:

- an empty or new directory is used as is;
- a non-empty one is refused, unless ``overwrite`` is set, or ``resume`` is set and the manifest is
  the same command's (a resumable run);
- with ``overwrite``, the entries of the previous manifest are removed (they were aligner's own
  output: old checkpoints must not be resumed into a new run) and every new file replaces an old
  one atomically; files not listed in a manifest are never deleted;
- a directory that is also one of the command's inputs (the Aligner being merged, the base model)
  is refused even with ``overwrite``;
- every file written gets the mode a new file normally gets (0666 less the umask), whatever the
  writer left.

Commands that write one file (``generate --output``, ``bank build``) check it with
:func:`check_output_file` before any work, and write computed results with :func:`write_results`,
which never loses them.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .files import sync_directory, write_atomic
from .options import OptionError

MANIFEST_NAME = "aligner_output.json"
MANIFEST_FORMAT = "aligner-output"
MANIFEST_VERSION = 1


def read_manifest(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The manifest of ``directory``, or None if aligner did not write it (no manifest)."""
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(
            f"{path} is not valid JSON ({error}); remove it if aligner did not write it"
        ) from error
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{path} is not an aligner output manifest; remove it if aligner did not write it")
    files = manifest.get("files")
    if not isinstance(files, list) or not all(_is_plain_name(name) for name in files):
        raise ValueError(f"{path}: 'files' must be a list of names inside the directory")
    return manifest


def _is_plain_name(name: Any) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name


def _listing(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(sorted(names)[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_output_dir(
    directory: str | os.PathLike,
    command: str,
    *,
    overwrite: bool = False,
    resume: bool = False,
    inputs: Iterable[str | os.PathLike | None] = (),
) -> dict[str, Any] | None:
    """Check that ``command`` may write into ``directory`` (nothing is written); returns its manifest.

    Raises :class:`OptionError` (naming the ``overwrite`` / ``resume`` options) for a non-empty
    directory that is not this command's resumable run, and ValueError for a path that is a file
    or is one of ``inputs``.
    """
    path = Path(directory)
    if path.exists() and not path.is_dir():
        raise ValueError(f"output directory {path} is a file; give a directory (new or empty)")
    for source in inputs:
        if source is not None and Path(source).exists() and path.resolve() == Path(source).resolve():
            raise ValueError(
                f"output directory {path} is also an input of {command}; write to another directory"
            )
    contents = [entry.name for entry in path.iterdir()] if path.is_dir() else []
    manifest = read_manifest(path) if contents else None
    if resume:
        if manifest is None:
            raise OptionError(
                f"{{resume}}: {path} holds no aligner {command} run to continue"
                + (" (it was not written by aligner)" if contents else "")
            )
        if manifest.get("command") != command:
            raise OptionError(
                f"{{resume}}: {path} holds the output of aligner {manifest.get('command')}, not of {command}"
            )
        return manifest
    if not contents or overwrite:
        return manifest
    if manifest is not None:
        what = f"the output of an earlier aligner {manifest.get('command')}"
        resumable = manifest.get("command") == command and any(
            name.startswith("checkpoint-") for name in manifest["files"]
        )
        hint = ", {resume} to continue it" if resumable else ""
        raise OptionError(
            f"output directory {path} already holds {what}; pass {{overwrite}} to replace it "
            f"(files aligner did not write are kept){hint}, or choose another directory"
        )
    raise OptionError(
        f"output directory {path} is not empty and was not written by aligner (it holds "
        f"{_listing(contents)}); choose a new or empty directory, or pass {{overwrite}} to write "
        "beside those files (they are kept)"
    )


def check_output_file(
    path: str | os.PathLike,
    what: str,
    *,
    overwrite: bool = False,
    make_parents: bool = False,
    example: str = "results.jsonl",
) -> Path:
    """Check, before any work, that a command may write the file ``path`` (nothing is written):
    not a directory, not an existing file unless ``overwrite``, in an existing writable folder (with
    ``make_parents``: one that can be made). ``what`` names it in the errors (``--output``)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(
            f"{what} {path} is a directory; give the name of a file to write, e.g. {path / example}"
        )
    if path.exists() and not overwrite:
        raise FileExistsError(f"{what} {path} exists; pass --overwrite to replace it")
    folder = path.parent
    while make_parents and not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        problem = "does not exist" if not folder.exists() else "is not a folder"
        raise FileNotFoundError(f"{what} {path}: {folder} {problem}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"{what} {path}: the folder {folder} is not writable")
    return path


def write_results(path: str | os.PathLike, text: str, what: str) -> Path:
    """Write ``text``, results that took work to compute, to ``path`` atomically. Should that fail
    (the disk is full, the folder went away), they are not lost: they go to a new file in the
    temporary directory, and the error raised names it."""
    try:
        return write_atomic(path, text)
    except OSError as error:
        path = Path(path)
        try:
            fd, rescue = tempfile.mkstemp(prefix=f"aligner-{path.stem}-", suffix=path.suffix or ".txt")
            with os.fdopen(fd, "w", encoding="utf-8") as file:
                file.write(text)
        except OSError:
            kept = "the results are only in the output above"
        else:
            kept = f"the results are saved in {rescue} instead"
        raise OSError(f"{what} {path} could not be written ({error.strerror or error}); {kept}") from error


def new_file_mode() -> int:
    """The permission bits a newly created file gets: 0o666 less the process umask."""
    try:  # Linux: read without changing it
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


class OutputDir:
    """A directory a command writes into, with its manifest kept up to date (see the module doc)."""

    def __init__(self, directory: str | os.PathLike, command: str, manifest: dict[str, Any]) -> None:
        self.path, self.command, self._manifest = Path(directory), command, manifest

    @classmethod
    def claim(
        cls,
        directory: str | os.PathLike,
        command: str,
        *,
        overwrite: bool = False,
        resume: bool = False,
        inputs: Iterable[str | os.PathLike | None] = (),
    ) -> OutputDir:
        """Check the directory (:func:`check_output_dir`), create it, and start or continue its manifest.
        With ``overwrite``, what the previous manifest lists is removed first."""
        previous = check_output_dir(directory, command, overwrite=overwrite, resume=resume, inputs=inputs)
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        if resume and previous is not None:
            return cls(path, command, previous)
        output = cls(
            path, command, {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "command": command}
        )
        output._manifest["files"] = list(previous["files"]) if previous else []
        for name in list(output.files):  # an earlier aligner run's output: never mixed into this one
            output.remove(name)
        return output

    @property
    def files(self) -> list[str]:
        return list(self._manifest["files"])

    def owns(self, name: str) -> bool:
        return name in self._manifest["files"]

    def own(self, *names: str) -> None:
        """Record ``names`` (entries directly inside the directory) as this command's, before writing them."""
        new = [name for name in names if name not in self._manifest["files"]]
        for name in new:
            if not _is_plain_name(name):
                raise ValueError(f"{name!r} is not a name inside {self.path}")
        if new or not (self.path / MANIFEST_NAME).is_file():
            self._manifest["files"] = [*self._manifest["files"], *new]
            self._save()

    def give_usual_mode(self, *names: str) -> None:
        """Give the files ``names`` (this command's own) the mode a new file gets, as every other
        output has: some writers leave 0600 (``save_pretrained`` does for ``model.safetensors``)."""
        mode = new_file_mode()
        for name in names:
            if not self.owns(name):
                raise ValueError(f"{self.path / name} was not written by aligner; its mode is left as it is")
            path = self.path / name
            if path.is_file() and not path.is_symlink():
                os.chmod(path, mode)

    def remove(self, name: str) -> None:
        """Delete an entry this directory's manifest lists (and only such an entry)."""
        if name not in self._manifest["files"]:
            raise ValueError(f"{self.path / name} was not written by aligner; it is not deleted")
        target = self.path / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
        self._manifest["files"] = [entry for entry in self._manifest["files"] if entry != name]
        self._save()

    def save_pretrained(self, *savers: Any) -> list[str]:
        """``save_pretrained`` every one of ``savers`` (model, tokenizer) into the directory without
        deleting anything there: they write into a staging directory, then each file is recorded in the
        manifest and renamed into place (each replaced atomically). Returns the file names."""
        staging_name = f".staging-{secrets.token_hex(4)}"
        self.own(staging_name)
        staging = self.path / staging_name
        try:
            for saver in savers:
                saver.save_pretrained(staging)
            names = sorted(p.name for p in staging.iterdir())
            nested = [name for name in names if (staging / name).is_dir()]
            if nested:
                raise ValueError(
                    f"save_pretrained wrote directories ({', '.join(nested)}); expected files only"
                )
            self.own(*names)
            for name in names:
                os.replace(staging / name, self.path / name)
            sync_directory(self.path)
        finally:
            self.remove(staging_name)
        return names

    def _save(self) -> None:
        write_atomic(self.path / MANIFEST_NAME, json.dumps(self._manifest, indent=2) + "\n")
