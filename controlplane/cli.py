"""The `cwlite` command. Thin: each subcommand lives beside the code it drives.

Every CwliteError prints one line on stderr and exits 1; --debug shows the traceback.
"""
from __future__ import annotations

import importlib
import json
import sys

import click

from controlplane.errors import CwliteError

# name -> "module:attribute" of a click command; imported only when used, so
# `cwlite --help` stays fast and one area's import cost never taxes another.
SUBCOMMANDS: dict[str, str] = {
    "status": "controlplane.cli:status",
    "debug": "controlplane.cli:debug",
    "policy": "controlplane.policy_cli:policy",
    "enforce": "prima.enforce_cli:enforce",
    "db": "prima.db_cli:db",
    "proof": "controlplane.proof_cli:proof",
    "serve": "controlplane.service_cli:serve",
    "enrol": "controlplane.verifier_cli:enrol",
    "verify": "controlplane.verifier_cli:verify",
    "log": "controlplane.mlog_cli:log",
    "tpm": "controlplane.mlog_cli:tpm",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(SUBCOMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = SUBCOMMANDS.get(name)
        if target is None:
            return None
        module, attr = target.split(":")
        return getattr(importlib.import_module(module), attr)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
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


def emit(data: dict, as_json: bool, human) -> None:
    """Print `data` as JSON (--json) or through `human(data)` for a terminal."""
    if as_json:
        click.echo(json.dumps(data, indent=2, sort_keys=True))
    else:
        human(data)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(as_json: bool) -> None:
    """Kernel, BTF, LSMs, BPF program types, bcc, TPM, and the backend cwlite would pick.

    Probes by loading real BPF programs (needs root): an allow-all BPF LSM
    program, a sched_process_exec tracepoint, cgroup_skb and sched_cls programs.

    \b
    Examples:
      cwlite status
      cwlite status --json | jq .backend
    """
    from controlplane import status as status_mod

    emit(status_mod.collect().to_dict(), as_json, _print_status)


def _mark(ok: bool) -> str:
    return "[green]yes[/]" if ok else "[red]no[/]"


def _print_status(s: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(show_header=False, box=None)
    table.add_row("kernel", s["kernel"])
    table.add_row("BTF", _mark(s["btf"]["present"]) + f"  {s['btf'].get('path')}")
    table.add_row("active LSMs", ",".join(s["lsm"]["active"] or ["unknown"]))
    table.add_row("BPF LSM loads", _mark(s["lsm"]["bpf_loadable"]) + f"  {s['lsm']['detail']}")
    for key in ("tracepoint", "cgroup_skb", "tc"):
        table.add_row(key, _mark(s[key]["ok"]) + f"  {s[key]['detail']}")
    table.add_row("bcc", f"{s['bcc'].get('version')}  headers {s['bcc'].get('headers')}")
    table.add_row("TPM", f"{s['tpm']['use'] or '[red]none[/]'}  (device {s['tpm']['device']}, swtpm {s['tpm']['swtpm']})")
    table.add_row("backend", f"[bold]{s['backend'] or 'none'}[/]  {s['backend_reason']}")
    Console().print(table)


@cli.group()
def debug() -> None:
    """Developer views of what cwlite loads."""


@debug.command("ebpf")
@click.argument("source")
@click.option("-D", "defines", multiple=True, help="Extra -D flag(s), as an engine would pass.")
def debug_ebpf(source: str, defines: tuple[str, ...]) -> None:
    """Print a BPF SOURCE from ebpf/ and its -D flags, exactly as bcc compiles them.

    \b
    Examples:
      cwlite debug ebpf probe.bpf.c
      cwlite debug ebpf probe.bpf.c -D CWL_PROBE_LSM
    """
    from ebpf import loader

    click.echo(loader.render(source, [f"-D{d}" for d in defines]).show())


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


if __name__ == "__main__":
    run()
