"""The one exception family of cwlite.

Every error a user can cause or meet is a CwliteError whose message is one line
naming the file, field or device at fault. The CLI prints that line and exits 1
(a traceback only with --debug). Subclasses carry the lower layer's facts as
attributes so tests and callers assert on data, not on text.
"""
from __future__ import annotations

from enum import StrEnum
from pathlib import Path


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


class PolicyReason(StrEnum):
    """Why a policy was refused: callers (the service's 403 vs 422) decide on this, never on message text."""

    READ = "read"              # the file cannot be read
    SYNTAX = "syntax"          # not TOML
    SCHEMA = "schema"          # TOML, but a key is unknown, missing, mistyped or inconsistent
    UNSIGNED = "unsigned"      # a signature is required and there is none (or no key to check it)
    SIGNATURE = "signature"    # the signature is malformed or does not verify
    ROLLBACK = "rollback"      # its serial is lower than the one the host already ran
    EXPIRED = "expired"        # its `expires` is past


class PolicyError(CwliteError):
    """A policy bundle is malformed, unsigned when it must be, or inconsistent; `.source`, `.line`, `.key` say where,
    `.reason` (a PolicyReason) says why."""

    def __init__(self, message: str, *, reason: PolicyReason = PolicyReason.SCHEMA, source: str = "",
                 line: int | None = None, key: str = "") -> None:
        super().__init__(message)
        self.reason = reason
        self.source = source
        self.line = line
        self.key = key


class KeyFileError(CwliteError):
    """An Ed25519 key file is missing, unreadable or not Ed25519; `.path` names it."""

    def __init__(self, message: str, *, path: str = "") -> None:
        super().__init__(message)
        self.path = path


class FileError(CwliteError):
    """A file cwlite must read or write is missing, a directory, or not permitted; `.path` names it."""

    def __init__(self, message: str, *, path: str = "") -> None:
        super().__init__(message)
        self.path = path

    @classmethod
    def from_os(cls, path: str | Path, exc: OSError, doing: str) -> "FileError":
        """`PATH: cannot DOING: STRERROR` from an OSError, naming the file the user gave."""
        return cls(f"{path}: cannot {doing}: {exc.strerror or exc}", path=str(path))


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


class SelinuxError(CwliteError):
    """An SELinux module cannot be rendered, built or loaded, or a policy cannot be analysed; `.source`, `.field` say where."""

    def __init__(self, message: str, *, source: str = "", field: str = "") -> None:
        super().__init__(message)
        self.source = source
        self.field = field


class VmError(CwliteError):
    """A Build VM cannot be created, booted, stopped or vouched for; `.reason` is a stable word, `.vm` its name."""

    def __init__(self, message: str, *, reason: str, vm: str = "") -> None:
        super().__init__(message)
        self.reason = reason
        self.vm = vm
class ConfigError(CwliteError):
    """The CLI's configuration file (/etc/cwlite/cwlite.toml) is unreadable or names an unknown command or option;
    `.source` and `.key` say where."""

    def __init__(self, message: str, *, source: str = "", key: str = "") -> None:
        super().__init__(message)
        self.source = source
        self.key = key
