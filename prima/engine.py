"""PRIMA's enforcement engine: loads ebpf/exec.bpf.c, fills its maps, turns ring-buffer records into Events.

One engine, one BPF source, two backends selected by a -D flag (`backend`):
"tracepoint" (-DCWL_BACKEND_TP: a violation kills the process) and "lsm"
(-DCWL_BACKEND_LSM: a violation is denied). Both share the maps and the event
layout of cwlite.h / prima_decide.h, so everything here is backend-independent.

Reloads never open an unenforced window: the policy/DB maps have two slots
(arrays of maps); a reload makes fresh maps, fills and freezes them
(BPF_MAP_FREEZE: nobody can write them through bpf(2) any more), installs
them in the idle slots, then flips `cwl_gen` in one map write. The engine
also records itself for the self-protection guards (prima.selfprotect).
Label ids are stable for the engine's lifetime (a label dropped from the policy
keeps its id with an empty trust set: its processes can load nothing more).

The ring-buffer callback only decodes and queues (an exception in a ctypes
callback would only be printed); `poll()` returns Events for the caller to
write to its sink. Lost records are counted in the kernel (cwl_drops) and
reported as LOST_EVENTS, never dropped silently.
"""
from __future__ import annotations

import ctypes
import os
import struct
from collections import deque
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

from cext import bpfmap
from controlplane.core.errors import CwliteError, EnforcementError
from controlplane.core.events import ZERO_DIGEST, Event, EventKind, alive_digest, transition_op
from controlplane.core.policy import Policy
from ebpf import abi, loader
from prima import cdi, selfprotect
from prima.arming import Arming
from prima.kernelview import KernelEntry, KernelIdentity, Watch, kernel_dev
from prima.measure import measure_evidence

if TYPE_CHECKING:  # bcc itself is imported by ebpf.loader when a program is compiled
    import bcc

# One source, two backends (ebpf/exec.bpf.c): the -D flag that selects each.
SOURCE = "exec.bpf.c"
BACKENDS = {"tracepoint": "-DCWL_BACKEND_TP", "lsm": "-DCWL_BACKEND_LSM"}
LABEL_MAPS = {"tracepoint": "cwl_task_labels", "lsm": "cwl_task_label_ls"}  # where exec.bpf.c keeps labels, per backend
LABEL_MAX = 64          # label ids 1..63 (0 = unlabelled)
TASK_MAX = 65536        # labelled processes alive at once
SEEN_MAX = 65536        # (label, measurement) pairs already logged
ENTRY_MAX = 1024        # entrypoint inodes
RINGBUF_PAGES = 256     # 1 MiB of events in flight
MIN_TRUST_MAX = 4096

Measure = Callable[[Watch], Sequence[KernelEntry]]  # measures after watching: see Engine.reload

# The words events carry into the log (and the verifier reads), for the header's names
# whose word is not the name itself; the numbers are cwlite.h's / cdi.h's (ebpf.abi).
WORDS = {
    "CWL_WHY_NONE": "", "CWL_WHY_UNKNOWN": "unmeasured", "CWL_WHY_CHANGED": "changed-after-measurement",
    "CWL_WHY_NOT_IN_SET": "not-in-trust-set", "CWL_WHY_ANON": "anonymous-exec",
    "CWL_WHY_WRITERS": "open-for-write", "CWL_WHY_TAINTED": "write-enabled-since-measurement",
    "CWL_WHY_LAYER": "overlay-layer-untrusted",
    "CWL_WHY_UNDECLARED": "undeclared-transition", "CWL_WHY_OUTSIDER": "outside-label",
    "CWL_WHY_COMPAT": "compat-syscall", "CWL_WHY_UNARMED": "continued-before-armed",
    "CWL_DROP_LABEL": "label-map", "CWL_DROP_SEEN": "seen-map", "CWL_DROP_CDI": "cdi-map",
}


