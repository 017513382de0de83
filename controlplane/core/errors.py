"""The one exception family of cwlite.

Every error a user can cause or meet is a CwliteError whose message is one line
naming the file, field or device at fault. The CLI prints that line and exits 1
(a traceback only with --debug). Subclasses carry the lower layer's facts as
attributes so tests and callers assert on data, not on text.
"""
from __future__ import annotations


class CwliteError(Exception):
    """Base of every cwlite error: `str(exc)` is one actionable line."""


class KernelError(CwliteError):
    """The running kernel cannot do what was asked (BTF, BPF load/attach)."""


class BtfError(KernelError):
    """A BTF file or a struct field path could not be resolved."""


class BpfCompileError(KernelError):
    """bcc could not compile a BPF source; `.source`, `.line` and `.compiler_output` say where."""

    def __init__(self, message: str, *, source: str = "", line: int | None = None, compiler_output: str = "") -> None:
        super().__init__(message)
        self.source = source
        self.line = line
        self.compiler_output = compiler_output


class PolicyError(CwliteError):
    """A policy bundle is malformed, unsigned when it must be, or inconsistent; `.source`, `.line`, `.key` say where."""

    def __init__(self, message: str, *, source: str = "", line: int | None = None, key: str = "") -> None:
        super().__init__(message)
        self.source = source
        self.line = line
        self.key = key


class MeasureDBError(CwliteError):
    """The measurement DB, or a source of trust feeding it, is unusable."""


class TpmError(CwliteError):
    """A TPM command failed; `.rc` is the TPM/TSS return code, `.detail` the decoded text."""

    def __init__(self, message: str, *, rc: int | None = None, detail: str = "", handle: str = "") -> None:
        super().__init__(message)
        self.rc = rc
        self.detail = detail
        self.handle = handle


class LogError(CwliteError):
    """The measurement log is malformed or disagrees with the PCR; `.entry` is the entry number."""

    def __init__(self, message: str, *, entry: int | None = None) -> None:
        super().__init__(message)
        self.entry = entry


class EnforcementError(CwliteError):
    """The enforcement engine cannot start or keep enforcing (fail closed)."""


class VerifyError(CwliteError):
    """Attestation or proof checking failed; `.reason` is a stable machine-readable word."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class StoreError(CwliteError):
    """The attestation store (SQLAlchemy URL) cannot be opened or refused a change."""
