"""A TP stays what it was measured to be, on the tracepoint backend (host kernel): issue 21's attacks.

The scenarios are tests/kernel/prima_subject.py's, shared with the lsm backend's VM tier
(tests/vm/guest/test_lsm_subject.py); here a violation kills the offending process.
"""
from __future__ import annotations

import pytest

from tests.conftest import requires
from tests.kernel.prima_lab import Lab
from tests.kernel.prima_subject import SCENARIOS, Outcome, build_kit

pytestmark = [requires(root=True), requires(tool="gcc")]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    lab = Lab(tmp_path_factory.mktemp("prima-subject"))
    yield lab
    lab.close()


@pytest.fixture(scope="module")
def kit(lab):
    return build_kit(lab.root)


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_subject(lab, kit, scenario) -> None:
    SCENARIOS[scenario](lab, kit, Outcome("tracepoint"))
