"""The build controller: distcc jobs only to hosts that verify, re-verified while the build runs.

    1. every build host is attested (enrolled AK, fresh quote, TRUSTED proof; a Build VM through the
       host that booted it, controlplane.verifier.chain) and its policy must let only distccd receive
       on its distcc port (hosts.port_authority_refusal);
    2. the build command runs with distcc's host list = the verified hosts (distcc.DistccRun);
    3. while it runs, each host is attested again every `interval` seconds; a host whose
       round is not TRUSTED (or cannot complete) is dropped from the list at once, and the
       build is tainted with the reason, or stopped (`strict`: make's process group is killed);
    4. after the command ends, one last round per host still in use covers the jobs it ran since;
    5. the outputs, who compiled each, and every proof go into a signed provenance (provenance.py).

The verifier is reached only through controlplane.verifier (attest), never host internals.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from controlplane.build import provenance
from controlplane.build.distcc import LOCAL, DistccRun, Job
from controlplane.build.hosts import BuildHost, distccd_label, port_authority_refusal
from controlplane.core import proof as proof_mod
from controlplane.core.atomic import write_atomic
from controlplane.core.errors import CwliteError, VerifyError
from controlplane.verifier import attest as verifier
from controlplane.verifier import chain
from controlplane.verifier.attest import Attestation
from controlplane.verifier.chain import ChainAttestation
from controlplane.verifier.judge import Reference, Verdict
from controlplane.verifier.store import Store

CONTROLLER = "controller"    # jobs distcc ran locally (no host free, fallback) and every link step


@dataclass
class HostRun:
    """A build host during one build: whether it is in distcc's list, its proofs, why it was dropped."""

    host: BuildHost
    label: str = ""
    active: bool = False
    dropped: str = ""
    ak_sha256: str = ""
    proofs: list[dict] = field(default_factory=list)
    untrusted_entries: list[dict] = field(default_factory=list)
    jobs: int = 0


@dataclass
class Result:
    """What `run` returns: the command's status, the taint or stop, and where the provenance is."""

    returncode: int
    tainted: bool
    stopped: bool
    hosts: list[HostRun]
    jobs: list[Job]
    taints: list[dict]
    out: Path
    envelope: Path | None
    rounds: int

    def summary(self) -> dict[str, Any]:
        return {"returncode": self.returncode, "tainted": self.tainted, "stopped": self.stopped,
                "rounds": self.rounds, "provenance": str(self.envelope) if self.envelope else None,
                "out": str(self.out), "taints": self.taints,
                "hosts": [{"name": h.host.name, "distcc": h.host.distcc, "active": h.active, "dropped": h.dropped,
                           "jobs": h.jobs, "proofs": [p["file"] for p in h.proofs]} for h in self.hosts],
                "jobs": {"total": len(self.jobs), "local": sum(1 for j in self.jobs if j.host == LOCAL)}}


Report = Callable[[str, dict], None]


