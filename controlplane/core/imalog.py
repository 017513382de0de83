"""The kernel's IMA measurement-log formats (every template), and the one PCR replay.

Pure: no TPM, no files of the running system. The live write-ahead log that
writes `ima-ng` is controlplane.host.mlog; the verifier reads logs here.

On-disk form: exactly the bytes the kernel's
/sys/kernel/security/ima/binary_runtime_measurements holds (little-endian, as
on x86 and as `ima_canonical_fmt` writes on every architecture), one entry
after the other; `to_ascii` gives the lines of ascii_runtime_measurements.
So tools that read IMA logs read cwlite's, and cwlite reads the kernel's own
logs in every template it writes: `ima` (SHA-1 digest, name), `ima-ng`,
`ima-sig` (Debian's default), `ima-ngv2`/`ima-sigv2`, `ima-buf` (critical
data, kernel_version, keys), `ima-modsig`, `evm-sig` and custom formats.

One entry (security/integrity/ima/ima_fs.c `ima_measurements_show`):

    u32 pcr | 20-byte template hash (SHA-1 of the template data) |
    u32 len, template name | u32 len, template data

The template data is the template's fields, each `u32 len, bytes`
(ima_template_lib.c): d-ng = b"sha256:" NUL digest, n-ng = the name and a NUL,
sig/buf/modsig = raw bytes, ... The old `ima` template is the exception:
no data length, its 20-byte digest without length, its name as `u32 strlen,
name` without the NUL; its template hash covers the digest and the name
padded with zeros to 256 bytes (ima_calc_field_array_hash_tfm). The kernel
replaces spaces in names by "_" (ima_write_template_field_data); so does
cwlite (and newlines and NULs, which would break the ASCII form).

PCR banks: the kernel extends each bank with that bank's hash of the same
template data (SHA-1 = the logged template hash, SHA-256, ...); a violation
entry (template hash all zero) extends 0xff bytes in every bank. A policy's
`pcr=` rules spread one log over several PCRs: replay takes the PCR.
"""
from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping, NamedTuple, Sequence

from controlplane.core.errors import LogError
from controlplane.core.events import Event, parse_ima_name
from controlplane.core.quote import PCR_COUNT, SHA256_SIZE

TEMPLATE = "ima-ng"                              # what cwlite writes
# What it reads: the kernel's builtin templates (ima_template.c builtin_templates), name -> field ids.
# A custom format (ima_template_fmt=, or a policy rule's template=) is logged under its format string,
# e.g. "d-ng|n-ng|buf"; template_fields() reads those too.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "ima": ("d", "n"),
    "ima-ng": ("d-ng", "n-ng"),
    "ima-sig": ("d-ng", "n-ng", "sig"),
    "ima-ngv2": ("d-ngv2", "n-ng"),
    "ima-sigv2": ("d-ngv2", "n-ng", "sig"),
    "ima-buf": ("d-ng", "n-ng", "buf"),
    "ima-modsig": ("d-ng", "n-ng", "sig", "d-modsig", "modsig"),
    "evm-sig": ("d-ng", "n-ng", "evmsig", "xattrnames", "xattrlengths", "xattrvalues", "iuid", "igid", "imode"),
}
# How ascii_runtime_measurements shows each field (ima_template.c supported_fields[].field_show,
# ima_template_lib.c ima_show_template_data_ascii).
_DIGEST, _DIGEST_ALGO, _STRING, _HEX, _UINT = "digest", "digest-with-algo", "string", "hex", "uint"
FIELD_FORMATS: dict[str, str] = {
    "d": _DIGEST, "n": _STRING, "d-ng": _DIGEST_ALGO, "d-ngv2": _DIGEST_ALGO, "n-ng": _STRING,
    "sig": _HEX, "buf": _HEX, "d-modsig": _DIGEST_ALGO, "modsig": _HEX, "evmsig": _HEX,
    "iuid": _UINT, "igid": _UINT, "imode": _UINT, "xattrnames": _STRING, "xattrlengths": _HEX, "xattrvalues": _HEX,
}
_UINT_SIZES = {"iuid": 4, "igid": 4, "imode": 2}   # unsigned int uid/gid, u16 i_mode (ima_eventinode*_init)
_ALWAYS_NUL = ("n", "n-ng")                       # names carry their NUL even when empty
IMA_EVENT_NAME_LEN_MAX = 255                      # the 'ima' template hashes its name padded to 255 + 1
SHA1_SIZE = 20
ZERO_PCR = bytes(SHA256_SIZE)
_ZERO_SHA1 = bytes(SHA1_SIZE)
VIOLATION_EXTEND = b"\xff" * SHA256_SIZE
BOOT_AGGREGATE_PCRS = tuple(range(10))        # sha256 bank: PCRs 0-9 (ima_calc_boot_aggregate_tfm)
BANKS = {"sha1": hashlib.sha1, "sha256": hashlib.sha256, "sha384": hashlib.sha384, "sha512": hashlib.sha512}
_NAME_FIXES = str.maketrans({" ": "_", "\n": "_", "\0": "_"})
_U32 = struct.Struct("<I")
_HEAD = struct.Struct("<I20sI")                 # pcr, template hash, template name length
_DIGEST_ALGS = {"sha1": 20, "sha256": 32, "sha384": 48, "sha512": 64, "md5": 16, "sm3": 32,
                "sha224": 28, "rmd160": 20, "streebog256": 32, "streebog512": 64, "wp512": 64}
