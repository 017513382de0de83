"""The measurement DB store: schema and migrations, atomic builds, digest, kernel view, bad input."""
from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from controlplane.cli.main import main
from controlplane.core.errors import MeasureDBError
from prima import measure
from prima.measure import FileKind
from prima.kernelview import kernel_dev, kernel_view
from prima.measuredb import MIGRATIONS, SCHEMA_VERSION, MeasureDB, diff, migrate
from prima.sources import build

TRUE = "/usr/bin/true"


def _tree(root: Path) -> Path:
    """A small site directory: two ELF programs, a script, and files that are not code."""
    (root / "bin").mkdir(parents=True)
    shutil.copy2(TRUE, root / "bin" / "tool")
    shutil.copy2("/usr/bin/env", root / "bin" / "env2")
    (root / "bin" / "run.sh").write_text("#!/bin/sh -e\necho hi\n")
    (root / "README").write_text("not code\n")
    (root / "bin" / "looks-exec").write_text("echo no shebang\n")
    os.chmod(root / "bin" / "looks-exec", 0o755)
    return root


def test_kernel_dev_moves_major_to_bit_20() -> None:
    assert kernel_dev(os.makedev(8, 1)) == (8 << 20) | 1
    assert kernel_dev(os.makedev(0, 39)) == 39
    assert kernel_dev(os.makedev(259, 70000)) == (259 << 20) | 70000  # huge minors: glibc encodes them apart
    assert os.makedev(259, 70000) != (259 << 20) | 70000


def test_classify_reads_the_header_not_the_mode(tmp_path: Path) -> None:
    site = _tree(tmp_path / "site")
    os.chmod(site / "bin" / "tool", 0o644)  # an ELF without x bits is still code
    kinds = {Path(m.path).name: m.kind for m in measure.measure_many(measure.walk(site))}
    assert kinds["tool"] == measure.FileKind("elf")
    assert kinds["run.sh"] == measure.FileKind("script", "/bin/sh -e")
    assert kinds["README"] is None and kinds["looks-exec"] is None
    obj = bytearray(open(TRUE, "rb").read(64))
    obj[16:18] = (1).to_bytes(2, "little")  # ET_REL: an object file is not loadable code
    assert measure.classify(bytes(obj)) is None
    assert measure.classify(b"#!\n") is None and measure.classify(b"#! /usr/bin/env python3\n").interpreter == "/usr/bin/env python3"


def test_dir_build_records_origin_and_digest_is_order_independent(tmp_path: Path) -> None:
    site = _tree(tmp_path / "site")
    r1 = build(tmp_path / "a.db", from_dir=[site], trust_set="site", note="ci 42")
    assert (r1.measured, r1.untrusted) == (3, 0)
    with MeasureDB.open(tmp_path / "a.db") as db:
        assert db.trust_sets() == ["site"] and db.schema_version == SCHEMA_VERSION
        digest = measure.measure_file(site / "bin" / "tool").sha256
        (o,) = db.lookup(digest)
        assert (o.origin, o.package, o.path, o.note, o.trust_set) == ("dir", str(site), str(site / "bin" / "tool"), "ci 42", "site")
        assert db.is_trusted(digest, "site")
        (script,) = db.lookup(measure.measure_file(site / "bin" / "run.sh").sha256)
        assert script.code == FileKind("script", "/bin/sh -e")
    # Same content built into another DB in another order of sets: same digest.
    build(tmp_path / "b.db", from_dir=[site], trust_set="other", note="x")
    build(tmp_path / "b.db", from_dir=[site], trust_set="site", note="ci 42")
    build(tmp_path / "a.db", from_dir=[site], trust_set="other", note="x")
    with MeasureDB.open(tmp_path / "a.db") as a, MeasureDB.open(tmp_path / "b.db") as b:
        assert a.digest() == b.digest() and len(a.digest()) == 32
        journal = sqlite3.connect(tmp_path / "a.db").execute("PRAGMA journal_mode").fetchone()[0]
        assert journal == "wal"
    # A different note is different trusted content.
    build(tmp_path / "b.db", from_dir=[site], trust_set="site", note="ci 43")
    with MeasureDB.open(tmp_path / "a.db") as a, MeasureDB.open(tmp_path / "b.db") as b:
        assert a.digest() != b.digest()


def test_incremental_build_reuses_unchanged_files_and_sees_changes(tmp_path: Path) -> None:
    site = _tree(tmp_path / "site")
    db = tmp_path / "m.db"
    first = build(db, from_dir=[site], trust_set="site")
    assert first.reused == 0
    again = build(db, from_dir=[site], trust_set="site")
    assert again.reused == 5 and again.digest == first.digest  # every file, code or not, reused
    with open(site / "bin" / "tool", "ab") as f:
        f.write(b"\0")
    changed = build(db, from_dir=[site], trust_set="site")
    assert changed.reused == 4 and changed.digest != first.digest


