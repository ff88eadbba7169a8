"""Lazy package exports (PEP 562): a package's public names are imported from their submodules on
first use, so that importing the package (and ``aligner --help``) costs nothing heavy."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_exports(
    package: str, namespace: dict[str, Any], exports: dict[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The ``__getattr__`` and ``__dir__`` of ``package`` (whose globals are ``namespace``):
    ``exports`` maps each public name to the submodule that defines it, or to the full name of a
    module elsewhere (one with a dot: ``aligner.models``); other names are looked up as submodules
    (``aligner.reference``). Each value is cached in ``namespace`` once imported."""

    def __getattr__(name: str) -> Any:
        if name in exports:
            module = exports[name] if "." in exports[name] else f".{exports[name]}"
            value = getattr(importlib.import_module(module, package), name)
        else:
            try:
                value = importlib.import_module(f".{name}", package)
            except ModuleNotFoundError as error:
                if error.name != f"{package}.{name}":
                    raise
                raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__
