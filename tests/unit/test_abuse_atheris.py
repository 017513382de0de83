"""Coverage-guided fuzzing (atheris, libFuzzer) of the policy parser, both log parsers and the proof
checker, each from a corpus of valid inputs; a crash (any exception but a one-line CwliteError) fails.

The hypothesis suite (test_abuse_fuzz.py) mutates structure; this one follows coverage. Each target
runs for RUNS inputs or SECONDS, whichever ends first.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from controlplane.core import proof as proof_mod
from tests.unit.test_abuse_fuzz import PROOF_DOC, VALID_POLICY

VECTORS = Path(__file__).resolve().parents[1] / "vectors"
RUNS, SECONDS = 50_000, 30
SEEDS = {
    "policy": [VALID_POLICY.encode()],
    "log-binary": [(VECTORS / f"{n}.bin").read_bytes() for n in ("ima_ng_sample", "kernel_ima_sig")],
    "log-ascii": [(VECTORS / f"{n}.ascii").read_bytes() for n in ("ima_ng_sample", "kernel_ima_sig")],
    "proof": [proof_mod.sign(PROOF_DOC, Ed25519PrivateKey.from_private_bytes(bytes(range(32))))],
}


@pytest.mark.parametrize("target", sorted(SEEDS))
def test_coverage_guided_fuzzing_finds_no_crash(target: str, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, seed in enumerate(SEEDS[target]):
        (corpus / f"seed{i}").write_bytes(seed)
    r = subprocess.run([sys.executable, "-m", "tests.unit.atheris_targets", target, str(corpus), f"-runs={RUNS}",
                        f"-max_total_time={SECONDS}", "-max_len=8192"],
                       capture_output=True, text=True, timeout=SECONDS + 120, cwd=Path(__file__).resolve().parents[2])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Done" in r.stderr or "INITED" in r.stderr, r.stderr[-2000:]
