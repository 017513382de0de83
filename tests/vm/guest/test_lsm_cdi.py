"""CDI protection under the `lsm` backend, in the VM: only the TP labels a CDI names may change it.

A CDI directory (with a nested file) and a single-file CDI elsewhere, on
tmpfs. Unlabelled processes (this Python) and a TP that is not a writer get
EPERM from the syscall itself for every way of changing a CDI: write, create,
rename over or out, truncate, chmod, unlink, link; a TP the policy names as a
writer does all of it. Each denial is a `denied` violation event naming the op.
"""
from __future__ import annotations

import errno
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from controlplane.core.events import Event, EventKind
from controlplane.core.policy import Policy, parse_policy
from prima.engine import Engine
from tests.bypass.lab import LDSO, shared_libs
from tests.prima_fixtures import measure_files

TOOLS = ("mv", "ln", "rm", "truncate", "mkdir", "chmod")


@dataclass
class CdiLab:
    root: Path
    out: Path          # a CDI directory
    single: Path       # a single-file CDI outside it
    writer: Path       # entrypoint of tp_writer (a writer of both CDIs)
    other: Path        # entrypoint of tp_other (a TP, but no writer)
    engine: Engine
    entries: list
    events: list[Event]

    def policy(self, mode: str = "enforce") -> Policy:
        return parse_policy(
            f'mode = "{mode}"\ntrust_sets = ["base"]\n'
            f'[labels.tp_writer]\nentrypoints = ["{self.writer}"]\ntrust_set = "base"\n'
            f'[labels.tp_other]\nentrypoints = ["{self.other}"]\ntrust_set = "base"\n'
            f'[[cdis]]\npath = "{self.out}"\nwriters = ["tp_writer"]\n'
            f'[[cdis]]\npath = "{self.single}"\nwriters = ["tp_writer"]\n', source=f"cdi-{mode}.toml")

    def sh(self, entrypoint: Path, script: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(entrypoint), "-c", script], capture_output=True, text=True, timeout=60)

    def violations(self, op: str, timeout: float = 5.0) -> list[Event]:
        deadline = time.monotonic() + timeout
        while True:
            self.events += self.engine.poll(50)
            found = [e for e in self.events if e.kind is EventKind.VIOLATION and e.op == op]
            if found or time.monotonic() > deadline:
                self.events = [e for e in self.events if e not in found]
                return found


@pytest.fixture(scope="module")
def lab(tmp_path_factory, host_root_files):
    root = tmp_path_factory.mktemp("cdi")
    out = root / "out"
    (out / "sub").mkdir(parents=True)
    (out / "artifact.o").write_bytes(b"built by a TP\n")
    (out / "sub" / "deep.o").write_bytes(b"nested\n")
    (out / "empty").mkdir()
    (root / "conf").mkdir()
    single = root / "conf" / "build.cfg"
    single.write_text("trusted config\n")
    os.link(out / "artifact.o", root / "early-alias")  # a second name made before the engine loaded
    writer, other = root / "ep-writer", root / "ep-other"
    shutil.copy2("/bin/sh", writer)
    shutil.copy2("/bin/sh", other)
    tools = [os.path.realpath(shutil.which(t)) for t in TOOLS]
    trusted = sorted({str(writer), str(other), os.path.realpath(LDSO), *shared_libs("/bin/sh"), *tools,
                      *(lib for t in tools for lib in shared_libs(t))})
    entries = measure_files(trusted, 1)
    lab = CdiLab(root, out, single, writer, other, None, entries, [])  # type: ignore[arg-type]
    lab.engine = Engine(lab.policy(), entries, backend="lsm")
    yield lab
    lab.engine.close()


@pytest.fixture(autouse=True)
def fresh_events(lab) -> None:
    """Each test sees only the events its own syscalls caused."""
    lab.engine.poll(50)
    lab.events = []


def _eperm(call, *args) -> None:
    with pytest.raises(PermissionError) as info:
        call(*args)
    assert info.value.errno == errno.EPERM, info.value


def test_unlabelled_process_cannot_write_a_cdi(lab) -> None:
    for path in (lab.out / "artifact.o", lab.out / "sub" / "deep.o", lab.single):
        before = path.read_bytes()
        _eperm(open, path, "r+b")
        _eperm(open, path, "ab")
        assert path.read_bytes() == before
    [v, *_] = lab.violations("open-write")
    assert v.label == "" and v.detail["action"] == "denied" and v.detail["why"] == "not-writer"
    assert v.detail["ino"] == os.stat(lab.out / "artifact.o").st_ino
    assert (lab.out / "artifact.o").open("rb").read() == b"built by a TP\n"  # reading is fine


def test_unlabelled_process_cannot_create_in_a_cdi_directory(lab) -> None:
    _eperm(open, lab.out / "new.o", "w")
    _eperm(os.mkdir, lab.out / "newdir")
    _eperm(os.symlink, "/etc/passwd", lab.out / "link.o")
    _eperm(os.mknod, lab.out / "fifo", 0o600 | 0o010000)
    _eperm(open, lab.out / "sub" / "new.o", "w")
    assert sorted(p.name for p in lab.out.iterdir()) == ["artifact.o", "empty", "sub"]
    [v, *_] = lab.violations("create")
    assert v.detail["name"] in {"new.o", "newdir", "link.o", "fifo"} and v.detail["why"] == "not-writer"


