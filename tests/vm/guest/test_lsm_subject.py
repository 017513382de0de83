"""A TP stays what it was measured to be, on the lsm backend (in the VM): issue 21's attacks.

The scenarios are tests/kernel/prima_subject.py's, shared with the tracepoint backend's
host tier (tests/kernel/test_prima_subject.py); here a violation is denied by its hook
(the syscall fails) instead of killing the process.
"""
from __future__ import annotations

import functools

import pytest

from prima.engine import Engine
from tests.kernel import prima_lab
from tests.kernel.prima_lab import Lab
from tests.kernel.prima_subject import SCENARIOS, Outcome, build_kit


@pytest.fixture(scope="module")
def lab(tmp_path_factory, host_root_files):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(prima_lab, "Engine", functools.partial(Engine, backend="lsm"))
        lab = Lab(tmp_path_factory.mktemp("prima-lsm-subject"))
    assert lab.engine.backend == "lsm"
    yield lab
    lab.close()


@pytest.fixture(scope="module")
def kit(lab):
    return build_kit(lab.root)


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_subject(lab, kit, scenario) -> None:
    SCENARIOS[scenario](lab, kit, Outcome("lsm"))
