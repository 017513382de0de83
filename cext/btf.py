"""Kernel struct field offsets from BTF, through libbpf's BTF API (cext._btf).

A path is `struct.member[.member...]`: the first word names a struct or union,
each later one a member, found through anonymous structs/unions, through
embedded (not pointed-to) structs, and through an array of structs to its
first element (`pid.numbers.nr` is `pid.numbers[0].nr`). Kernels rename fields (6.1's
`inode.i_ctime` is `inode.i_ctime_sec` on 6.11+), so `first_field` takes
alternatives and says which one this kernel has.
"""
from __future__ import annotations

import errno
import os
from dataclasses import dataclass

from cext._btf import ffi, lib
from controlplane.core.errors import BtfError

VMLINUX = "/sys/kernel/btf/vmlinux"


@dataclass(frozen=True)
class Field:
    """Where one field sits: byte offset from the start of the outer struct, and size."""

    path: str
    offset: int
    size: int


class Btf:
    """A parsed BTF file. Use as a context manager; `close()` frees libbpf's copy."""

    def __init__(self, path: str = VMLINUX) -> None:
        self.path = path
        if not os.path.exists(path):
            raise BtfError(f"{path}: no such BTF file (kernel built without CONFIG_DEBUG_INFO_BTF?)")
        ffi.errno = 0
        handle = lib.btf__parse(path.encode(), ffi.NULL)
        if handle == ffi.NULL:
            code = ffi.errno or errno.EINVAL
            raise BtfError(f"{path}: not a BTF file libbpf can parse ({os.strerror(code)})")
        self._btf = handle
        self._cache: dict[str, Field] = {}

    def __enter__(self) -> "Btf":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._btf is not None:
            lib.btf__free(self._btf)
            self._btf = None

    def _handle(self):
        if self._btf is None:
            raise BtfError(f"{self.path}: BTF already closed")
        return self._btf

    def field(self, path: str) -> Field:
        """Resolve `struct.member[.member...]` to its byte offset and size."""
        if path in self._cache:
            return self._cache[path]
        btf = self._handle()
        parts = path.split(".")
        if len(parts) < 2 or not all(parts):
            raise BtfError(f"{path!r}: field path must be struct.member[.member...]")
        type_id = lib.cwl_find_composite(btf, parts[0].encode())
        if type_id < 0:
            raise BtfError(f"{self.path}: {path}: no struct or union named {parts[0]!r}")
        bit_off = ffi.new("uint32_t *")
        mtype = ffi.new("uint32_t *")
        bitfield = ffi.new("uint32_t *")
        total_bits = 0
        for depth, name in enumerate(parts[1:], start=1):
            if depth > 1:
                inner = lib.cwl_composite_of(btf, mtype[0])
                if inner < 0:
                    raise BtfError(
                        f"{self.path}: {path}: {'.'.join(parts[:depth])} is not an embedded struct or union"
                    )
                type_id = inner
            if lib.cwl_find_member(btf, type_id, name.encode(), bit_off, mtype, bitfield) != 0:
                raise BtfError(f"{self.path}: {path}: {'.'.join(parts[:depth])} has no member {name!r}")
            total_bits += bit_off[0]
        if bitfield[0] or total_bits % 8:
            raise BtfError(f"{self.path}: {path}: is a bitfield; BPF programs here read whole fields only")
        size = lib.btf__resolve_size(btf, mtype[0])
        if size < 0:
            raise BtfError(f"{self.path}: {path}: size cannot be resolved")
        result = Field(path=path, offset=total_bits // 8, size=int(size))
        self._cache[path] = result
        return result

    def first_field(self, *paths: str) -> Field:
        """The first of several alternative paths this kernel has (fields get renamed)."""
        errors = []
        for path in paths:
            try:
                return self.field(path)
            except BtfError as exc:
                errors.append(str(exc))
        raise BtfError(f"{self.path}: none of {', '.join(paths)} exists: " + "; ".join(errors))
