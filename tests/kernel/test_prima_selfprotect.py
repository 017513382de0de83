"""Enforcement protects itself, tracepoint backend on the host kernel (issue 22).

The scenarios are tests/selfprotect_scenarios.py's, shared with the lsm run in
the VM (tests/vm/guest/test_lsm_selfprotect.py); here an attacker is killed at
the syscall's entry and the attack is logged. The engine runs in this test
process, so this process is the daemon.
"""
from __future__ import annotations

import pytest

from tests import selfprotect_scenarios as sc
from tests.conftest import requires
from tests.kernel.prima_lab import Lab

pytestmark = [requires(root=True), requires(tool="gcc"), requires(tool="bpftool")]

EXPECT = sc.expect("tracepoint")


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    lab = Lab(tmp_path_factory.mktemp("selfprotect"))
    yield lab
    lab.close()


def test_deleting_a_tp_label_kills_the_caller_and_is_logged(lab) -> None:
    sc.scenario_delete_tp_label(lab, EXPECT)


def test_forged_trust_entry_is_refused_by_the_freeze(lab) -> None:
    sc.scenario_forge_trust_entry(lab, EXPECT)


def test_replacing_a_generation_slot_kills_the_caller(lab) -> None:
    sc.scenario_replace_generation_slot(lab, EXPECT)


def test_map_dump_still_works(lab) -> None:
    sc.scenario_dump_still_works(lab, EXPECT)


def test_link_detach_kills_the_caller(lab) -> None:
    sc.scenario_link_detach(lab, EXPECT)


@pytest.mark.parametrize("target", ["pid", "group", "thread"])
def test_tp_signal_to_the_daemon_kills_the_sender(lab, target) -> None:
    sc.scenario_tp_signals_daemon(lab, EXPECT, target)


def test_daemon_holds_the_reserved_label(lab) -> None:
    sc.scenario_daemon_label(lab, EXPECT)


def test_reload_makes_fresh_frozen_maps(lab) -> None:
    sc.scenario_reload_makes_fresh_frozen_maps(lab, EXPECT)
