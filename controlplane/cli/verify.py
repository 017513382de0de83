"""`cwlite enrol` and `cwlite verify`: the verifier's side, as the build controller runs it."""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import sys
import time
from dataclasses import dataclass
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


def store_options(f):
    """--data-dir and --store, for every command that reads the verifier's store."""
    f = click.option("--store", "store_url", help="SQLAlchemy URL of the attestation store "
                     "(default: SQLite in --data-dir; postgresql+psycopg://... for a fleet).")(f)
    return click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_DATA,
                        show_default=True, help="The verifier's key and default store.")(f)


def open_store(data_dir: Path, url: str | None):
    """The attestation store at `url`, or SQLite in `data_dir` (created)."""
    from controlplane.verifier.store import Store, default_url   # lazy: see the note at the top

    data_dir.mkdir(parents=True, exist_ok=True)
    return Store.open(url or default_url(data_dir))


@click.command("enrol")
@click.argument("url")
@click.argument("name")
@store_options
@click.option("--ek-ca", "ek_cas", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="CA certificate(s) the EK certificate must chain to (repeatable; requires an EK certificate).")
@click.option("--pcr", type=click.IntRange(0, 23),
              help="cwlite's log PCR on the host (default: the one it serves: 10, or 11 where the kernel's IMA owns 10).")