_new = tuple.__new__


def template_fields(template_name: str) -> tuple[str, ...] | None:
    """The field ids of a template as the log names it (a builtin name or a custom "d-ng|n-ng|..."),
    or None for one the kernel could not have written."""
    fids = TEMPLATES.get(template_name)
    if fids is None and "|" in template_name:
        fids = tuple(template_name.split("|"))
        if not all(f in FIELD_FORMATS for f in fids):
            return None
    return fids


class LogEntry(NamedTuple):
    """One measurement-log entry of any template. A tuple, so a 100,000-entry log costs one small
    object per entry; `fields` are the template's fields as the kernel holds them (strings with their
    NUL), `template_hash` is the SHA-1 the kernel logs, `pcr_digest` what the sha256 bank extended."""

    index: int
    pcr: int
    template_hash: bytes
    template_name: str
    digest: bytes
    name: str
    digest_alg: str
    fields: tuple[bytes, ...]
    pcr_digest: bytes

    @classmethod
    def new(cls, index: int, pcr: int, digest: bytes, name: str, digest_alg: str = "sha256") -> "LogEntry":
        """An ima-ng entry for (digest, name), with the name made kernel-safe and the hashes computed."""
        name = name.translate(_NAME_FIXES)
        fields = (digest_alg.encode() + b":\0" + digest, name.encode("utf-8", "surrogateescape") + b"\0")
        data = _template_data(TEMPLATE, fields)
        return _new(cls, (index, pcr, hashlib.sha1(data).digest(), TEMPLATE, digest, name, digest_alg, fields,
                          hashlib.sha256(data).digest()))

    @classmethod
    def from_fields(cls, index: int, pcr: int, template_name: str, fields: Iterable[bytes], *,
                    violation: bool = False) -> "LogEntry":
        """An entry of any template from its fields as the kernel holds them (checked as a parsed one is)."""
        fields = tuple(fields)
        fids = template_fields(template_name)
        if fids is None or len(fids) != len(fields):
            raise LogError(f"template {template_name!r}: {len(fields)} fields given, it has {len(fids or ())}",
                           entry=index)
        thash = _ZERO_SHA1 if violation else hashlib.sha1(_template_data(template_name, fields)).digest()
        return _entry("fields", index, pcr, thash, template_name, fids, fields)

    @property
    def template_data(self) -> bytes:
        """The bytes the template hash is taken over (ima_calc_field_array_hash_tfm)."""
        return _template_data(self.template_name, self.fields)

    @property
    def field_ids(self) -> tuple[str, ...]:
        """The template's field ids, in the order of `fields`."""
        return template_fields(self.template_name) or ()

    def field(self, field_id: str) -> bytes | None:
        """The data of template field `field_id` ("sig", "buf", "modsig", ...), or None if the template has none."""
        try:
            return self.fields[self.field_ids.index(field_id)]
        except ValueError:
            return None

    @property
    def signature(self) -> bytes:
        """The file's IMA signature (the `sig` field of ima-sig, ima-modsig, ...); empty when none."""
        return self.field("sig") or b""

    @property
    def is_violation(self) -> bool:
        """A kernel IMA violation entry: logged with a zero template hash, extended with 0xff bytes."""
        return self.template_hash == _ZERO_SHA1

    def bank_digest(self, bank: str) -> bytes:
        """What the kernel extends into PCR bank `bank` for this entry (ima_calc_field_array_hash: the
        bank's hash of the template data; a violation extends 0xff bytes in every bank)."""
        if bank == "sha256":
            return self.pcr_digest
        h = _bank(bank)
        if self.is_violation:
            return b"\xff" * h().digest_size
        return self.template_hash if bank == "sha1" else h(self.template_data).digest()

    def binary(self) -> bytes:
        """The entry exactly as binary_runtime_measurements holds it (ima_fs.c ima_measurements_show)."""
        tname = self.template_name.encode()
        head = _HEAD.pack(self.pcr, self.template_hash, len(tname)) + tname
        if self.template_name == "ima":          # no data length; d without length, n without its NUL
            d, n = self.fields
            name = n.split(b"\0", 1)[0]
            return head + d + _U32.pack(len(name)) + name
        data = self.template_data
        return head + _U32.pack(len(data)) + data

    def ascii(self) -> str:
        """The entry's line in ascii_runtime_measurements (without the newline)."""
        return " ".join((f"{self.pcr:2d} {self.template_hash.hex()} {self.template_name}",
                         *map(_field_ascii, self.field_ids, self.fields)))

    def event(self) -> Event | None:
        """The cwlite Event this entry records (None for an entry cwlite did not write)."""
        return parse_ima_name(self.digest, self.name)

    def to_dict(self) -> dict:
        """The entry as JSON values; fields past digest and name as the ASCII form shows them."""
        out = {"index": self.index, "pcr": self.pcr, "template_hash": self.template_hash.hex(),
               "template_name": self.template_name, "digest": f"{self.digest_alg}:{self.digest.hex()}",
               "name": self.name}
        for fid, data in zip(self.field_ids[2:], self.fields[2:]):
            out["signature" if fid == "sig" else fid] = _field_ascii(fid, data)
        return out


