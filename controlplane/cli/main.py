"""The `cwlite` command: the top-level group and its entry point.

Each subcommand lives in its own module of this package, beside nothing but
the click wiring for the code it drives. Every CwliteError prints one line on
stderr and exits 1; --debug shows the traceback.
"""
from __future__ import annotations

import sys

import click

from controlplane.cli.db import db
from controlplane.cli.enforce import enforce
from controlplane.cli.log import log, tpm
from controlplane.cli.policy import policy
from controlplane.cli.proof import proof
from controlplane.cli.selinux import selinux
from controlplane.cli.serve import serve
from controlplane.cli.status import debug, status
from controlplane.cli.verify import enrol, verify
from controlplane.core.errors import CwliteError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show a traceback on errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """cwlite: enforce and prove CW-Lite integrity on a build machine.

    PRIMA (only trusted code under a TP label), Port Authority (untrusted
    network input only to trusted filters), CDI protection, an ima-ng
    measurement log extended into a TPM PCR, and quotes a remote verifier checks.

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
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


for _command in (status, debug, policy, enforce, db, proof, serve, enrol, verify, log, tpm, selinux):
    cli.add_command(_command)


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI; a CwliteError is one line on stderr and exit 1."""
    debug_flag = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        cli.main(args=argv, prog_name="cwlite", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("cwlite: aborted", err=True)
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except CwliteError as exc:
        if debug_flag:
            raise
        click.echo(f"cwlite: error: {exc}", err=True)
        return 1
    return 0


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
