"""SELinux enforcing the cwlite module on the guest kernel (Debian 6.1, `security=selinux`).

The host links the module into a scratch copy of selinux-policy-default; the
guest (its own boot: SELinux must be the major LSM from the kernel command
line) loads that binary policy, labels a CDI and two copies of a static
busybox on a tmpfs (the 9p root carries no SELinux labels), and writes the
CDI from the TP domain, entered through its entrypoint type, and from
`user_t`, with SELinux enforcing. `tests/vm/selinux_guest.sh` is the guest
side; its results come back through the results dir.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from controlplane.core.policy import load_policy
from controlplane.core.selinux_render import cdi_type_of, domain_of, render
from controlplane.host import selinux_module
from tests.conftest import requires
from tests.vm.harness import run_in_vm

pytestmark = [requires(root=True, tool="qemu-system-x86_64"), requires(tool="swtpm"), requires(tool="semodule")]

REPO = Path(__file__).resolve().parents[2]
SELINUX_APPEND = "lsm=lockdown,capability,landlock,yama,integrity,selinux,bpf selinux=1 security=selinux enforcing=0"
TP_CTX = f"system_u:system_r:{domain_of('tp_build')}:s0"
USER_CTX = "user_u:user_r:user_t:s0"


@pytest.fixture(scope="module")
def guest(tmp_path_factory) -> tuple[dict[str, str], str]:
    rendered = render(load_policy(REPO / "selinux-policy" / "policy.toml"))
    work = tmp_path_factory.mktemp("selinux")
    src = work / "module"
    selinux_module.write_sources(rendered, src)
    binary = selinux_module.link(selinux_module.scratch_store(work / "store"), selinux_module.build(src), rendered)
    results = work / "results"
    results.mkdir()
    shutil.copyfile(binary, results / "policy.33")
    run = run_in_vm(f"sh {REPO}/tests/vm/selinux_guest.sh {results}", results_dir=results, timeout=900,
                    append=SELINUX_APPEND)
    assert run.rc == 0, run.output[-2000:]
    lines = (results / "result").read_text().splitlines()
    return dict(ln.split("=", 1) for ln in lines if "=" in ln), (results / "avc").read_text()


def test_linked_policy_loads_on_the_guest_kernel(guest) -> None:
    result, _ = guest
    assert result["load"] == "0"
    assert result["self"].startswith("system_u:system_r:kernel_t:")


def test_tp_domain_entered_through_its_entrypoint_writes_its_cdi(guest) -> None:
    result, _ = guest
    assert result["tp_domain"] == TP_CTX
    assert result["tp_rc"] == "0"
    assert "tp" in result["cdi"].split()


def test_untrusted_domain_write_to_a_cdi_is_denied_with_an_avc(guest) -> None:
    result, avc = guest
    assert result["user_domain"] == USER_CTX
    assert result["user_rc"] != "0"
    assert "user" not in result["cdi"].split()
    denials = [ln for ln in avc.splitlines()
               if f"scontext={USER_CTX}" in ln and f"tcontext=system_u:object_r:{cdi_type_of(0)}:s0" in ln
               and "tclass=file" in ln and "permissive=0" in ln]
    assert denials and any("{ append }" in ln or "{ write }" in ln for ln in denials), avc
