"""`cwlite build` and `cwlite provenance check`: distcc builds on verified hosts, and their provenance."""
from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

import click
from rich.console import Console
from rich.live import Live
from rich.table import Table

from controlplane.cli.output import console, emit
from controlplane.cli.verify import _reference, open_store, store_options
from controlplane.core.keys import load_signing_key
from controlplane.build.hosts import DEFAULT_HOSTS, load_hosts

EXIT_TAINTED, EXIT_STOPPED = 2, 3


class Progress:
    """The build on a terminal: jobs per host and verification rounds (rich Live); plain lines otherwise."""

    def __init__(self, con: Console) -> None:
        self.con = con
        self.jobs: dict[str, int] = {}
        self.rounds: dict[str, list[str]] = {}
        self.events: list[str] = []
        self.live = Live(self._table(), console=con, transient=False) if con.is_terminal else None

    def __enter__(self) -> "Progress":
        if self.live:
            self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live:
            self.live.__exit__(*exc)

    def _table(self) -> Table:
        t = Table(title="cwlite build")
        for col in ("host", "jobs", "rounds", "last verdict"):
            t.add_column(col)
        for name in sorted(set(self.jobs) | set(self.rounds)):
            r = self.rounds.get(name, [])
            t.add_row(name, str(self.jobs.get(name, 0)), str(len(r)), r[-1] if r else "")
        return t

    def __call__(self, kind: str, data: dict) -> None:
        line = ""
        if kind == "round":
            self.rounds.setdefault(data["host"], []).append(data["verdict"])
        elif kind == "jobs":
            self.jobs.update(data)
        elif kind in ("dropped", "refused"):
            line = f"{data['host']}: {kind.upper()}: {data['reason']}"
            for e in data.get("entries", []):
                line += f"\n    entry {e['index']}: {e['reason']} {e['label']} {e['op']} {e['subject']}"
        elif kind == "start":
            line = f"building with {', '.join(data['hosts'])}: {' '.join(data['command'])}"
        if self.live:
            if line:
                self.live.console.print(line)
            self.live.update(self._table())
        elif line or kind == "round":
            click.echo(f"{time.strftime('%H:%M:%S')} {line or data['host'] + ': ' + data['verdict']}", err=True)


@click.command("build", context_settings={"ignore_unknown_options": True})
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@store_options
@click.option("--hosts", "hosts_path", type=click.Path(dir_okay=False, path_type=Path), default=DEFAULT_HOSTS,
              show_default=True, help="The build hosts (TOML: [[hosts]] name, distcc, jobs, label; a Build VM's [hosts.vm] via, kernel, "
                   "cmdline, host_policy, host_db).")
@click.option("--policy", "policy_path", required=True, type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="The verifier's own copy of the policy the hosts must run.")
@click.option("--db", "db_path", required=True, type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="The verifier's own copy of the measurement DB.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("cwlite-provenance"),
              show_default=True, help="The provenance directory (envelope, proofs, build record, keys).")
@click.option("--controller-key", type=click.Path(dir_okay=False, path_type=Path),
              help="Ed25519 key that signs the provenance (default: DATA_DIR/controller.key, made if missing).")
@click.option("--strict", is_flag=True, help="Stop the build when a host stops verifying (default: mark it tainted).")
@click.option("--interval", type=click.FloatRange(0.5), default=5.0, show_default=True,
              help="Seconds between re-verifications of each host while the build runs.")