def words(prefix: str, *, exclude: tuple[str, ...] = ()) -> dict[int, str]:
    """value -> event word for a group of header constants: WORDS, else the name (CDI_ dropped) in lower-case-with-dashes."""
    return {value: WORDS.get(prefix + name, name.removeprefix("CDI_").lower().replace("_", "-"))
            for value, name in abi.names(prefix, exclude=exclude).items()}


KINDS = {value: EventKind[name] for value, name in abi.names("CWL_EV_").items()}
OPS = words("CWL_OP_")          # cwlite.h's PRIMA ops and cdi.h's CWL_OP_CDI_* (lsm backend only)
ACTIONS = words("CWL_ACT_")
WHYS = words("CWL_WHY_")
DROPS = words("CWL_DROP_", exclude=("CWL_DROP_MAX",))
DROP_MAX = abi.value("CWL_DROP_MAX")
OP_EXEC = abi.value("CWL_OP_EXEC")
OP_TRACEME = abi.value("CWL_OP_TRACEME")  # a subject event where the current process is the subject
# events about two processes, the current one and `peer` (cwlite.h: a TP as a subject)
SUBJECT_OPS = frozenset(abi.value(f"CWL_OP_{n}") for n in ("PTRACE", "PROC_MEM", "VM_WRITE", "TRACEME", "RELEASE"))
# Self-protection events (selfprotect.h) name what they concern by numbers, not by a file.
SELF_OPS = frozenset({abi.value("CWL_OP_BPF"), abi.value("CWL_OP_SIGNAL")})
# violations whose (dev, ino) is not a file that was run or mapped: nothing to measure
NO_FILE_OPS = frozenset(OPS[v] for v in (*SUBJECT_OPS, *SELF_OPS))


class CwlEvent(ctypes.Structure):
    """Python view of `struct cwl_event` (cwlite.h); tests check it against bcc's own layout."""

    _fields_ = [
        ("kind", ctypes.c_uint32), ("op", ctypes.c_uint32), ("pid", ctypes.c_uint32), ("tgid", ctypes.c_uint32),
        ("label", ctypes.c_uint32), ("prev_label", ctypes.c_uint32), ("action", ctypes.c_uint32),
        ("why", ctypes.c_uint32), ("dev", ctypes.c_uint32), ("peer", ctypes.c_uint32),
        ("ino", ctypes.c_uint64), ("ctime_ns", ctypes.c_uint64), ("ktime_ns", ctypes.c_uint64),
        ("digest", ctypes.c_uint8 * 32), ("comm", ctypes.c_char * 16),
        ("name", ctypes.c_char * abi.value("CWL_NAME_LEN")),
    ]


@dataclass(frozen=True)
class Loaded:
    """What one generation holds: for messages and `cwlite enforce --json` status."""

    generation: int
    labels: dict[str, int]
    trusted_files: int
    entrypoints: dict[str, str]  # path -> label
    missing_entrypoints: tuple[str, ...]


