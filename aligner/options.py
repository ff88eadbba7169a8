"""Errors about a named option, worded for whoever set it: ``max_steps`` for library callers,
``--max-steps`` on the command line."""

from __future__ import annotations

import re
from collections.abc import Callable

_PLACEHOLDER = re.compile(r"\{(\w+)\}")


class OptionError(ValueError):
    """A bad value for an option, or a situation an option resolves. The message names options as
    ``{name}`` placeholders; ``str()`` shows them as Python names and :meth:`render` as the caller wants."""

    def __init__(self, template: str) -> None:
        super().__init__(template)
        self.template = template

    def render(self, name: Callable[[str], str]) -> str:
        return _PLACEHOLDER.sub(lambda match: name(match.group(1)), self.template)

    def __str__(self) -> str:
        return self.render(lambda option: option)


def cli_flag(name: str) -> str:
    """The command-line spelling of option ``name``: ``--max-steps`` for ``max_steps``."""
    return "--" + name.replace("_", "-")
