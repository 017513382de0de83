"""`cwlite proof`: check a proof offline and show its verdict table."""
from __future__ import annotations

import json
from pathlib import Path

import click
from rich.table import Table

from controlplane.core import proof as proof_mod
from controlplane.cli.output import console, emit
from controlplane.core.keys import load_public_key


@click.group("proof")
def proof() -> None:
    """Check and read the signed proofs `cwlite verify` writes."""


@proof.command("check")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--key", "key_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The verifier's Ed25519 public key (PEM, or 32 raw/hex bytes).")
@click.option("--json", "as_json", is_flag=True, help="Print the checked proof as JSON.")
def check_cmd(file: Path, key_path: Path, as_json: bool) -> None:
    """Check FILE offline: canonical form, the verifier's Ed25519 signature, and the TPM quote inside.

    Needs nothing but the file and the verifier's public key: no network, no
    TPM, no store. The quote is re-checked with the AK the proof names (TPM
    signature, qualifying data = SHA-256(nonce || TLS key hash), quoted PCR
    value = the replayed value). Exit status 0 means the proof is intact and
    was signed by that key (its verdict may still be "untrusted": read it);
    exit 1 with one line naming the reason (proof-format, proof-signature,
    proof-quote) otherwise.

    \b
    Examples:
      # a proof written by `cwlite verify build1 --proof-out p.json`
      cwlite proof check p.json --key /var/lib/cwlite/verifier/verifier.pub
      # the verdict only, for scripts
      cwlite proof check p.json --key verifier.pub --json | jq -r .verdict
    """
    data = _read(file)
    doc = proof_mod.check(data, load_public_key(key_path), source=str(file))
    proof_mod.check_quote(doc, source=str(file))
    emit(doc, as_json, lambda d: print_proof(
        d, header=f"{file}: signature OK, quote OK (AK signature, nonce and TLS key binding, PCR value) "
                  f"({proof_mod.digest(data)[:16]})"))


@proof.command("show")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the (unchecked) proof document as JSON.")
def show_cmd(file: Path, as_json: bool) -> None:
    """Print FILE's verdict table WITHOUT checking the signature (use `check` for that).

    \b
    Examples:
      cwlite proof show p.json
      cwlite proof show p.json | less -R
      cwlite proof show p.json --json | jq .entries
    """
    try:
        doc = json.loads(_read(file))
    except ValueError as exc:
        raise click.ClickException(f"{file}: not JSON: {exc}") from exc
    emit(doc, as_json, lambda d: print_proof(d, header=f"{file}: NOT checked (unverified content)"))


def _read(file: Path) -> bytes:
    try:
        return file.read_bytes()
    except OSError as exc:
        raise click.ClickException(f"{file}: {exc.strerror}") from exc


def _print_kernel_ima(con, kernel: dict) -> None:
    """The kernel's own IMA log in a proof: the range replayed, then each entry not trusted."""
    start, end = kernel.get("start", 0), kernel.get("end", 0)
    span = f"entries {start}..{end - 1}" if isinstance(end, int) and end > start else "no new entries"
    con.print(f"kernel IMA log {span} replayed to PCR {kernel.get('pcr')} = {str(kernel.get('pcr_value', ''))[:16]}…  "
              f"{kernel.get('trusted_entries', '?')} trusted, {kernel.get('excluded_entries', '?')} excluded")
    entries = kernel.get("entries", [])
    if entries:
        table = Table(title="kernel IMA entries not trusted")
        for col in ("#", "verdict", "path", "template", "digest"):
            table.add_column(col)
        for e in entries:
            table.add_row(str(e.get("index")), f"[red]{e.get('reason')}[/]", e.get("subject", ""), e.get("op", ""),
                          str(e.get("digest", "")))
        con.print(table)


def print_proof(doc: dict, *, header: str = "") -> None:
    """The proof for a person: who, what was checked, each entry that was not simply trusted, the verdict."""
    con = console()
    if header:
        con.print(header)
    host, log = doc.get("host", {}), doc.get("log", {})
    con.print(f"host [bold]{host.get('name')}[/] at {host.get('url')}  "
              f"AK {str(host.get('ak_sha256', ''))[:16]}  TLS key {str(host.get('tls_spki_sha256', ''))[:16]}")
    start, end = log.get("start", 0), log.get("end", 0)
    span = f"entries {start}..{end - 1}" if isinstance(end, int) and end > start else "no new entries"
    con.print(f"log {span} replayed to PCR {log.get('pcr')} = "
              f"{str(log.get('pcr_value', ''))[:16]}…  policy {str(doc.get('policy_digest', ''))[:16]}  "
              f"DB {str(doc.get('db_digest', ''))[:16]}")
    entries = doc.get("entries", [])
    if entries:
        table = Table(title=f"entries not simply trusted ({doc.get('trusted_entries', '?')} others were)")
        for col in ("#", "verdict", "reason", "label", "op", "subject / name", "digest"):
            table.add_column(col)
        for e in entries:
            colour = "green" if e.get("verdict") == "trusted" else ("yellow" if e.get("verdict") == "info" else "red")
            table.add_row(str(e.get("index")), f"[{colour}]{e.get('verdict')}[/]", e.get("reason", ""),
                          e.get("label", ""), e.get("op", ""), e.get("subject") or e.get("name", ""),
                          str(e.get("digest", ""))[:16])
        con.print(table)
        for e in entries:    # what ran, in full: an operator can look it up or add it to the DB
            if e.get("reason") == "violation" and e.get("kind") == "violation":
                sha = str(e.get("digest", ""))
                con.print(f"entry {e.get('index')}: {e.get('subject')}: sha256 "
                          + ("unknown (the file was gone or changed before the daemon measured it)"
                             if sha.strip("0") == "" else sha))
    kernel = doc.get("kernel_ima")
    if kernel:
        _print_kernel_ima(con, kernel)
    verdict = doc.get("verdict")
    colour = "green" if verdict == proof_mod.TRUSTED else "red"
    con.print(f"verdict: [bold {colour}]{str(verdict).upper()}[/]"
              + (f"  ({'; '.join(doc.get('reasons', []))})" if doc.get("reasons") else ""))
