"""The PRIMA bypass suite (tests/bypass/scenarios.py) in the VM: the lsm backend denies with EPERM.

Where the tracepoint backend kills the process (status 137), here the syscall
returns EPERM ("Operation not permitted" from the shell or the helper's
perror) and the process lives on; every attempt is a `denied` violation event.
Plus what only the lsm backend sees: a #! script's own inode, and mappings
whose pages are not the file's (private writable, copied on write).
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.bypass.backend import LSM
from tests.bypass.lab import Lab
from tests.bypass.scenarios import BypassScenarios

pytestmark = list(LSM.marks)

WRITABLE_CODE_C = r"""
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
/* Code that is not the measured file although it maps one: "wx" maps it private, writable and
 * executable; "cow" writes to a private mapping (its page becomes the task's copy), then
 * mprotects it executable. */
int main(int argc, char **argv)
{
	int fd = open(argv[2], O_RDONLY);
	if (fd < 0) { perror("open"); return 3; }
	if (!strcmp(argv[1], "wx")) {
		if (mmap(0, 4096, PROT_READ | PROT_WRITE | PROT_EXEC, MAP_PRIVATE, fd, 0) == MAP_FAILED) { perror("mmap"); return 3; }
	} else {
		volatile char *p = mmap(0, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
		if (p == MAP_FAILED) { perror("mmap"); return 3; }
		p[0] = p[0];
		if (mprotect((void *)p, 4096, PROT_READ | PROT_EXEC)) { perror("mprotect"); return 3; }
	}
	puts("mapped");
	return 0;
}
"""


@pytest.mark.usefixtures("host_root_files")  # before the lab measures system files
class TestLsm(BypassScenarios):
    backend = LSM

    def test_hashbang_script_exec_is_judged_as_the_script(self, lab: Lab, tmp_path: Path) -> None:
        """bprm_check_security sees the #! script itself (the tracepoint backend sees only its interpreter)."""
        script = tmp_path / "job.sh"
        script.write_text(f"#!{lab.shell}\necho from-script\n")
        script.chmod(0o755)
        tp = lab.label()
        r = tp.sh(f"{script}; echo rc=$?")
        assert r.stdout.split() == ["rc=126"]
        self.backend.expect.reported(r.stderr)
        [v] = tp.violations("exec")
        assert v.subject == str(script) and v.detail["why"] == "unmeasured" and v.detail["action"] == "denied"
        ok = lab.label(trusted=[str(script)])
        assert ok.sh(f"{script}; echo rc=$?").stdout.split() == ["from-script", "rc=0"]

    @pytest.fixture(scope="class")
    @classmethod
    def writable_code(cls, tmp_path_factory: pytest.TempPathFactory) -> str:
        src = tmp_path_factory.mktemp("wx") / "wx.c"
        src.write_text(WRITABLE_CODE_C)
        subprocess.run(["gcc", "-O2", "-o", str(src.with_suffix("")), str(src)], check=True)
        return str(src.with_suffix(""))

    @pytest.mark.parametrize("how, call", [("wx", "mmap"), ("cow", "mprotect")])
    def test_writable_copies_of_a_trusted_file_follow_the_anon_exec_rule(self, lab: Lab, writable_code: str,
                                                                         how: str, call: str) -> None:
        strict = lab.label(anon_exec="violation", trusted=[writable_code])
        r = strict.sh(f"{writable_code} {how} {lab.true}; echo rc=$?")
        self.backend.expect.reported(r.stderr, prefix=f"{call}:")
        [v] = strict.violations("anon-exec" if call == "mmap" else "mprotect")
        assert v.detail["why"] == "anonymous-exec" and v.detail["ino"] == os.stat(lab.true).st_ino
        jit = lab.label(anon_exec="allow", trusted=[writable_code])
        assert jit.sh(f"{writable_code} {how} {lab.true}; echo rc=$?").stdout.split() == ["mapped", "rc=0"]
