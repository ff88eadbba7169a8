"""Errors about a named option, worded for whoever set it: ``max_steps`` for library callers,
``--max-steps`` on the command line; and how the command line's ``--help`` shows option defaults.
Nothing heavy is imported here: ``aligner --help`` reads this module."""

from __future__ import annotations

import argparse
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


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` of the ``aligner`` commands: descriptions and epilogs as written, and every option's
    default shown ("(default: 128)"), except where there is none to show (None, an empty list, an
    on/off flag) or the help text already says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.nargs == 0 or action.default in (None, [], argparse.SUPPRESS) or "default" in text:
            return text
        return super()._get_help_string(action)
