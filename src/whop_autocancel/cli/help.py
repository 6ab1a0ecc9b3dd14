"""How a command's `--help` names its arguments.

The help is click's plain text (no rich markup, no boxes; cli/__init__.py), wrapped at spaces to
80 columns at most. Options name their value with a metavar (`--port PORT`); typer would write
its type (`<int>`) instead, and it writes an argument as `{pool}` in the usage line and as
`pool <str>` in the list of arguments. Every command is a `HelpCommand`: an argument is its name
in capitals there (`POOL`, `[ID]` when it may be left out), with its help.
"""

from __future__ import annotations

import typer
from typer._click import Context, HelpFormatter
from typer.core import TyperArgument, TyperCommand


def argument_name(argument: TyperArgument) -> str:
    """`POOL`: the argument's metavar, else its name in capitals; `…` when it takes several."""
    name = argument.metavar or (argument.name or "").upper()
    return name if argument.nargs == 1 else f"{name}…"


class HelpCommand(TyperCommand):
    """A command whose usage line and help name each argument as `argument_name` does."""

    def collect_usage_pieces(self, ctx: Context) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if isinstance(param, TyperArgument):
                name = argument_name(param)
                pieces.append(name if param.required else f"[{name}]")
            else:
                pieces.extend(param.get_usage_pieces(ctx))
        return pieces

    def format_options(self, ctx: Context, formatter: HelpFormatter) -> None:
        arguments, options = [], []
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            if isinstance(param, TyperArgument):
                arguments.append((argument_name(param), record[1]))
            else:
                options.append(record)
        for title, rows in (("Arguments", arguments), ("Options", options)):
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)


def use_help_command(app: typer.Typer) -> None:
    """Make every command of `app` and of its groups, however deep, a `HelpCommand` (unless
    it asked for a class of its own)."""
    for info in app.registered_commands:
        if info.cls is None or info.cls is TyperCommand:
            info.cls = HelpCommand
    for group in app.registered_groups:
        if group.typer_instance is not None:
            use_help_command(group.typer_instance)
