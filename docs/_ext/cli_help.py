"""``.. cli-help:: [COMMAND]``: the ``hyperspy-gp [COMMAND] --help`` text as a literal block.

The help is taken from :func:`hyperspy_gp.cli.build_parser` at build time, so the
documentation shows exactly what the installed command prints.
"""

from __future__ import annotations

import argparse

from docutils import nodes
from docutils.parsers.rst import Directive


def help_text(command: str | None) -> str:
    """The help of ``hyperspy-gp`` (``command=None``) or of one of its subcommands."""
    from hyperspy_gp.cli import build_parser

    parser = build_parser()
    if command is None:
        return parser.format_help()
    for action in parser._actions:  # argparse keeps subparsers in a private action
        if isinstance(action, argparse._SubParsersAction):
            if command in action.choices:
                return action.choices[command].format_help()
    raise ValueError(f"hyperspy-gp has no command {command!r}")


class CliHelp(Directive):
    """Insert the ``--help`` text of ``hyperspy-gp`` or of one of its commands."""

    optional_arguments = 1
    has_content = False

    def run(self) -> list[nodes.Node]:
        command = self.arguments[0] if self.arguments else None
        try:
            text = help_text(command)
        except ValueError as exc:
            raise self.error(str(exc)) from None
        block = nodes.literal_block(text, text)
        block["language"] = "text"
        return [block]


def setup(app):
    app.add_directive("cli-help", CliHelp)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