@click.option("--interval", type=click.FloatRange(0.1), default=30.0, show_default=True,
              help="Seconds between re-attestations in `cwlite verify --watch`.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def enrol(url: str, name: str, data_dir: Path, store_url: str | None, ek_cas: tuple[Path, ...], pcr: int | None,
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
    with open_store(data_dir, store_url) as store:
        host = registrar.enrol(url, name, store, cas=cas, pcr=pcr, interval_s=interval)
        same_ek = sorted(h.name for h in store.hosts() if h.ek_public == host.ek_public and h.name != name)
    warnings = []
    if not cas:
        warnings.append(f"{name}: EK trusted on first use: no --ek-ca, so no manufacturer CA vouched for this TPM "
                        f"(EK certificate {'present, not checked' if host.ek_cert else 'absent'})")
    if same_ek:
        warnings.append(f"{name}: this EK is already enrolled as {', '.join(same_ek)}: one TPM under two names "
                        f"(remove the old name: cwlite hosts remove {same_ek[0]})")
    for w in warnings:
        click.echo(f"cwlite: warning: {w}", err=True)
    emit({"name": host.name, "url": host.url, "pcr": host.pcr, "interval_s": host.interval_s,
          "ek_sha256": hashlib.sha256(host.ek_public).hexdigest(), "ek_certificate": host.ek_cert is not None,
          "ek_ca_checked": bool(cas), "also_enrolled_as": same_ek, "warnings": warnings,
          "ak_sha256": hashlib.sha256(host.ak_public).hexdigest()}, as_json,
         lambda d: click.echo(f"enrolled {d['name']} at {d['url']}: EK {d['ek_sha256'][:16]} "
                              f"(certificate {'checked' if cas else ('present' if d['ek_certificate'] else 'none')}), "
                              f"AK {d['ak_sha256'][:16]} activated"))


@dataclass(frozen=True)
class KernelImaOptions:
    """--kernel-ima, --ima-policy, --ima-exclude: whether and how to judge the kernel's own IMA log."""

    enabled: bool = False
    keylime_policy: Path | None = None
    excludes: tuple[str, ...] = ()


@contextlib.contextmanager
def _reference(policy_path: Path, db_path: Path, extra_policies: tuple[bytes, ...] = (),
               kernel: KernelImaOptions = KernelImaOptions()) -> Iterator:
    policy = load_policy(policy_path)
    with MeasureDB.open(db_path) as db:
        kref = None
        if kernel.enabled or kernel.keylime_policy is not None or kernel.excludes:
            from controlplane.verifier.kernel_ima import KernelImaReference, load_keylime_policy   # lazy: top note

            runtime = load_keylime_policy(kernel.keylime_policy) if kernel.keylime_policy is not None else None
            kref = KernelImaReference.of(db, runtime, kernel.excludes)
        yield Reference(policy, db, frozenset(extra_policies), kernel_ima=kref)


@click.command("verify")
@click.argument("hosts", nargs=-1)
@store_options
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
@click.option("--kernel-ima", is_flag=True,
              help="Also attest the kernel's own IMA log (GET /v1/ima-log, PCR 10): every file it measured is "
                   "judged against --db and --ima-policy (trusted / unknown / violation).")
@click.option("--ima-policy", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="A Keylime runtime policy (JSON, Keylime 7.x) as a further trust source; implies --kernel-ima.")
@click.option("--ima-exclude", "ima_excludes", multiple=True, metavar="REGEX",
              help="Kernel IMA paths not judged (matched at the start, as Keylime's excludes; repeatable).")
@click.option("--metrics-port", type=click.IntRange(1, 65535),
              help="With --watch: serve Prometheus metrics (rounds by host and outcome) on this port (plain HTTP).")
@click.option("--metrics-host", default="127.0.0.1", show_default=True, help="With --metrics-port: the address.")
@click.option("--via", "via", metavar="HOST", help="Attest the VM NAME through the enrolled HOST that booted it "
              "(`cwlite vm up`): host quote -> host log's record of the VM -> VM quote by that vTPM's AK -> VM log.")
@click.option("--host-policy", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="With --via: the verifier's copy of the HOST's policy (--policy/--db are the VM's).")
@click.option("--host-db", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="With --via: the verifier's copy of the HOST's measurement DB.")
@click.option("--vm-kernel", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="With --via: the kernel image the VM must have booted.")
@click.option("--vm-initrd", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="With --via: the initrd the VM must have booted (default: none).")
@click.option("--vm-cmdline", help="With --via: the boot command line the VM must have had (`cwlite vm list --json`).")
@click.option("--vm-disk", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="With --via: the root disk image the VM must have booted (`cwlite vm up --disk`; default: none, "
                   "the VM runs over its host's root).")
@click.option("--json", "as_json", is_flag=True, help="Print the proof(s) as JSON.")
def verify(hosts: tuple[str, ...], data_dir: Path, store_url: str | None, policy_path: Path, db_path: Path,
           watch: bool, rounds: int | None, full: bool, proof_out: Path | None, push_policy: Path | None,
           kernel_ima: bool, ima_policy: Path | None, ima_excludes: tuple[str, ...], metrics_port: int | None,
           metrics_host: str, via: str | None, host_policy: Path | None, host_db: Path | None,
           vm_kernel: Path | None, vm_initrd: Path | None, vm_cmdline: str | None, vm_disk: Path | None,
           as_json: bool) -> None:
    """Attest enrolled HOSTS: fresh quote over TLS, key binding, log replay, every entry judged, signed proof.

    Exit status 0 when every host is trusted, 2 when one is untrusted, 1 when an
    attestation could not be completed (the reason is printed: signature, nonce,
    tls-key, pcr-mismatch, policy-rollback, ...). With --watch every host is
    attested concurrently (one connection pool), each at its own interval, and
    the exit status (after --rounds, or on Ctrl-C) is that of each host's last round. Proofs are kept in the store and checkable
    offline with `cwlite proof check` and the verifier key's .pub file
    (DATA_DIR/verifier.pub).

    \b
    Examples:
      cwlite verify build1 --policy policy.toml --db trusted.db
      cwlite verify build1 --policy policy.toml --db trusted.db --json --proof-out build1.proof
      # continuous: each host at its enrolled interval, forever
      cwlite verify --watch --policy policy.toml --db trusted.db
      # the same, with Prometheus metrics of the rounds on http://127.0.0.1:9464/metrics
      cwlite verify --watch --metrics-port 9464 --policy policy.toml --db trusted.db
      # replace the host's policy (signed by the controller), then attest against it
      cwlite verify build1 --push-policy new.toml --policy policy.toml --db trusted.db
      # Keylime's job too: the kernel's IMA log against the DB and a Keylime runtime policy
      cwlite verify build1 --policy policy.toml --db trusted.db --ima-policy runtime.json --ima-exclude '/var/log/'
      # a VM through the host that booted it (transitive trust; the VM is never enrolled)
      cwlite verify vm1 --via host1 --policy vm.toml --db vm.db --host-policy host.toml --host-db host.db \\
          --vm-kernel vmlinuz --vm-cmdline "$(cwlite vm list --json | jq -r '.vms[0].cmdline')"
      # a VM booted from a disk image (`cwlite vm image`, `vm up --disk`): the image is a boot part too
      cwlite verify vm2 --via host1 --policy vm.toml --db vm.db --host-policy host.toml --host-db host.db \
          --vm-kernel vmlinuz --vm-initrd vm-initrd.img --vm-disk vm.img --vm-cmdline "$CMDLINE"
    """
    from controlplane.verifier import attest as v   # lazy: see the note at the top

    if metrics_port is not None and not watch:
        raise click.UsageError("--metrics-port goes with --watch")
    if proof_out is not None and len(hosts) != 1:
        raise click.UsageError("--proof-out needs exactly one HOST")
    if proof_out is not None and not proof_out.parent.is_dir():   # before the attestation, not after it
        raise FileError(f"{proof_out}: --proof-out directory {proof_out.parent} does not exist", path=str(proof_out))
    key = load_signing_key(data_dir / "verifier.key", create=True)
    if via is not None:
        _verify_via(hosts, via, data_dir, store_url, key, policy_path, db_path, host_policy, host_db, vm_kernel,
                    vm_initrd, vm_cmdline, vm_disk, proof_out, as_json)
        return
    with open_store(data_dir, store_url) as store:
        policy_file, extra = policy_path, ()
        if push_policy is not None:
            if len(hosts) != 1:
                raise click.UsageError("--push-policy needs exactly one HOST")
            answer = v.push_policy(store.host(hosts[0]), push_policy.read_text(),
                                   read_signature(signature_path(push_policy)))
            click.echo(f"{hosts[0]}: loaded pushed policy {answer['policy_digest'][:16]}", err=True)
            policy_file, extra = push_policy, (load_policy(policy_path).digest(),)
        kernel = KernelImaOptions(kernel_ima, ima_policy, ima_excludes)
        with _reference(policy_file, db_path, extra, kernel) as ref:
            if watch:
                _watch(store, ref, key, hosts, rounds, as_json,
                       RoundMetrics.serve(metrics_host, metrics_port) if metrics_port else None)
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


def _verify_via(hosts, via, data_dir, store_url, key, policy_path, db_path, host_policy, host_db, vm_kernel,
                vm_initrd, vm_cmdline, vm_disk, proof_out, as_json) -> None:
    """`verify NAME --via HOST`: the chain of controlplane.verifier.chain; exit 0 trusted, 2 untrusted, 1 refused."""
    from controlplane.core.digest import sha256_file
    from controlplane.core.vmrecord import NO_PART, cmdline_digest
    from controlplane.verifier import chain   # lazy: see the note at the top

    if len(hosts) != 1:
        raise click.UsageError("--via needs exactly one NAME (the VM)")
    missing = [o for o, v in (("--host-policy", host_policy), ("--host-db", host_db), ("--vm-kernel", vm_kernel),
                              ("--vm-cmdline", vm_cmdline)) if v is None]
    if missing:
        raise click.UsageError(f"--via needs {', '.join(missing)}")
    boot = {"kernel": sha256_file(vm_kernel), "initrd": sha256_file(vm_initrd) if vm_initrd else NO_PART,
            "cmdline": cmdline_digest(vm_cmdline)}
    if vm_disk is not None:
        boot["disk"] = sha256_file(vm_disk)
    name = hosts[0]
    with open_store(data_dir, store_url) as store, _reference(host_policy, host_db) as host_ref, \
            _reference(policy_path, db_path) as vm_ref:
        try:
            att = chain.attest_via(name, store.host(via), host_ref, vm_ref, boot, key, store=store)
        except VerifyError as exc:
            click.echo(f"cwlite: {name} via {via}: REFUSED ({exc.reason}): {exc}", err=True)
            if as_json:
                click.echo(json.dumps({"host": name, "via": via, "refused": exc.reason, "message": str(exc)}))
            sys.exit(1)
    if proof_out is not None:
        write_atomic(proof_out, att.proof, mode=0o644)
    emit(att.document, as_json, print_proof)
    if att.verdict != Verdict.TRUSTED:
        sys.exit(2)


class RoundMetrics:
    """Prometheus counters of `verify --watch`: rounds by host and outcome."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter   # only a watch with metrics pays

        self.registry = CollectorRegistry()
        self.rounds = Counter("cwlite_verifier_rounds", "Verification rounds by host and outcome (trusted, "
                              "untrusted, refused)", ["host", "outcome"], registry=self.registry)

    @classmethod
    def serve(cls, host: str, port: int) -> "RoundMetrics":
        """The metrics, served over HTTP at host:port/metrics from a daemon thread."""
        from prometheus_client import start_http_server

        m = cls()
        try:
            start_http_server(port, addr=host, registry=m.registry)
        except OSError as exc:
            raise FileError(f"{host}:{port}: --metrics-port: cannot listen: {exc.strerror}") from exc
        return m

    def count(self, host: str, outcome: str) -> None:
        self.rounds.labels(host, outcome).inc()


def _watch(store, ref, key, hosts, rounds, as_json, metrics: RoundMetrics | None = None) -> None:
    """Print each round as it ends; exit 2 if a host's last round was untrusted, 1 if one was refused."""
    last: dict[str, str] = {}
    try:
        asyncio.run(_watch_rounds(store, ref, key, hosts, rounds, as_json, last, metrics))
    except KeyboardInterrupt:
        click.echo("cwlite: watch interrupted", err=True)
    states = set(last.values())
    worst = 2 if Verdict.UNTRUSTED in states else (1 if any(s.startswith("refused") for s in states) else 0)
    if worst:
        bad = sorted(n for n, s in last.items() if s != Verdict.TRUSTED)
        click.echo(f"cwlite: not trusted at the last round: {', '.join(bad)}", err=True)
        sys.exit(worst)      # SystemExit: click's Exit would be swallowed in non-standalone mode


async def _watch_rounds(store, ref, key, hosts, rounds, as_json, last: dict[str, str],
                        metrics: RoundMetrics | None = None) -> None:
    from controlplane.verifier import attest as v   # lazy: see the note at the top

    async for name, result in v.watch(store, ref, key, hosts=hosts or None, rounds=rounds):
        stamp = time.strftime("%H:%M:%S")
        if isinstance(result, CwliteError):      # VerifyError, or StoreError (reason "store")
            reason = getattr(result, "reason", "store")
            if metrics is not None:
                metrics.count(name, "refused")
            state, line = f"refused:{reason}", f"REFUSED ({reason}): {result}"
        else:
            if metrics is not None:
                metrics.count(name, str(result.verdict))
            state = result.verdict
            new = [e for e in result.document["entries"]]
            line = (f"{result.verdict.upper()} entries {result.log_start}..{result.log_end}"
                    + (f" ({'; '.join(result.reasons)})" if result.reasons else ""))
            for e in new:
                line += f"\n    entry {e['index']}: {e['reason']} {e['label']} {e['op']} {e['subject']}"
            for e in result.document.get("kernel_ima", {}).get("entries", []):
                line += f"\n    kernel IMA entry {e['index']}: {e['reason']} {e['subject']} sha256:{e['digest']}"
        if as_json:
            click.echo(json.dumps({"host": name, "state": state, "at": stamp,
                                   "proof": None if isinstance(result, CwliteError) else result.document}))
        elif state != last.get(name) or state != Verdict.TRUSTED:
            flag = "" if state == Verdict.TRUSTED else "  <-- FLAGGED"
            click.echo(f"{stamp} {name}: {line}{flag}")
        last[name] = state
