"""`cwlite status` and `cwlite debug`: what this machine offers cwlite, and what cwlite loads."""
from __future__ import annotations

import click
from rich.console import Console
from rich.table import Table

from controlplane.cli.output import emit
from controlplane.host import status as status_mod
from ebpf import loader


@click.command()
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
    emit(status_mod.collect().to_dict(), as_json, _print_status)


def _mark(ok: bool) -> str:
    return "[green]yes[/]" if ok else "[red]no[/]"


def _print_status(s: dict) -> None:
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


@click.group()
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
    click.echo(loader.render(source, [f"-D{d}" for d in defines]).show())
