"""cext: C the control plane needs, built by `pip install .` with cffi.

`cext.btf` resolves kernel struct field offsets from BTF, so BPF programs never
depend on kernel-header struct layouts (DESIGN.md, "Kernel mediation").
"""
from __future__ import annotations

from controlplane.core.errors import CwliteError

try:
    from cext import _btf  # noqa: F401  (the compiled module)
except ImportError as exc:  # pragma: no cover - only on a broken install
    raise CwliteError("cext not built: run `pip install .` (or `make setup`) in the cwlite checkout") from exc

from cext.btf import Btf, Field, VMLINUX

__all__ = ["Btf", "Field", "VMLINUX"]
