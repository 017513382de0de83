"""Port Authority (tests/bypass/portauthority.py) in the VM: the lsm backend's socket hooks refuse with
EPERM or drop, and count what they refused; the tc classifier is the same program as on the host."""
from __future__ import annotations

import pytest

from tests.bypass.backend import LSM
from tests.bypass.portauthority import PaScenarios

pytestmark = list(LSM.marks)


@pytest.mark.usefixtures("host_root_files")  # before the lab measures system files
class TestLsm(PaScenarios):
    backend = LSM
