"""The vm tier on the host: boot once per guest suite, run its tests inside, report each one here.

Two suites, each one boot: `tests/vm/guest` (the lsm backend, the vTPM) and
`tests/vm/guest_ima` (the kernel's own IMA measuring with `ima_policy=tcb`,
which makes every file root reads slower: only the tests that need it pay).
One boot runs a suite's folder in the VM (a boot is ~12 s, each bcc
compile ~8 s under software emulation: per-test boots would cost minutes). The
guest writes a junit file to the VM's --rwdir; each guest test case becomes a
host test case below with the guest's own failure text, so the tier's output
lists every claim proved in the VM.
"""
from __future__ import annotations

import functools
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import requires
from tests.vm.conftest import GUEST_ENV, VM_FACTS
from tests.vm.harness import DEB_TIMEOUT, DEFAULT_APPEND, REPO_ROOT, VmError, ensure_deb, find_kernel, run_in_vm

pytestmark = [requires(root=True, tool="qemu-system-x86_64"), requires(tool="swtpm")]

GUEST_DIR = "tests/vm/guest"
IMA_GUEST_DIR = "tests/vm/guest_ima"
# guest folder -> kernel command line of its boot
SUITES = {GUEST_DIR: DEFAULT_APPEND, IMA_GUEST_DIR: f"{DEFAULT_APPEND} ima_policy=tcb"}
VM_TIMEOUT = 1800.0  # the guest suite (PRIMA and Port Authority on lsm): ~12 min idle, more under load
IMA_VM_TIMEOUT = 1800.0  # the kernel-IMA suite's own boot: ima_policy=tcb hashes every file root reads (one
                        # guest test: 14 min 20 s under load average 15, boot 250 s of it; ~65 s boots idle)
# Whichever test first asks for a suite boots it inside that test (and the main suite's first one may
# run `make deb` before): pytest-timeout's default (900 s, pyproject.toml) killed a guest suite that
# took longer under load, and the next test booted it again.
pytestmark.append(pytest.mark.timeout(int(DEB_TIMEOUT + max(VM_TIMEOUT, IMA_VM_TIMEOUT) + 300)))
# The guest's /tmp is an overlay of 9p and tmpfs, where stat() and the kernel
# disagree about a file's device: guest tests keep their files on /run (tmpfs).
GUEST_BASETEMP = "/run/cwlite-guest-tmp"


def _guest_command(suite: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", suite, *args]


@functools.lru_cache(maxsize=None)
def _guest_nodeids(suite: str = GUEST_DIR) -> tuple[str, ...]:
    """The guest tests, collected on the host (collection only imports them), so each gets a host id."""
    env = dict(os.environ, **{GUEST_ENV: "1"})
    proc = subprocess.run(_guest_command(suite, "--collect-only", "-q"), cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True)
    ids = [line.strip() for line in proc.stdout.splitlines() if "::" in line]
    if proc.returncode != 0 or not ids:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-5:]
        pytest.fail(f"{suite}: guest tests do not collect (rc {proc.returncode}): {' | '.join(tail)}", pytrace=False)
    return tuple(ids)


def _suite_of(nodeid: str) -> str:
    return next(s for s in SUITES if nodeid.startswith(s + "/"))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "guest_test" in metafunc.fixturenames:
        ids = [i for suite in SUITES for i in _guest_nodeids(suite)]
        metafunc.parametrize("guest_test", ids, ids=[i.removeprefix("tests/vm/") for i in ids])
    if "suite" in metafunc.fixturenames:
        metafunc.parametrize("suite", list(SUITES), ids=[s.removeprefix("tests/vm/") for s in SUITES])


@dataclass
class GuestOutcome:
    status: str  # passed | failed | skipped | missing
    text: str = ""
    properties: dict[str, str] = field(default_factory=dict)


@dataclass
class GuestSession:
    rc: int | None
    console: str
    outcomes: dict[str, GuestOutcome]
    error: str = ""


def _junit_key(nodeid: str) -> tuple[str, str]:
    """(classname, name) pytest's junit writer gives `nodeid`."""
    path, *scopes = nodeid.split("::")
    return ".".join([path.removesuffix(".py").replace("/", "."), *scopes[:-1]]), scopes[-1]


def _parse_junit(path: Path) -> dict[tuple[str, str], GuestOutcome]:
    outcomes: dict[tuple[str, str], GuestOutcome] = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        props = {p.get("name", ""): p.get("value", "") for p in case.iter("property")}
        outcome = GuestOutcome("passed", properties=props)
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome.status = "skipped" if tag == "skipped" else "failed"
                outcome.text = f"{node.get('message', '')}\n{node.text or ''}".strip()
                break
        outcomes[(case.get("classname", ""), case.get("name", ""))] = outcome
    return outcomes


