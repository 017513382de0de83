"""`db build` after a change of content the stat does not show (issue 20): the cache never answers
for it, so the new bytes are measured. The load-time side of the same attacks is the bypass
suite's (tests/bypass/content.py)."""
from __future__ import annotations

from prima.measuredb import MeasureDB
from prima.sources import build
from tests.bypass import content
from tests.conftest import requires

pytestmark = [requires(root=True)]


def _digest_of(db_path, path) -> bytes:
    with MeasureDB.open(db_path) as db:
        [digest] = {m.digest for m in db.measurements("t") if m.path == str(path)}
    return digest


def test_db_build_after_a_stat_invisible_change_records_the_new_digest(tmp_path) -> None:
    with content.tmpfs(tmp_path / "t") as mnt:
        tool = content.tool_copy(mnt)
        db = tmp_path / "m.db"
        build(db, from_dir=[mnt], trust_set="t")
        old = _digest_of(db, tool)
        new = content.patch_stat_invisibly(tool)
        assert new != old
        again = build(db, from_dir=[mnt], trust_set="t")
        assert _digest_of(db, tool) == new and again.reused == 0
        with MeasureDB.open(db) as m:
            assert m.verify(["t"]) == []


@requires(tool="mkfs.ext4")
def test_db_build_cache_is_used_on_ext4_only_for_files_measured_without_a_writer(tmp_path) -> None:
    """ext4 stamps the ctime at every first write to a clean page, so the cache may answer for a file
    measured with nobody writing it; never for one measured while a shared mapping could write it."""
    with content.ext4(tmp_path / "e") as mnt:
        tool = content.tool_copy(mnt)
        db = tmp_path / "m.db"
        build(db, from_dir=[mnt], trust_set="t")
        assert build(db, from_dir=[mnt], trust_set="t").reused == 1  # unchanged, no writer: from the cache
        with content.shared_mapping(tool) as m:
            m[len(m) - 1] = m[len(m) - 1]  # dirty: stamped now
            build(db, from_dir=[mnt], trust_set="t")  # measured while writable: not cached
            content.patch(m)  # no fault, no stamp
            unstamped = content.stat_key(tool)
        assert content.stat_key(tool) == unstamped
        again = build(db, from_dir=[mnt], trust_set="t")
        assert again.reused == 0 and _digest_of(db, tool) == content.sha256(tool)