@click.option("--json", "as_json", is_flag=True, help="Print the build summary as JSON.")
def build(command: tuple[str, ...], data_dir: Path, store_url: str | None, hosts_path: Path, policy_path: Path,
          db_path: Path, out: Path, controller_key: Path | None, strict: bool, interval: float, as_json: bool) -> None:
    """Run COMMAND (after `--`) with distcc, handing jobs only to hosts that verify.

    Each host in --hosts must be enrolled (`cwlite enrol`), or be a Build VM
    verified through the enrolled host that booted it (`vm.via` in the hosts
    file: `cwlite verify NAME --via HOST`), give a fresh
    quote whose proof is TRUSTED, and run a policy whose Port Authority rule
    lets only distccd receive on its distcc port. distcc's host list is then
    those hosts; while COMMAND runs each host is attested again every
    --interval seconds, and one that is no longer trusted is dropped from the
    list at once: the build is marked tainted (exit 2), or stopped with
    --strict (exit 3). COMMAND's output goes to stderr. Every object file is attributed to the host that
    compiled it, and a DSSE-signed in-toto statement (SLSA provenance) with
    the proofs is written to --out; check it with `cwlite provenance check`.

    \b
    Examples:
      cwlite build --hosts hosts.toml --policy policy.toml --db trusted.db -- make -j8
      # stop at the first host that fails re-verification (every 2 s)
      cwlite build --strict --interval 2 --policy policy.toml --db trusted.db -- make -j4
      # a summary for scripts
      cwlite build --json --out prov --policy policy.toml --db trusted.db -- make -j4 | jq .taints
    """
    from controlplane.build.controller import Controller   # lazy: the verifier's imports (httpx, SQLAlchemy)

    hosts = load_hosts(hosts_path)
    key = load_signing_key(data_dir / "verifier.key", create=True)
    ctl = load_signing_key(controller_key or data_dir / "controller.key", create=controller_key is None)
    with contextlib.ExitStack() as stack:
        store = stack.enter_context(open_store(data_dir, store_url))
        ref = stack.enter_context(_reference(policy_path, db_path))
        chains = {h.vm.via: (h.vm.host_policy, h.vm.host_db) for h in hosts if h.vm}
        # the host a Build VM is verified through is judged against the verifier's own copies of its policy and DB
        via_refs = {via: stack.enter_context(_reference(*files)) for via, files in chains.items()}
        progress = stack.enter_context(Progress(Console(stderr=True)))
        result = Controller(hosts, store, ref, key, ctl, workdir=Path.cwd(), out=out, strict=strict,
                            interval=interval, report=progress, via_refs=via_refs).run(list(command), stdout=sys.stderr)
    emit(result.summary(), as_json, _print_summary)
    if result.stopped:
        sys.exit(EXIT_STOPPED)
    if result.returncode != 0:
        sys.exit(1)
    if result.tainted:
        sys.exit(EXIT_TAINTED)


def _print_summary(s: dict) -> None:
    con = console()
    for h in s["hosts"]:
        state = "verified" if h["active"] else f"DROPPED ({h['dropped']})"
        con.print(f"{h['name']} {h['distcc']}: {h['jobs']} jobs, {len(h['proofs'])} proofs, {state}")
    for t in s["taints"]:
        con.print(f"[red]tainted by {t['host']}[/]: {t['reason']}; objects it compiled: {', '.join(t['objects']) or '-'}")
    status = "STOPPED" if s["stopped"] else ("TAINTED" if s["tainted"] else "clean")
    con.print(f"build: exit {s['returncode']}, {s['jobs']['total']} distcc jobs ({s['jobs']['local']} local), "
              f"{s['rounds']} verification rounds, {status}; provenance: {s['provenance'] or 'none (stopped)'}")


@click.group("provenance")
def provenance_group() -> None:
    """Check the provenance `cwlite build` writes."""


@provenance_group.command("check")
@click.argument("directory", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--controller-key", type=click.Path(dir_okay=False, path_type=Path),
              help="The controller's public key (default: DIRECTORY/controller.pub: pin it for a real check).")
@click.option("--verifier-key", type=click.Path(dir_okay=False, path_type=Path),
              help="The verifier's public key (default: DIRECTORY/verifier.pub).")
@click.option("--root", type=click.Path(file_okay=False, path_type=Path),
              help="Where the outputs are (default: the build directory the statement names).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def provenance_check(directory: Path, controller_key: Path | None, verifier_key: Path | None, root: Path | None,
                     as_json: bool) -> None:
    """Re-check DIRECTORY offline: the envelope's DSSE signature, each proof's signature and TPM quote,
    the build record, and every subject's SHA-256 against the file.

    Exit 0: intact and clean; 2: intact but the build was tainted (read the
    taints); 1: something does not check (one line naming it).

    \b
    Examples:
      cwlite provenance check cwlite-provenance --controller-key ctl.pub --verifier-key verifier.pub
      cwlite provenance check prov --root /srv/build/openssh --json | jq .taints
    """
    from controlplane.build.provenance import check_dir

    checked = check_dir(directory, controller_key=controller_key, verifier_key=verifier_key, root=root)
    data = {"ok": True, "subjects": checked.subjects, "proofs": checked.proofs, "tainted": checked.tainted,
            "taints": checked.record.get("taints", []), "command": checked.record.get("command")}
    emit(data, as_json, lambda d: click.echo(
        f"{directory}: envelope signature OK, {d['proofs']} proofs OK (signature, quote), "
        f"{d['subjects']} subjects match; build " + ("TAINTED: " + "; ".join(
            f"{t['host']}: {t['reason']}" for t in d["taints"]) if d["tainted"] else "clean")))
    if checked.tainted:
        sys.exit(EXIT_TAINTED)

