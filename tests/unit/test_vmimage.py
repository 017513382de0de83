"""`cwlite vm image`'s pure parts: the kernel release read from a bzImage, what the base tree is keyed by, and the
refusals before anything is fetched. (The build itself: tests/vm/test_vmv.py, which boots the image.)"""
from __future__ import annotations

import glob
from pathlib import Path

import pytest

from controlplane.core.errors import VmError
from controlplane.host import vmimage

KERNELS = sorted(glob.glob("/boot/vmlinuz-*"))


@pytest.mark.skipif(not KERNELS, reason="no /boot/vmlinuz-* on this machine")
@pytest.mark.parametrize("kernel", KERNELS)
def test_the_release_is_read_from_the_kernel_images_setup_header(kernel: str) -> None:
    """Debian names its images vmlinuz-RELEASE: the header's version string must agree with the name."""
    assert vmimage.kernel_release(Path(kernel)) == Path(kernel).name.removeprefix("vmlinuz-")


def test_a_file_that_is_no_bzimage_is_refused(tmp_path: Path) -> None:
    for body in (b"", b"\0" * 0x1000, b"MZ" + b"\xff" * 0x1000):
        f = tmp_path / "not-a-kernel"
        f.write_bytes(body)
        with pytest.raises(VmError) as err:
            vmimage.kernel_release(f)
        assert str(f) in str(err.value) and err.value.reason == "usage"


def test_the_base_tree_is_keyed_by_everything_but_the_package_file(tmp_path: Path) -> None:
    """A new cwlite package reuses the tree (it is reinstalled each build); a new kernel release, package
    list or mirror makes a new base."""
    a = vmimage.ImageSpec(deb=tmp_path / "a.deb", kernel_release="6.1.0-57-amd64")
    assert vmimage.ImageSpec(deb=tmp_path / "b.deb", kernel_release="6.1.0-57-amd64").base() == a.base()
    for other in (vmimage.ImageSpec(deb=a.deb, kernel_release="6.1.0-58-amd64"),
                  vmimage.ImageSpec(deb=a.deb, kernel_release=a.kernel_release, packages=("distcc", "make")),
                  vmimage.ImageSpec(deb=a.deb, kernel_release=a.kernel_release, mirror="http://mirror.invalid/debian")):
        assert other.base() != a.base()
    assert "linux-headers-6.1.0-57-amd64" in a.apt_packages() and "distcc" in a.apt_packages()


def test_a_missing_package_file_is_refused_before_anything_is_fetched(tmp_path: Path) -> None:
    spec = vmimage.ImageSpec(deb=tmp_path / "cwlite_0.1.0-1_amd64.deb", kernel_release="6.1.0-57-amd64")
    with pytest.raises(VmError) as err:
        vmimage.build_image(tmp_path / "vm.img", spec, tmp_path)
    assert err.value.reason == "usage"
    assert not (tmp_path / "vm-images").exists() and not (tmp_path / "vm.img").exists()
