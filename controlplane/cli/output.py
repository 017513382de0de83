"""What every `cwlite` subcommand prints: JSON for scripts, or a human view for a terminal."""
from __future__ import annotations

import json
from typing import Any, Callable

import click


def emit(data: dict, as_json: bool, human: Callable[[Any], None]) -> None:
    """Print `data` as JSON (--json) or through `human(data)` for a terminal."""
    if as_json:
        click.echo(json.dumps(data, indent=2, sort_keys=True))
    else:
        human(data)
