"""BPF C sources (bcc dialect), shipped as package data, and the one loader that compiles them.

`ebpf.loader` is the only place that calls bcc's compiler: every engine loads its
programs through it, so the BTF offsets and compile-error reporting are the same
everywhere. `ebpf.abi` reads the headers' constants without it (no cext, no bcc), so
the policy-side users of those numbers (portauthority.rules, the build controller) stay light.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path


def source_dir() -> Path:
    """The folder holding the BPF sources (package data of `ebpf`)."""
    return Path(str(resources.files("ebpf")))
