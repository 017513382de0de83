"""The host's control socket: `cwlite vm up` records VM entries into the log `cwlite serve` holds (real swtpm)."""
from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest

from controlplane.core.errors import LogError
from controlplane.core.events import Event, EventKind
from controlplane.core.imalog import replay
from controlplane.core.vmrecord import PARTS, VmRecord
from controlplane.host import control
from controlplane.host.mlog import MeasurementLog
from tests.conftest import requires
from tests.tpm_fixtures import swtpm, swtpm_template, tpm  # noqa: F401

pytestmark = requires(tool="swtpm")
PCR = 16
RECORD = VmRecord("vm1", {p: hashlib.sha256(p.encode()).digest() for p in PARTS}, b"\x01" * 32, b"\x02" * 32, 11, 1)


def test_vm_entries_go_into_the_served_log_and_its_pcr(tpm, tmp_path: Path) -> None:
    with MeasurementLog.open(tmp_path / "m.log", tpm, pcr=PCR) as log, \
            control.ControlServer(control.socket_path(tmp_path), log):
        assert stat.S_IMODE(os.stat(control.socket_path(tmp_path)).st_mode) == 0o600
        with control.client(tmp_path) as client:
            answer = client.record_all(RECORD.events("create"))
        assert [a["index"] for a in answer] == [1, 2, 3, 4, 5]          # after the boot aggregate
        entries = log.entries(0)
        assert [e.name for e in entries[1:]] == [e.ima_name() for e in RECORD.events("create")]
        assert entries[-1].digest == RECORD.digest()
        assert replay(entries, PCR) == tpm.read_pcr(PCR)               # answered only once in the PCR


def test_other_kinds_are_refused_and_nothing_is_recorded(tpm, tmp_path: Path) -> None:
    with MeasurementLog.open(tmp_path / "m.log", tpm, pcr=PCR) as log, \
            control.ControlServer(control.socket_path(tmp_path), log):
        with control.client(tmp_path) as client, pytest.raises(LogError, match="daemon-start entries are not accepted"):
            client.record_all([Event(EventKind.DAEMON_START, subject="forged")])
        assert len(log.entries(0)) == 1


def test_without_a_serving_process_vm_up_is_told_to_start_one(tmp_path: Path) -> None:
    with pytest.raises(LogError, match="no `cwlite serve` holds this host's measurement log"):
        with control.client(tmp_path):
            pass


def test_a_data_dir_too_long_for_a_unix_socket_still_gets_one(tpm, tmp_path: Path) -> None:
    data = tmp_path / ("d" * 120)
    data.mkdir()
    path = control.socket_path(data)
    assert not path.is_relative_to(data) and len(str(path)) < 108
    with MeasurementLog.open(data / "m.log", tpm, pcr=PCR) as log, control.ControlServer(path, log):
        with control.client(data) as client:
            assert [a["index"] for a in client.record_all(RECORD.events("restart"))] == [1, 2, 3, 4, 5]
    assert not path.exists()