def test_kernel_view_bits_follow_the_callers_order_and_drop_changed_files(tmp_path: Path) -> None:
    site = _tree(tmp_path / "site")
    db_path = tmp_path / "m.db"
    build(db_path, from_dir=[site], trust_set="site")
    build(db_path, from_dir=[site / "bin"], trust_set="bin")
    tool = site / "bin" / "tool"
    with MeasureDB.open(db_path) as db:
        view = {e.path: e for e in kernel_view(db, ["bin", "site"])}
        st = os.stat(tool)
        e = view[str(tool)]
        assert (e.dev, e.ino, e.ctime_ns, e.sets_mask) == (kernel_dev(st.st_dev), st.st_ino, st.st_ctime_ns, 0b11)
        assert {e.sets_mask for e in kernel_view(db, ["site"])} == {1}
        # Metadata change only (ctime moves, content same): still trusted, new cookie.
        time.sleep(0.01)
        os.utime(tool)
        e2 = {e.path: e for e in kernel_view(db, ["site", "bin"])}[str(tool)]
        assert e2.ctime_ns == os.stat(tool).st_ctime_ns != e.ctime_ns and e2.sets_mask == 0b11
        # Content change: no longer in the view.
        with open(tool, "r+b") as f:
            f.seek(100)
            f.write(b"\x90")
        assert str(tool) not in {e.path for e in kernel_view(db, ["site", "bin"])}
        assert [m.path for m in db.verify(["site"])] == [str(tool)]
        with pytest.raises(MeasureDBError, match=r"trust set 'nope': unknown \(defined: bin, site\)"):
            kernel_view(db, ["site", "nope"])


def test_migration_from_schema_1_keeps_data(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path, isolation_level=None)
    migrate(conn, 1)
    conn.execute("INSERT INTO trust_sets VALUES ('s', '', '{}', 'then')")
    conn.execute("INSERT INTO measurements VALUES ('s', ?, 'dir', '/d', '', '/d/x', '', 'elf', '', '')", (bytes(32),))
    conn.close()
    assert len(MIGRATIONS) == 2
    with MeasureDB.open(path) as db:
        assert db.schema_version == 2 and db.is_trusted(bytes(32), "s")
        assert [o.path for o in db.lookup(bytes(32))] == ["/d/x"]


