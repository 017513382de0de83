"""Compile a BPF source from ebpf/ with bcc, with the kernel's BTF offsets as -D constants.

Every engine loads its programs here (DESIGN.md: offsets come from BTF, never
from kernel headers). What can be cached is: the resolved offsets (one BTF parse
per process and BTF file) and the rendered source. bcc's Python API has no
object cache, so each start still runs clang once per program.
"""
from __future__ import annotations

import functools
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from cext import VMLINUX, Btf
from ebpf import source_dir
from controlplane.core.errors import BpfCompileError, KernelError

if TYPE_CHECKING:  # bcc is imported lazily: tracefs must be mounted before `import bcc`
    import bcc

# The kernel fields cwlite's programs read, as macro stem -> alternative BTF
# paths (kernels rename fields; the first that exists wins). Each becomes
# -DCWL_OFF_<stem>=<byte offset> and -DCWL_SZ_<stem>=<size>.
KERNEL_FIELDS: dict[str, tuple[str, ...]] = {
    "TASK_STRUCT_MM": ("task_struct.mm",),
    "TASK_STRUCT_TGID": ("task_struct.tgid",),
    "TASK_STRUCT_REAL_PARENT": ("task_struct.real_parent",),
    "MM_STRUCT_EXE_FILE": ("mm_struct.exe_file",),
    "FILE_F_INODE": ("file.f_inode",),
    "FILE_F_MODE": ("file.f_mode",),
    "FILE_F_FLAGS": ("file.f_flags",),
    "INODE_I_INO": ("inode.i_ino",),
    "INODE_I_MODE": ("inode.i_mode",),
    "INODE_I_SB": ("inode.i_sb",),
    "INODE_I_CTIME_SEC": ("inode.i_ctime_sec", "inode.__i_ctime.tv_sec", "inode.i_ctime.tv_sec"),
    "INODE_I_CTIME_NSEC": ("inode.i_ctime_nsec", "inode.__i_ctime.tv_nsec", "inode.i_ctime.tv_nsec"),
    "SUPER_BLOCK_S_DEV": ("super_block.s_dev",),
    "LINUX_BINPRM_FILE": ("linux_binprm.file",),
    "LINUX_BINPRM_INTERPRETER": ("linux_binprm.interpreter",),
    # PRIMA (exec_*.bpf.c): fd -> file, VMA -> file, the ELF interpreter's base, script files, names.
    "TASK_STRUCT_FILES": ("task_struct.files",),
    "TASK_STRUCT_SIGNAL": ("task_struct.signal",),
    "SIGNAL_STRUCT_LIVE": ("signal_struct.live",),
    "FILES_STRUCT_FDT": ("files_struct.fdt",),
    "FDTABLE_FD": ("fdtable.fd",),
    "FDTABLE_MAX_FDS": ("fdtable.max_fds",),
    "FDTABLE_OPEN_FDS": ("fdtable.open_fds",),
    "VM_AREA_STRUCT_VM_FILE": ("vm_area_struct.vm_file",),
    "MM_STRUCT_SAVED_AUXV": ("mm_struct.saved_auxv",),
    "LINUX_BINPRM_EXECUTABLE": ("linux_binprm.executable",),
    "LINUX_BINPRM_FILENAME": ("linux_binprm.filename",),
    "FILE_F_PATH_DENTRY": ("file.f_path.dentry",),
    "DENTRY_D_NAME_NAME": ("dentry.d_name.name",),
    # CDI protection (exec.bpf.c lsm backend, cdi.h): dentry -> inode and parent; COW pages of a file VMA.
    "DENTRY_D_INODE": ("dentry.d_inode",),
    "DENTRY_D_PARENT": ("dentry.d_parent",),
    "VM_AREA_STRUCT_ANON_VMA": ("vm_area_struct.anon_vma",),
    "VM_AREA_STRUCT_VM_START": ("vm_area_struct.vm_start",),
    "VM_AREA_STRUCT_VM_END": ("vm_area_struct.vm_end",),
    "MM_STRUCT_MM_MT_MA_ROOT": ("mm_struct.mm_mt.ma_root",),
    "MAPLE_RANGE_64_PIVOT": ("maple_range_64.pivot",),
    "MAPLE_RANGE_64_SLOT": ("maple_range_64.slot",),
    "MAPLE_ARANGE_64_PIVOT": ("maple_arange_64.pivot",),
    "MAPLE_ARANGE_64_SLOT": ("maple_arange_64.slot",),
    "TASK_STRUCT_PERSONALITY": ("task_struct.personality",),
    # Content checks (issue 20): open writers, and the layer inode behind an overlayfs inode.
    "INODE_I_WRITECOUNT": ("inode.i_writecount",),
    "INODE_I_PRIVATE": ("inode.i_private",),
    "SUPER_BLOCK_S_MAGIC": ("super_block.s_magic",),
    # A TP as a subject (exec.bpf.c): tracing state, tracer and tracees, a thread's tid, the
    # 32-bit-syscall flag (x86), a /proc/PID/mem file's process, the stack's flags, syscall registers.
    "TASK_STRUCT_PTRACE": ("task_struct.ptrace",),
    "TASK_STRUCT_PARENT": ("task_struct.parent",),
    "TASK_STRUCT_PID": ("task_struct.pid",),
    "TASK_STRUCT_PTRACED": ("task_struct.ptraced",),
    "TASK_STRUCT_PTRACE_ENTRY": ("task_struct.ptrace_entry",),
    "TASK_STRUCT_PID_LINKS": ("task_struct.pid_links",),
    "TASK_STRUCT_THREAD_INFO_STATUS": ("task_struct.thread_info.status",),
    "PROC_INODE_PID": ("proc_inode.pid",),
    "PROC_INODE_VFS_INODE": ("proc_inode.vfs_inode",),
    "PID_TASKS": ("pid.tasks",),
    "FILE_F_OP": ("file.f_op",),
    "FILE_OPERATIONS_OPEN": ("file_operations.open",),
    "MM_STRUCT_ARG_START": ("mm_struct.arg_start",),
    "VM_AREA_STRUCT_VM_FLAGS": ("vm_area_struct.vm_flags",),
    "PT_REGS_BX": ("pt_regs.bx",),
    "PT_REGS_CX": ("pt_regs.cx",),
    # Self-protection (selfprotect.h): fd -> BPF map/link/program ids, a task's process group, pidfd -> pid.
    "FILE_PRIVATE_DATA": ("file.private_data",),
    "BPF_MAP_ID": ("bpf_map.id",),
    "BPF_PROG_AUX": ("bpf_prog.aux",),
    "BPF_PROG_AUX_ID": ("bpf_prog_aux.id",),
    "BPF_LINK_PROG": ("bpf_link.prog",),
    "SIGNAL_STRUCT_PIDS": ("signal_struct.pids",),
    "PID_NUMBERS_NR": ("pid.numbers.nr",),  # numbers[0].nr: the pid in the initial namespace
    # Port Authority (net.bpf.c lsm): a socket's sock, its protocol, family, local port and addresses;
    # a sendmsg's address; a received packet's IP header.
    "SOCKET_SK": ("socket.sk",),
    "SOCK_SK_PROTOCOL": ("sock.sk_protocol",),
    "SOCK_SKC_FAMILY": ("sock.__sk_common.skc_family",),
    "SOCK_SKC_NUM": ("sock.__sk_common.skc_num",),
    "SOCK_SKC_RCV_SADDR": ("sock.__sk_common.skc_rcv_saddr",),
    "SOCK_SKC_V6_RCV_SADDR": ("sock.__sk_common.skc_v6_rcv_saddr",),
    "MSGHDR_MSG_NAME": ("msghdr.msg_name",),
    "MSGHDR_MSG_NAMELEN": ("msghdr.msg_namelen",),
    "SK_BUFF_HEAD": ("sk_buff.head",),
    "SK_BUFF_NETWORK_HEADER": ("sk_buff.network_header",),
    "SK_BUFF_PROTOCOL": ("sk_buff.protocol",),
}