def test_unlabelled_process_cannot_rename_over_or_out_of_a_cdi(lab) -> None:
    forged = lab.root / "forged.o"
    forged.write_bytes(b"forged\n")
    _eperm(os.rename, forged, lab.out / "artifact.o")
    _eperm(os.rename, forged, lab.single)
    _eperm(os.rename, lab.out / "artifact.o", lab.root / "stolen.o")
    assert (lab.out / "artifact.o").read_bytes() == b"built by a TP\n" and forged.exists()
    assert lab.violations("rename")


def test_unlabelled_process_cannot_truncate_chmod_or_unlink_a_cdi(lab) -> None:
    _eperm(os.truncate, lab.out / "artifact.o", 0)
    _eperm(os.truncate, lab.single, 0)
    _eperm(os.chmod, lab.out / "artifact.o", 0o777)
    _eperm(os.unlink, lab.out / "artifact.o")
    _eperm(os.unlink, lab.single)
    _eperm(os.unlink, lab.out / "sub" / "deep.o")
    _eperm(os.rmdir, lab.out / "empty")
    assert (lab.out / "artifact.o").read_bytes() == b"built by a TP\n" and lab.single.read_text() == "trusted config\n"
    assert lab.violations("setattr") and lab.violations("unlink")


def test_hard_links_made_elsewhere_do_not_escape(lab) -> None:
    # a link made before cwlite loaded: same inode, so the write is still a CDI write
    _eperm(open, lab.root / "early-alias", "r+b")
    # a new link from outside is refused (it would be a name the directory walk cannot see)
    _eperm(os.link, lab.out / "artifact.o", lab.root / "late-alias")
    _eperm(os.link, lab.single, lab.root / "late-single")
    assert not (lab.root / "late-alias").exists()
    [w, *_] = lab.violations("open-write")
    assert w.detail["name"] == "early-alias" and w.detail["ino"] == os.stat(lab.out / "artifact.o").st_ino
    assert lab.violations("link")


def test_a_tp_that_is_not_a_writer_is_denied(lab) -> None:
    r = lab.sh(lab.other, f"echo forged > {lab.out / 'artifact.o'}; echo rc=$?")
    assert os.strerror(errno.EPERM) in r.stderr and r.stdout.strip() == "rc=2", r
    [v, *_] = lab.violations("open-write")
    assert v.label == "tp_other" and v.detail["action"] == "denied"


def test_the_writer_tp_can_change_its_cdis(lab) -> None:
    out = lab.out
    script = " && ".join([
        f"echo rebuilt > {out / 'artifact.o'}",
        f"echo made > {out / 'new.o'}",
        f"mkdir {out / 'newdir'}",
        f"echo fresh > {out / 'newdir' / 'fresh.o'}",
        f"mv {out / 'new.o'} {out / 'moved.o'}",
        f"truncate -s 0 {out / 'moved.o'}",
        f"chmod 600 {out / 'moved.o'}",
        f"ln {out / 'moved.o'} {out / 'link.o'}",
        f"rm {out / 'link.o'} {out / 'moved.o'}",
        f"echo v2 > {lab.single}",
        "echo ok",
    ])
    r = lab.sh(lab.writer, script)
    assert r.stdout.strip() == "ok", r.stderr
    assert (out / "artifact.o").read_text() == "rebuilt\n" and lab.single.read_text() == "v2\n"
    assert not lab.violations("open-write", timeout=0.3) and not lab.violations("create", timeout=0.1)
    # what the writer made after the engine loaded is a CDI too
    _eperm(open, out / "newdir" / "fresh.o", "r+b")
    _eperm(os.link, out / "newdir" / "fresh.o", lab.root / "fresh-alias")


def test_what_a_writer_makes_later_stays_a_cdi_at_any_depth_and_name(lab) -> None:
    """Inodes made under a CDI directory join the CDI map (d_instantiate): deeper than the
    8-level ancestor walk, and through a link the writer itself made outside."""
    deep = lab.out.joinpath(*(f"d{i}" for i in range(12)))
    r = lab.sh(lab.writer, f"mkdir -p {deep} && echo x > {deep / 'leaf.o'} && ln {deep / 'leaf.o'} {lab.root / 'outside.o'} && echo ok")
    assert r.stdout.strip() == "ok", r.stderr
    _eperm(open, deep / "leaf.o", "r+b")
    _eperm(open, lab.root / "outside.o", "r+b")
    _eperm(os.unlink, deep / "leaf.o")
    names = {v.detail["name"] for v in lab.violations("open-write")}
    assert names == {"leaf.o", "outside.o"}


def test_audit_mode_allows_and_logs_cdi_writes(lab) -> None:
    target = lab.out / "sub" / "deep.o"
    lab.engine.reload(lab.policy("audit"), lab.entries)
    try:
        with open(target, "ab") as f:
            f.write(b"audited\n")
    finally:
        lab.engine.reload(lab.policy("enforce"), lab.entries)
    assert target.read_bytes().endswith(b"audited\n")
    [v, *_] = lab.violations("open-write")
    assert v.detail["action"] == "allowed" and v.detail["name"] == "deep.o"
    _eperm(open, target, "ab")  # enforcing again
