"""The main job on one machine (`make demo`): PRIMA enforcement -> measurement log/TPM -> quote -> proof.

    1. a measurement DB for the demo trust set: Debian's installed coreutils,
       dash and libc6 (dpkg, checked against dpkg's md5sums), plus the TP's entrypoint;
    2. a policy in audit mode: processes that enter label tp_demo through the
       entrypoint may run only code from that trust set (audit: a violation is
       logged, not killed, so the demo can show it in the proof);
    3. enforcement (tracepoint backend) and the attestation service run in one
       process, sharing the measurement log and the embedded swtpm;
    4. the verifier enrols the host (EK certificate chain + credential activation),
       the TP runs a trusted program, the verifier attests: proof 1 "trusted";
    5. the TP runs an untrusted program (a binary not in the DB), the verifier
       attests again: proof 2 "untrusted", naming that log entry.

The building blocks (`prepare`, `Demo`) are what tests/e2e/test_attest_e2e.py drives.
"""
from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from rich.console import Console
from rich.table import Table

from controlplane.cli.proof import print_proof
from controlplane.cli.serve import running_service
from controlplane.core import proof as proof_mod
from controlplane.core.errors import CwliteError
from controlplane.core.keys import load_public_key, load_signing_key
from controlplane.core.policy import load_policy
from controlplane.verifier import attest as verifier
from controlplane.verifier import registrar
from controlplane.verifier.judge import Reference
from controlplane.verifier.store import Store, default_url
from prima.measuredb import MeasureDB
from prima.sources import build

TRUST_SET = "demo"
LABEL = "tp_demo"
PACKAGES = ("coreutils", "dash", "libc6")
TRUSTED_PROGRAM = "/usr/bin/sha256sum"

POLICY = """\
# cwlite demo policy: one TP label, entered by exec of its entrypoint
mode = "{mode}"
backend = "tracepoint"
pcr = 10
trust_sets = ["{trust_set}"]

[labels.{label}]
entrypoints = ["{entry}"]
trust_set = "{trust_set}"
"""


@dataclass(frozen=True)
class Layout:
    """The demo's files: the TP entrypoint, an untrusted program, the DB and policy (host and verifier copies)."""

    work: Path
    entry: Path          # a copy of /bin/sh: exec of it enters the TP label
    untrusted: Path      # a copy of /usr/bin/true at a new inode: never measured
    db: Path
    policy: Path
    verifier_db: Path
    verifier_policy: Path

    @property
    def host_dir(self) -> Path:
        return self.work / "host"

    @property
    def verifier_dir(self) -> Path:
        return self.work / "verifier"


def prepare(work: Path, *, mode: str = "audit") -> Layout:
    """Build the DB (dpkg packages + the entrypoint's directory) and the policy; copy both for the verifier."""
    work = Path(work)
    tp_bin, elsewhere, verifier = work / "tp-bin", work / "downloads", work / "verifier"
    for d in (tp_bin, elsewhere, verifier, work / "host"):
        d.mkdir(parents=True, exist_ok=True)
    entry = tp_bin / "tp-shell"
    shutil.copy2(os.path.realpath("/bin/sh"), entry)
    untrusted = elsewhere / "true"
    shutil.copy2("/usr/bin/true", untrusted)
    db = work / "host" / "measure.db"
    build(db, from_dpkg=list(PACKAGES), deps=False, from_dir=[tp_bin], trust_set=TRUST_SET,
          note="cwlite demo: Debian coreutils, dash, libc6 and the TP entrypoint")
    policy = work / "host" / "policy.toml"
    policy.write_text(POLICY.format(mode=mode, trust_set=TRUST_SET, label=LABEL, entry=entry))
    # the verifier judges with ITS copies, never with what the host serves
    vdb, vpolicy = verifier / "measure.db", verifier / "policy.toml"
    shutil.copy2(db, vdb)
    shutil.copy2(policy, vpolicy)
    return Layout(work, entry, untrusted, db, policy, vdb, vpolicy)


class Demo:
    """A running slice: host (enforcement + service) and a verifier with its store and key."""

    def __init__(self, layout: Layout, running, store, key) -> None:
        self.layout, self.running, self.store, self.key = layout, running, store, key

    @classmethod
    @contextlib.contextmanager
    def start(cls, layout: Layout, *, controller_key: Path | None = None,
              say: io.TextIOBase | None = None) -> Iterator["Demo"]:
        with running_service(layout.host_dir, policy_path=layout.policy, db_path=layout.db, enforce=True,
                             backend="tracepoint", controller_key=controller_key,
                             say=say or io.StringIO()) as running, \
                Store.open(default_url(layout.verifier_dir)) as store:
            key = load_signing_key(layout.verifier_dir / "verifier.key", create=True)
            demo = cls(layout, running, store, key)
            demo.wait_logged(lambda e: e.name.startswith("cwlite:db-load:"), what="enforcement start")
            yield demo

    def enrol(self, name: str = "build-vm-1"):
        ca = self.layout.host_dir / "swtpm" / "ca"
        cas = registrar.load_cas(sorted(ca.glob("*cert*.pem")))
        return registrar.enrol(self.running.url, name, self.store, cas=cas, require_ek_cert=True)

    def run_as_tp(self, program: str | Path, *args: str) -> subprocess.CompletedProcess:
        """Run `program` from a shell that entered the TP label (exec of the entrypoint)."""
        cmd = " ".join([str(program), *args])
        return subprocess.run([str(self.layout.entry), "-c", cmd], capture_output=True, text=True, timeout=60)

    def wait_logged(self, pred: Callable, *, what: str, timeout: float = 180.0):
        """The first committed log entry matching `pred` (enforcement writes asynchronously).

        The deadline covers a bcc compile of the engine, which takes a minute or more on a loaded 2-core machine."""
        deadline = time.monotonic() + timeout
        while True:
            if self.running.failure:
                raise CwliteError(f"demo: enforcement stopped: {self.running.failure[0]}")
            for e in self.running.log.entries(0):
                if pred(e):
                    return e
            if time.monotonic() > deadline:
                raise CwliteError(f"demo: no log entry for {what} within {timeout:.0f} s")
            time.sleep(0.05)

    def attest(self, name: str = "build-vm-1"):
        ref = _reference(self.layout)
        try:
            return verifier.attest(self.store.host(name), ref, self.key, store=self.store)
        finally:
            ref.db.close()