class Controller:
    """One build: `Controller(...).run(command)`. `report(kind, data)` sees each step (the CLI's progress)."""

    def __init__(self, hosts: Sequence[BuildHost], store: Store, ref: Reference, verifier_key: Ed25519PrivateKey,
                 controller_key: Ed25519PrivateKey, *, workdir: Path, out: Path, strict: bool = False,
                 interval: float = 5.0, report: Report | None = None,
                 via_refs: Mapping[str, Reference] | None = None) -> None:
        self.runs = [HostRun(h) for h in hosts]
        self.via_refs = dict(via_refs or {})     # a Build VM's host (its `via`) -> the verifier's reference for it
        missing = sorted({h.vm.via for h in hosts if h.vm and h.vm.via not in self.via_refs})
        if missing:
            raise CwliteError(f"cwlite build: no reference (policy, DB) for the Build VMs' host(s) {', '.join(missing)}")
        self.store, self.ref, self.key, self.controller_key = store, ref, verifier_key, controller_key
        self.workdir, self.out = Path(workdir).resolve(), Path(out).resolve()
        self.strict, self.interval = strict, interval
        self.report = report or (lambda kind, data: None)
        self.distcc = DistccRun(self.out / "work")
        self.taints: list[dict] = []
        self.rounds = 0
        self.stopped = False

    # verification ------------------------------------------------------------------------
    def _attest(self, run: HostRun) -> bool:
        """One round for `run`'s host; its proof is kept; False (with run.dropped set) when not TRUSTED."""
        self.rounds += 1
        try:
            att = self._round(run.host)
        except VerifyError as exc:
            run.dropped = run.dropped or f"attestation refused ({exc.reason}): {exc}"
            self.report("round", {"host": run.host.name, "verdict": f"refused:{exc.reason}", "message": str(exc)})
            return False
        n = len(run.proofs)
        name = f"{provenance.PROOFS}/{run.host.name}-{n}.json"
        write_atomic(self.out / name, att.proof, mode=0o644)
        run.ak_sha256 = att.document["host"]["ak_sha256"]
        log = att.document["log"]
        run.proofs.append({"file": name, "sha256": proof_mod.digest(att.proof), "host": run.host.name, "round": n,
                           "verdict": att.verdict.value, "log_start": log["start"], "log_end": log["end"]}
                          | ({"via": run.host.vm.via} if run.host.vm else {}))
        self.report("round", {"host": run.host.name, "verdict": att.verdict.value, "round": n,
                              "reasons": list(att.reasons)})
        if att.verdict is not Verdict.TRUSTED:
            run.untrusted_entries = list(att.document["entries"])
            run.dropped = run.dropped or "; ".join(att.reasons) or "untrusted"
            return False
        refusal = port_authority_refusal(self.ref.policy, run.host, run.label)
        if refusal:
            run.dropped = run.dropped or refusal
            return False
        return True

    def _round(self, host: BuildHost) -> Attestation | ChainAttestation:
        """One attestation of `host`: an enrolled host directly; a Build VM through the host that booted it."""
        if host.vm is None:
            return verifier.attest(self.store.host(host.name), self.ref, self.key, store=self.store)
        return chain.attest_via(host.name, self.store.host(host.vm.via), self.via_refs[host.vm.via], self.ref,
                                host.vm.boot(), self.key, store=self.store)

    def verify_hosts(self) -> list[HostRun]:
        """The first round for every host; those that verify go into distcc's list."""
        for run in self.runs:
            run.label = distccd_label(self.ref.policy, run.host)
            run.active = self._attest(run)
            if not run.active:
                self.report("refused", {"host": run.host.name, "reason": run.dropped})
        self.distcc.write_hosts(r.host.spec for r in self.runs if r.active)
        return [r for r in self.runs if r.active]

    def _reverify(self, proc: subprocess.Popen | None) -> None:
        """A round for every active host; a host that fails is dropped: tainted, or the build stopped."""
        for run in self.runs:
            if run.active and not self._attest(run):
                run.active = False
                self.distcc.write_hosts(r.host.spec for r in self.runs if r.active)
                self.taints.append({"host": run.host.name, "reason": run.dropped, "proof": run.proofs[-1]["file"]
                                    if run.proofs else None, "entries": run.untrusted_entries})
                self.report("dropped", {"host": run.host.name, "reason": run.dropped, "entries": run.untrusted_entries})
                if self.strict and proc is not None and proc.poll() is None:
                    self.stopped = True
                    _stop(proc)

    # the build --------------------------------------------------------------------------------
    def run(self, command: Sequence[str], *, env: dict[str, str] | None = None, stdout: Any = None) -> Result:
        """Verify, build, re-verify, attribute, and write the provenance. CwliteError if no host verifies.

        `stdout`: where the command's output goes (a file object or fd; default: inherited)."""
        (self.out / provenance.PROOFS).mkdir(parents=True, exist_ok=True)
        base_env = dict(os.environ if env is None else env)
        self.distcc.prepare(base_env.get("PATH", os.defpath))
        started = _now()
        t0 = time.time()
        if not self.verify_hosts():
            raise CwliteError("cwlite build: no build host verified: "
                              + "; ".join(f"{r.host.name}: {r.dropped}" for r in self.runs))
        self.report("start", {"command": list(command), "hosts": [r.host.spec for r in self.runs if r.active]})
        proc = subprocess.Popen(list(command), cwd=self.workdir, env=self.distcc.env(base_env), start_new_session=True,
                                stdout=stdout)
        due = time.monotonic() + self.interval
        while True:
            try:
                proc.wait(timeout=max(0.0, min(0.5, due - time.monotonic())))
            except subprocess.TimeoutExpired:
                pass
            self._count(self.distcc.collect())
            if proc.returncode is not None:
                break
            if time.monotonic() >= due:
                self._reverify(proc)
                due = time.monotonic() + self.interval
        if not self.stopped:
            self._reverify(None)      # the jobs since the last round are covered only by a round after them
        self._count(self.distcc.collect())
        return self._finish(list(command), proc.returncode, started, t0)

    def _count(self, jobs: list[Job]) -> None:
        by_addr = {r.host.distcc: r for r in self.runs}
        for job in jobs:
            if job.host in by_addr:
                by_addr[job.host].jobs += 1
        if jobs:
            self.report("jobs", {r.host.name: r.jobs for r in self.runs}
                        | {CONTROLLER: sum(1 for j in self.distcc.done if j.host == LOCAL)})

    def _finish(self, command: list[str], returncode: int, started: str, t0: float) -> Result:
        """Attribution, taint details, the build record and (unless stopped) the signed statement."""
        jobs = self.distcc.done
        by_addr = {r.host.distcc: r.host.name for r in self.runs}
        compiled_by = {j.output: by_addr.get(j.host, CONTROLLER) for j in jobs}
        sources = {j.output: j.source for j in jobs}
        for taint in self.taints:
            taint["objects"] = sorted(str(p.relative_to(self.workdir)) if p.is_relative_to(self.workdir) else str(p)
                                      for p, h in compiled_by.items() if h == taint["host"])
        subjects = []
        for path in _outputs(self.workdir, t0, skip=self.out):
            subjects.append(provenance.Subject(str(path.relative_to(self.workdir)), provenance.sha256_file(path),
                                               compiled_by.get(path, CONTROLLER), sources.get(path, "")))
        hosts = [{"name": r.host.name, "distcc": r.host.distcc, "label": r.label, "ak_sha256": r.ak_sha256,
                  "first_proof": r.proofs[0]["file"], "first_proof_sha256": r.proofs[0]["sha256"],
                  "first_verdict": r.proofs[0]["verdict"], "jobs": r.jobs, "dropped": r.dropped,
                  "tainted": any(t["host"] == r.host.name for t in self.taints),
                  "via": r.host.vm.via if r.host.vm else ""}
                 for r in self.runs if r.proofs]
        record = {"command": command, "returncode": returncode, "tainted": bool(self.taints), "stopped": self.stopped,
                  "taints": self.taints, "rounds": self.rounds, "interval_s": self.interval, "strict": self.strict,
                  "jobs": [{"object": str(j.output), "source": j.source, "host": by_addr.get(j.host, CONTROLLER)}
                           for j in jobs]}
        data = provenance.record_bytes(record)
        write_atomic(self.out / provenance.BUILD_RECORD, data, mode=0o644)
        envelope = None
        if not self.stopped:
            stmt = provenance.statement(
                subjects=subjects, command=command, workdir=str(self.workdir), hosts=hosts,
                proofs=[p for r in self.runs for p in r.proofs], record_sha256=hashlib.sha256(data).hexdigest(),
                parameters={"policyDigest": self.ref.policy_digest.hex(), "dbDigest": self.ref.db_digest.hex(),
                            "reverifyIntervalS": self.interval, "strict": self.strict},
                builder_id=f"https://cwlite.dev/build-controller/{provenance.key_id(self.controller_key.public_key())}",
                started=started, finished=_now(), invocation=str(uuid.uuid4()))
            envelope = provenance.write_dir(self.out, stmt, record, self.controller_key, self.key.public_key())
        self.report("done", {"returncode": returncode, "tainted": bool(self.taints), "stopped": self.stopped})
        return Result(returncode, bool(self.taints), self.stopped, self.runs, list(jobs), self.taints, self.out,
                      envelope, self.rounds)


def _stop(proc: subprocess.Popen) -> None:
    """Stop the whole build (make and every job it started): its process group, TERM then KILL."""
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 30.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _outputs(workdir: Path, since: float, *, skip: Path) -> list[Path]:
    """Regular files under `workdir` written since the build started (the provenance directory excluded)."""
    out = []
    for root, dirs, files in os.walk(workdir):
        rp = Path(root)
        dirs[:] = [d for d in dirs if (rp / d).resolve() != skip and d != ".git"]
        for f in files:
            p = rp / f
            try:
                st = p.lstat()
            except OSError:
                continue
            if p.is_file() and not p.is_symlink() and st.st_mtime >= since:
                out.append(p)
    return sorted(out)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def dump(result: Result) -> str:
    return json.dumps(result.summary(), indent=2, sort_keys=True)
