"""Fault: the disk fills while the measurement log is appended (issue 28 §5).

The log lives on a small tmpfs the test mounts, beside a filler file that leaves it a few pages.
Entries are recorded until an append fails. Then:
- no half-written entry: the file is exactly the committed entries, and they replay to the PCR;
- nothing is silently dropped: every later record, and every quote, is refused;
- the verifier's round is an "error" (the service answers 503), never trusted;
- the enforcement daemon whose log failed keeps enforcing (an untrusted exec under the TP label is
  still killed), records nothing more, and answers no liveness (fail closed);
- with space again, the log reopens whole and goes on from the next index.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from controlplane.cli.demo import prepare
from controlplane.cli.enforce import Daemon, JsonLinesSink
from controlplane.core import imalog
from controlplane.core.errors import FileError, LogError, VerifyError
from controlplane.core.events import Event, EventKind
from controlplane.core.keys import load_signing_key
from controlplane.host.mlog import MeasurementLog, read_log
from controlplane.verifier import attest as verifier
from controlplane.verifier import registrar
from controlplane.verifier.store import Store
from tests.attest_fixtures import enforcement_started, reference, running_host  # noqa: F401
from tests.conftest import requires
from tests.tpm_fixtures import swtpm, swtpm_template, tpm  # noqa: F401

pytestmark = [requires(root=True), requires(tool="swtpm"), pytest.mark.timeout(600)]
PCR = 10
ROOM = 2 * 4096          # what the filler leaves the log: two tmpfs pages


@contextlib.contextmanager
def small_disk(where: Path, size_kib: int = 64):
    """A tmpfs of `size_kib` at `where`, nearly filled by a filler file (ROOM bytes left); unmounted after."""
    where.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k,mode=0700", "cwlite-fault", str(where)],
                   check=True)
    try:
        st = os.statvfs(where)
        filler = where / "filler"
        filler.write_bytes(b"\0" * (st.f_bavail * st.f_frsize - ROOM))
        yield filler
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def _event(i: int) -> Event:
    return Event(EventKind.TRUSTED_LOAD, os.urandom(32), "tp_build", "exec", f"/usr/lib/gcc/x86_64-linux-gnu/12/cc1-{i:05d}")


def record_until_full(log: MeasurementLog, limit: int = 10_000) -> LogError:
    for i in range(limit):
        try:
            log.record(_event(i), wait=True)
        except LogError as exc:
            return exc
    raise AssertionError(f"{limit} entries fitted in {ROOM} bytes")


def test_a_full_disk_leaves_no_half_entry_and_the_verifier_is_refused(tmp_path, tpm, reference) -> None:
    with small_disk(tmp_path / "small") as filler:
        path = filler.parent / "measurements.log"
        log = MeasurementLog.open(path, tpm, pcr=PCR)
        ref = reference.open()
        with running_host(tmp_path / "host", tpm=tpm, log=log) as host, \
                Store(f"sqlite:///{tmp_path}/attest.db") as store, contextlib.closing(ref.db):
            enforcement_started(host, reference)
            enrolled = registrar.enrol(host.url, "build-vm-1", store)
            key = load_signing_key(tmp_path / "verifier.key", create=True)
            assert verifier.attest(enrolled, ref, key, store=store).verdict == "trusted"

            full = record_until_full(log)
            committed = log.entries()
            assert "cannot append" in str(full) and full.entry == len(committed)
            # no half-written entry: the file holds exactly the committed entries, which replay to the PCR
            assert read_log(path) == committed
            assert path.stat().st_size == sum(len(e.binary()) for e in committed)
            assert imalog.replay(committed, PCR) == tpm.read_pcr(PCR)
            # nothing recorded silently from now on, and no quote vouches for a log that stopped
            with pytest.raises(LogError):
                log.record(_event(-1))
            with pytest.raises(VerifyError) as refused:
                verifier.attest(store.host("build-vm-1"), ref, key, store=store)
            assert "HTTP 503" in str(refused.value)
            assert [v.verdict for v in store.verdicts("build-vm-1")] == ["error", "trusted"]
        log.close()

        filler.unlink()                                  # space again: the log reopens whole
        with MeasurementLog.open(path, tpm, pcr=PCR) as again:
            assert again.entries() == committed and again.recovered == 0 and again.torn_bytes == 0
            assert again.record(_event(0), wait=True).index == len(committed)
            assert imalog.replay(again.entries(), PCR) == tpm.read_pcr(PCR)


@pytest.mark.timeout(900)
def test_the_daemon_keeps_enforcing_when_its_log_fills(tmp_path, tpm) -> None:
    """Enforce mode, tracepoint backend: the log fills with the TP's label transitions; an untrusted
    program under the label is still killed afterwards, and no liveness is answered."""
    layout = prepare(tmp_path / "work", mode="enforce")
    run_tp = lambda cmd: subprocess.run([str(layout.entry), "-c", cmd], capture_output=True, text=True, timeout=60)
    with small_disk(tmp_path / "small") as filler:
        log = MeasurementLog.open(filler.parent / "measurements.log", tpm, pcr=PCR)
        daemon = Daemon(layout.policy, layout.db, log, backend="tracepoint")
        failure: list[BaseException] = []

        def run() -> None:
            try:
                daemon.run()
            except BaseException as exc:  # noqa: BLE001 - asserted below
                failure.append(exc)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        try:
            deadline = time.monotonic() + 300
            while not any(e.name.startswith("cwlite:daemon-start") for e in log.entries()):
                assert thread.is_alive() and time.monotonic() < deadline, failure
                time.sleep(0.2)
            n = 0
            while daemon.sink_error is None:            # each run enters the label: one entry per exec
                assert run_tp("/usr/bin/true").returncode == 0
                n += 1
                assert n < 2000 and thread.is_alive(), failure
                if n % 20 == 0:
                    time.sleep(0.3)                     # let the daemon read the ring buffer
            assert isinstance(daemon.sink_error, LogError) and "cannot append" in str(daemon.sink_error)
            assert thread.is_alive(), "the daemon stopped enforcing when its log filled"
            assert run_tp(f"{layout.untrusted}; echo rc=$?").stdout.strip() == "rc=137"   # still killed
            assert daemon.request_alive(os.urandom(32), timeout=2.0) is False         # no liveness claimed
            assert read_log(log.path) == log.entries()                                # no half entry
        finally:
            daemon.stop_requested = True
            thread.join(60)
            log.close()
    assert not failure, failure
    assert daemon.unrecorded >= 1


def test_a_full_disk_under_the_events_file_is_one_file_error() -> None:
    """The JSON-lines sink on a full device (/dev/full: every write ENOSPC) raises the project's FileError,
    which the daemon turns into "enforcing, unrecorded" (an OSError would have stopped it)."""
    sink = JsonLinesSink(Path("/dev/full"))
    try:
        with pytest.raises(FileError, match="/dev/full: cannot append an event: No space left on device"):
            sink.record(_event(0))
    finally:
        with contextlib.suppress(OSError):
            sink.close()
