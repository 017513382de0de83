"""What was measured is what runs, under the `lsm` backend in the VM: the attacks of
tests/kernel/prima_content.py (a trusted file's bytes changed without a stat change), each
refused with EPERM before the load and logged as a `denied` violation naming why."""
from __future__ import annotations

import functools

import pytest

from prima.engine import Engine
from tests.kernel import prima_content as content
from tests.kernel import prima_lab
from tests.kernel.prima_lab import Lab


@pytest.fixture(scope="module")
def lab(tmp_path_factory, host_root_files):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(prima_lab, "Engine", functools.partial(Engine, backend="lsm"))
        lab = Lab(tmp_path_factory.mktemp("prima-lsm-content"))
    assert lab.engine.backend == "lsm"
    yield lab
    lab.close()


@pytest.mark.parametrize("case", [
    content.case_tmpfs_shared_patch_then_exec,
    content.case_tmpfs_shared_patch_then_mmap_exec,
    content.case_ext4_dirty_before_measure_then_patch,
    content.case_writer_holds_the_file_open,
    content.case_rewritten_closed_and_remeasured_is_trusted,
    content.case_overlay_lower_layer_rewrite,
], ids=lambda c: c.__name__.removeprefix("case_"))
def test_content_change_is_denied(lab, tmp_path, case) -> None:
    case(lab, tmp_path, content.LSM)