class Engine:
    """BPF: ebpf/exec.bpf.c (-DCWL_BACKEND_TP or -DCWL_BACKEND_LSM) — all hooks; maps cwl_* of prima_decide.h.

    Use as a context manager: `with Engine(policy, entries) as e: e.poll(...)`.
    """

    def __init__(self, policy: Policy, entries: Sequence[KernelEntry] | Measure, *, backend: str = "tracepoint",
                 db_digest: bytes = ZERO_DIGEST, trust_max: int | None = None,
                 ringbuf_pages: int = RINGBUF_PAGES, before_labels: Callable[["Engine"], None] | None = None) -> None:
        """`before_labels(engine)`: called once the programs are loaded and protected, before the first
        generation lets any process enter a label. What must see every labelled process from its first
        instruction attaches there (Port Authority: `label_map_fd`, `label_ids(policy)`); if it raises,
        the engine closes and the error propagates."""
        if backend not in BACKENDS:
            raise EnforcementError(f"backend {backend!r}: not one of {', '.join(BACKENDS)}")
        self.backend = backend
        self.trust_max = trust_max or max(MIN_TRUST_MAX, 2 * (0 if callable(entries) else len(entries)))
        self.ringbuf_pages = ringbuf_pages
        self._label_ids: dict[str, int] = {}
        self._paths: dict[tuple[int, int], str] = {}
        self._queue: deque[Event] = deque()
        self._drops_seen = [0] * DROP_MAX
        self._decode_errors = 0
        self._bpf: "bcc.BPF | None" = None
        self._generation = -1
        self._slots: dict[int, dict[str, tuple[int, int]]] = {0: {}, 1: {}}  # gen -> name -> (fd, map id)
        self._threads: set[int] = set()
        self.arming: Arming | None = None  # tracepoint backend: attaches the per-syscall programs on demand
        self._arming_errors = 0
        self.records = 0  # ring-buffer records read so far (the liveness entry's "events up to")
        self.loaded: Loaded | None = None
        self._start(policy, entries, db_digest, before_labels)

    # ---- lifecycle --------------------------------------------------------------------
    def _start(self, policy: Policy, entries: Sequence[KernelEntry] | Measure, db_digest: bytes,
               before_labels: Callable[["Engine"], None] | None) -> None:
        flags = [f"-DCWL_TRUST_MAX={self.trust_max}", f"-DCWL_ENTRY_MAX={ENTRY_MAX}", f"-DCWL_LABEL_MAX={LABEL_MAX}",
                 f"-DCWL_TASK_MAX={TASK_MAX}", f"-DCWL_SEEN_MAX={SEEN_MAX}", f"-DCWL_RINGBUF_PAGES={self.ringbuf_pages}",
                 f"-DCWL_TAINT_MAX={2 * self.trust_max}"]
        if self.backend == "lsm":  # the lsm backend also guards CDIs (prima.cdi, ebpf/cdi.h)
            flags += cdi.cflags()
            flags += selfprotect.lsm_cflags()
        # bcc attaches at load, before the first generation is written: until
        # then the maps are empty, so no process can enter a label and nothing
        # is labelled yet (labels are only entered through cwl_entry*).
        self._bpf = loader.load(SOURCE, [BACKENDS[self.backend], *flags])
        try:
            self._protect()
            self._bpf[b"cwl_events"].open_ring_buffer(self._on_record)
            if self.backend == "tracepoint":
                self.arming = Arming(self._bpf)
            self._queue.append(Event(EventKind.DAEMON_START, subject=f"prima/{self.backend}",
                                     detail={"backend": self.backend, "pid": os.getpid()}))
            if before_labels is not None:
                before_labels(self)
            self.reload(policy, entries, db_digest)
        except BaseException:
            self.close(record_stop=False)
            raise

    def _protect(self) -> None:
        """Record this engine for the self-protection guards (selfprotect.h): its programs and maps,
        the daemon's reserved label and threads, then the daemon itself (frozen: the guards go live)."""
        bpf = self._require()
        try:
            selfprotect.register(bpf)
            selfprotect.label_daemon(bpf, self.backend)
            self._threads = selfprotect.track_threads(bpf, set())
            selfprotect.record_daemon(bpf)
        except CwliteError as exc:
            raise EnforcementError(f"prima/{self.backend}: cannot set up self-protection: {exc}") from exc

    def _fresh_map(self, name: str, items: Iterable[tuple[object, object]]) -> tuple[int, int]:
        """A new map typed as `<name>_t`, filled with `items` and frozen: (fd, map id)."""
        bpf = self._require()
        fd = bpfmap.create_like(bpf[f"{name}_t".encode()].map_fd, name)
        try:
            for key, value in items:
                bpfmap.update(fd, bytes(key), bytes(value))
            bpfmap.freeze(fd)
            return fd, bpfmap.map_info(fd).id
        except BaseException:
            os.close(fd)
            raise

    def _install(self, gen: int, maps: dict[str, tuple[int, int]]) -> None:
        """Put a generation's fresh maps in their slots (guarded first); the maps they replace are closed."""
        bpf = self._require()
        selfprotect.add_maps(bpf, [mid for _, mid in maps.values()])
        for name, (fd, _) in maps.items():
            bpfmap.update(bpf[name.encode()].map_fd, struct.pack("=I", gen), struct.pack("=I", fd))
        old, self._slots[gen] = self._slots[gen], maps
        self._close_maps(old)

    def _close_maps(self, maps: dict[str, tuple[int, int]]) -> None:
        for fd, _ in maps.values():
            os.close(fd)
        if maps and self._bpf is not None:
            selfprotect.remove_maps(self._bpf, [mid for _, mid in maps.values()])

    def generation_maps(self) -> dict[str, int]:
        """Map ids of the live generation, by name (cwl_trust, cwl_entry, ...): for `bpftool map` and tests."""
        return {name: mid for name, (_, mid) in self._slots.get(self._generation, {}).items()}

    def watch(self, keys: Iterable[tuple[int, int]]) -> None:
        """Start recording write-enabling events (cwl_taint) on these kernel (dev, ino) keys.

        Call it BEFORE their content is read: a file is trusted only if no write
        was enabled on it after its entry's measured_ns, and only watched keys are
        recorded. Existing records are kept (a taint is not undone by watching again).
        """
        table = self._require()[b"cwl_taint"]
        zero = ctypes.c_uint64(0)
        for dev, ino in keys:
            k = table.Key(dev=dev, ino=ino)
            try:
                table[k]
            except KeyError:
                try:
                    table[k] = zero
                except Exception as exc:  # bcc raises a bare Exception when the update fails (map full)
                    raise EnforcementError(f"prima/{self.backend}: taint map full ({2 * self.trust_max} files): "
                                           f"restart `cwlite enforce` to resize") from exc

    def label_ids(self, policy: Policy) -> dict[str, int]:
        """The kernel's id of each of `policy`'s labels, assigned on first sight and kept for the engine's
        life (a label keeps its id across reloads; ids are never reused). reload() assigns them too."""
        for name in sorted(policy.labels):
            if name not in self._label_ids:
                if len(self._label_ids) + 1 >= LABEL_MAX:
                    raise EnforcementError(f"{policy.source}: labels: more than {LABEL_MAX - 1} labels in one engine run")
                self._label_ids[name] = len(self._label_ids) + 1
        return dict(self._label_ids)

    def reload(self, policy: Policy, entries: Sequence[KernelEntry] | Measure, db_digest: bytes = ZERO_DIGEST) -> Loaded:
        """Fill the idle generation from `policy` + `entries`, then flip to it (atomic for the kernel).

        `entries` is best a callable that measures after calling watch() with the
        keys it will read (prima.kernelview.kernel_view takes `watch`): then a
        write enabled while, or after, a file is read is never missed. Plain
        entries are watched here, after they were read.
        """
        bpf = self._require()
        if callable(entries):
            entries = entries(self.watch)
        if len(entries) > self.trust_max:
            raise EnforcementError(f"measurement DB kernel view: {len(entries)} files, the loaded maps hold "
                                   f"{self.trust_max}: restart `cwlite enforce` to resize")
        self.watch((e.dev, e.ino) for e in entries)
        gen = 0 if self._generation != 0 else 1
        self.label_ids(policy)
        sets = policy.trust_sets()

        trust = bpf[b"cwl_trust_t"]
        trust_items = []
        paths: dict[tuple[int, int], str] = {}
        for e in entries:
            k = trust.Key(dev=e.dev, ino=e.ino)
            v = trust.Leaf(ctime_ns=e.ctime_ns, sets_mask=e.sets_mask, measured_ns=e.measured_ns)
            ctypes.memmove(v.digest, e.digest, 32)
            trust_items.append((k, v))
            paths[(e.dev, e.ino)] = e.path

        labels = bpf[b"cwl_labels_t"]
        label_items = []
        for name, lid in self._label_ids.items():
            lb = policy.labels.get(name)
            leaf = labels.Leaf()
            if lb is not None:
                leaf.set_bit = 1 << sets.index(lb.trust_set)
                leaf.on_exec_drop = 1 if lb.on_exec == "drop" else 0
                leaf.anon_exec_violation = 1 if lb.anon_exec == "violation" else 0
                leaf.enter_mask = sum(1 << self._label_ids[t] for t in lb.transitions)
                leaf.compat_allow = 1 if lb.compat_syscalls == "allow" else 0
                leaf.io_uring_allow = 1 if lb.io_uring == "allow" else 0
            label_items.append((labels.Key(lid), leaf))

        entry = bpf[b"cwl_entry_t"]
        entry_items = []
        found: dict[str, str] = {}
        missing: list[str] = []
        ids = KernelIdentity()          # keyed as the kernel view keys the DB's files (an overlay's own inode)
        for name, lb in sorted(policy.labels.items()):
            for ep in lb.entrypoints:
                try:
                    dev, ino = ids.key(ep)
                except OSError:
                    missing.append(ep)
                    continue
                entry_items.append((entry.Key(dev=dev, ino=ino), entry.Leaf(label=self._label_ids[name])))
                found[ep] = name

        conf = bpf[b"cwl_conf_t"]
        items = {"cwl_trust": trust_items, "cwl_entry": entry_items, "cwl_labels": label_items,
                 "cwl_conf": [(conf.Key(0), conf.Leaf(enforce=1 if policy.mode == "enforce" else 0))]}
        if self.backend == "lsm":
            items["cwl_cdi"] = cdi.generation_items(bpf, policy, self._label_ids)
        fresh: dict[str, tuple[int, int]] = {}
        try:
            for name, recs in items.items():
                fresh[name] = self._fresh_map(name, recs)
        except BaseException:
            for fd, _ in fresh.values():
                os.close(fd)
            raise
        self._install(gen, fresh)
        # The flip: one array write; every hook reads cwl_gen first.
        bpf[b"cwl_gen"][bpf[b"cwl_gen"].Key(0)] = ctypes.c_uint32(gen)
        self._generation = gen
        self._paths = paths
        # Records of files the live generation no longer trusts are dropped (the next
        # reload watches its own keys again before reading them).
        taint = bpf[b"cwl_taint"]
        for k in [k for k in taint.keys() if (k.dev, k.ino) not in paths]:
            try:
                del taint[k]
            except KeyError:
                pass
        self._queue.append(Event(EventKind.POLICY_LOAD, policy.digest(), subject=policy.source,
                                 detail={"mode": policy.mode, "generation": gen}))
        self._queue.append(Event(EventKind.DB_LOAD, db_digest, subject=f"{len(entries)} trusted files",
                                 detail={"trusted_files": len(entries), "generation": gen}))
        self.loaded = Loaded(gen, dict(self._label_ids), len(entries), found, tuple(missing))
        return self.loaded

    def close(self, *, record_stop: bool = True) -> None:
        """Detach every program (bcc cleanup); the last records are read first and stay
        queued for drain() (with daemon-stop after them)."""
        if self._bpf is None:
            return
        try:
            if self.arming is not None:
                self.arming.close()
            self._collect(None)
        finally:
            self.arming = None
            for gen in (0, 1):
                maps, self._slots[gen] = self._slots[gen], {}
                for fd, _ in maps.values():
                    os.close(fd)
            self._bpf.cleanup()
            self._bpf = None
        if record_stop:
            self._queue.append(Event(EventKind.DAEMON_STOP, subject=f"prima/{self.backend}"))

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def bpf(self) -> "bcc.BPF":
        """The loaded programs and maps (bcc), for inspection by name as exec.bpf.c declares them
        (tests read cwl_task_labels and the programs' run counts through it). Raises when closed."""
        return self._require()

    @property
    def label_map_fd(self) -> int:
        """The fd of the map holding each process's label (tracepoint: cwl_task_labels, tgid -> label;
        lsm: cwl_task_label_ls, task storage), valid while the engine is open: Port Authority's
        programs read it through a map-in-map slot (portauthority.engine `labels_fd`)."""
        from bcc import libbcc  # loaded already (the engine compiled): bcc decides at import where tracefs is

        fd = libbcc.lib.bpf_table_fd(self._require().module, LABEL_MAPS[self.backend].encode())
        if fd < 0:
            raise EnforcementError(f"ebpf/{SOURCE}: {LABEL_MAPS[self.backend]}: no such map in the loaded programs")
        return fd

    def confine(self, adopt: Callable[[int], int]) -> None:
        """Tracepoint backend: labelled processes run only in TP cgroups, each moved there by
        `adopt(tgid)` (returning the cgroup's id) before its first instruction (prima.arming).
        Port Authority's engine adopts; the lsm backend has no cgroup programs and nothing to do."""
        if self.arming is not None:
            self.arming.confine(adopt)

    def _require(self) -> "bcc.BPF":
        if self._bpf is None:
            raise EnforcementError(f"prima/{self.backend}: engine is closed")
        return self._bpf

    # ---- events -----------------------------------------------------------------------
    def _on_record(self, ctx: object, data: int, size: int) -> None:
        """Ring-buffer callback: decode and queue only."""
        self.records += 1
        try:
            rec = ctypes.cast(data, ctypes.POINTER(CwlEvent)).contents
            self._queue.append(self._event(rec))
        except Exception:  # never raise into ctypes; counted and reported as lost
            self._decode_errors += 1

    def _label_name(self, lid: int) -> str:
        for name, i in self._label_ids.items():
            if i == lid:
                return name
        if lid == selfprotect.daemon_label():
            return selfprotect.DAEMON_LABEL_NAME
        return "" if lid == 0 else f"#{lid}"

    def _event(self, r: CwlEvent) -> Event:
        kind = KINDS[r.kind]
        name = bytes(r.name).split(b"\0", 1)[0].decode(errors="replace")
        op = OPS.get(r.op, str(r.op))
        subject = self._paths.get((r.dev, r.ino)) if kind is EventKind.TRUSTED_LOAD else None
        if r.op in SELF_OPS:
            subject = selfprotect.describe(op, r.dev, r.ino)
        detail = {
            "pid": r.pid, "tgid": r.tgid, "comm": bytes(r.comm).split(b"\0", 1)[0].decode(errors="replace"),
            "action": ACTIONS.get(r.action, str(r.action)), "dev": r.dev, "ino": r.ino, "ctime_ns": r.ctime_ns,
            "ktime_ns": r.ktime_ns, "backend": self.backend, "name": name,
        }
        if r.why:
            detail["why"] = WHYS.get(r.why, str(r.why))
        if kind is EventKind.LABEL_TRANSITION:
            detail["from"] = self._label_name(r.prev_label)
            if r.op == OP_EXEC and r.prev_label:  # a hop between labels: the verifier checks it was declared
                op = transition_op(detail["from"])
        if r.op in SUBJECT_OPS:
            subject = self._subject_text(r, detail)
        return Event(kind, bytes(r.digest), self._label_name(r.label if r.label else r.prev_label),
                     op, subject or name, detail)

    def _subject_text(self, r: CwlEvent, detail: dict) -> str:
        """Both processes of a subject event, actor first, without spaces (a log name keeps them
        as "_"): `tgid=12(gdb,-)->tgid=34(tp_build)`; the current process also names its comm."""
        comm = str(detail["comm"]).replace(" ", "_")
        me = f"tgid={r.tgid}({comm},{self._label_name(r.prev_label if r.op != OP_TRACEME else r.label) or '-'})"
        peer = f"tgid={r.peer}({self._label_name(r.label if r.op != OP_TRACEME else r.prev_label) or '-'})"
        actor, subject = (peer, me) if r.op == OP_TRACEME else (me, peer)
        detail.update(peer=r.peer, actor=actor, subject=subject)
        return f"{actor}->{subject}"

    @staticmethod
    def evidence(event: Event) -> Event:
        """A violation naming a file, with that file's SHA-256 measured now (prima.measure.measure_evidence),
        so an operator sees what ran and can add it to the DB; the kernel records no content hash.

        Called by the enforce loop (never the ring-buffer callback: reading a file is slow). When the file
        cannot be measured (gone, changed, too big) the digest stays zero and detail["sha256"] says "unknown".
        """
        d = event.detail
        if (event.kind is not EventKind.VIOLATION or event.digest != ZERO_DIGEST or not d.get("ino")
                or event.op in NO_FILE_OPS):
            return event
        digest = measure_evidence(int(d.get("tgid") or d.get("pid") or 0), int(d["dev"]), int(d["ino"]),
                                  int(d.get("ctime_ns") or 0), str(d.get("name") or event.subject),
                                  kernel_dev=kernel_dev)
        if digest is None:
            return replace(event, detail={**d, "sha256": "unknown"})
        return replace(event, digest=digest, detail={**d, "sha256": digest.hex()})

    def drops(self) -> dict[str, int]:
        """Kernel-side failure counts since load (summed over CPUs)."""
        table = self._require()[b"cwl_drops"]
        return {DROPS.get(i, str(i)): sum(table[table.Key(i)]) for i in range(DROP_MAX) if i in DROPS}

    def alive(self, nonce: bytes) -> list[Event]:
        """Read the ring buffer, then add the liveness entry for a verifier's `nonce` ("alive, nonce N,
        events up to K"): every queued event, that entry last, for the caller to record in this order."""
        self._collect(None)
        self._queue.append(Event(EventKind.ENGINE_ALIVE, alive_digest(nonce), op="alive",
                                 subject=f"prima/{self.backend} events={self.records}",
                                 detail={"nonce": nonce.hex(), "events": self.records, "backend": self.backend}))
        return self.drain()

    def drain(self) -> list[Event]:
        """Events already queued (after close(): the last records and daemon-stop)."""
        out = list(self._queue)
        self._queue.clear()
        return out

    def poll(self, timeout_ms: int = 100) -> list[Event]:
        """Wait up to `timeout_ms` for records; return every queued Event, LOST_EVENTS included."""
        self._collect(timeout_ms)
        return self.drain()

    def _collect(self, timeout_ms: int | None) -> None:
        """Queue the ring buffer's records (waiting up to `timeout_ms`; None: read what is
        there now, without waiting on epoll) and a LOST_EVENTS event for new kernel drops."""
        bpf = self._require()
        if timeout_ms is None:
            bpf.ring_buffer_consume()
        else:
            bpf.ring_buffer_poll(timeout_ms)
        self._threads = selfprotect.track_threads(bpf, self._threads)
        counts = self.drops()
        lost = {}
        for i, name in DROPS.items():
            new = counts[name] - self._drops_seen[i]
            if new > 0 and name != "seen-map":  # seen-map only repeats events
                lost[name] = new
            self._drops_seen[i] = counts[name]
        if self._decode_errors:
            lost["undecodable"] = self._decode_errors
            self._decode_errors = 0
        if self.arming is not None and self.arming.errors > self._arming_errors:
            # the per-syscall programs could not be attached or detached as needed (fail closed: a
            # process held for arming stays stopped); the proof must say enforcement was impaired
            lost["arming"] = self.arming.errors - self._arming_errors
            self._arming_errors = self.arming.errors
        if lost:
            self._queue.append(Event(EventKind.LOST_EVENTS, subject=", ".join(f"{k}={v}" for k, v in sorted(lost.items())),
                                     detail=lost))
