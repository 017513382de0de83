"""`cwlite enforce`: the PRIMA daemon — engine + sinks + signals; Port Authority beside PRIMA.

When the policy has Port Authority rules and the backend has its programs (tracepoint),
the daemon runs portauthority.engine in the same process as prima.engine (it reads
PRIMA's task labels), guarded by PRIMA's self-protection, and records its entries too.

SIGHUP re-reads the policy and the measurement DB and swaps them in as one
generation (the old one stays enforced until the flip, and stays if the new
one is bad). SIGTERM/SIGINT detach every program and record daemon-stop.
"""
from __future__ import annotations

import json
import os
import queue
import signal
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Sequence

import click

from controlplane.core.errors import CwliteError, EnforcementError, FileError
from controlplane.core.events import Event, EventKind, EventSink
from controlplane.core.paths import DEFAULT_DATA_DIR
from controlplane.core.policy import Policy, load_policy
from controlplane.host.policy_floor import admit
from ebpf.probe import probe_lsm
from portauthority import engine as pa_engine
from prima import selfprotect
from prima.engine import MIN_TRUST_MAX, Engine, Measure
from prima.kernelview import kernel_view, kernel_view_bound
from prima.measuredb import MeasureDB

ALIVE_TIMEOUT_S = 5.0  # how long a quote waits for the engine's liveness entry


def event_json(event: Event) -> dict:
    """One event as a JSON object (the JSON-lines sink and --json stdout)."""
    return {"kind": event.kind.value, "digest": event.digest.hex(), "label": event.label, "op": event.op,
            "subject": event.subject, "ima_name": event.ima_name(), "detail": dict(event.detail)}


class JsonLinesSink:
    """Append each event as one JSON line; flushed and fsynced before record() returns."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._f = open(path, "a", encoding="utf-8")
        except OSError as exc:
            raise FileError.from_os(path, exc, "open the events file") from exc

    def record(self, event: Event) -> None:
        try:
            self._f.write(json.dumps(event_json(event), sort_keys=True) + "\n")
            self._f.flush()
            os.fsync(self._f.fileno())
        except OSError as exc:          # a full disk: the daemon goes on enforcing, unrecorded (Daemon._record)
            raise FileError.from_os(self.path, exc, "append an event") from exc

    def close(self) -> None:
        self._f.close()


class StreamSink:
    """--json: one JSON object per line on a stream (stdout)."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def record(self, event: Event) -> None:
        self.stream.write(json.dumps(event_json(event), sort_keys=True) + "\n")
        self.stream.flush()


@dataclass
class Tee:
    sinks: Sequence[EventSink] = field(default_factory=list)

    def record(self, event: Event) -> None:
        for s in self.sinks:
            s.record(event)


def resolve_backend(requested: str) -> str:
    """"auto" -> "lsm" when a BPF LSM program loads here, else "tracepoint"."""
    if requested != "auto":
        return requested
    return "lsm" if probe_lsm().ok else "tracepoint"


def load_inputs(policy_path: Path, db_path: Path, controller_key: Path | None, policy: Policy | None = None
                ) -> tuple[Policy, Measure, bytes, int]:
    """Policy (signature checked when a key is configured), the DB's kernel view for its trust sets (a
    callable taking Engine.watch, so the engine watches each file before it is read), the DB digest,
    and how many entries the view can have at most (to size the engine's maps).

    `policy`: the policy already loaded from `policy_path` by the caller (not read and parsed again).
    """
    if policy is None:
        policy = load_policy(policy_path, controller_key=controller_key, require_signature=controller_key is not None)
    if not db_path.exists():
        raise EnforcementError(f"{db_path}: no measurement DB (build one with `cwlite db build`)")
    with MeasureDB.open(db_path) as db:
        missing = [s for s in policy.trust_sets() if s not in db.trust_sets()]
        if missing:
            raise EnforcementError(f"{policy_path}: trust_sets: {', '.join(missing)} not in {db_path} "
                                   f"(has: {', '.join(db.trust_sets()) or 'none'})")
        digest = db.digest()
        size_hint = kernel_view_bound(db, policy.trust_sets())

    def view(watch):
        with MeasureDB.open(db_path) as db:
            return kernel_view(db, policy.trust_sets(), watch=watch)

    return policy, view, digest, size_hint


