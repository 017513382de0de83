"""The kernel's `ima-ng` measurement-log format, and the one PCR replay.

Pure: no TPM, no files of the running system. The live write-ahead log that
writes this format is controlplane.host.mlog; the verifier reads it here.

On-disk form: exactly the bytes the kernel's
/sys/kernel/security/ima/binary_runtime_measurements holds (little-endian, as
on x86), one entry after the other; `to_ascii` gives the lines of
ascii_runtime_measurements. So tools that read IMA logs read cwlite's; and
cwlite's parsers read the kernel's own logs, in `ima-ng` and in `ima-sig`
(Debian's default template: ima-ng plus the file's signature field).

One entry (security/integrity/ima/ima_fs.c `ima_measurements_show`):

    u32 pcr | 20-byte template hash (SHA-1 of the template data) |
    u32 len, "ima-ng" | u32 len, template data

and the ima-ng template data (ima_template_lib.c) is two fields, each
`u32 len, bytes`: d-ng = b"sha256:" NUL digest, n-ng = the name and a NUL.
The kernel replaces spaces in names by "_" (ima_write_template_field_data);
so does cwlite (and newlines and NULs, which would break the ASCII form).
In the sha256 PCR bank the kernel extends SHA-256 of the template data; a
violation entry (template hash all zero) extends 32 bytes of 0xff.
"""
from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping

from controlplane.core.errors import LogError
from controlplane.core.events import Event, parse_ima_name
from controlplane.core.quote import PCR_COUNT, SHA256_SIZE

TEMPLATE = "ima-ng"                              # what cwlite writes
TEMPLATE_FIELDS = {"ima-ng": 2, "ima-sig": 3}   # what it reads: ima-sig = ima-ng + a signature (kernel logs)
SHA1_SIZE = 20
ZERO_PCR = bytes(SHA256_SIZE)
VIOLATION_EXTEND = b"\xff" * SHA256_SIZE
BOOT_AGGREGATE_PCRS = tuple(range(10))        # sha256 bank: PCRs 0-9 (ima_calc_boot_aggregate_tfm)
_NAME_FIXES = str.maketrans({" ": "_", "\n": "_", "\0": "_"})
_U32 = struct.Struct("<I")
_HEAD = struct.Struct("<I20sI")                 # pcr, template hash, template name length
_DIGEST_ALGS = {"sha1": 20, "sha256": 32, "sha384": 48, "sha512": 64, "md5": 16, "sm3": 32}


class _computed_once:
    """A lock-free cached property. functools.cached_property takes a lock on each first access
    (Python 3.11), which was a sixth of a 100,000-entry verifier check; entries are immutable, so a
    race only computes the same bytes twice."""

    def __init__(self, func) -> None:
        self.func = func
        self.name = func.__name__
        self.__doc__ = func.__doc__

    def __get__(self, obj, owner=None):
        if obj is None:
            return self
        value = obj.__dict__[self.name] = self.func(obj)
        return value


@dataclass(frozen=True, kw_only=True)
class LogEntry:
    """One ima-ng entry. `template_hash` is the SHA-1 the kernel logs; `pcr_digest` is what the sha256 bank extends."""

    index: int
    pcr: int
    template_hash: bytes
    template_name: str = TEMPLATE
    digest: bytes
    name: str
    digest_alg: str = "sha256"
    signature: bytes = b""          # ima-sig only: the file's IMA signature (often empty)

    @classmethod
    def new(cls, index: int, pcr: int, digest: bytes, name: str, digest_alg: str = "sha256") -> "LogEntry":
        """An entry for (digest, name), with the name made kernel-safe and the template hash computed."""
        name = name.translate(_NAME_FIXES)
        data = _template_data(digest_alg, digest, name)
        entry = cls(index=index, pcr=pcr, template_hash=hashlib.sha1(data).digest(), digest=digest,
                    name=name, digest_alg=digest_alg)
        entry.__dict__["template_data"] = data   # seed the cached_property: built once per entry
        return entry

    @_computed_once
    def template_data(self) -> bytes:
        return _template_data(self.digest_alg, self.digest, self.name, self.template_name, self.signature)

    @property
    def is_violation(self) -> bool:
        """A kernel IMA violation entry: logged with a zero template hash, extended with 0xff bytes."""
        return self.template_hash == bytes(SHA1_SIZE)

    @_computed_once
    def pcr_digest(self) -> bytes:
        """The value extended into the sha256 PCR bank for this entry."""
        return VIOLATION_EXTEND if self.is_violation else hashlib.sha256(self.template_data).digest()

    def binary(self) -> bytes:
        """The entry exactly as binary_runtime_measurements holds it."""
        data = self.template_data
        tname = self.template_name.encode()
        return b"".join((_HEAD.pack(self.pcr, self.template_hash, len(tname)), tname, _U32.pack(len(data)), data))

    def ascii(self) -> str:
        """The entry's line in ascii_runtime_measurements (without the newline)."""
        line = (f"{self.pcr:2d} {self.template_hash.hex()} {self.template_name} "
                f"{self.digest_alg}:{self.digest.hex()} {self.name}")
        return line + f" {self.signature.hex()}" if self.template_name == "ima-sig" else line

    def event(self) -> Event | None:
        """The cwlite Event this entry records (None for an entry cwlite did not write)."""
        return parse_ima_name(self.digest, self.name)

    def to_dict(self) -> dict:
        return {"index": self.index, "pcr": self.pcr, "template_hash": self.template_hash.hex(),
                "template_name": self.template_name, "digest": f"{self.digest_alg}:{self.digest.hex()}",
                "name": self.name, **({"signature": self.signature.hex()} if self.template_name == "ima-sig" else {})}


