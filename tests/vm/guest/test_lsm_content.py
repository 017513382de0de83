"""What was measured is what runs, under the `lsm` backend in the VM: the attacks of
tests/kernel/prima_content.py (a trusted file's bytes changed without a stat change), each
refused with EPERM before the load and logged as a `denied` violation naming why."""
from __future__ import annotations

import pytest

from tests.kernel import prima_content as content
from tests.kernel.prima_lab import Lab


@pytest.fixture(scope="module")
def lab(tmp_path_factory, host_root_files):
    lab = Lab(tmp_path_factory.mktemp("prima-lsm-content"), backend="lsm")
    yield lab
    lab.close()


@pytest.mark.parametrize("case", content.CASES, ids=content.case_id)
def test_content_change_is_denied(lab, tmp_path, case) -> None:
    case(lab, tmp_path, content.LSM)