class Daemon:
    """The enforce loop, usable from other commands (e.g. a service embedding enforcement)."""

    def __init__(self, policy_path: Path, db_path: Path, sink: EventSink, *, backend: str = "auto",
                 controller_key: Path | None = None, log: IO[str] | None = None, policy: Policy | None = None,
                 data_dir: Path | None = None, pa_interfaces: Sequence[str] = ()) -> None:
        """`policy`: `policy_path` as the caller already loaded it (checked with `controller_key`), for the start;
        `log`: where status lines go (default: sys.stderr as it is when the daemon speaks, JSON lines included);
        `data_dir`: where the policy serial floor lives (a reload to an older serial is refused);
        `pa_interfaces`: where Port Authority's tc classifier goes (none: only its cgroup or LSM programs)."""
        self.policy_path, self.db_path, self.sink = policy_path, db_path, sink
        self.pa_interfaces = tuple(pa_interfaces)
        self.pa: pa_engine.Engine | None = None
        self.policy = policy
        self.data_dir = data_dir
        self.backend, self.controller_key, self.log = backend, controller_key, log
        self.reload_requested = False
        self.stop_requested = False
        self.engine: Engine | None = None     # while run() runs: the engine (benchmarks detach its programs)
        self.sink_error: CwliteError | None = None   # the sink (measurement log) failed: see `_record`
        self.unrecorded = 0                           # events read after that, not recorded
        self._alive: queue.SimpleQueue[tuple[bytes, threading.Event]] = queue.SimpleQueue()

    def request_alive(self, nonce: bytes, timeout: float = ALIVE_TIMEOUT_S) -> bool:
        """Ask the enforce loop to log its liveness entry for a verifier's `nonce` (after every event it
        has read); True once recorded, False when the engine did not answer within `timeout` (the
        attestation service quotes anyway: the verifier then finds no liveness entry)."""
        done = threading.Event()
        self._alive.put((nonce, done))
        return done.wait(timeout)

    def run(self) -> None:
        policy, view, db_digest, size_hint = load_inputs(self.policy_path, self.db_path, self.controller_key, self.policy)
        backend = resolve_backend(self.backend if self.backend != "auto" else policy.backend)
        try:
            # Port Authority attaches before PRIMA's first generation lets anyone enter a label: no TP
            # ever binds or listens before its rules are in force (the log's db-load comes after it)
            engine = Engine(policy, view, backend=backend, db_digest=db_digest, trust_max=max(MIN_TRUST_MAX, 2 * size_hint),
                            before_labels=lambda e: self._start_pa(policy, e))
        except BaseException:
            if self.pa is not None:
                self.pa.close()
                self.pa = None
            raise
        self.engine = engine
        try:
            # daemon-start, policy-load and db-load reach the log now, before the daemon says it enforces: a
            # daemon killed before its first poll must still leave its start behind (the next start is then
            # the enforcement gap the verifier flags; a restarted unit would otherwise look like the first)
            for ev in engine.drain():
                self.sink.record(ev)
            self._say(f"enforcing {self.policy_path} ({policy.mode}) with {engine.loaded.trusted_files} trusted files, "
                      f"backend {backend}")
            while not self.stop_requested:
                for ev in engine.poll(200 if self.pa is None else 100):
                    self._record(engine.evidence(ev))
                if self.pa is not None:
                    for ev in self.pa.poll(100):
                        self._record(ev)
                self._answer_alive(engine)
                if self.reload_requested:
                    self.reload_requested = False
                    self._reload(engine)
        finally:
            if self.pa is not None:
                self.pa.close()
                for ev in self.pa.drain():
                    self._record(ev)
            engine.close()
            for ev in engine.drain():
                self._record(engine.evidence(ev))
            self._say("detached" if self.sink_error is None else
                      f"detached; {self.unrecorded} events were not recorded after the log failed")

    def _record(self, ev: Event) -> None:
        """Record one event; if the sink fails (a full disk, a dead TPM), enforcement goes on (fail
        closed: untrusted code stays denied) but nothing more is recorded and no liveness is answered,
        so the service's quotes fail (the log refuses them) and the next daemon start is a gap entry."""
        if self.sink_error is not None:
            self.unrecorded += 1
            return
        try:
            self.sink.record(ev)
        except CwliteError as exc:
            self.sink_error = exc
            self.unrecorded += 1
            self._say(f"cannot record events, enforcement continues unrecorded until a restart: {exc}")

    def _start_pa(self, policy: Policy, engine: Engine) -> None:
        """Port Authority beside PRIMA, on PRIMA's backend, when the policy has rules (PRIMA's
        `before_labels`: its programs loaded, no label entered yet)."""
        if not policy.port_authority.rules:
            return
        self.pa = pa_engine.Engine(policy, engine.label_ids(policy), labels_fd=engine.label_map_fd, backend=engine.backend,
                                   interfaces=self.pa_interfaces)
        selfprotect.register(self.pa.bpf, into=engine.bpf)
        engine.confine(self.pa.adopt)  # tracepoint: TPs run in TP cgroups, where the cgroup programs are
        where = f"TP cgroups ({pa_engine.TP_CGROUP}) under {self.pa.cgroup_root}" if self.pa.cgroup_root \
            else "LSM socket hooks"
        self._say(f"Port Authority ({self.pa.backend}): {len(policy.port_authority.rules)} rule(s), {where}, "
                  f"tc on {', '.join(self.pa_interfaces) or 'no interface'}")

    def _answer_alive(self, engine: Engine) -> None:
        while True:
            try:
                nonce, done = self._alive.get_nowait()
            except queue.Empty:
                return
            if self.sink_error is not None:
                continue        # nothing can be recorded: the liveness entry is not there to claim
            for ev in engine.alive(nonce):
                self._record(engine.evidence(ev))
            if self.sink_error is None:
                done.set()

    def _reload(self, engine: Engine) -> None:
        try:
            policy, view, db_digest, _size = load_inputs(self.policy_path, self.db_path, self.controller_key)
            if self.data_dir is not None:
                admit(policy, self.data_dir)
            loaded = engine.reload(policy, view, db_digest)
            if self.pa is not None:
                self.pa.reload(policy, loaded.labels)
        except CwliteError as exc:
            # The previous generation is still live: enforcement never stopped.
            self._say(f"reload refused, previous policy still enforced: {exc}")
            self._record(Event(EventKind.VIOLATION, op="reload", subject=str(self.policy_path),
                               detail={"error": str(exc)}))
            return
        self._say(f"reloaded: generation {loaded.generation}, {loaded.trusted_files} trusted files")

    def _say(self, text: str) -> None:
        print(f"cwlite enforce: {text}", file=self.log or sys.stderr, flush=True)