def test_bad_input_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(os.urandom(8192))
    with pytest.raises(MeasureDBError, match=r"garbage\.db: not a usable measurement DB: file is not a database"):
        MeasureDB.open(garbage)
    damaged = tmp_path / "damaged.db"
    build(damaged, from_dir=["/usr/bin"], trust_set="s")
    size = damaged.stat().st_size
    with open(damaged, "r+b") as f:  # a real DB with pages overwritten in the middle
        f.seek(size // 2)
        f.write(b"\xa5" * 8192)
    with pytest.raises(MeasureDBError, match=r"damaged\.db: not a usable measurement DB: database disk image is malformed$"):
        MeasureDB.open(damaged)
    other = tmp_path / "other.db"
    sqlite3.connect(other).execute("CREATE TABLE t(x)").connection.commit()
    with pytest.raises(MeasureDBError, match=r"other\.db: application_id: not a cwlite measurement DB"):
        MeasureDB.open(other)
    newer = tmp_path / "newer.db"
    build(newer, from_dir=[_tree(tmp_path / "s")], trust_set="s")
    sqlite3.connect(newer).execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(MeasureDBError, match=rf"user_version: schema {SCHEMA_VERSION + 1} is newer"):
        MeasureDB.open(newer)
    with pytest.raises(MeasureDBError, match=r"missing\.db: no such measurement DB"):
        MeasureDB.open(tmp_path / "missing.db")
    with pytest.raises(MeasureDBError, match=r"/nonexistent/dir: --from-dir: no such directory"):
        build(tmp_path / "x.db", from_dir=["/nonexistent/dir"], trust_set="s")
    with pytest.raises(MeasureDBError, match=r"trust set 'bad name'"):
        build(tmp_path / "x.db", from_dir=[tmp_path], trust_set="bad name")
    # The CLI: one line on stderr, exit 1.
    for argv, text in (
        (["db", "show", "--db", str(garbage)], "garbage.db: not a usable measurement DB: file is not a database"),
        (["db", "show", "--db", str(tmp_path / "missing.db")], "missing.db: no such measurement DB"),
        (["db", "verify", "--db", str(newer), "--trust-set", "x"], "user_version: schema"),
        (["db", "build", "--db", str(tmp_path / "y.db"), "--trust-set", "s", "--from-dir", "/nonexistent/dir"], "/nonexistent/dir: --from-dir: no such directory"),
    ):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("cwlite: error: ") and text in err


def test_unknown_trust_set_is_refused_everywhere(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db_path = tmp_path / "m.db"
    build(db_path, from_dir=[_tree(tmp_path / "s")], trust_set="core")
    with MeasureDB.open(db_path) as db:
        with pytest.raises(MeasureDBError, match=r"m\.db: trust set 'toolchain': unknown \(defined: core\)"):
            db.is_trusted(bytes(32), "toolchain")
    assert main(["db", "verify", "--db", str(db_path), "--trust-set", "toolchain"]) == 1
    assert "trust set 'toolchain': unknown (defined: core)" in capsys.readouterr().err


def test_cli_show_diff_verify(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    site = _tree(tmp_path / "site")
    a, b = tmp_path / "a.db", tmp_path / "b.db"
    assert main(["db", "build", "--db", str(a), "--trust-set", "site", "--from-dir", str(site), "--json"]) == 0
    built = json.loads(capsys.readouterr().out)
    assert built["measured"] == 3
    tool = site / "bin" / "tool"
    assert main(["db", "show", "--db", str(a), "--json", str(tool)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["trusted_in"] == ["site"] and shown["digest"] == measure.measure_file(tool).sha256.hex()
    assert main(["db", "show", "--db", str(a), "--json", shown["digest"]]) == 0
    assert json.loads(capsys.readouterr().out)["origins"][0]["path"] == str(tool)
    assert main(["db", "show", "--db", str(a), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["digest"] == built["digest"]
    shutil.copy2("/usr/bin/false", tool)
    assert main(["db", "verify", "--db", str(a), "--json"]) == 1
    assert [m["path"] for m in json.loads(capsys.readouterr().out)["mismatches"]] == [str(tool)]
    assert main(["db", "build", "--db", str(b), "--trust-set", "site", "--from-dir", str(site)]) == 0
    capsys.readouterr()
    assert main(["db", "diff", "--json", str(a), str(b)]) == 0
    d = json.loads(capsys.readouterr().out)
    assert (d["added"], d["removed"], [c["path"] for c in d["changed"]]) == ([], [], [str(tool)])
    assert diff(a, a).changed == ()


def test_killed_build_leaves_the_old_db_readable_and_unchanged(tmp_path: Path) -> None:
    db_path = tmp_path / "m.db"
    build(db_path, from_dir=[_tree(tmp_path / "site")], trust_set="site")
    with MeasureDB.open(db_path) as db:
        before = (db.digest(), db.measurements(), db.trust_sets())
    killed = 0
    for delay in (0.3, 0.45, 0.6, 0.75):
        proc = subprocess.Popen(
            [sys.executable, "-m", "controlplane.cli", "db", "build", "--db", str(db_path), "--trust-set", "site",
             "--from-dir", "/usr/lib/x86_64-linux-gnu", "--from-dir", "/usr/bin"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        time.sleep(delay)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            killed += 1
        proc.wait()
        if proc.returncode != -signal.SIGKILL:
            break  # it finished: the DB legitimately changed
        with MeasureDB.open(db_path) as db:
            assert (db.digest(), db.measurements(), db.trust_sets()) == before
        assert sqlite3.connect(db_path).execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert killed >= 1, "every build finished before the kill: the test proved nothing"


def test_build_killed_inside_its_write_transaction_changes_nothing(tmp_path: Path) -> None:
    """Kill the builder at the moment it holds SQLite's write lock (seen by a probe connection)."""
    db_path = tmp_path / "m.db"
    build(db_path, from_dir=[_tree(tmp_path / "site")], trust_set="site")
    with MeasureDB.open(db_path) as db:
        before = (db.digest(), db.measurements(), db.trust_sets())
    probe = sqlite3.connect(db_path, isolation_level=None, timeout=0)
    in_transaction = 0
    for attempt in range(5):
        proc = subprocess.Popen(
            [sys.executable, "-m", "controlplane.cli", "db", "build", "--db", str(db_path), "--trust-set", f"bin{attempt}",
             "--from-dir", "/usr/bin"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        while proc.poll() is None:
            try:
                probe.execute("BEGIN IMMEDIATE")
                probe.execute("ROLLBACK")
            except sqlite3.OperationalError:  # "database is locked": the builder is writing
                proc.send_signal(signal.SIGKILL)
                in_transaction += 1
                break
        proc.wait()
        with MeasureDB.open(db_path) as db:
            now = (db.digest(), db.measurements(), db.trust_sets())
        if proc.returncode != -signal.SIGKILL:
            before = now  # it finished first: the DB legitimately changed; try again
            continue
        assert now == before
        assert probe.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        break
    probe.close()
    assert in_transaction >= 1, "never caught the builder inside its transaction"
