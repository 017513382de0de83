"""The `cwlite` command: the top-level group and its entry point.

Each subcommand lives in its own module of this package, beside nothing but
the click wiring for the code it drives. Every CwliteError prints one line on
stderr and exits 1; --debug shows the traceback.
"""
from __future__ import annotations

import sys

import click

from controlplane.cli import config, logs
from controlplane.cli.build import build, provenance_group
from controlplane.cli.db import db
from controlplane.cli.enforce import enforce
from controlplane.cli.hosts import hosts
from controlplane.cli.log import log, tpm
from controlplane.cli.pa import pa
from controlplane.cli.policy import policy
from controlplane.cli.proof import proof
from controlplane.cli.selinux import selinux
from controlplane.cli.serve import serve
from controlplane.cli.status import debug, status
from controlplane.cli.verify import enrol, verify
from controlplane.cli.vm import vm
from controlplane.core.errors import CwliteError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show a traceback on errors (also accepted after the subcommand).")
@click.option("--log-format", type=click.Choice(logs.FORMATS), default="text", show_default=True,
              help="stderr as plain lines, or one JSON object per line (for journald and log shippers).")
@click.version_option(package_name="cwlite", prog_name="cwlite", message="%(prog)s %(version)s")
@click.pass_context
def cli(ctx: click.Context, debug: bool, log_format: str) -> None:
    """cwlite: enforce and prove CW-Lite integrity on a build machine.

    PRIMA (only trusted code under a TP label), CDI protection, an ima-ng
    measurement log extended into a TPM PCR, and quotes a remote verifier
    checks. Port Authority (untrusted network input only to the TP labels its
    rules name, `cwlite pa`) is enforced on both backends (lsm: socket hooks;
    tracepoint: cgroup programs), with a tc classifier on the interfaces named.

    \b
    Examples:
      # what this kernel allows, and the backend cwlite would use (scripts: --json)
      cwlite status --json
      # trusted code for the label's trust set, from Debian's installed packages
      cwlite db build --db trusted.db --trust-set build-tools --from-dpkg gcc make distcc
      # on the Build VM: enforce the signed policy and serve attestations
      cwlite serve --enforce --policy policy.toml --db trusted.db
      # on the build controller: attest the host, keep a signed proof
      cwlite verify build1 --policy policy.toml --db trusted.db --proof-out build1.proof
      # on the build controller: a distcc build on verified hosts only, with signed provenance
      cwlite build --hosts hosts.toml --policy policy.toml --db trusted.db -- make -j8

    Option defaults come from /etc/cwlite/cwlite.toml (or $CWLITE_CONFIG):
    `key = value` for every command with option --key, `[command]` tables
    for one command; the command line wins.
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


for _command in (status, debug, policy, enforce, pa, db, proof, serve, enrol, verify, hosts, build, provenance_group,
                 log, tpm, selinux, vm):
    cli.add_command(_command)


def _debug_first(args: list[str]) -> list[str]:
    """`--debug` anywhere before a `--` is the group's flag: `cwlite policy check x --debug` works too."""
    end = args.index("--") if "--" in args else len(args)
    if "--debug" not in args[:end]:
        return args
    return ["--debug", *(a for i, a in enumerate(args) if not (i < end and a == "--debug"))]


def _usage_line(exc: click.ClickException) -> str:
    """A click error as one line: the command it concerns, the message, where help is."""
    message = " ".join(exc.format_message().split())
    ctx = getattr(exc, "ctx", None)
    if ctx is None:
        return message
    return f"{ctx.command_path}: {message} (see {ctx.command_path} --help)"


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI; a CwliteError is one line on stderr and exit 1."""
    args = _debug_first(logs.hoist(list(argv if argv is not None else sys.argv[1:])))
    if logs.requested_format(args) != "json":
        return _main(args)
    stderr, sys.stderr = sys.stderr, logs.JsonLines(sys.stderr)
    try:
        return _main(args)
    finally:
        sys.stderr.flush()
        sys.stderr = stderr


def _main(args: list[str]) -> int:
    debug_flag = args[:1] == ["--debug"]   # _debug_first hoisted it before --log-format
    try:
        path, required = config.config_path()
        defaults = config.default_map(cli, path, required=required)
        cli.main(args=args, prog_name="cwlite", standalone_mode=False, default_map=defaults)
    except click.exceptions.Abort:
        click.echo("cwlite: aborted", err=True)
        return 130
    except click.ClickException as exc:    # usage errors too: one line, exit 1, as every other error
        click.echo(f"cwlite: error: {_usage_line(exc)}", err=True)
        return 1
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except CwliteError as exc:
        if debug_flag:
            raise
        click.echo(f"cwlite: error: {exc}", err=True)
        return 1
    except OSError as exc:      # a file nobody turned into a CwliteError yet: still one line naming it
        if debug_flag:
            raise
        click.echo(f"cwlite: error: {exc.filename or 'I/O'}: {exc.strerror or exc}", err=True)
        return 1
    return 0


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