# Kernel functions whose addresses the programs compare pointers with (-D<macro>=<address>,
# from /proc/kallsyms): the open of /proc/PID/mem files (fs/proc/base.c), which identifies
# them by their file_operations, not by a path. A text symbol: present without KALLSYMS_ALL.
KERNEL_SYMBOLS: dict[str, str] = {"CWL_PROC_MEM_OPEN": "mem_open"}
KALLSYMS = "/proc/kallsyms"

_MAIN_C = "/virtual/main.c"
_VERIFIER_STATS = re.compile(r"^(processed \d+ insns|verification time|stack depth)")
_DIAG = re.compile(r"^(?P<file>[^\s:]+):(?P<line>\d+):(?:(?P<col>\d+):)?\s*(?P<kind>error|fatal error):\s*(?P<msg>.*)$")


@dataclass(frozen=True)
class Program:
    """A BPF source ready for bcc: its text and every -D flag it is compiled with."""

    name: str
    text: str
    cflags: tuple[str, ...]

    def show(self) -> str:
        """The source and flags exactly as bcc receives them (`cwlite debug ebpf`)."""
        flags = " \\\n  ".join(self.cflags)
        return f"/* {self.name}, compiled with:\n  {flags}\n */\n{self.text}"


@functools.lru_cache(maxsize=4)
def offset_cflags(btf_path: str = VMLINUX) -> tuple[str, ...]:
    """-D flags for every KERNEL_FIELDS entry, resolved from `btf_path` (cached per process)."""
    with Btf(btf_path) as btf:
        flags: list[str] = []
        for stem, paths in KERNEL_FIELDS.items():
            field = btf.first_field(*paths)
            flags += [f"-DCWL_OFF_{stem}={field.offset}", f"-DCWL_SZ_{stem}={field.size}"]
    return tuple(flags)


