"""prima.cdi: which inodes a policy's CDIs name, and their writer bits."""
from __future__ import annotations

import os

import pytest

from controlplane.core.errors import EnforcementError, KernelError
from controlplane.core.policy import parse_policy
from prima import cdi
from prima.kernelview import kernel_dev
from tests.conftest import requires


def _policy(*cdis: tuple[str, list[str]]):
    text = 'mode = "enforce"\ntrust_sets = ["base"]\n[labels.tp_a]\nentrypoints = ["/usr/bin/a"]\ntrust_set = "base"\n'
    text += '[labels.tp_b]\nentrypoints = ["/usr/bin/b"]\ntrust_set = "base"\n'
    for path, writers in cdis:
        text += f'[[cdis]]\npath = "{path}"\nwriters = {writers!r}\n'.replace("'", '"')
    return parse_policy(text, source="p.toml")


IDS = {"tp_a": 1, "tp_b": 2}


def test_a_cdi_directory_is_every_inode_beneath_it(tmp_path) -> None:
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "a.o").write_text("a")
    (out / "sub" / "b.o").write_text("b")
    os.symlink("/etc/passwd", out / "link")  # the link itself, never its target
    inodes = {c.path: c for c in cdi.cdi_inodes(_policy((str(out), ["tp_a"])), IDS)}
    assert set(inodes) == {str(out), str(out / "sub"), str(out / "a.o"), str(out / "sub" / "b.o"), str(out / "link")}
    st = os.stat(out / "a.o")
    a = inodes[str(out / "a.o")]
    assert (a.dev, a.ino, a.writers, a.index, a.is_dir) == (kernel_dev(st.st_dev), st.st_ino, 1 << 1, 0, False)
    assert inodes[str(out / "sub")].is_dir and not inodes[str(out / "link")].is_dir
    assert os.stat("/etc/passwd").st_ino not in {c.ino for c in inodes.values() if c.path != str(out / "link")}


def test_an_inode_in_two_cdis_keeps_only_the_writers_both_allow(tmp_path) -> None:
    (tmp_path / "shared").write_text("x")
    os.link(tmp_path / "shared", tmp_path / "alias")
    policy = _policy((str(tmp_path / "shared"), ["tp_a", "tp_b"]), (str(tmp_path / "alias"), ["tp_b"]))
    [only] = cdi.cdi_inodes(policy, IDS)
    assert only.writers == 1 << 2 and only.index == 0


def test_a_missing_cdi_path_fails_closed(tmp_path) -> None:
    policy = _policy((str(tmp_path), ["tp_a"]), (str(tmp_path / "nope"), ["tp_b"]))
    with pytest.raises(EnforcementError) as info:
        cdi.cdi_inodes(policy, IDS)
    assert str(info.value) == f"p.toml: cdis[1].path: {tmp_path / 'nope'}: No such file or directory (a CDI must exist to be protected)"


def test_a_writer_label_needs_a_kernel_id_below_64(tmp_path) -> None:
    policy = _policy((str(tmp_path), ["tp_b"]))
    with pytest.raises(EnforcementError, match=r"^p\.toml: cdis\[0\]\.writers: label 'tp_b' has no kernel id below 64"):
        cdi.cdi_inodes(policy, {"tp_a": 1, "tp_b": 64})


@requires(tool="bpftool")
def test_lsm_hook_parameters_are_read_from_btf() -> None:
    assert cdi.lsm_hook_params("file_open") == ("file",)
    setattr_params = cdi.lsm_hook_params("inode_setattr")
    assert setattr_params[-2:] == ("dentry", "attr")
    assert ("-DCWL_LSM_SETATTR_IDMAP" in cdi.cflags()) == (len(setattr_params) == 3)
    with pytest.raises(KernelError, match="no BPF LSM hook bpf_lsm_no_such_hook"):
        cdi.lsm_hook_params("no_such_hook")