def _template_data(template_name: str, fields: tuple[bytes, ...]) -> bytes:
    if template_name == "ima":                   # d, then n padded to IMA_EVENT_NAME_LEN_MAX + 1, no lengths
        d, n = fields
        return d + n + bytes(max(0, IMA_EVENT_NAME_LEN_MAX + 1 - len(n)))
    pack = _U32.pack
    return b"".join([pack(len(f)) + f for f in fields])


def _field_ascii(field_id: str, data: bytes) -> str:
    """One field as ima_show_template_data_ascii prints it (an empty field prints nothing)."""
    if not data:
        return ""
    fmt = FIELD_FORMATS[field_id]
    if fmt is _HEX or fmt is _DIGEST:
        return data.hex()
    if fmt is _DIGEST_ALGO:                      # "<algo>:" NUL digest, or "<type>:<algo>:" NUL digest (d-ngv2)
        sep = data.find(b"\0")
        return data[:sep].decode("ascii", "replace") + data[sep + 1:].hex()
    if fmt is _STRING:
        return data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
    return str(int.from_bytes(data, "little")) if len(data) in (1, 2, 4, 8) else ""


def _field_from_ascii(field_id: str, text: str) -> bytes:
    """The inverse of _field_ascii. Raises ValueError on bad hex or numbers."""
    fmt = FIELD_FORMATS[field_id]
    if fmt is _STRING:
        return text.encode("utf-8", "surrogateescape") + b"\0" if text or field_id in _ALWAYS_NUL else b""
    if not text:
        return b""
    if fmt is _DIGEST_ALGO:
        sep = text.rindex(":") + 1
        return text[:sep].encode("ascii") + b"\0" + bytes.fromhex(text[sep:])
    if fmt is _UINT:
        return int(text).to_bytes(_UINT_SIZES.get(field_id, 4), "little")
    return bytes.fromhex(text)


def _fail(source: str, index: int, what: str) -> LogError:
    return LogError(f"{source}: entry {index}: {what}", entry=index)


