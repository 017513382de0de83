"""Man pages generated from the CLI's own help, at build time (`python3 -m controlplane.cli.manpages DIR`).

One page per command (`cwlite.1`, `cwlite-db-build.1`, ...), written from the
same click objects `--help` prints, so the two never disagree and nothing
generated is committed. `\\b` blocks (the examples) stay unwrapped (`.nf`).
"""
from __future__ import annotations

import sys
from datetime import date
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Iterator

import click

from controlplane.cli.main import cli


def _esc(text: str) -> str:
    """Roff-safe text: backslashes escaped, no line starting with a control character."""
    lines = text.replace("\\", "\\e").split("\n")
    return "\n".join(f"\\&{ln}" if ln.startswith((".", "'")) else ln for ln in lines)


def _body(help_text: str) -> str:
    """Click help paragraphs as roff: `\\b` paragraphs verbatim, the others filled."""
    out = []
    for para in help_text.strip().split("\n\n"):
        if para.lstrip().startswith("\b"):
            out.append(".PP\n.nf\n" + _esc("\n".join(ln for ln in para.split("\n") if ln.strip() != "\b")) + "\n.fi")
        else:
            out.append(".PP\n" + _esc(" ".join(ln.strip() for ln in para.split("\n"))))
    return "\n".join(out)


def _walk(cmd: click.Command, path: list[str]) -> Iterator[tuple[list[str], click.Command]]:
    yield path, cmd
    if isinstance(cmd, click.Group):
        for name in sorted(cmd.commands):
            yield from _walk(cmd.commands[name], path + [name])


def page(path: list[str], cmd: click.Command, *, release: str, today: str) -> str:
    """The roff source of one command's page."""
    name = "-".join(path)
    ctx = click.Context(cmd, info_name=" ".join(path))
    lines = [f'.TH "{name.upper()}" "1" "{today}" "cwlite {release}" "cwlite manual"',
             ".SH NAME", f"{_esc(name)} \\- {_esc(cmd.get_short_help_str(limit=200))}",
             ".SH SYNOPSIS", f".B {_esc(' '.join(path))}", _esc(" ".join(cmd.collect_usage_pieces(ctx))),
             ".SH DESCRIPTION", _body(cmd.help or "")]
    records = [p.get_help_record(ctx) for p in cmd.get_params(ctx)]
    if any(records):
        lines.append(".SH OPTIONS")
        for rec in filter(None, records):
            lines += [".TP", f".B {_esc(rec[0])}", _esc(rec[1])]
    if isinstance(cmd, click.Group):
        lines.append(".SH COMMANDS")
        for sub in sorted(cmd.commands):
            lines += [".TP", f".B {_esc(sub)}", _esc(cmd.commands[sub].get_short_help_str(limit=200)),
                      f"See \\fB{'-'.join(path + [sub])}\\fR(1)."]
    lines += [".SH SEE ALSO", "\\fBcwlite\\fR(1); /usr/share/doc/cwlite/README.md.gz" if path != ["cwlite"]
              else "/usr/share/doc/cwlite/README.md.gz; /etc/cwlite/cwlite.toml (option defaults)"]
    return "\n".join(lines) + "\n"


def write_pages(out: Path) -> list[Path]:
    """Every command's page into `out`."""
    try:
        release = version("cwlite")
    except PackageNotFoundError:
        release = "unknown"
    out.mkdir(parents=True, exist_ok=True)
    today = date.today().isoformat()
    written = []
    for path, cmd in _walk(cli, ["cwlite"]):
        if cmd.hidden:
            continue
        p = out / f"{'-'.join(path)}.1"
        p.write_text(page(path, cmd, release=release, today=today))
        written.append(p)
    return written


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python3 -m controlplane.cli.manpages OUTDIR")
    print(f"wrote {len(write_pages(Path(sys.argv[1])))} man pages into {sys.argv[1]}")
