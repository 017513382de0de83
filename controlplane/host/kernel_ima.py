"""The running kernel's own IMA measurement log, served to verifiers beside cwlite's.

The kernel appends to /sys/kernel/security/ima/binary_runtime_measurements and
extends each entry into its PCR (CONFIG_IMA_MEASURE_PCR_IDX, 10). cwlite does
not write it, and cannot: this module only reads it, parses it with the one
parser (controlplane.core.imalog) and keeps what it parsed, so serving
entries from N costs one read of the kernel's file and a parse of what is new.
The kernel log only grows within a boot, so the parsed prefix stays valid.
"""
from __future__ import annotations

import threading
from pathlib import Path

from controlplane.core.errors import LogError
from controlplane.core.imalog import LogEntry, scan_binary

IMA_BINARY_LOG = Path("/sys/kernel/security/ima/binary_runtime_measurements")
KERNEL_IMA_PCR = 10         # CONFIG_IMA_MEASURE_PCR_IDX: Debian's and every distribution's default


class KernelImaLog:
    """The kernel's IMA log at `path` (binary form), read incrementally. Thread-safe."""

    def __init__(self, path: Path = IMA_BINARY_LOG) -> None:
        self.path = Path(path)
        self._entries: list[LogEntry] = []
        self._parsed_bytes = 0
        self._lock = threading.Lock()

    @classmethod
    def if_present(cls, path: Path = IMA_BINARY_LOG) -> "KernelImaLog | None":
        """The kernel's log when this kernel runs IMA and it can be read here, else None."""
        log = cls(path)
        try:
            log.entries()
        except LogError:
            return None
        return log

    def entries(self) -> list[LogEntry]:
        """Every entry the kernel has logged so far (the file is re-read, only the new bytes are parsed)."""
        with self._lock:
            try:
                data = self.path.read_bytes()
            except OSError as exc:
                raise LogError(f"{self.path}: cannot read the kernel's IMA log: {exc.strerror or exc}") from exc
            if len(data) < self._parsed_bytes:
                raise LogError(f"{self.path}: the kernel's IMA log shrank ({len(data)} < {self._parsed_bytes} "
                               "bytes): it is not the log this service started with")
            scan = scan_binary(data[self._parsed_bytes:], source=str(self.path), start_index=len(self._entries))
            if scan.error is not None and not scan.torn:
                raise scan.error
            # a torn tail cannot happen in the kernel's own file; if it did, it is read again next time
            self._entries.extend(scan.entries)
            self._parsed_bytes += scan.end
            return list(self._entries)

    @property
    def pcr(self) -> int:
        """The PCR the kernel measures into (that of its entries; CONFIG_IMA_MEASURE_PCR_IDX before any)."""
        with self._lock:
            return self._entries[0].pcr if self._entries else KERNEL_IMA_PCR