def _reference(layout: Layout):
    return Reference(load_policy(layout.verifier_policy), MeasureDB.open(layout.verifier_db))


def _print_round(con, att) -> None:
    """Every log entry this round judged (a proof lists only those not simply trusted)."""
    colour = {"trusted": "green", "info": "cyan", "untrusted": "red"}
    table = Table(title=f"measurement log entries {att.log_start}..{att.log_end - 1} as the verifier judged them",
                  title_justify="left")
    for col in ("#", "event", "label", "op", "subject", "verdict"):
        table.add_column(col, overflow="fold")
    for v in att.entries:
        table.add_row(str(v.index), v.kind or "(not cwlite)", v.label, v.op, v.subject or "",
                      f"[{colour.get(v.verdict, 'white')}]{v.verdict}[/]" + (f" ({v.reason})" if v.reason else ""))
    con.print(table)


def main(work: Path | None = None) -> int:
    """`make demo`: the whole slice, with a narration a newcomer can follow."""
    con = Console()
    if os.geteuid() != 0:
        con.print("[red]cwlite demo: needs root (it loads BPF programs)[/]")
        return 1
    work = Path(work or tempfile.mkdtemp(prefix="cwlite-demo-"))
    t0 = time.monotonic()

    def step(text: str) -> None:
        con.rule(f"[bold]{text}[/]  [dim]{time.monotonic() - t0:5.1f}s[/]", align="left")

    step("1. measurement DB and policy")
    layout = prepare(work)
    con.print(f"trust set [bold]{TRUST_SET}[/]: Debian packages {', '.join(PACKAGES)} (installed files, checked "
              f"against dpkg's md5sums) + the TP entrypoint {layout.entry}")
    con.print(f"policy {layout.policy}: a process that execs {layout.entry.name} enters the TP label "
              f"[bold]{LABEL}[/] and may then run only code of trust set {TRUST_SET}; mode [bold]audit[/] "
              "(violations are logged and attested, not killed)")
    step("2. start enforcement (tracepoint) and the attestation service (HTTPS)")
    with Demo.start(layout) as demo:
        con.print(f"service {demo.running.url}; fresh TLS key {demo.running.state.tls.spki_sha256.hex()[:16]}… "
                  f"logged as a tls-key entry; measurement log {layout.host_dir / 'measurements.log'}")
        step("3. enrol: EK certificate chain + TPM credential activation")
        host = demo.enrol()
        con.print(f"enrolled {host.name}: EK certificate chains to swtpm's local CA; the AK was proven to be in "
                  "the same TPM as the EK (ActivateCredential returned the verifier's secret)")

        step("4. the TP runs a trusted program; the verifier attests")
        r = demo.run_as_tp(TRUSTED_PROGRAM, str(layout.policy))
        con.print(f"$ tp-shell -c '{TRUSTED_PROGRAM} policy.toml'  -> exit {r.returncode}: {r.stdout.split()[0][:16]}…")
        demo.wait_logged(lambda e: e.name.endswith(TRUSTED_PROGRAM) or "sha256sum" in e.name, what="the trusted load")
        first = demo.attest()
        _print_round(con, first)
        print_proof(first.document)
        (work / "proof-1.json").write_bytes(first.proof)

        step("5. the TP runs an untrusted program; the verifier attests again")
        r = demo.run_as_tp(layout.untrusted)
        con.print(f"{layout.untrusted} is a copy of /usr/bin/true that no trusted source measured")
        con.print(f"$ tp-shell -c '{layout.untrusted}'  -> exit {r.returncode} (audit mode: allowed, but logged)")
        demo.wait_logged(lambda e: e.name.startswith("cwlite:violation:"), what="the violation")
        second = demo.attest()
        _print_round(con, second)
        print_proof(second.document)
        (work / "proof-2.json").write_bytes(second.proof)

    step("6. anyone checks the proofs offline with the verifier's public key")
    pub = layout.verifier_dir / "verifier.pub"
    for name in ("proof-1.json", "proof-2.json"):
        doc = proof_mod.check((work / name).read_bytes(), load_public_key(pub), source=name)
        con.print(f"$ cwlite proof check {work / name} --key {pub}  -> signature OK, verdict {doc['verdict']}")
    ok = first.verdict == "trusted" and second.verdict == "untrusted"
    con.print(f"[bold]{'demo complete' if ok else 'demo FAILED'}[/] in {time.monotonic() - t0:.1f}s "
              f"(files kept in {work})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else None))
