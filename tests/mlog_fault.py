"""Test-only crash point for the measurement log, installed in a test's own child process.

The product has no fault hook: a crash test's child calls `crash_after_durable(n)`
before it opens the log, which wraps `MeasurementLog.make_durable` in that
process only, so the child dies (exit FAULT_EXIT) after the commit that holds
entry n is on disk and before any of it is extended into the (real) TPM.
"""
from __future__ import annotations

import os
from typing import Sequence

from controlplane.core.imalog import LogEntry
from controlplane.host.mlog import MeasurementLog

FAULT_EXIT = 86


def crash_after_durable(index: int) -> None:
    """In this process: exit with FAULT_EXIT once a durable batch reaches entry `index`, before its extend."""
    durable = MeasurementLog.make_durable

    def durable_then_crash(log: MeasurementLog, batch: Sequence[LogEntry]) -> None:
        durable(log, batch)
        if batch[-1].index >= index:
            os._exit(FAULT_EXIT)

    MeasurementLog.make_durable = durable_then_crash
