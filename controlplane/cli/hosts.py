"""`cwlite hosts list|remove|proofs`: the enrolled hosts as the verifier's store holds them."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import click
from rich.table import Table

from controlplane.cli.output import console, emit
from controlplane.cli.verify import store_options, open_store


@click.group("hosts")
def hosts() -> None:
    """The hosts this verifier has enrolled: list them, remove one, read its last proofs.

    \b
    Examples:
      cwlite hosts list
      cwlite hosts proofs build1 --limit 3
      cwlite hosts proofs build1 --json | jq -r '.[0].proof.verdict'
      # a machine replaced (new TPM): remove, then enrol it again
      cwlite hosts remove build1 && cwlite enrol https://10.0.0.5:8443 build1
    """


@hosts.command("list")
@store_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def list_cmd(data_dir: Path, store_url: str | None, as_json: bool) -> None:
    """Every enrolled host: where, its EK, PCR, interval, and its last verdict.

    \b
    Examples:
      cwlite hosts list
      cwlite hosts list --store postgresql+psycopg://verifier@db/cwlite
      cwlite hosts list --json | jq -r '.hosts[] | select(.last_verdict != "trusted") | .name'
    """
    with open_store(data_dir, store_url) as store:
        rows = []
        for h in store.hosts():
            last = store.verdicts(h.name, limit=1)
            rows.append({"name": h.name, "url": h.url, "pcr": h.pcr, "interval_s": h.interval_s,
                         "ek_sha256": hashlib.sha256(h.ek_public).hexdigest(), "ek_certificate": h.ek_cert is not None,
                         "log_offset": h.log_offset, "policy_serial": store.policy_serial(h.name),
                         "last_verdict": last[0].verdict if last else None,
                         "last_reason": last[0].reason if last else None,
                         "last_at": last[0].created_at.isoformat(timespec="seconds") if last else None})

    def human(data: dict) -> None:
        table = Table(title=f"{len(data['hosts'])} enrolled host(s)")
        for col in ("name", "url", "EK", "PCR", "every", "last verdict", "at"):
            table.add_column(col)
        for r in data["hosts"]:
            table.add_row(r["name"], r["url"], r["ek_sha256"][:16], str(r["pcr"]), f"{r['interval_s']:g} s",
                          (r["last_verdict"] or "never attested") + (f" ({r['last_reason']})" if r["last_reason"] else ""),
                          r["last_at"] or "")
        console().print(table)

    emit({"hosts": rows}, as_json, human)


@hosts.command("remove")
@click.argument("name")
@store_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def remove_cmd(name: str, data_dir: Path, store_url: str | None, as_json: bool) -> None:
    """Forget host NAME: its pinned EK and AK, verified state, verdicts and proofs.

    \b
    Examples:
      cwlite hosts remove build1
      # the machine got a new TPM: forget it, enrol it again
      cwlite hosts remove build1 && cwlite enrol https://10.0.0.5:8443 build1
      cwlite hosts remove build1 --json
    """
    with open_store(data_dir, store_url) as store:
        store.remove(name)
    emit({"removed": name}, as_json, lambda d: click.echo(f"removed {d['removed']} (EK, AK, state, verdicts, proofs)"))


@hosts.command("proofs")
@click.argument("name")
@store_options
@click.option("--limit", type=click.IntRange(1), default=10, show_default=True, help="How many, newest first.")
@click.option("--json", "as_json", is_flag=True, help="Each verdict with its signed proof document.")
def proofs_cmd(name: str, data_dir: Path, store_url: str | None, limit: int, as_json: bool) -> None:
    """Host NAME's last verdicts, newest first, each with the signed proof it produced (when it got that far).

    \b
    Examples:
      cwlite hosts proofs build1
      cwlite hosts proofs build1 --limit 1 --json | jq '.[0].proof.entries'
      cwlite hosts proofs build1 --limit 5 --json | jq -r '.[] | .at + " " + .verdict'
    """
    with open_store(data_dir, store_url) as store:
        store.host(name)                         # "not enrolled" names the command that fixes it
        out = []
        for v in store.verdicts(name, limit=limit):
            document = store.proof(v.proof_id) if v.proof_id is not None else None
            out.append({"at": v.created_at.isoformat(timespec="seconds"), "verdict": v.verdict, "reason": v.reason,
                        "message": v.message, "log_start": v.log_start, "log_end": v.log_end,
                        "proof_sha256": hashlib.sha256(document.encode()).hexdigest() if document else None,
                        "proof": json.loads(document) if document else None})

    def human(rows: list) -> None:
        table = Table(title=f"{name}: last {len(rows)} verdict(s)")
        for col in ("at", "verdict", "log", "reason / message", "proof"):
            table.add_column(col)
        for r in rows:
            table.add_row(r["at"], r["verdict"], f"{r['log_start']}..{r['log_end']}",
                          r["message"] or r["reason"], (r["proof_sha256"] or "-")[:16])
        console().print(table)

    if as_json:
        click.echo(json.dumps(out, indent=2, sort_keys=True))
    else:
        human(out)