def _template_data(digest_alg: str, digest: bytes, name: str, template: str = TEMPLATE,
                   signature: bytes = b"") -> bytes:
    d_ng = digest_alg.encode() + b":\0" + digest
    n_ng = name.encode("utf-8", "surrogateescape") + b"\0"
    data = _U32.pack(len(d_ng)) + d_ng + _U32.pack(len(n_ng)) + n_ng
    return data + _U32.pack(len(signature)) + signature if template == "ima-sig" else data


def _fail(source: str, index: int, what: str) -> LogError:
    return LogError(f"{source}: entry {index}: {what}", entry=index)


def _check_digest(source: str, index: int, alg: str, digest: bytes) -> None:
    want = _DIGEST_ALGS.get(alg)
    if want is None:
        raise _fail(source, index, f"d-ng: unknown digest algorithm {alg!r}")
    if len(digest) != want:
        raise _fail(source, index, f"d-ng: {alg} digest is {len(digest)} bytes, want {want}")


def _check_hash(source: str, entry: LogEntry) -> LogEntry:
    if not entry.is_violation and hashlib.sha1(entry.template_data).digest() != entry.template_hash:
        raise _fail(source, entry.index, "template hash does not match the template data (entry corrupted)")
    return entry


class _Torn(Exception):
    """The data ends inside an entry (as after a crash in the middle of an append)."""


def _one_binary(view: memoryview, off: int, n: int, source: str) -> tuple[LogEntry, int]:
    """The entry at `off` and the offset after it. Raises _Torn (data ends early) or LogError (bad data)."""
    size = len(view)
    if size - off < _HEAD.size:
        raise _Torn(f"truncated header ({size - off} of {_HEAD.size} bytes at offset {off})")
    pcr, thash, tname_len = _HEAD.unpack_from(view, off)
    off += _HEAD.size
    if tname_len == 0 or tname_len > 255:
        raise _fail(source, n, f"template name length {tname_len} at offset {off - 4} (corrupted)")
    if off + tname_len + 4 > size:
        raise _Torn(f"truncated template name at offset {off}")
    tname = bytes(view[off: off + tname_len]).decode("ascii", "replace")
    off += tname_len
    (dlen,) = _U32.unpack_from(view, off)
    off += 4
    if tname not in TEMPLATE_FIELDS:
        raise _fail(source, n, f"template {tname!r} (reads {', '.join(TEMPLATE_FIELDS)})")
    if off + dlen > size:
        raise _Torn(f"truncated template data ({size - off} of {dlen} bytes)")
    if pcr >= PCR_COUNT:
        raise _fail(source, n, f"PCR {pcr} out of range")
    fields, foff, end = [], off, off + dlen
    while foff < end:
        if foff + 4 > end:
            raise _fail(source, n, "template data: truncated field length")
        (flen,) = _U32.unpack_from(view, foff)
        foff += 4
        if foff + flen > end:
            raise _fail(source, n, f"template data: field {len(fields)} overruns the entry")
        fields.append(bytes(view[foff: foff + flen]))
        foff += flen
    if len(fields) != TEMPLATE_FIELDS[tname]:
        raise _fail(source, n, f"{tname} has {TEMPLATE_FIELDS[tname]} fields, entry has {len(fields)}")
    d_ng, n_ng = fields[:2]
    sep = d_ng.find(b":\0")
    if sep <= 0:
        raise _fail(source, n, "d-ng: no '<alg>:' prefix")
    if not n_ng.endswith(b"\0") or b"\0" in n_ng[:-1]:
        raise _fail(source, n, "n-ng: not one NUL-terminated string")
    alg, digest = d_ng[:sep].decode("ascii", "replace"), d_ng[sep + 2:]
    _check_digest(source, n, alg, digest)
    entry = _check_hash(source, LogEntry(index=n, pcr=pcr, template_hash=thash, template_name=tname, digest=digest,
                                         name=n_ng[:-1].decode("utf-8", "surrogateescape"), digest_alg=alg,
                                         signature=fields[2] if tname == "ima-sig" else b""))
    return entry, end


@dataclass(frozen=True)
class Scan:
    """A binary log read up to its first bad entry: what a writer needs to recover a torn append."""

    entries: list[LogEntry]
    end: int                    # offset after the last whole, valid entry
    error: LogError | None      # the first bad entry, or None
    torn: bool                  # the data just ends inside an entry (a crash mid-append)