@functools.lru_cache(maxsize=2)
def symbol_cflags(kallsyms: str = KALLSYMS) -> tuple[str, ...]:
    """-D flags for every KERNEL_SYMBOLS entry: its one address in the core kernel (cached per process).

    A symbol the kernel has twice, or an address hidden as 0 (kptr_restrict, no CAP_SYSLOG),
    is an error: a pointer compared with 0 would match every file without that operation.
    """
    wanted = {sym: macro for macro, sym in KERNEL_SYMBOLS.items()}
    found: dict[str, list[int]] = {sym: [] for sym in wanted}
    try:
        with open(kallsyms) as f:
            for line in f:
                parts = line.split()
                if len(parts) == 3 and parts[2] in found and parts[1] in "tT":  # core kernel: no [module]
                    found[parts[2]].append(int(parts[0], 16))
    except OSError as exc:
        raise KernelError(f"{kallsyms}: cannot read kernel symbols ({exc})") from exc
    flags = []
    for sym, addrs in found.items():
        if len(addrs) != 1 or not addrs[0]:
            why = "not found" if not addrs else f"{len(addrs)} definitions" if len(addrs) > 1 else "address hidden (run as root, kptr_restrict <= 1)"
            raise KernelError(f"{kallsyms}: {sym}: {why}")
        flags.append(f"-D{wanted[sym]}={addrs[0]:#x}ULL")
    return tuple(flags)


def render(name: str, cflags: Sequence[str] = (), *, btf_path: str = VMLINUX) -> Program:
    """Read `ebpf/<name>` and gather its flags: BTF offsets, kernel symbols, the include path, then the caller's."""
    path = source_dir() / name
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise KernelError(f"ebpf/{name}: no such BPF source (have: {', '.join(sorted(p.name for p in source_dir().glob('*.bpf.c')))})") from None
    flags = (*offset_cflags(btf_path), *symbol_cflags(), f"-I{source_dir()}", *cflags)
    return Program(name=name, text=text, cflags=flags)


def ensure_tracefs() -> None:
    """Mount tracefs if it is not: bcc finds tracepoints through it, and decides where at import."""
    if os.path.isdir("/sys/kernel/tracing/events") or os.path.isdir("/sys/kernel/debug/tracing/events"):
        return
    proc = subprocess.run(["mount", "-t", "tracefs", "nodev", "/sys/kernel/tracing"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise KernelError(f"/sys/kernel/tracing: cannot mount tracefs: {proc.stderr.strip() or 'mount failed'}")


def compile_program(program: Program) -> "bcc.BPF":
    """Compile and load `program` with bcc; a compile error names the source line.

    BPF: whatever the source declares; bcc auto-attaches TRACEPOINT_PROBE and LSM_PROBE.
    """
    ensure_tracefs()
    import bcc  # here, after tracefs is mounted: bcc decides at import where tracepoints are

    # clang writes diagnostics straight to fd 2; capture them to name the line.
    with tempfile.TemporaryFile(mode="w+b") as err:
        saved = os.dup(2)
        os.dup2(err.fileno(), 2)
        try:
            return bcc.BPF(text=program.text.encode(), cflags=list(program.cflags))
        except Exception as exc:
            os.dup2(saved, 2)
            err.seek(0)
            output = err.read().decode(errors="replace")
            raise _compile_error(program, output, exc) from exc
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def load(name: str, cflags: Sequence[str] = (), *, btf_path: str = VMLINUX) -> "bcc.BPF":
    """render() then compile_program(): the one call engines make."""
    return compile_program(render(name, cflags, btf_path=btf_path))


def _compile_error(program: Program, output: str, exc: Exception) -> BpfCompileError:
    for line in output.splitlines():
        m = _DIAG.match(line.strip())
        if not m:
            continue
        where = f"ebpf/{program.name}" if m["file"] == _MAIN_C else m["file"]
        return BpfCompileError(
            f"{where}:{m['line']}: {m['msg']}",
            source=where,
            line=int(m["line"]),
            compiler_output=output,
        )
    # Not a clang diagnostic: a verifier or attach failure. Keep its last useful line (the
    # verifier's complaint, not the statistics it prints after it).
    lines = [ln for ln in output.splitlines() if ln.strip() and not _VERIFIER_STATS.match(ln)]
    tail = lines[-1] if lines else str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return BpfCompileError(f"ebpf/{program.name}: load failed: {tail}", source=f"ebpf/{program.name}", compiler_output=output)
