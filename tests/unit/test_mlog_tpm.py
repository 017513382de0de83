"""The measurement log against a real swtpm: agreement, replay, crash recovery, refusal of bad logs."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from controlplane.core import imalog
from controlplane.core.errors import LogError
from controlplane.core.events import Event, EventKind
from controlplane.core.quote import verify_quote
from controlplane.host import mlog
from controlplane.host.swtpm import Swtpm
from controlplane.host.tpm import Tpm, open_tpm
from tests.mlog_fault import FAULT_EXIT
from tests.conftest import requires
from tests.tpm_fixtures import tpm2_pcrread, swtpm, swtpm_template, tpm, tpm_tools_env  # noqa: F401

pytestmark = requires(tool="swtpm")
REPO = Path(__file__).resolve().parents[2]


def ev(i: int, kind: EventKind = EventKind.TRUSTED_LOAD) -> Event:
    return Event(kind, hashlib.sha256(b"%d" % i).digest(), "tp_build", "exec", f"/usr/bin/tool-{i}")


@requires(tool="tpm2_pcrread")
def test_log_and_pcr_agree_after_10000_entries(tpm, tpm_tools_env, tmp_path: Path) -> None:
    path = tmp_path / "measurements.log"
    with mlog.MeasurementLog.open(path, tpm, pcr=10) as log:
        first = log.entries()
        assert [e.name for e in first] == ["boot_aggregate"]
        assert first[0].digest == imalog.boot_aggregate(tpm.read_pcrs(range(10)))
        for i in range(10_000):
            log.record(ev(i))
        log.flush()
        entries = log.entries()
        assert len(entries) == 10_001 and [e.index for e in entries] == list(range(10_001))
        assert imalog.replay(entries, 10) == tpm.read_pcr(10) == tpm2_pcrread(tpm_tools_env, 10)
    # the file replays to the PCR from either form, and the forms agree byte for byte
    data = path.read_bytes()
    from_bin = imalog.parse_binary(data)
    text = imalog.to_ascii(from_bin)
    from_ascii = imalog.parse_ascii(text)
    assert from_bin == from_ascii == entries
    assert imalog.to_binary(from_ascii) == data
    assert imalog.replay(from_ascii, 10) == imalog.replay(from_bin, 10) == tpm2_pcrread(tpm_tools_env, 10)
    # and it reopens clean: nothing to recover
    with mlog.MeasurementLog.open(path, tpm, pcr=10) as log:
        assert log.recovered == 0 and len(log.entries()) == 10_001


CHILD = textwrap.dedent("""
    import hashlib, sys
    from pathlib import Path
    from controlplane.host import mlog
    from controlplane.core.events import Event, EventKind
    from controlplane.host.tpm import Tpm
    from tests.mlog_fault import crash_after_durable
    if len(sys.argv) > 5:
        crash_after_durable(int(sys.argv[5]))
    tpm = Tpm(sys.argv[1])
    log = mlog.MeasurementLog.open(Path(sys.argv[2]), tpm, pcr=int(sys.argv[3]))
    for i in range(int(sys.argv[4])):
        log.record(Event(EventKind.TRUSTED_LOAD, hashlib.sha256(b"%d" % i).digest(), "tp", "exec", f"/bin/{i}"),
                   wait=(i % 7 == 0))
    log.close()
    print("survived")
""")


def _child(swtpm, path: Path, pcr: int, n: int, crash_after: int | None) -> subprocess.CompletedProcess:
    """The CHILD logging `n` events; with `crash_after`, it dies once entry `crash_after` is durable, unextended."""
    fault = [] if crash_after is None else [str(crash_after)]
    return subprocess.run([sys.executable, "-c", CHILD, swtpm.tcti, str(path), str(pcr), str(n), *fault],
                          cwd=REPO, capture_output=True, text=True, timeout=120)


def test_crash_between_log_and_extend_recovers(swtpm, tpm, tmp_path: Path) -> None:
    path = tmp_path / "m.log"
    proc = _child(swtpm, path, 10, 60, 30)
    assert proc.returncode == FAULT_EXIT, proc.stderr
    assert "survived" not in proc.stdout
    logged = mlog.read_log(path)
    pcr = tpm.read_pcr(10)
    assert len(logged) >= 31                                   # entry 30 reached the disk ...
    prefixes = imalog.replay_prefixes(logged, 10)
    behind = [k for k, v in enumerate(prefixes) if v == pcr]
    assert behind and behind[-1] <= 30 < len(logged)           # ... but not the PCR
    with mlog.MeasurementLog.open(path, tpm, pcr=10) as log:
        assert log.recovered == len(logged) - behind[-1] > 0
        assert tpm.read_pcr(10) == imalog.replay(logged, 10)
        log.record(ev(1000), wait=True)
        assert imalog.replay(log.entries(), 10) == tpm.read_pcr(10)


EMBEDDED_CHILD = textwrap.dedent("""
    import hashlib, sys
    from pathlib import Path
    from controlplane.host import mlog
    from controlplane.core.events import Event, EventKind
    from controlplane.host.tpm import open_tpm
    from tests.mlog_fault import crash_after_durable
    crash_after_durable(10)
    tpm = open_tpm(Path(sys.argv[1]))             # starts the embedded swtpm
    log = mlog.MeasurementLog.open(Path(sys.argv[1]) / "measurements.log", tpm, pcr=10)
    for i in range(30):
        log.record(Event(EventKind.DAEMON_START if i == 0 else EventKind.TRUSTED_LOAD,
                         hashlib.sha256(b"%d" % i).digest(), "tp", "exec", f"/bin/{i}"))
    log.close()
