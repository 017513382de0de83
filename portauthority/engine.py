"""Port Authority's engine: loads ebpf/net.bpf.c beside PRIMA, fills its rule set, logs what it refused.

One source, the backend chosen by a -D flag as PRIMA's is (prima.engine), and PRIMA's backend:
BPF: ebpf/net.bpf.c -DCWL_BACKEND_TP (tracepoint) — cgroup sock_create, bind4/6, connect4/6,
sendmsg4/6 and cgroup_skb ingress on each TP cgroup (below), each attached through a
BPF link (the attachment dies with the daemon, as bcc's tracepoints do), and the syscall
tracepoints bcc attaches itself (socket, execve/execveat, recvmsg, pidfd_getfd: a packet socket
or a socket made outside the label reaching a TP); -DCWL_BACKEND_LSM (lsm) — LSM
socket_create, socket_post_create, socket_bind, socket_listen, socket_accept, socket_connect,
socket_sendmsg, socket_sock_rcv_skb and file_receive, attached by bcc at load. On both, a tc clsact ingress classifier on
each of `interfaces`, attached with pyroute2 (it reads no label, so it is the same program
under both backends) and checked every interval (a removed classifier or one that no longer
runs first is a violation entry; a removed one is attached again).

Labels are PRIMA's: the engine is made beside a running `prima.engine.Engine` of the same
backend, whose label map it is handed by fd (`labels_fd`: `prima.label_map_fd`, tracepoint
`cwl_task_labels`, lsm the task storage `cwl_task_label_ls`; the programs read it through the
map-in-map slot cwl_pa_label_src, so engines opened and closed in one process never mix) and
whose label ids (`label_ids`) the rule set's masks use. The caller,
which holds both engines (portauthority and prima are sibling layers), adds this one's
programs and maps to PRIMA's self-protection guard: `prima.selfprotect.register(pa.bpf, into=prima.bpf)`.

TP cgroups (tracepoint backend, issue 24): the cgroup programs run on every socket made in the
cgroup they are attached to, for the socket's life, so they are attached only where labelled
processes live: a child cgroup `cwlite-tp` of the cgroup a TP was started in (its unit's limits,
which are hierarchical, still apply; systemd still stops it with its unit), made and attached the
first time. The caller hands `adopt` to PRIMA (`prima.confine(pa.adopt)`): a label entry outside a
TP cgroup is held before its first instruction until `adopt` moved the process in. Processes in
no TP cgroup, unlabelled ones, run no cgroup program at all. A labelled process that makes a
socket outside a TP cgroup anyway (root moved it out, or it forked a child into another cgroup
with clone3's CLONE_INTO_CGROUP) is killed at socket(2)'s entry and counted (op `socket`, why
`cgroup`): its sockets are always made where the programs run.

Refusals are counted in the kernel per (label, rule, op, port, reason); `poll()`
turns each interval's new counts into one `pa-refused` entry per key, so a flood of
100,000 packets is a handful of entries whose counts add up. A listener a rule
allowed becomes one `pa-listener` entry per (label, protocol, port), with the
SHA-256 of the program that took the port. Failed counts or events are themselves
counted (cwl_pa_drops) and reported as lost-events. The engine logs no daemon-start of its
own: it runs inside the PRIMA daemon, whose start and stop entries cover it (a second
daemon-start would read as an enforcement gap).
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import struct
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Mapping, Sequence

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from cext import bpfmap
from controlplane.core.errors import CwliteError, EnforcementError
from controlplane.core.events import Event, EventKind, PaSubject
from controlplane.core.policy import Policy
from ebpf import abi, loader
from portauthority.rules import OP_WORDS, WHY_WORDS, kernel_rules

if TYPE_CHECKING:
    import bcc

SOURCE = "net.bpf.c"
BACKENDS = {"tracepoint": "-DCWL_BACKEND_TP", "lsm": "-DCWL_BACKEND_LSM"}
# What each variant's programs are (`cwlite pa show`); the tc classifier comes on top on both.
HOOKS = {"tracepoint": "cgroup sock_create, bind4/6, connect4/6, sendmsg4/6 and cgroup_skb ingress on TP cgroups "
                       "(EPERM/drop)",
         "lsm": "LSM socket_create, socket_post_create, socket_bind, socket_listen, socket_accept, socket_connect, "
                "socket_sendmsg, socket_sock_rcv_skb and file_receive (EPERM/drop)"}
COUNT_MAX = 4096         # distinct refusal keys per interval before they are counted as lost
PENDING_MAX = 65536      # labelled threads inside execve or recvmsg at once (net.bpf.c's syscall state)
RINGBUF_PAGES = 16
MOUNTS = "/proc/self/mounts"
INTERVAL_S = 1.0         # counts become entries at most once per interval
TC_HANDLE = 0x1c0c0001   # the filter's handle on clsact ingress ("cwl" + 1)
TC_PRIO = 0xc0c0
CLSACT_INGRESS = "ffff:fff2"
TC_NAME = "cwl_pa_tc"
TP_CGROUP = "cwlite-tp"  # the child cgroup a TP is moved into, below the cgroup it was started in
PROTO_WORDS = {abi.value("CWL_PA_TCP"): "tcp", abi.value("CWL_PA_UDP"): "udp"}
ACTIONS = {abi.value("CWL_ACT_DENIED"): "denied", abi.value("CWL_ACT_KILLED"): "killed",
           abi.value("CWL_ACT_ALLOWED"): "allowed"}
DROPS = {v: n.lower() for v, n in abi.names("CWL_PA_DROP_", exclude=("CWL_PA_DROP_MAX",)).items()}
DROP_MAX = abi.value("CWL_PA_DROP_MAX")


def cgroup2_root(mounts: str = MOUNTS) -> str:
    """Where the cgroup v2 hierarchy is mounted (/sys/fs/cgroup, or /sys/fs/cgroup/unified on hybrid hosts)."""
    try:
        with open(mounts) as f:
            for line in f:
                parts = line.split()
                if len(parts) > 2 and parts[2] == "cgroup2":
                    return parts[1]
    except OSError as exc:
        raise EnforcementError(f"{mounts}: cannot read mounts: {exc.strerror}") from exc
    raise EnforcementError(f"{mounts}: no cgroup2 mount: Port Authority's cgroup programs need cgroup v2 "
                           "(mount -t cgroup2 none /sys/fs/cgroup/unified)")


class PaEvent(ctypes.Structure):
    """Python view of `struct cwl_pa_event` (cwlite.h); tests check its size against the header's."""

    _fields_ = [("tgid", ctypes.c_uint32), ("label", ctypes.c_uint32), ("rule", ctypes.c_uint32),
                ("port", ctypes.c_uint16), ("proto", ctypes.c_uint8), ("op", ctypes.c_uint8),
                ("comm", ctypes.c_char * 16)]


