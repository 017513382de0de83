"""The numbers of the kernel<->Python contract, read once from the headers that define them.

`ebpf/cwlite.h`, `ebpf/cdi.h` and `ebpf/selfprotect.h` are the one source of every `CWL_*` constant
an event carries (kinds, ops, actions, reasons, drop indexes, sizes). Python
never retypes them (STYLE.md: constants flow one way): `constants()` reads
each object-like `#define CWL_<NAME> <integer>` of those headers, and
`names()` turns a group of them (`CWL_OP_`, `CWL_WHY_`, ...) into the value ->
name table a decoder needs. tests/kernel/test_prima_layout.py compiles the
headers with bcc and checks every value read here against what clang sees.
"""
from __future__ import annotations

import functools
import re
from typing import Mapping

from controlplane.core.errors import KernelError
from ebpf import source_dir

HEADERS = ("cwlite.h", "cdi.h", "selfprotect.h")

# An object-like #define of a CWL_ name (a function-like one has "(" right after the name).
_DEFINE = re.compile(r"^[ \t]*#[ \t]*define[ \t]+(CWL_\w+)(?![\w(])[ \t]*(.*?)[ \t]*(?:/\*.*?\*/[ \t]*|//.*)?$",
                     re.MULTILINE)
_INT = re.compile(r"^(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)[uUlL]*$")


def parse_defines(text: str, source: str) -> dict[str, int]:
    """Every `#define CWL_<NAME> <integer literal>` of a header's text (decimal, 0x hex, 0 octal; U/L suffixes).

    A define with no value (an include guard) is not a constant; a define whose
    value is an expression or another name is refused, naming the line: the
    header must stay readable without a C preprocessor.
    """
    out: dict[str, int] = {}
    for m in _DEFINE.finditer(text):
        name, value = m[1], m[2]
        if not value:
            continue
        lit = _INT.match(value)
        line = text.count("\n", 0, m.start()) + 1
        if lit is None:
            raise KernelError(f"{source}:{line}: {name}: value {value!r} is not an integer literal "
                              "(ebpf.abi reads literals only: write the number)")
        digits = lit[1]
        number = int(digits, 16) if digits[:2] in ("0x", "0X") else int(digits, 8) if digits.startswith("0") else int(digits)
        if name in out and out[name] != number:
            raise KernelError(f"{source}:{line}: {name}: defined twice ({out[name]}, {number})")
        out[name] = number
    return out


@functools.lru_cache(maxsize=1)
def constants() -> Mapping[str, int]:
    """Every CWL_* integer constant of HEADERS, by name (read once per process)."""
    out: dict[str, int] = {}
    for header in HEADERS:
        path = source_dir() / header
        try:
            text = path.read_text()
        except OSError as exc:
            raise KernelError(f"ebpf/{header}: cannot read: {exc.strerror}") from exc
        for name, value in parse_defines(text, f"ebpf/{header}").items():
            if out.get(name, value) != value:
                raise KernelError(f"ebpf/{header}: {name}: {value} differs from another header's {out[name]}")
            out[name] = value
    return out


def value(name: str) -> int:
    """One constant by its C name; a missing one names the headers searched."""
    try:
        return constants()[name]
    except KeyError:
        raise KernelError(f"{name}: not defined in {', '.join('ebpf/' + h for h in HEADERS)}") from None


def names(prefix: str, *, exclude: tuple[str, ...] = ()) -> dict[int, str]:
    """value -> C name (without `prefix`) of every constant starting with `prefix`, except `exclude`d names.

    Two names with one value in a group are refused: a decoder could not tell them apart.
    """
    out: dict[int, str] = {}
    for name, number in constants().items():
        if not name.startswith(prefix) or name in exclude:
            continue
        short = name[len(prefix):]
        if number in out:
            raise KernelError(f"{prefix}*: {prefix}{out[number]} and {name} are both {number}")
        out[number] = short
    return out
