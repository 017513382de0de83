"""`cwlite enrol` and `cwlite verify`: the verifier's side, as the build controller runs it."""
from __future__ import annotations

import contextlib
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Iterator

import click

from controlplane.cli.output import emit
from controlplane.cli.proof import print_proof
from controlplane.core.atomic import write_atomic
from controlplane.core.errors import CwliteError, FileError, VerifyError
from controlplane.core.keys import load_signing_key
from controlplane.core.paths import DEFAULT_DATA_DIR
from controlplane.core.policy import load_policy, read_signature, signature_path
from controlplane.verifier.judge import Reference, Verdict
from prima.measuredb import MeasureDB

# verifier.attest, .registrar and .store (httpx, SQLAlchemy: about 0.5 s to import) are imported by the
# commands that use them, not here: every `cwlite` start would pay for them.

DEFAULT_DATA = DEFAULT_DATA_DIR / "verifier"


def _common(f):
    f = click.option("--store", "store_url", help="SQLAlchemy URL of the attestation store "
                     "(default: SQLite in --data-dir; postgresql+psycopg://... for a fleet).")(f)
    return click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_DATA,
                        show_default=True, help="The verifier's key and default store.")(f)


def _open_store(data_dir: Path, url: str | None):
    from controlplane.verifier.store import Store, default_url   # lazy: see the note at the top

    data_dir.mkdir(parents=True, exist_ok=True)
    return Store.open(url or default_url(data_dir))


@click.command("enrol")
@click.argument("url")
@click.argument("name")
@_common
@click.option("--ek-ca", "ek_cas", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="CA certificate(s) the EK certificate must chain to (repeatable; requires an EK certificate).")
@click.option("--pcr", type=click.IntRange(0, 23), default=10, show_default=True)
@click.option("--interval", type=click.FloatRange(0.1), default=30.0, show_default=True,
              help="Seconds between re-attestations in `cwlite verify --watch`.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def enrol(url: str, name: str, data_dir: Path, store_url: str | None, ek_cas: tuple[Path, ...], pcr: int,
          interval: float, as_json: bool) -> None:
    """Enrol the host serving at URL as NAME: EK check, credential activation, EK and AK pinned.

    The verifier seals a random secret to the host's EK for its AK's name;
    only the TPM holding both can return it. With --ek-ca the EK certificate
    must chain to one of those CAs and certify the presented EK.

    \b
    Examples:
      cwlite enrol https://10.0.0.5:8443 build1
      # swtpm's local CA (swtpm_setup --create-ek-cert)
      cwlite enrol https://127.0.0.1:8443 build1 --ek-ca /var/lib/cwlite/swtpm/ca/issuercert.pem \\
          --ek-ca /var/lib/cwlite/swtpm/ca/swtpm-localca-rootca-cert.pem
      cwlite enrol https://10.0.0.5:8443 build1 --interval 10 --json
    """
    from controlplane.verifier import registrar   # lazy: see the note at the top

    cas = registrar.load_cas(ek_cas) if ek_cas else None
    with _open_store(data_dir, store_url) as store:
        host = registrar.enrol(url, name, store, cas=cas, pcr=pcr, interval_s=interval)
    emit({"name": host.name, "url": host.url, "pcr": host.pcr, "interval_s": host.interval_s,
          "ek_sha256": hashlib.sha256(host.ek_public).hexdigest(), "ek_certificate": host.ek_cert is not None,
          "ak_sha256": hashlib.sha256(host.ak_public).hexdigest()}, as_json,
         lambda d: click.echo(f"enrolled {d['name']} at {d['url']}: EK {d['ek_sha256'][:16]} "
                              f"(certificate {'checked' if cas else ('present' if d['ek_certificate'] else 'none')}), "
                              f"AK {d['ak_sha256'][:16]} activated"))


@contextlib.contextmanager
def _reference(policy_path: Path, db_path: Path, extra_policies: tuple[bytes, ...] = ()) -> Iterator:
    policy = load_policy(policy_path)
    with MeasureDB.open(db_path) as db:
        yield Reference(policy, db, frozenset(extra_policies))