def _entry(source: str, n: int, pcr: int, thash: bytes, tname: str, fids: tuple[str, ...],
           fields: tuple[bytes, ...]) -> LogEntry:
    """An entry from parsed fields: digest and name checked, template hash checked, sha256-bank digest computed."""
    if pcr >= PCR_COUNT:
        raise _fail(source, n, f"PCR {pcr} out of range")
    if len(fids) < 2 or FIELD_FORMATS[fids[0]] not in (_DIGEST, _DIGEST_ALGO) or fids[1] not in _ALWAYS_NUL:
        raise _fail(source, n, f"template {tname!r}: no digest and name fields first")
    d, nm = fields[0], fields[1]
    violation = thash == _ZERO_SHA1
    if fids[0] == "d":
        alg, digest = ("md5" if len(d) == 16 else "sha1"), d
    else:
        sep = d.find(b":\0")
        if sep <= 0:
            raise _fail(source, n, f"{fids[0]}: no '<alg>:' prefix")
        alg, digest = d[:sep].rpartition(b":")[2].decode("ascii", "replace"), d[sep + 2:]
    want = _DIGEST_ALGS.get(alg)
    if want is None:
        raise _fail(source, n, f"{fids[0]}: unknown digest algorithm {alg!r}")
    if len(digest) != want and not (violation and digest == _ZERO_SHA1):   # pre-5.x kernels: 20 zero bytes
        raise _fail(source, n, f"{fids[0]}: {alg} digest is {len(digest)} bytes, want {want}")
    if not nm.endswith(b"\0") or b"\0" in nm[:-1]:
        raise _fail(source, n, f"{fids[1]}: not one NUL-terminated string")
    data = _template_data(tname, fields)
    if not violation and hashlib.sha1(data).digest() != thash:
        raise _fail(source, n, "template hash does not match the template data (entry corrupted)")
    return _new(LogEntry, (n, pcr, thash, tname, digest, nm[:-1].decode("utf-8", "surrogateescape"), alg, fields,
                           VIOLATION_EXTEND if violation else hashlib.sha256(data).digest()))


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
    fids = template_fields(tname)
    if fids is None:
        raise _fail(source, n, f"template {tname!r} (reads {', '.join(TEMPLATES)} and custom formats)")
    if pcr >= PCR_COUNT:
        raise _fail(source, n, f"PCR {pcr} out of range")
    if tname == "ima":                           # d: 20 bytes, no length; n: u32 strlen, name without its NUL
        if off + SHA1_SIZE + 4 > size:
            raise _Torn(f"truncated 'ima' digest at offset {off}")
        d = bytes(view[off: off + SHA1_SIZE])
        (nlen,) = _U32.unpack_from(view, off + SHA1_SIZE)
        off += SHA1_SIZE + 4
        if nlen > IMA_EVENT_NAME_LEN_MAX:
            raise _fail(source, n, f"'ima' name length {nlen} (at most {IMA_EVENT_NAME_LEN_MAX})")
        if off + nlen > size:
            raise _Torn(f"truncated 'ima' name ({size - off} of {nlen} bytes)")
        end = off + nlen
        return _entry(source, n, pcr, thash, tname, fids, (d, bytes(view[off:end]) + b"\0")), end
    (dlen,) = _U32.unpack_from(view, off)
    off += 4
    if off + dlen > size:
        raise _Torn(f"truncated template data ({size - off} of {dlen} bytes)")
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
    if len(fields) != len(fids):
        raise _fail(source, n, f"{tname} has {len(fids)} fields, entry has {len(fields)}")
    return _entry(source, n, pcr, thash, tname, fids, tuple(fields)), end


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
    """Entries of a binary_runtime_measurements-format buffer; a malformed entry raises LogError(entry=n).

    Integers are little-endian: what the kernel writes on x86 and, with `ima_canonical_fmt`, on every
    architecture (a big-endian kernel without it writes host order, which this does not read)."""
    scan = scan_binary(data, source=source, start_index=start_index)
    if scan.error is not None:
        raise scan.error
    return scan.entries