def scan_binary(data: bytes, *, source: str = "log", start_index: int = 0) -> Scan:
    """The entries before the first bad one, where they end, and what stopped the scan."""
    entries: list[LogEntry] = []
    off, n, view = 0, start_index, memoryview(data)
    try:
        while off < len(data):
            entry, off_next = _one_binary(view, off, n, source)
            entries.append(entry)
            off, n = off_next, n + 1
    except _Torn as torn:
        return Scan(entries, off, _fail(source, n, str(torn)), True)
    except LogError as err:
        return Scan(entries, off, err, False)
    return Scan(entries, off, None, False)


def parse_binary(data: bytes, *, source: str = "log", start_index: int = 0) -> list[LogEntry]:
    """Entries of a binary_runtime_measurements-format buffer; a malformed entry raises LogError(entry=n)."""
    scan = scan_binary(data, source=source, start_index=start_index)
    if scan.error is not None:
        raise scan.error
    return scan.entries


def parse_ascii(text: str, *, source: str = "log") -> list[LogEntry]:
    """Entries of ascii_runtime_measurements text; a malformed line raises LogError(entry=n)."""
    entries: list[LogEntry] = []
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    for n, line in enumerate(lines):
        parts = line.lstrip(" ").split(" ", 4)
        if len(parts) != 5:
            raise _fail(source, n, f"{len(parts)} fields, ima-ng lines have 5")
        pcr_s, thash_s, tname, dng, name = parts
        if tname not in TEMPLATE_FIELDS:
            raise _fail(source, n, f"template {tname!r} (reads {', '.join(TEMPLATE_FIELDS)})")
        sig_hex = ""
        if tname == "ima-sig":   # names hold no spaces in kernel logs: the signature is the last word
            name, space, sig_hex = name.rpartition(" ")
            if not space:
                raise _fail(source, n, "ima-sig line without its signature field")
        alg, _, dhex = dng.partition(":")
        try:
            pcr = int(pcr_s)
            thash = bytes.fromhex(thash_s)
            digest = bytes.fromhex(dhex)
            signature = bytes.fromhex(sig_hex)
        except ValueError as exc:
            raise _fail(source, n, f"not a number/hex field ({exc})") from exc
        if not 0 <= pcr < PCR_COUNT or len(thash) != SHA1_SIZE:
            raise _fail(source, n, f"PCR {pcr_s!r} or template hash {thash_s!r} malformed")
        _check_digest(source, n, alg, digest)
        entries.append(_check_hash(source, LogEntry(index=n, pcr=pcr, template_hash=thash, template_name=tname,
                                                    digest=digest, name=name, digest_alg=alg, signature=signature)))
    return entries


def parse_any(data: bytes, *, source: str = "log") -> list[LogEntry]:
    """Entries of a log in either form: ASCII lines start with the PCR number ("%2d"), binary ones do not."""
    if data[:1].isdigit() or data[:1] == b" ":
        return parse_ascii(data.decode("utf-8", "surrogateescape"), source=source)
    return parse_binary(data, source=source)


def to_binary(entries: Iterable[LogEntry]) -> bytes:
    return b"".join(e.binary() for e in entries)


def to_ascii(entries: Iterable[LogEntry]) -> str:
    return "".join(e.ascii() + "\n" for e in entries)


def extends(entries: Iterable[LogEntry], pcr: int, start: bytes = ZERO_PCR) -> Iterator[bytes]:
    """The sha256-bank value of `pcr` after each entry, extending from `start` (entries for other
    PCRs leave it unchanged). The one PCR replay: every form below is built on it."""
    value, sha = start, hashlib.sha256
    for e in entries:
        if e.pcr == pcr:
            value = sha(value + e.pcr_digest).digest()
        yield value


def replay(entries: Iterable[LogEntry], pcr: int, start: bytes = ZERO_PCR) -> bytes:
    """The value `pcr` holds after extending every entry for it, from `start` (reset: zero)."""
    value = start
    for value in extends(entries, pcr, start):
        pass
    return value


def replay_prefixes(entries: Iterable[LogEntry], pcr: int, start: bytes = ZERO_PCR) -> list[bytes]:
    """PCR values after 0, 1, ..., len(entries) entries, from `start`."""
    return [start, *extends(entries, pcr, start)]


def replay_to(entries: Iterable[LogEntry], start_value: bytes, target: bytes, pcr: int) -> int | None:
    """How many of `entries` extend `start_value` to `target` (0 if already equal), or None.

    `start_value` is the PCR after the entries already verified (zero for a whole log). A
    verifier does not take the host's word for how many entries a quote covers: the only
    prefix that can reach the quoted value is the one the TPM extended (a hash chain cannot
    match twice).
    """
    if start_value == target:
        return 0
    for n, value in enumerate(extends(entries, pcr, start_value), 1):
        if value == target:
            return n
    return None


def boot_aggregate(pcr_values: Mapping[int, bytes]) -> bytes:
    """The kernel's sha256 boot_aggregate: SHA-256 over PCRs 0-9 of the sha256 bank, in order."""
    return hashlib.sha256(b"".join(pcr_values[i] for i in BOOT_AGGREGATE_PCRS)).digest()