""")


def test_a_crashed_daemon_leaves_the_embedded_tpm_running_and_recovers(tmp_path: Path) -> None:
    """The embedded swtpm outlives its daemon like hardware: the restarted daemon attaches and recovers."""
    proc = subprocess.run([sys.executable, "-c", EMBEDDED_CHILD, str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == FAULT_EXIT, proc.stderr
    orphan = Swtpm.attach(tmp_path / "swtpm")
    assert orphan is not None
    try:
        with open_tpm(tmp_path) as t:
            assert t.swtpm.pid == orphan.pid                      # attached, not restarted: PCRs kept
            logged = mlog.read_log(tmp_path / "measurements.log")
            assert imalog.replay(logged, 10) != t.read_pcr(10)
            with mlog.MeasurementLog.open(tmp_path / "measurements.log", t, pcr=10) as log:
                assert log.recovered > 0 and log.archived is None
                assert imalog.replay(log.entries(), 10) == t.read_pcr(10)
    finally:
        os.kill(orphan.pid, 15)                                   # the swtpm this test's child started


def test_without_the_fault_the_child_finishes(swtpm, tpm, tmp_path: Path) -> None:
    proc = _child(swtpm, tmp_path / "m.log", 10, 20, None)
    assert proc.returncode == 0 and "survived" in proc.stdout, proc.stderr
    assert imalog.replay(mlog.read_log(tmp_path / "m.log"), 10) == tpm.read_pcr(10)


FULL_DISK = textwrap.dedent("""
    import hashlib, resource, signal, sys
    from pathlib import Path
    from controlplane.host import mlog
    from controlplane.core.errors import LogError
    from controlplane.core.events import Event, EventKind
    from controlplane.host.tpm import Tpm
    log = mlog.MeasurementLog.open(Path(sys.argv[1]), Tpm(sys.argv[2]), pcr=10)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    size = Path(sys.argv[1]).stat().st_size
    resource.setrlimit(resource.RLIMIT_FSIZE, (size + 500, size + 500))   # the disk fills mid-entry
    try:
        for i in range(100):
            log.record(Event(EventKind.TRUSTED_LOAD, hashlib.sha256(b"%d" % i).digest(), "tp", "exec", f"/b/{i}"))
    except LogError as exc:
        print("refused", exc.entry)
    log.close()