def _ascii_row(line: str, n: int, source: str) -> tuple:
    """One line as a LogEntries row: the entry without its index."""
    parts = line.lstrip(" ").split(" ")
    if len(parts) == 5 and parts[2] == TEMPLATE:   # ima-ng, most lines: the general path below, unrolled
        alg, colon, dhex = parts[3].partition(":")
        name = parts[4]
        try:
            pcr, thash, digest = int(parts[0]), bytes.fromhex(parts[1]), bytes.fromhex(dhex)
        except ValueError as exc:
            raise _fail(source, n, f"not a number/hex field ({exc})") from exc
        n_ng = name.encode("utf-8", "surrogateescape") + b"\0"
        if (colon and _DIGEST_ALGS.get(alg) == len(digest) and 0 <= pcr < PCR_COUNT and len(thash) == SHA1_SIZE
                and thash != _ZERO_SHA1 and "\0" not in name):
            d_ng = alg.encode() + b":\0" + digest
            data = _U32.pack(len(d_ng)) + d_ng + _U32.pack(len(n_ng)) + n_ng
            if hashlib.sha1(data).digest() != thash:
                raise _fail(source, n, "template hash does not match the template data (entry corrupted)")
            return pcr, thash, TEMPLATE, digest, name, alg, (d_ng, n_ng), hashlib.sha256(data).digest()
    if len(parts) < 5:
        raise _fail(source, n, f"{len(parts)} fields, a line has at least 5")
    pcr_s, thash_s, tname = parts[0], parts[1], parts[2]
    fids = template_fields(tname)
    if fids is None:
        raise _fail(source, n, f"template {tname!r} (reads {', '.join(TEMPLATES)} and custom formats)")
    if len(parts) - 3 != len(fids):   # names hold no spaces (the kernel writes "_"): one word per field
        raise _fail(source, n, f"{tname} has {len(fids)} fields, the line has {len(parts) - 3}")
    try:
        pcr = int(pcr_s)
        thash = bytes.fromhex(thash_s)
        fields = tuple(map(_field_from_ascii, fids, parts[3:]))
    except (ValueError, OverflowError) as exc:
        raise _fail(source, n, f"not a number/hex field ({exc})") from exc
    if not 0 <= pcr < PCR_COUNT or len(thash) != SHA1_SIZE:
        raise _fail(source, n, f"PCR {pcr_s!r} or template hash {thash_s!r} malformed")
    return tuple(_entry(source, n, pcr, thash, tname, fids, fields)[1:])


class LogEntries(Sequence[LogEntry]):
    """Entries parsed from ASCII, held as rows and made into LogEntry tuples on access.

    Why: a row is a plain tuple of bytes, str and int, which CPython's collector stops tracking,
    and a repeated line is one shared row; a list of 100,000 LogEntry (a tuple subclass, always
    tracked) kept alive through a verifier round made every collection in it rescan them, which
    cost as much as the parse. Indexing, slicing (step 1: absolute indices kept), iteration, len
    and == (with any sequence of entries) behave as for a list.
    """

    __slots__ = ("start", "_rows")

    def __init__(self, rows: list[tuple], start: int = 0) -> None:
        self._rows = rows            # (pcr, template_hash, template_name, digest, name, digest_alg, fields, pcr_digest)
        self.start = start

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, i):
        if isinstance(i, slice):
            first, _, step = i.indices(len(self._rows))
            if step != 1:
                return list(self)[i]
            return LogEntries(self._rows[i], self.start + first)
        row = self._rows[i]
        return _new(LogEntry, (self.start + (i if i >= 0 else len(self._rows) + i), *row))

    def __iter__(self) -> Iterator[LogEntry]:
        new, cls = _new, LogEntry
        for n, row in enumerate(self._rows, self.start):
            yield new(cls, (n, *row))

    def __add__(self, other: Sequence[LogEntry]) -> "LogEntries | list[LogEntry]":
        """Pages of one log, in order, stay rows; anything else becomes a list."""
        if isinstance(other, LogEntries) and other.start == self.start + len(self):
            return LogEntries(self._rows + other._rows, self.start)
        return [*self, *other]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, (LogEntries, list, tuple)):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"LogEntries({len(self)} entries from {self.start})"


