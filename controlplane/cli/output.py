"""What every `cwlite` subcommand prints: JSON for scripts, or a human view for a terminal."""
from __future__ import annotations

import json
from typing import Any, Callable

import click
from rich.console import Console

PIPED_WIDTH = 1000     # a file or a pipe is not 80 columns wide: rows stay whole for grep and diff


def emit(data: dict, as_json: bool, human: Callable[[Any], None]) -> None:
    """Print `data` as JSON (--json) or through `human(data)` for a terminal."""
    if as_json:
        click.echo(json.dumps(data, indent=2, sort_keys=True))
    else:
        human(data)


def console() -> Console:
    """A rich Console on stdout: the terminal's width on a terminal; not wrapped at 80 columns when piped."""
    con = Console()
    return con if con.is_terminal else Console(width=PIPED_WIDTH, soft_wrap=True)
