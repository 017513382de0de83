"""A TP stays what it was measured to be, on the lsm backend (in the VM): issue 21's attacks.

The scenarios are tests/kernel/prima_subject.py's, shared with the tracepoint backend's
host tier (tests/kernel/test_prima_subject.py); here a violation is denied by its hook
(the syscall fails) instead of killing the process.
"""
from __future__ import annotations

import pytest

from tests.kernel.prima_subject import SCENARIOS, Outcome, build_kit


@pytest.fixture(scope="module")
def kit(lsm_lab):
    return build_kit(lsm_lab.root)


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_subject(lsm_lab, kit, scenario) -> None:
    SCENARIOS[scenario](lsm_lab, kit, Outcome("lsm"))
