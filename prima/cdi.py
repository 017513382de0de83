"""CDI protection for the lsm backend: which inodes are CDIs, and which TP labels may write each.

BPF: ebpf/exec.bpf.c -DCWL_BACKEND_LSM (file_open, inode_create/link/unlink/rename/setattr, ...)
reads the generation slots of cwl_cdi (ebpf/cdi.h; its CWL_OP_CDI_*/CWL_WHY_CDI_* numbers
are decoded by prima.engine through ebpf.abi). The engine asks
`generation_items()` for the generation it is about to make live, so CDIs
change with the policy in the same flip as PRIMA's maps.

A CDI is its path's inode and, for a directory, every inode beneath it when
the engine loads: the kernel side also walks a few ancestors up, so files made
later inside a CDI directory are covered through it. A CDI path that does not
exist is an error (fail closed): nothing would be protected.
"""
from __future__ import annotations

import functools
import os
import re
import subprocess
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping

from controlplane.core.errors import EnforcementError, KernelError
from cext import VMLINUX
from controlplane.core.policy import Policy
from prima.kernelview import KernelIdentity

if TYPE_CHECKING:
    import bcc

CDI_MAX = 65536  # CDI inodes (files and directories) in one generation
WRITER_LABEL_LIMIT = 64  # writers are one bit per label id in a u64


@dataclass(frozen=True)
class CdiInode:
    """One protected inode: kernel dev_t, inode number, writer label bits, the policy's CDI index."""

    dev: int
    ino: int
    writers: int
    index: int
    is_dir: bool
    path: str


def _writers_mask(policy: Policy, index: int, label_ids: Mapping[str, int]) -> int:
    mask = 0
    for name in policy.cdis[index].writers:
        lid = label_ids.get(name)
        if lid is None or not 0 < lid < WRITER_LABEL_LIMIT:
            raise EnforcementError(f"{policy.source}: cdis[{index}].writers: label {name!r} has no kernel id "
                                   f"below {WRITER_LABEL_LIMIT} (ids: {dict(label_ids)})")
        mask |= 1 << lid
    return mask


def cdi_inodes(policy: Policy, label_ids: Mapping[str, int]) -> list[CdiInode]:
    """Every inode the policy's CDIs name now. An inode in two CDIs keeps only the writers both allow."""
    found: dict[tuple[int, int], CdiInode] = {}
    ids = KernelIdentity()
    for index, cdi in enumerate(policy.cdis):
        writers = _writers_mask(policy, index, label_ids)
        try:
            top = os.lstat(cdi.path)
        except OSError as exc:
            raise EnforcementError(f"{policy.source}: cdis[{index}].path: {cdi.path}: {exc.strerror} "
                                   "(a CDI must exist to be protected)") from None
        paths = [(cdi.path, top)]
        if os.path.isdir(cdi.path) and not os.path.islink(cdi.path):
            for root, dirs, files in os.walk(cdi.path, onerror=_walk_error(policy, index)):
                for name in (*dirs, *files):
                    p = os.path.join(root, name)
                    paths.append((p, os.lstat(p)))
        for p, st in paths:
            key = (ids.dev(p, st.st_dev), st.st_ino)      # as the kernel keys it (an overlay's own inode)
            prev = found.get(key)
            found[key] = CdiInode(key[0], key[1], writers & prev.writers if prev else writers,
                                  prev.index if prev else index, os.path.isdir(p) and not os.path.islink(p), p)
    if len(found) > CDI_MAX:
        raise EnforcementError(f"{policy.source}: cdis: {len(found)} inodes, the kernel map holds {CDI_MAX}")
    return list(found.values())


def _walk_error(policy: Policy, index: int):
    def fail(exc: OSError) -> None:
        raise EnforcementError(f"{policy.source}: cdis[{index}].path: {exc.filename}: {exc.strerror}") from None
    return fail


def generation_items(bpf: "bcc.BPF", policy: Policy, label_ids: Mapping[str, int]) -> list[tuple[object, object]]:
    """The (key, value) records of a generation's CDI map, typed as cdi.h's cwl_cdi_t
    (the engine makes, fills and freezes the map, then installs it in the idle cwl_cdi slot)."""
    table = bpf[b"cwl_cdi_t"]
    return [(table.Key(dev=c.dev, ino=c.ino), table.Leaf(writers=c.writers, index=c.index, is_dir=int(c.is_dir)))
            for c in cdi_inodes(policy, label_ids)]


def cflags(btf_path: str = VMLINUX) -> list[str]:
    """-D flags exec.bpf.c's lsm backend needs beyond PRIMA's: the CDI map size and this kernel's inode_setattr arguments."""
    flags = [f"-DCWL_CDI_MAX={CDI_MAX}"]
    if lsm_hook_params("inode_setattr", btf_path)[0] != "dentry":
        flags.append("-DCWL_LSM_SETATTR_IDMAP")  # 6.3+: (idmap, dentry, attr)
    return flags


@functools.lru_cache(maxsize=8)
def lsm_hook_params(hook: str, btf_path: str = VMLINUX) -> tuple[str, ...]:
    """Parameter names of the kernel's BPF LSM attach point `bpf_lsm_<hook>`, from BTF (bpftool)."""
    proc = subprocess.run(["bpftool", "btf", "dump", "file", btf_path, "format", "raw"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise KernelError(f"{btf_path}: bpftool btf dump failed: {proc.stderr.strip() or proc.returncode}")
    func = re.search(rf"^\[\d+\] FUNC 'bpf_lsm_{re.escape(hook)}' type_id=(\d+)", proc.stdout, re.MULTILINE)
    if func is None:
        raise KernelError(f"{btf_path}: no BPF LSM hook bpf_lsm_{hook} in this kernel's BTF")
    proto = re.search(rf"^\[{func[1]}\] FUNC_PROTO .*vlen=(\d+)\n((?:\t.*\n?)*)", proc.stdout, re.MULTILINE)
    if proto is None:
        raise KernelError(f"{btf_path}: bpf_lsm_{hook}: FUNC_PROTO {func[1]} not found")
    return tuple(re.findall(r"^\t'([^']*)'", proto[2], re.MULTILINE))