def _exe_measurement(tgid: int) -> tuple[bytes, str]:
    """SHA-256 and path of the program a process runs (its image is write-denied while it runs)."""
    path = f"/proc/{tgid}/exe"
    try:
        target = os.readlink(path)
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.digest(), target
    except OSError:
        return bytes(32), "(exited)"


class Engine:
    """BPF: ebpf/net.bpf.c — tracepoint: cgroup sock_addr/sock_create/skb programs; lsm: socket_* LSM
    hooks; both: the tc classifier.

    Use as a context manager beside a PRIMA engine, and close it first (its slot keeps PRIMA's
    label map alive, labels and all):
    `with Engine(policy, prima.loaded.labels, labels_fd=prima.label_map_fd, backend=...) as pa: pa.poll()`.
    """

    def __init__(self, policy: Policy, label_ids: Mapping[str, int], *, labels_fd: int, backend: str,
                 interfaces: Sequence[str] = (), cgroup_root: str | None = None, interval_s: float = INTERVAL_S) -> None:
        if backend not in BACKENDS:
            raise EnforcementError(f"portauthority/{backend}: no such backend (have: {', '.join(BACKENDS)})")
        self.backend = backend
        self.cgroup_root: str | None = None  # tracepoint: the cgroup v2 mount the TP cgroups are made in
        self.interval_s = interval_s
        self._queue: deque[Event] = deque()
        self._cg_lock = threading.Lock()  # adopt() runs on PRIMA's arming thread
        self._tp_cgroups: dict[str, tuple[int, bool]] = {}  # TP cgroup path -> (cgroup id, made by us)
        self._links: dict[str, list[int]] = {}  # TP cgroup path -> its link fds (none while detached)
        self._detached = False
        self._tc: list[tuple[int, bool]] = []  # (ifindex, clsact made by us)
        self._paused_tc: list[str] = []
        self._paused_tp: list[bytes] = []
        self._tc_names: dict[int, str] = {}  # ifindex -> name, for the watch (_check_tc)
        self._tc_faults: dict[str, str] = {}  # name -> the fault last logged for it
        self._cgroup_progs: list[tuple[str, int, int]] = []  # (name, prog fd, attach type)
        self._tp_cgroups_fd = -1  # net.bpf.c cwl_pa_tp_cgroups: the ids where the cgroup programs run
        self._seen_listeners: set[tuple[str, str, int]] = set()
        self._counts_seen: dict[bytes, int] = {}
        self._drops_seen = [0] * DROP_MAX
        self._decode_errors = 0
        self._ring = False
        self._last_flush = time.monotonic()
        self._labels: dict[int, str] = {}
        self._gen = -1
        self._policy = policy
        self._bpf: "bcc.BPF | None" = loader.load(SOURCE, [BACKENDS[self.backend], f"-DCWL_PA_COUNT_MAX={COUNT_MAX}",
                                                          f"-DCWL_PA_RINGBUF_PAGES={RINGBUF_PAGES}",
                                                          f"-DCWL_PA_PENDING_MAX={PENDING_MAX}"])
        try:
            self._take_labels(labels_fd)
            self.reload(policy, label_ids)
            # lsm: bcc attached the LSM programs at load (no cgroup programs in that variant)
            if self.backend == "tracepoint":
                self.cgroup_root = cgroup_root or cgroup2_root()
                self._load_cgroup_programs()
            for name in interfaces:
                self._attach_tc(name)
            self._bpf[b"cwl_pa_events"].open_ring_buffer(self._on_record)
            self._ring = True
        except BaseException:
            self.close()
            raise

    # ---- attach ------------------------------------------------------------------------
    def _take_labels(self, labels_fd: int) -> None:
        """Put PRIMA's label map in cwl_pa_label_src[0]; the kernel refuses a map of another shape."""
        src = self._require()[b"cwl_pa_label_src"]
        try:
            bpfmap.update(src.map_fd, struct.pack("=i", 0), struct.pack("=i", labels_fd))
        except CwliteError as exc:
            raise EnforcementError(f"ebpf/{SOURCE}: cwl_pa_label_src: PRIMA's label map (fd {labels_fd}) "
                                   f"refused: {exc}") from exc

    def _load_cgroup_programs(self) -> None:
        import bcc  # loaded by ebpf.loader already

        bpf = self._require()
        at = bcc.BPFAttachType
        programs = [
            (b"pa_sock_create", bcc.BPF.CGROUP_SOCK, at.CGROUP_INET_SOCK_CREATE),
            (b"pa_bind4", bcc.BPF.CGROUP_SOCK_ADDR, at.CGROUP_INET4_BIND),
            (b"pa_bind6", bcc.BPF.CGROUP_SOCK_ADDR, at.CGROUP_INET6_BIND),
            (b"pa_connect4", bcc.BPF.CGROUP_SOCK_ADDR, at.CGROUP_INET4_CONNECT),
            (b"pa_connect6", bcc.BPF.CGROUP_SOCK_ADDR, at.CGROUP_INET6_CONNECT),
            (b"pa_sendmsg4", bcc.BPF.CGROUP_SOCK_ADDR, at.CGROUP_UDP4_SENDMSG),
            (b"pa_sendmsg6", bcc.BPF.CGROUP_SOCK_ADDR, at.CGROUP_UDP6_SENDMSG),
            (b"pa_ingress", bcc.BPF.CGROUP_SKB, at.CGROUP_INET_INGRESS),
        ]
        for name, ptype, atype in programs:
            try:
                fn = bpf.load_func(name, ptype, None, atype)
            except Exception as exc:  # bcc raises a bare Exception with the verifier's errno
                raise EnforcementError(f"ebpf/{SOURCE}: {name.decode()}: load failed: {exc}") from exc
            self._cgroup_progs.append((name.decode(), fn.fd, atype))
        self._tp_cgroups_fd = bpf[b"cwl_pa_tp_cgroups"].map_fd

    def _link_cgroup(self, path: str) -> None:
        """Attach every cgroup program to the cgroup at `path` (its links kept under that path)."""
        try:
            cg = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            raise EnforcementError(f"{path}: cannot open the TP cgroup: {exc.strerror}") from exc
        links = self._links.setdefault(path, [])
        try:
            for name, fd, atype in self._cgroup_progs:
                try:
                    links.append(bpfmap.link_create(fd, cg, atype))
                except CwliteError as exc:
                    raise EnforcementError(f"{path}: {name}: cannot attach: {exc}") from exc
        finally:
            os.close(cg)

    def _unlink_cgroups(self) -> None:
        for links in self._links.values():
            for fd in links:
                os.close(fd)
        self._links = {}

    def adopt(self, tgid: int) -> int:
        """Move process `tgid` into the TP cgroup below its own cgroup (or keep it in the one it is
        in), made and given the cgroup programs the first time; returns that cgroup's id. PRIMA calls
        it for a held process (`prima.confine(pa.adopt)`); an error leaves the process outside, and
        PRIMA kills it. Raises ProcessLookupError when it is gone, EnforcementError otherwise."""
        if self.cgroup_root is None:
            raise EnforcementError(f"portauthority/{self.backend}: no TP cgroups on this backend")
        try:
            with open(f"/proc/{tgid}/cgroup") as f:
                here = next((ln[3:].strip() for ln in f if ln.startswith("0::")), None)
        except FileNotFoundError:
            raise ProcessLookupError(tgid) from None
        if here is None:
            raise EnforcementError(f"/proc/{tgid}/cgroup: no cgroup v2 line (0::)")
        parent = os.path.join(self.cgroup_root, here.lstrip("/"))
        path = parent if os.path.basename(parent) == TP_CGROUP else os.path.join(parent, TP_CGROUP)
        with self._cg_lock:
            cgroup_id = self._tp_cgroup(path)
            try:
                with open(os.path.join(path, "cgroup.procs"), "w") as procs:
                    procs.write(str(tgid))
            except ProcessLookupError:
                raise
            except OSError as exc:
                raise EnforcementError(f"{path}/cgroup.procs: cannot move process {tgid} in: {exc.strerror}") from exc
        return cgroup_id

    def _tp_cgroup(self, path: str) -> int:
        """The id of the TP cgroup at `path`, made and attached the first time (under _cg_lock)."""
        if path in self._tp_cgroups:
            return self._tp_cgroups[path][0]
        made = True
        try:
            os.mkdir(path)
        except FileExistsError:
            made = False
        except OSError as exc:
            raise EnforcementError(f"{path}: cannot make the TP cgroup: {exc.strerror}") from exc
        cgroup_id = os.stat(path).st_ino  # a cgroup v2 directory's inode number is the cgroup's id
        try:
            if not self._detached:
                self._link_cgroup(path)
            bpfmap.update(self._tp_cgroups_fd, struct.pack("=Q", cgroup_id), b"\x01")
        except BaseException:
            for fd in self._links.pop(path, []):
                os.close(fd)
            if made:
                with contextlib.suppress(OSError):
                    os.rmdir(path)
            raise
        self._tp_cgroups[path] = (cgroup_id, made)
        return cgroup_id

    def attached(self, on: bool) -> None:
        """Detach (False) or re-attach (True) every program, keeping maps and counts: for benchmarks
        that compare the same traffic with and without Port Authority in interleaved rounds. Either
        is a no-op when already so (a second detach must not forget where the classifier was).
        Tracepoint backend only: bcc keeps the lsm programs attached until the engine closes."""
        if self.backend != "tracepoint":
            raise EnforcementError(f"portauthority/{self.backend}: programs stay attached until close()")
        bpf = self._require()
        with self._cg_lock:
            if not on and not self._detached:
                self._unlink_cgroups()
                names = [self._ifname(idx) for idx, _ in self._tc]
                self._detach_tc()
                self._paused_tc = names
                self._paused_tp = list(bpf.tracepoint_fds)  # bcc attached net.bpf.c's syscall tracepoints
                for tp in self._paused_tp:
                    bpf.detach_tracepoint(tp)
                self._detached = True
            elif on and self._detached:
                for path in self._tp_cgroups:
                    self._link_cgroup(path)
                for name in self._paused_tc:
                    self._attach_tc(name)
                self._paused_tc = []
                for tp in self._paused_tp:
                    category, event = tp.split(b":")
                    bpf.attach_tracepoint(tp=tp, fn_name=b"tracepoint__" + category + b"__" + event)
                self._paused_tp = []
                self._detached = False

    @staticmethod
    def _ifname(idx: int) -> str:
        with IPRoute() as ipr:
            return ipr.get_links(idx)[0].get_attr("IFLA_IFNAME")

    def _attach_tc(self, ifname: str) -> None:
        import bcc  # loaded by ebpf.loader already

        fn = self._require().load_func(b"pa_tc_ingress", bcc.BPF.SCHED_CLS)
        with IPRoute() as ipr:
            found = ipr.link_lookup(ifname=ifname)
            if not found:
                raise EnforcementError(f"interface {ifname!r}: no such interface")
            idx = found[0]
            made = True
            try:
                ipr.tc("add", "clsact", idx)
            except NetlinkError as exc:
                if exc.code != errno.EEXIST:
                    raise EnforcementError(f"interface {ifname}: cannot add clsact: {exc}") from exc
                made = False
            try:
                ipr.tc("add-filter", "bpf", idx, TC_HANDLE, fd=fn.fd, name=TC_NAME, parent=CLSACT_INGRESS,
                       prio=TC_PRIO, classid=1, direct_action=True)
            except NetlinkError as exc:
                if made:
                    ipr.tc("del", "clsact", idx)
                raise EnforcementError(f"interface {ifname}: cannot attach the tc classifier: {exc}") from exc
            self._tc.append((idx, made))
            self._tc_names[idx] = ifname

    def _tc_fault(self, ipr: IPRoute, idx: int, name: str) -> str:
        """What is wrong with the classifier on `name` ("" = it is the first ingress filter there)."""
        if ipr.link_lookup(ifname=name) != [idx]:
            return "interface gone or replaced"
        found = [m for m in ipr.get_filters(index=idx, parent=CLSACT_INGRESS) if m["handle"]]  # none without clsact
        ours = [m for m in found if m["handle"] == TC_HANDLE and m["info"] >> 16 == TC_PRIO
                and m.get_attr("TCA_OPTIONS") is not None and m.get_attr("TCA_OPTIONS").get_attr("TCA_BPF_NAME") == TC_NAME]
        if not ours:
            return "classifier removed"
        first = min(m["info"] >> 16 for m in found)
        if first < TC_PRIO:
            return f"a filter at prio {first} runs before it"
        return ""

    def _check_tc(self) -> None:
        """tc filters are netlink objects, out of reach of PRIMA's bpf(2) self-protection: root can delete
        cwlite's classifier or put a filter before it without a bpf call. Each interval every interface
        must still run it first on clsact ingress; a change is logged once as a violation, and a removed
        classifier is attached again."""
        with IPRoute() as ipr:
            for idx, made in list(self._tc):
                name = self._tc_names.get(idx, str(idx))
                fault = self._tc_fault(ipr, idx, name)
                if fault and self._tc_faults.get(name) != fault:
                    self._queue.append(Event(EventKind.VIOLATION, op="pa-tc", subject=f"{name}: {fault}",
                                             detail={"interface": name, "backend": self.backend}))
                self._tc_faults[name] = fault
                if fault == "classifier removed":
                    self._tc.remove((idx, made))
                    self._attach_tc(name)
                    new_idx, new_made = self._tc.pop()
                    self._tc.append((new_idx, made or new_made))

    def _detach_tc(self) -> None:
        with IPRoute() as ipr:
            for idx, made in self._tc:
                try:
                    if made:
                        ipr.tc("del", "clsact", idx)
                    else:
                        ipr.tc("del-filter", "bpf", idx, TC_HANDLE, parent=CLSACT_INGRESS, prio=TC_PRIO)
                except NetlinkError:
                    pass  # the interface went away (a test's veth): its filters went with it
        self._tc = []

    # ---- rules ---------------------------------------------------------------------------
    def reload(self, policy: Policy, label_ids: Mapping[str, int]) -> None:
        """Write the rule set (label masks by PRIMA's `label_ids`) into the idle slot, then count cwl_pa_gen
        up (its low bit picks the slot): connected sockets' remembered allowances lapse with it."""
        bpf = self._require()
        ids = dict(label_ids)
        rules = kernel_rules(policy, ids)
        sets = bpf[b"cwl_pa_sets"]
        leaf = sets.Leaf()
        leaf.nrules = len(rules)
        leaf.enforce = 1 if policy.mode == "enforce" else 0
        for i, r in enumerate(rules):
            kr = leaf.rules[i]
            kr.labels, kr.port, kr.proto, kr.kind, kr.nnets = r.labels, r.port, r.proto, r.kind, len(r.nets)
            if r.local:
                kr.local_family = r.local[0]
                ctypes.memmove(kr.local_addr, r.local[1], 16)
            for j, (family, prefix, addr, mask) in enumerate(r.nets):
                kr.nets[j].family, kr.nets[j].prefix = family, prefix
                ctypes.memmove(kr.nets[j].addr, addr, 16)
                ctypes.memmove(kr.nets[j].mask, mask, 16)
        gen = self._gen + 1  # counts up: sockets remember the generation their input was allowed under
        sets[sets.Key(gen & 1)] = leaf
        bpf[b"cwl_pa_gen"][bpf[b"cwl_pa_gen"].Key(0)] = ctypes.c_uint32(gen)
        self._gen = gen
        self._policy = policy
        self._labels = {lid: name for name, lid in ids.items()}

    # ---- events --------------------------------------------------------------------------
    def _label_name(self, lid: int) -> str:
        return self._labels.get(lid, f"#{lid}" if lid else "")

    def _on_record(self, ctx: object, data: int, size: int) -> None:
        """Ring-buffer callback: decode and queue only (a listener once per label, protocol, port)."""
        try:
            rec = ctypes.cast(data, ctypes.POINTER(PaEvent)).contents
            label, proto = self._label_name(rec.label), PROTO_WORDS.get(rec.proto, str(rec.proto))
            key = (label, proto, rec.port)
            if key in self._seen_listeners:
                return
            self._seen_listeners.add(key)
            digest, exe = _exe_measurement(rec.tgid)
            subject = PaSubject(proto, rec.port, rec.rule, exe=exe)
            self._queue.append(Event(EventKind.PA_LISTENER, digest, label, "listen", subject.text(),
                                     {"tgid": rec.tgid, "comm": bytes(rec.comm).split(b"\0", 1)[0].decode(errors="replace"),
                                      "backend": self.backend}))
        except Exception:  # never raise into ctypes: counted and reported as lost
            self._decode_errors += 1

    def _flush_counts(self) -> None:
        """One pa-refused entry per count key that grew since the last flush (and the tc watch)."""
        self._check_tc()
        table = self._require()[b"cwl_pa_counts"]
        for key, per_cpu in table.items():
            total = sum(per_cpu)
            raw = bytes(key)
            new = total - self._counts_seen.get(raw, 0)
            if new <= 0:
                continue
            self._counts_seen[raw] = total
            subject = PaSubject(PROTO_WORDS.get(key.proto, str(key.proto)), key.port, key.rule,
                                WHY_WORDS.get(key.why, str(key.why)), ACTIONS.get(key.action, str(key.action)), new)
            self._queue.append(Event(EventKind.PA_REFUSED, label=self._label_name(key.label),
                                     op=OP_WORDS.get(key.op, str(key.op)), subject=subject.text(),
                                     detail={"count": new, "total": total, "backend": self.backend}))
        drops = self._require()[b"cwl_pa_drops"]
        lost = {}
        for i, name in DROPS.items():
            total = sum(drops[drops.Key(i)])
            if total > self._drops_seen[i]:
                lost[name] = total - self._drops_seen[i]
                self._drops_seen[i] = total
        if self._decode_errors:
            lost["undecodable"], self._decode_errors = self._decode_errors, 0
        if lost:
            self._queue.append(Event(EventKind.LOST_EVENTS, subject="portauthority " + ", ".join(
                f"{k}={v}" for k, v in sorted(lost.items())), detail=lost))
        self._last_flush = time.monotonic()

    def counts(self) -> dict[tuple[str, str, str, int, str, str], int]:
        """Totals since load by (label, op, protocol, port, why, action): for tests and `cwlite pa show`."""
        table = self._require()[b"cwl_pa_counts"]
        return {(self._label_name(k.label), OP_WORDS.get(k.op, str(k.op)), PROTO_WORDS.get(k.proto, str(k.proto)),
                 k.port, WHY_WORDS.get(k.why, str(k.why)), ACTIONS.get(k.action, str(k.action))): sum(v)
                for k, v in table.items()}

    def poll(self, timeout_ms: int = 100, *, flush: bool = False) -> list[Event]:
        """Wait up to `timeout_ms` for listener events; add the counts' entries when an interval has
        passed (or `flush`). Returns every queued Event."""
        self._require().ring_buffer_poll(timeout_ms)
        if flush or time.monotonic() - self._last_flush >= self.interval_s:
            self._flush_counts()
        return self.drain()

    def drain(self) -> list[Event]:
        out = list(self._queue)
        self._queue.clear()
        return out

    # ---- lifecycle ----------------------------------------------------------------------
    def close(self) -> None:
        """Detach everything (links closed, tc filters removed); the last counts stay queued for drain()."""
        if self._bpf is None:
            return
        try:
            if self._ring:
                self._bpf.ring_buffer_consume()
                self._flush_counts()
        finally:
            with self._cg_lock:
                self._unlink_cgroups()
                for path, (_, made) in self._tp_cgroups.items():
                    if made:  # a TP still in it keeps it (EBUSY): it outlives the daemon, unfiltered
                        with contextlib.suppress(OSError):
                            os.rmdir(path)
                self._tp_cgroups = {}
            self._detach_tc()
            self._bpf.cleanup()
            self._bpf = None

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def bpf(self) -> "bcc.BPF":
        """The loaded programs and maps (bcc), by net.bpf.c's names. Raises when closed."""
        return self._require()

    def _require(self) -> "bcc.BPF":
        if self._bpf is None:
            raise EnforcementError(f"portauthority/{self.backend}: engine is closed")
        return self._bpf
