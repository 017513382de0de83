"""`cwlite selinux load`: the module's digest goes into the measurement log, and the verifier judges it.

Real tools and a real TPM: the reference-policy Makefile builds the module,
`semodule` installs it into a scratch copy of selinux-policy-default (a private
mount namespace: the host's store is never touched), swtpm holds the PCR the
entry is extended into. The verifier's judge then reads the entries back from
the log file: the module its own policy renders is trusted; a module edited by
hand after rendering is untrusted, naming its entry.
"""
from __future__ import annotations

import bz2
import json
import subprocess
import sys
from pathlib import Path


from controlplane.core import imalog
from controlplane.core.events import EventKind, parse_ima_name
from controlplane.core.policy import load_policy
from controlplane.core.selinux_render import render
from controlplane.host import selinux_module
from controlplane.host.mlog import read_log
from controlplane.verifier.judge import Facts, Judge, Reference, Verdict
from tests.conftest import requires
from tests.tpm_fixtures import needs_swtpm, swtpm, swtpm_template, tpm_tools_env, tpm2_pcrread  # noqa: F401

pytestmark = [requires(root=True), requires(tool="semodule"), requires(tool="checkmodule"), needs_swtpm]

REPO = Path(__file__).resolve().parents[2]
REFERENCE = REPO / "selinux-policy" / "policy.toml"
# the hand edit: the TP domain may make its memory writable and executable (W^X gone)
EDIT = "allow cwlite_tp_build_t self:process execmem;\n"


def _load(source: Path, root: Path, data_dir: Path, tcti: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "controlplane.cli", "selinux", "load", str(source), "--root", str(root),
                           "--data-dir", str(data_dir), "--device", tcti, "--json"],
                          capture_output=True, text=True, cwd=REPO, timeout=900)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _installed_cil(root: Path) -> str:
    """The module as the scratch store holds it (semodule's CIL of the .pp)."""
    return bz2.decompress((selinux_module.store_dir(root) / "active/modules/400/cwlite/cil").read_bytes()).decode()


def test_a_scratch_store_load_is_logged_and_an_edited_module_is_untrusted(swtpm, tpm_tools_env, tmp_path: Path) -> None:
    policy = load_policy(REFERENCE)
    expected = render(policy).digest()
    root, data_dir = tmp_path / "store", tmp_path / "cwlite"
    data_dir.mkdir()

    first = _load(REFERENCE, root, data_dir, swtpm.tcti)
    assert first["module_digest"] == expected and first["store"] == str(selinux_module.store_dir(root))
    assert "execmem" not in _installed_cil(root)

    edited = tmp_path / "edited"
    selinux_module.write_sources(render(policy), edited)
    with open(edited / "cwlite.te", "a") as f:
        f.write(EDIT)
    second = _load(edited, root, data_dir, swtpm.tcti)
    assert second["module_digest"] != expected
    assert "execmem" in _installed_cil(root)      # the edited module is what the store now holds

    entries = read_log(data_dir / "measurements.log")
    # boot_aggregate, then one selinux-load per load; the PCR is the replay of exactly these
    assert [e.index for e in entries] == [0, first["log_entry"], second["log_entry"]] == [0, 1, 2]
    pcr = entries[0].pcr
    assert tpm2_pcrread(tpm_tools_env, pcr) == imalog.replay(entries, pcr)
    events = [parse_ima_name(e.digest, e.name) for e in entries[1:]]
    assert [(ev.kind, ev.op, ev.subject) for ev in events] == [(EventKind.SELINUX_LOAD, "cwlite", first["store"])] * 2
    assert [ev.digest.hex() for ev in events] == [expected, second["module_digest"]]

    judge = Judge(Reference(policy, db=None), Facts(), pcr=pcr)
    verdicts = [judge.judge(e) for e in entries[1:]]
    assert [(v.index, v.verdict, v.reason) for v in verdicts] == [
        (1, Verdict.TRUSTED, ""), (2, Verdict.UNTRUSTED, "selinux-module")]
    assert verdicts[1].digest == second["module_digest"] and judge.facts.untrusted == 1
