"""cext.Btf against the running kernel's BTF, cross-checked with `bpftool btf dump` (no privilege)."""
from __future__ import annotations

import json
import shutil
import subprocess
from functools import lru_cache

import pytest

from cext import VMLINUX, Btf
from controlplane.core.errors import BtfError
from ebpf.loader import KERNEL_FIELDS

pytestmark = pytest.mark.skipif(shutil.which("bpftool") is None, reason="bpftool not installed (make setup)")


@lru_cache(maxsize=1)
def _bpftool_types() -> dict[int, dict]:
    out = subprocess.run(["bpftool", "-j", "btf", "dump", "file", VMLINUX], capture_output=True, text=True, check=True)
    return {t["id"]: t for t in json.loads(out.stdout)["types"]}


def _bpftool_offset(path: str) -> int:
    """Walk the path with bpftool's own dump: the independent reading of the same BTF."""
    types = _bpftool_types()
    by_name = {(t["kind"], t.get("name")): t for t in types.values()}
    struct = by_name.get(("STRUCT", path.split(".")[0])) or by_name[("UNION", path.split(".")[0])]

    def resolve(type_id: int) -> dict:
        t = types[type_id]
        while t["kind"] in ("TYPEDEF", "CONST", "VOLATILE", "RESTRICT", "TYPE_TAG", "ARRAY"):
            t = types[t["type_id"]]  # an array: its first element
        return t

    def find(t: dict, name: str) -> tuple[int, int] | None:
        for m in t["members"]:
            if m["name"] == name:
                return m["bits_offset"], m["type_id"]
            if m["name"] == "(anon)":
                inner = resolve(m["type_id"])
                if inner["kind"] in ("STRUCT", "UNION") and (hit := find(inner, name)):
                    return m["bits_offset"] + hit[0], hit[1]
        return None

    bits, cur = 0, struct
    for name in path.split(".")[1:]:
        hit = find(cur, name)
        assert hit is not None, f"bpftool has no {name} in {path}"
        bits += hit[0]
        cur = resolve(hit[1])
    return bits // 8


@pytest.mark.parametrize("stem", sorted(KERNEL_FIELDS))
def test_offsets_match_bpftool(stem: str) -> None:
    with Btf() as btf:
        field = btf.first_field(*KERNEL_FIELDS[stem])
    assert field.size > 0
    assert field.offset == _bpftool_offset(field.path), field


def test_ctime_resolves_whatever_this_kernel_calls_it() -> None:
    with Btf() as btf:
        sec = btf.first_field("inode.i_ctime_sec", "inode.__i_ctime.tv_sec", "inode.i_ctime.tv_sec")
    assert sec.size == 8
    assert sec.path in ("inode.i_ctime_sec", "inode.__i_ctime.tv_sec", "inode.i_ctime.tv_sec")


def test_nested_path_through_embedded_struct() -> None:
    with Btf() as btf:
        outer = btf.field("task_struct.thread")  # embedded struct thread_struct
        inner = btf.field("task_struct.thread.sp")
        sp = btf.field("thread_struct.sp")
    assert inner.offset == outer.offset + sp.offset


def test_missing_btf_file_is_one_clear_line(tmp_path) -> None:
    with pytest.raises(BtfError, match=r"no-such: no such BTF file"):
        Btf(str(tmp_path / "no-such"))


def test_garbage_btf_file(tmp_path) -> None:
    bad = tmp_path / "bad.btf"
    bad.write_bytes(b"\x00not btf" * 10)
    with pytest.raises(BtfError, match=r"bad.btf: not a BTF file"):
        Btf(str(bad))


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("task_struct.no_such_field", "task_struct has no member 'no_such_field'"),
        ("no_such_struct.x", "no struct or union named 'no_such_struct'"),
        ("task_struct.mm.exe_file", "task_struct.mm is not an embedded struct"),
        ("task_struct", "must be struct.member"),
    ],
)
def test_bad_field_paths(path: str, message: str) -> None:
    with Btf() as btf, pytest.raises(BtfError, match=message):
        btf.field(path)