@pytest.fixture(scope="module")
def guest_sessions(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Each suite's session, booted when its first test asks (one boot per suite)."""
    sessions: dict[str, GuestSession] = {}
    facts = {"kernel image": str(find_kernel())}
    request.config.stash[VM_FACTS] = facts

    def get(suite: str) -> GuestSession:
        if suite not in sessions:
            sessions[suite] = _boot_suite(suite, tmp_path_factory, facts)
        return sessions[suite]

    return {"get": get}


def _ensure_deb(rwdir: Path, facts: dict) -> None:
    """`make deb` on the host before the boot, when build/deb has no package: the guest installs it
    (guest/test_deb_install.py), and the guest's root is read-only."""
    log = rwdir / "make-deb.log"
    deb = ensure_deb(log)
    facts["cwlite package (for the guest's install test)"] = f"{deb or 'none'}" + (f", make deb log {log}"
                                                                                    if log.exists() else "")


def _boot_suite(suite: str, tmp_path_factory: pytest.TempPathFactory, facts: dict) -> GuestSession:
    """Boot once and run the whole guest folder; the junit file comes back through the rwdir."""
    rwdir = tmp_path_factory.mktemp("vm")
    if suite == GUEST_DIR:
        _ensure_deb(rwdir, facts)
    junit = rwdir / "guest.xml"
    env = f"{GUEST_ENV}=1 CWLITE_VM_RESULTS={rwdir}"
    command = f"env {env} " + " ".join(_guest_command(suite, f"--junitxml={junit}", f"--basetemp={GUEST_BASETEMP}",
                                                      "-q", "-ra", "--durations=8"))
    console = rwdir / "console.log"
    name = suite.removeprefix("tests/vm/")
    with console.open("w") as log:
        try:
            run = run_in_vm(command, results_dir=rwdir, timeout=VM_TIMEOUT if suite == GUEST_DIR else IMA_VM_TIMEOUT,
                             echo=log.write, append=SUITES[suite])
        except VmError as exc:
            return GuestSession(rc=None, console=exc.output, outcomes={}, error=str(exc))
    facts[f"{name}: boot seconds (to guest command)"] = f"{run.boot_seconds:.1f}" if run.boot_seconds else "never booted"
    facts[f"{name}: vm seconds (boot + guest tests + power off)"] = f"{run.seconds:.1f}"
    facts[f"{name}: console log"] = str(console)
    if not junit.exists():
        return GuestSession(rc=run.rc, console=run.output, outcomes={}, error=f"{junit}: guest wrote no junit file (vng rc {run.rc})")
    parsed = _parse_junit(junit)
    for outcome in parsed.values():
        for key in ("kernel", "backend", "bcc"):
            if key in outcome.properties:
                facts[f"guest {key}"] = outcome.properties[key]
    session = GuestSession(rc=run.rc, console=run.output, outcomes={})
    session.outcomes = {nodeid: parsed.get(_junit_key(nodeid), GuestOutcome("missing"))
                        for nodeid in _guest_nodeids(suite)}
    return session


def _tail(text: str, n: int = 25) -> str:
    return "\n".join(text.strip().splitlines()[-n:])


def test_in_vm(guest_sessions: dict, guest_test: str) -> None:
    """One guest test's verdict, as the VM gave it."""
    guest_session = guest_sessions["get"](_suite_of(guest_test))
    if guest_session.error:
        pytest.fail(f"{guest_session.error}\n--- VM console (tail) ---\n{_tail(guest_session.console)}", pytrace=False)
    outcome = guest_session.outcomes[guest_test]
    if outcome.status == "failed":
        pytest.fail(f"in the VM: {outcome.text}", pytrace=False)
    if outcome.status == "skipped":
        pytest.skip(f"in the VM: {outcome.text}")
    if outcome.status == "missing":
        pytest.fail(f"{guest_test}: not in the guest's junit file\n--- VM console (tail) ---\n{_tail(guest_session.console)}", pytrace=False)


def test_guest_run_exit_status_agrees(guest_sessions: dict, suite: str) -> None:
    """The guest pytest's exit status matches its verdicts (a crash after the tests would show here)."""
    guest_session = guest_sessions["get"](suite)
    if guest_session.error:
        pytest.fail(guest_session.error, pytrace=False)
    failed = any(o.status in ("failed", "missing") for o in guest_session.outcomes.values())
    assert guest_session.rc == (1 if failed else 0), _tail(guest_session.console)
