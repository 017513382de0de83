"""The VM harness itself: exit status, the only writable place, and cleanup on timeout."""
from __future__ import annotations

import os
import uuid

import pytest

from tests.conftest import requires
from tests.vm.harness import BOOT_TIMEOUT, VmError, kernel_version_key, run_in_vm

pytestmark = [requires(root=True, tool="qemu-system-x86_64"), requires(tool="swtpm")]


def test_newest_kernel_wins_by_version_not_by_text() -> None:
    images = ["/boot/vmlinuz-6.1.0-9-amd64", "/boot/vmlinuz-6.1.0-56-amd64", "/boot/vmlinuz-6.10.0-1-amd64"]
    assert max(images, key=kernel_version_key) == "/boot/vmlinuz-6.10.0-1-amd64"
    assert sorted(images, key=kernel_version_key)[0] == "/boot/vmlinuz-6.1.0-9-amd64"


def test_exit_status_and_only_the_rwdir_reaches_the_host(tmp_path) -> None:
    lost = f"/tmp/cwlite-harness-{uuid.uuid4().hex}"
    lines: list[str] = []
    # the cap is above BOOT_TIMEOUT, so a stalled boot is booted once more (the CI failure of stop 32)
    run = run_in_vm(f"echo kept > {tmp_path}/kept; echo lost > {lost}; echo guest-says-hi; exit 7",
                    results_dir=tmp_path, timeout=2 * BOOT_TIMEOUT, echo=lines.append)
    assert run.rc == 7
    assert (tmp_path / "kept").read_text() == "kept\n"
    assert not os.path.exists(lost)  # landed in the guest's tmpfs overlay
    assert "guest-says-hi" in run.output and any("guest-says-hi" in ln for ln in lines)  # streamed as it came
    assert run.boot_seconds is not None and 0 < run.boot_seconds <= run.seconds


def test_a_timeout_kills_qemu_and_swtpm(tmp_path) -> None:
    with pytest.raises(VmError) as info:
        run_in_vm("sleep 600", results_dir=tmp_path, timeout=5, echo=lambda line: None)
    assert "did not finish within 5 s" in str(info.value)
    assert len(info.value.pids) == 2
    for pid in info.value.pids:  # each led its own process group: nothing of either is left
        with pytest.raises(ProcessLookupError):
            os.killpg(pid, 0)


def test_a_stalled_boot_is_booted_once_more_then_reported_with_its_console_tail(tmp_path) -> None:
    lines: list[str] = []
    with pytest.raises(VmError) as info:  # no boot reaches its command within 1 s under TCG
        run_in_vm("echo never", results_dir=tmp_path, timeout=120, boot_timeout=1, echo=lines.append)
    assert "boot did not reach the guest command within 1 s" in str(info.value)
    assert "console's last lines:" in str(info.value)
    assert sum("booting once more" in ln for ln in lines) == 1  # one retry, not a loop
    for pid in info.value.pids:
        with pytest.raises(ProcessLookupError):
            os.killpg(pid, 0)