def parse_ascii(text: str, *, source: str = "log", start_index: int = 0) -> LogEntries:
    """Entries of ascii_runtime_measurements text, indexed from `start_index`; a malformed line raises
    LogError(entry=its index). A line seen before is parsed and hash-checked once (same bytes, same
    entry): a log repeats the same (digest, name) lines often."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    rows: list[tuple] = []
    append, seen = rows.append, {}
    for n, line in enumerate(lines, start_index):
        row = seen.get(line)
        if row is None:
            row = seen[line] = _ascii_row(line, n, source)
        append(row)
    return LogEntries(rows, start_index)


def parse_any(data: bytes, *, source: str = "log") -> list[LogEntry]:
    """Entries of a log in either form: ASCII lines start with the PCR number ("%2d"), binary ones do not."""
    if data[:1].isdigit() or data[:1] == b" ":
        return parse_ascii(data.decode("utf-8", "surrogateescape"), source=source)
    return parse_binary(data, source=source)


def to_binary(entries: Iterable[LogEntry]) -> bytes:
    return b"".join(e.binary() for e in entries)


def to_ascii(entries: Iterable[LogEntry]) -> str:
    return "".join(e.ascii() + "\n" for e in entries)


def _bank(bank: str):
    try:
        return BANKS[bank]
    except KeyError:
        raise LogError(f"PCR bank {bank!r}: replays {', '.join(BANKS)}") from None


def _zero(bank: str) -> bytes:
    return bytes(_bank(bank)().digest_size)


def extends(entries: Iterable[LogEntry], pcr: int, start: bytes | None = None, *,
            bank: str = "sha256") -> Iterator[bytes]:
    """The value of `pcr` in PCR bank `bank` after each entry, extending from `start` (reset: zero;
    entries for other PCRs leave it unchanged). The one PCR replay: every form below is built on it."""
    value, h = (start if start is not None else _zero(bank)), _bank(bank)
    if bank == "sha256" and isinstance(entries, LogEntries):      # the rows: no LogEntry made per entry
        for row in entries._rows:
            if row[0] == pcr:
                value = h(value + row[7]).digest()
            yield value
    elif bank == "sha256":
        for e in entries:
            if e.pcr == pcr:
                value = h(value + e.pcr_digest).digest()
            yield value
    else:
        for e in entries:
            if e.pcr == pcr:
                value = h(value + e.bank_digest(bank)).digest()
            yield value


def replay(entries: Iterable[LogEntry], pcr: int, start: bytes | None = None, *, bank: str = "sha256") -> bytes:
    """The value `pcr` holds in `bank` after extending every entry for it, from `start` (reset: zero)."""
    value = start if start is not None else _zero(bank)
    for value in extends(entries, pcr, start, bank=bank):
        pass
    return value


def replay_all(entries: Iterable[LogEntry], *, bank: str = "sha256") -> dict[int, bytes]:
    """Every PCR the log extends (a kernel policy's `pcr=` rules spread one log over several), from reset."""
    entries = list(entries)
    return {pcr: replay(entries, pcr, bank=bank) for pcr in sorted({e.pcr for e in entries})}


def replay_prefixes(entries: Iterable[LogEntry], pcr: int, start: bytes | None = None, *,
                    bank: str = "sha256") -> list[bytes]:
    """PCR values after 0, 1, ..., len(entries) entries, from `start`."""
    return [start if start is not None else _zero(bank), *extends(entries, pcr, start, bank=bank)]


def replay_to(entries: Iterable[LogEntry], start_value: bytes, target: bytes, pcr: int, *,
              bank: str = "sha256") -> int | None:
    """How many of `entries` extend `start_value` to `target` (0 if already equal), or None.

    `start_value` is the PCR after the entries already verified (zero for a whole log). A
    verifier does not take the host's word for how many entries a quote covers: the only
    prefix that can reach the quoted value is the one the TPM extended (a hash chain cannot
    match twice).
    """
    if start_value == target:
        return 0
    for n, value in enumerate(extends(entries, pcr, start_value, bank=bank), 1):
        if value == target:
            return n
    return None


def boot_aggregate(pcr_values: Mapping[int, bytes], bank: str = "sha256") -> bytes:
    """The kernel's boot_aggregate from one bank's PCRs (ima_calc_boot_aggregate_tfm): the bank's hash
    over PCRs 0-7, and 8-9 too in every bank but sha1 (the 'ima' template's is the sha1 one)."""
    pcrs = range(8) if bank == "sha1" else BOOT_AGGREGATE_PCRS
    return _bank(bank)(b"".join(pcr_values[i] for i in pcrs)).digest()