@click.command("verify")
@click.argument("hosts", nargs=-1)
@_common
@click.option("--policy", "policy_path", required=True, type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="The verifier's own copy of the policy the hosts must run.")
@click.option("--db", "db_path", required=True, type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="The verifier's own copy of the measurement DB.")
@click.option("--watch", is_flag=True, help="Re-attest every host at its interval; flag each change at once.")
@click.option("--rounds", type=click.IntRange(1), help="With --watch: stop after this many rounds in total.")
@click.option("--full", is_flag=True, help="Replay the whole log, not just what is new since the last proof.")
@click.option("--proof-out", type=click.Path(dir_okay=False, path_type=Path), help="Write the signed proof here (one HOST).")
@click.option("--push-policy", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="First push this controller-signed policy (FILE + FILE.sig) to the host, then attest against it.")
@click.option("--json", "as_json", is_flag=True, help="Print the proof(s) as JSON.")
def verify(hosts: tuple[str, ...], data_dir: Path, store_url: str | None, policy_path: Path, db_path: Path,
           watch: bool, rounds: int | None, full: bool, proof_out: Path | None, push_policy: Path | None,
           as_json: bool) -> None:
    """Attest enrolled HOSTS: fresh quote over TLS, key binding, log replay, every entry judged, signed proof.

    Exit status 0 when every host is trusted, 2 when one is untrusted, 1 when an
    attestation could not be completed (the reason is printed: signature, nonce,
    tls-key, pcr-mismatch, ...). Proofs are kept in the store and checkable
    offline with `cwlite proof check` and the verifier key's .pub file
    (DATA_DIR/verifier.pub).

    \b
    Examples:
      cwlite verify build1 --policy policy.toml --db trusted.db
      cwlite verify build1 --policy policy.toml --db trusted.db --json --proof-out build1.proof
      # continuous: each host at its enrolled interval, forever
      cwlite verify --watch --policy policy.toml --db trusted.db
      # replace the host's policy (signed by the controller), then attest against it
      cwlite verify build1 --push-policy new.toml --policy policy.toml --db trusted.db
    """
    from controlplane.verifier import attest as v   # lazy: see the note at the top

    if proof_out is not None and len(hosts) != 1:
        raise click.UsageError("--proof-out needs exactly one HOST")
    if proof_out is not None and not proof_out.parent.is_dir():   # before the attestation, not after it
        raise FileError(f"{proof_out}: --proof-out directory {proof_out.parent} does not exist", path=str(proof_out))
    key = load_signing_key(data_dir / "verifier.key", create=True)
    with _open_store(data_dir, store_url) as store:
        policy_file, extra = policy_path, ()
        if push_policy is not None:
            if len(hosts) != 1:
                raise click.UsageError("--push-policy needs exactly one HOST")
            answer = v.push_policy(store.host(hosts[0]), push_policy.read_text(),
                                   read_signature(signature_path(push_policy)))
            click.echo(f"{hosts[0]}: loaded pushed policy {answer['policy_digest'][:16]}", err=True)
            policy_file, extra = push_policy, (load_policy(policy_path).digest(),)
        with _reference(policy_file, db_path, extra) as ref:
            if watch:
                _watch(store, ref, key, hosts, rounds, as_json)
                return
            worst = 0
            for name in hosts or [h.name for h in store.hosts()]:
                try:
                    att = v.attest(store.host(name), ref, key, store=store, full=full)
                except VerifyError as exc:
                    click.echo(f"cwlite: {name}: REFUSED ({exc.reason}): {exc}", err=True)
                    if as_json:
                        click.echo(json.dumps({"host": name, "refused": exc.reason, "message": str(exc)}))
                    worst = max(worst, 1)
                    continue
                if proof_out is not None:
                    write_atomic(proof_out, att.proof, mode=0o644)
                emit(att.document, as_json, print_proof)
                if att.verdict != Verdict.TRUSTED:
                    worst = 2
            if worst:
                sys.exit(worst)      # SystemExit: click's Exit would be swallowed in non-standalone mode


def _watch(store, ref, key, hosts, rounds, as_json) -> None:
    from controlplane.verifier import attest as v   # lazy: see the note at the top

    last: dict[str, str] = {}
    for name, result in v.watch(store, ref, key, hosts=hosts or None, rounds=rounds):
        stamp = time.strftime("%H:%M:%S")
        if isinstance(result, CwliteError):      # VerifyError, or StoreError (reason "store")
            reason = getattr(result, "reason", "store")
            state, line = f"refused:{reason}", f"REFUSED ({reason}): {result}"
        else:
            state = result.verdict
            new = [e for e in result.document["entries"]]
            line = (f"{result.verdict.upper()} entries {result.log_start}..{result.log_end}"
                    + (f" ({'; '.join(result.reasons)})" if result.reasons else ""))
            for e in new:
                line += f"\n    entry {e['index']}: {e['reason']} {e['label']} {e['op']} {e['subject']}"
        if as_json:
            click.echo(json.dumps({"host": name, "state": state, "at": stamp,
                                   "proof": None if isinstance(result, CwliteError) else result.document}))
        elif state != last.get(name) or state != Verdict.TRUSTED:
            flag = "" if state == Verdict.TRUSTED else "  <-- FLAGGED"
            click.echo(f"{stamp} {name}: {line}{flag}")
        last[name] = state
