"""`/etc/cwlite/cwlite.toml`: defaults for the CLI's options, so the systemd units need no arguments.

A key is an option's long name without the dashes (`data-dir`, `policy`); a
table is a subcommand (`[serve]`, `["db build"]`). A top-level key applies to
every command that has that option. The command line and environment
variables (`CWLITE_DB`) still win: the file only replaces the built-in
defaults. An unknown command or option is an error naming the file and key,
as in the policy: a typo must not silently fall back to a default.

    data-dir = "/var/lib/cwlite"
    db = "/var/lib/cwlite/measure.db"

    [serve]
    policy = "/etc/cwlite/policy.toml"
    enforce = true
    host = "0.0.0.0"

    ["db build"]
    note = "nightly"
"""
from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

import click

from controlplane.core.errors import ConfigError

DEFAULT_CONFIG = Path("/etc/cwlite/cwlite.toml")
CONFIG_ENV = "CWLITE_CONFIG"


def config_path() -> tuple[Path, bool]:
    """The configuration file, and whether it was asked for (CWLITE_CONFIG) rather than the default."""
    given = os.environ.get(CONFIG_ENV)
    return (Path(given), True) if given else (DEFAULT_CONFIG, False)


def _options(cmd: click.Command) -> dict[str, click.Parameter]:
    """A command's options by long name without dashes."""
    return {o.lstrip("-"): p for p in cmd.params if isinstance(p, click.Option) for o in p.opts if o.startswith("--")}


def _apply_everywhere(cmd: click.Command, key: str, value: Any, out: dict) -> int:
    """Set `key` as a default of every command under `cmd` that has it; how many do."""
    n = 0
    param = _options(cmd).get(key)
    if param is not None and not isinstance(cmd, click.Group):
        out.setdefault(param.name, value)
        n += 1
    if isinstance(cmd, click.Group):
        for name, sub in cmd.commands.items():
            n += _apply_everywhere(sub, key, value, out.setdefault(name, {}))
    return n


def _section(cmd: click.Command, table: dict, where: str, source: str, out: dict) -> None:
    for key, value in table.items():
        here = f"{where}.{key}" if where else key
        if isinstance(value, dict):
            # a table names a subcommand: [serve], or ["db build"] (a top-level `db` key is the --db option)
            sub, target = cmd, out
            for word in key.split():
                sub = sub.commands.get(word) if isinstance(sub, click.Group) else None
                if sub is None:
                    raise ConfigError(f"{source}: [{here}]: no such command `cwlite {here.replace('.', ' ')}`",
                                      source=source, key=here)
                target = target.setdefault(word, {})
            _section(sub, value, here, source, target)
        elif isinstance(cmd, click.Group) and not where:
            if _apply_everywhere(cmd, key, value, out) == 0:
                raise ConfigError(f"{source}: {key}: no cwlite command has an option --{key}", source=source, key=key)
        else:
            param = _options(cmd).get(key)
            if param is None or isinstance(cmd, click.Group):
                raise ConfigError(f"{source}: {here}: `cwlite {where.replace('.', ' ')}` has no option --{key}",
                                  source=source, key=here)
            out[param.name] = value


def _prune(d: dict) -> dict:
    return {k: (_prune(v) if isinstance(v, dict) else v) for k, v in d.items() if not (isinstance(v, dict) and not _prune(v))}


def default_map(cli: click.Group, path: Path, *, required: bool) -> dict:
    """click's default_map for `cli` from the TOML file at `path` ({} when it is absent and not `required`)."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        if required:
            raise ConfigError(f"{path}: no such configuration file ({CONFIG_ENV})", source=str(path)) from None
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {getattr(exc, 'strerror', None) or exc}", source=str(path)) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not TOML: {exc}", source=str(path)) from exc
    out: dict = {}
    _section(cli, data, "", str(path), out)
    return _prune(out)