@click.command("enforce")
@click.option("--policy", "policy_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The policy bundle (TOML).")
@click.option("--db", "db_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The measurement DB (`cwlite db build`).")
@click.option("--events", "events_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Append every event as a JSON line to this file (fsynced).")
@click.option("--mlog", is_flag=True, help="Record every event in the measurement log (DATA_DIR/measurements.log, "
              "extended into the policy's PCR).")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_DATA_DIR, show_default=True,
              help="The highest policy serial run here (policy.serial: an older policy is refused); "
              "with --mlog also the log and the embedded swtpm.")
@click.option("--device", help="With --mlog: TPM device or TCTI (default: /dev/tpmrm0, else the embedded swtpm).")
@click.option("--backend", type=click.Choice(["auto", "tracepoint", "lsm"]), default="auto", show_default=True,
              help="Kernel backend; auto = the policy's choice, else the strongest this kernel allows.")
@click.option("--controller-key", type=click.Path(dir_okay=False, path_type=Path),
              help="Ed25519 public key (PEM): the policy's .sig must verify with it, at start and on every reload.")
@click.option("--pa-interface", "pa_interfaces", multiple=True,
              help="Attach Port Authority's tc ingress classifier to this interface (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print every event as a JSON line on stdout.")
def enforce(policy_path: Path, db_path: Path, events_path: Path | None, mlog: bool, data_dir: Path,
            device: str | None, backend: str, controller_key: Path | None, pa_interfaces: tuple[str, ...],
            as_json: bool) -> None:
    """Enforce PRIMA: processes under a TP label run only code the measurement DB trusts for the label.

    Loads the exec/mmap programs of the chosen backend (tracepoint: a
    violation kills the process before the new image runs; lsm: it is denied),
    fills their maps from the policy and the DB's view of this machine, and
    writes every event (label transitions, first trusted load of each
    measurement per label, every violation, lost events) to the sinks.
    SIGHUP re-reads policy and DB and swaps them in atomically (a bad new
    policy is refused and the old one stays enforced); SIGTERM detaches.

    \b
    Examples:
      # audit first: log what would be killed
      cwlite enforce --policy audit.toml --db /var/lib/cwlite/measure.db --json
      # enforce, events to a JSON-lines file
      cwlite enforce --policy policy.toml --db measure.db --events /var/log/cwlite-events.jsonl
      # enforce and record into the TPM-backed measurement log; Port Authority's tc on eth0
      cwlite enforce --policy policy.toml --db measure.db --mlog --pa-interface eth0
      # after `cwlite db build` re-measured changed files: pick them up
      kill -HUP $(pidof -s cwlite)
    """
    sinks: list[EventSink] = []
    closers = []
    if as_json:
        sinks.append(StreamSink(sys.stdout))
    if events_path is not None:
        js = JsonLinesSink(events_path)
        sinks.append(js)
        closers.append(js.close)
    tpm_ctx = None
    # parsed once, signature checked once: the daemon starts from this policy (SIGHUP re-reads the file)
    policy = load_policy(policy_path, controller_key=controller_key, require_signature=controller_key is not None)
    admit(policy, data_dir)     # never start from a policy older than one this host ran (serial floor)
    if mlog:
        # Only --mlog needs the TPM: tpm2-pytss costs ~0.15 s at import, paid by every `cwlite` start if at the top.
        from controlplane.host import mlog as mlog_mod
        from controlplane.host import tpm as tpm_mod

        pcr = mlog_mod.choose_pcr(policy.pcr)
        tpm_ctx = tpm_mod.open_tpm(data_dir, device=device)
        tpm = tpm_ctx.__enter__()
        log = mlog_mod.MeasurementLog.open(data_dir / "measurements.log", tpm, pcr=pcr)
        sinks.append(log)
        closers.append(log.close)
    daemon = Daemon(policy_path, db_path, Tee(sinks), backend=backend, controller_key=controller_key, policy=policy,
                    data_dir=data_dir, pa_interfaces=pa_interfaces)

    def on_hup(signum, frame) -> None:
        daemon.reload_requested = True

    def on_term(signum, frame) -> None:
        daemon.stop_requested = True

    signal.signal(signal.SIGHUP, on_hup)
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    try:
        daemon.run()
    finally:
        for close in reversed(closers):
            close()
        if tpm_ctx is not None:
            tpm_ctx.__exit__(None, None, None)