""")


def test_a_full_disk_never_leaves_half_an_entry(swtpm, tpm, tmp_path: Path) -> None:
    path = tmp_path / "m.log"
    proc = subprocess.run([sys.executable, "-c", FULL_DISK, str(path), swtpm.tcti], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    refused_at = int(proc.stdout.split()[-1])
    entries = mlog.read_log(path)                       # parses: whole entries only
    assert len(entries) == refused_at and 1 < refused_at < 10
    assert imalog.replay(entries, 10) == tpm.read_pcr(10)


def test_a_dead_tpm_stops_recording(swtpm, tpm, tmp_path: Path) -> None:
    with mlog.MeasurementLog.open(tmp_path / "m.log", tpm, pcr=10) as log:
        log.record(ev(1), wait=True)
        swtpm.stop()
        with pytest.raises(LogError) as err:
            log.record(ev(2), wait=True)
        assert err.value.entry == 2 and "commit failed" in str(err.value)
        with pytest.raises(LogError):
            log.record(ev(3))
        assert len(log.entries()) == 2


@pytest.fixture
def filled(tpm, tmp_path: Path) -> tuple[Path, list[imalog.LogEntry]]:
    path = tmp_path / "m.log"
    with mlog.MeasurementLog.open(path, tpm, pcr=10) as log:
        for i in range(20):
            log.record(ev(i))
    return path, mlog.read_log(path)


def _refused(path: Path, tpm) -> LogError:
    with pytest.raises(LogError) as err:
        mlog.MeasurementLog.open(path, tpm, pcr=10)
    assert "\n" not in str(err.value) and str(err.value).startswith(str(path))
    return err.value


def test_truncation_mid_entry_is_refused_naming_the_entry(filled, tpm) -> None:
    path, entries = filled
    end_of_12 = sum(len(e.binary()) for e in entries[:13])
    os.truncate(path, end_of_12 + 9)
    err = _refused(path, tpm)
    assert err.entry == 13 and "entry 13" in str(err)


def test_a_torn_last_append_that_was_never_extended_is_cut_off(filled, tpm) -> None:
    """Power lost mid-append: the partial entry never reached the PCR (write-ahead), so it is dropped."""
    path, entries = filled
    torn = imalog.LogEntry.new(21, 10, hashlib.sha256(b"late").digest(), "cwlite:violation:-:-:/x").binary()[:30]
    with open(path, "ab") as f:
        f.write(torn)
    with mlog.MeasurementLog.open(path, tpm, pcr=10) as log:
        assert log.torn_bytes == 30 and log.recovered == 0 and len(log.entries()) == 21
        log.record(ev(99), wait=True)
    assert imalog.replay(mlog.read_log(path), 10) == tpm.read_pcr(10)


def test_truncation_at_an_entry_boundary_is_refused(filled, tpm) -> None:
    path, entries = filled
    os.truncate(path, sum(len(e.binary()) for e in entries[:15]))
    err = _refused(path, tpm)                 # the PCR holds 21 entries, the log 15
    assert err.entry == 15 and "matches no prefix" in str(err)


def test_a_corrupted_entry_is_refused_naming_it(filled, tpm) -> None:
    path, entries = filled
    data = bytearray(path.read_bytes())
    data[sum(len(e.binary()) for e in entries[:7]) + 60] ^= 0x20
    path.write_bytes(bytes(data))
    err = _refused(path, tpm)
    assert err.entry == 7


def test_a_consistently_rewritten_entry_is_refused(filled, tpm) -> None:
    """Swap entry 9 for a well-formed one (template hash recomputed): only the PCR can tell."""
    path, entries = filled
    forged = list(entries)
    forged[9] = imalog.LogEntry.new(9, 10, hashlib.sha256(b"evil").digest(), entries[9].name)
    path.write_bytes(imalog.to_binary(forged))
    err = _refused(path, tpm)
    assert err.entry == len(entries)


def test_the_pcr_moved_by_someone_else_is_refused(filled, tpm) -> None:
    path, _ = filled
    tpm.extend(10, b"\x07" * 32)
    assert _refused(path, tpm).entry == 21


def test_an_empty_log_over_a_used_pcr_is_refused(tpm, tmp_path: Path) -> None:
    tpm.extend(10, b"\x07" * 32)
    err = _refused(tmp_path / "new.log", tpm)
    assert err.entry == 0 and "not at its reset value" in str(err)


def test_a_log_for_another_pcr_is_refused(filled, tpm) -> None:
    path, _ = filled
    with pytest.raises(LogError) as err:
        mlog.MeasurementLog.open(path, tpm, pcr=11)
    assert err.value.entry == 0 and "PCR 10" in str(err.value)


def test_one_writer_per_log(filled, tpm) -> None:
    path, _ = filled
    with mlog.MeasurementLog.open(path, tpm, pcr=10):
        with pytest.raises(LogError, match="another cwlite process"):
            mlog.MeasurementLog.open(path, tpm, pcr=10)


def test_a_tpm_reset_starts_a_new_log_and_keeps_the_old(swtpm, tmp_path: Path) -> None:
    path = tmp_path / "m.log"
    with Tpm(swtpm.tcti) as t, mlog.MeasurementLog.open(path, t, pcr=10) as log:
        log.record(ev(1))
    swtpm.stop()                                # power cycle: PCRs reset, reset count moves
    again = Swtpm.start(swtpm.data_dir)
    try:
        with Tpm(again.tcti) as t, mlog.MeasurementLog.open(path, t, pcr=10) as log:
            assert log.archived is not None and mlog.read_log(log.archived)[1].name == ev(1).ima_name()
            assert [e.name for e in log.entries()] == ["boot_aggregate"]
            assert imalog.replay(log.entries(), 10) == t.read_pcr(10)
        old = list(tmp_path.glob("m.log.reset*"))
        assert len([p for p in old if not p.name.endswith(".state")]) == 1
    finally:
        again.stop()


def test_quote_and_entries_agree_while_recording(tpm, tmp_path: Path) -> None:
    with mlog.MeasurementLog.open(tmp_path / "m.log", tpm, pcr=10) as log:
        stop = threading.Event()

        def writer() -> None:
            for i in range(3000):              # bounded: the quotes below land while it writes
                if stop.is_set():
                    return
                log.record(ev(i))

        th = threading.Thread(target=writer)
        th.start()
        try:
            for n in range(3):
                q, entries = log.quote(b"nonce%d" % n)
                info = verify_quote(tpm.ak_public(), q, b"nonce%d" % n)
                assert imalog.replay(entries, 10) == info.pcr_values[10]
        finally:
            stop.set()
            th.join()
