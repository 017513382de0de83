"""Keylime's own IMA check, timed on a cwlite log: the side-by-side baseline of test_bench_verifier.

Runs in Keylime's venv (made by `keylime_python()` from PyPI), never in cwlite's:

    <keylime venv>/bin/python tests/bench/keylime_baseline.py LOG.ascii POLICY.json PCR_HEX ROUNDS

and prints one JSON line: {"seconds": [...] (CPU seconds), "running_hash": hex, "failures": n}. Each round is
`keylime.ima.ima.process_measurement_list` over every line, with a fresh AgentAttestState (a
whole-log check), the sha256 PCR bank and the runtime policy given. The keylime import is inside
main(): the host side imports keylime_python() from here without Keylime installed.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

KEYLIME = "keylime==7.14.3"
# keylime.ima imports these though Keylime's PyPI metadata does not declare them; its `gpg` is
# Debian's python3-gpg (no PyPI wheel), seen through --system-site-packages.
KEYLIME_DEPS = ("jsonschema", "pyyaml", "lark")
KEYLIME_VENV = Path(os.environ.get("CWLITE_KEYLIME_VENV", "/var/cache/cwlite-bench/keylime-venv"))


def keylime_python(venv: Path = KEYLIME_VENV) -> Path:
    """The python of a venv holding Keylime from PyPI, made on first use (a minute, once per machine)."""
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "from keylime.ima import ima; from keylime.agentstates import AgentAttestState"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    venv.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["/usr/bin/python3", "-m", "venv", "--system-site-packages", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", KEYLIME, *KEYLIME_DEPS], check=True)
    done = subprocess.run(probe, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{venv}: keylime.ima does not import: {done.stderr.strip().splitlines()[-1]} "
                           "(python3-gpg: make setup installs it)")
    return python


def main(log_path: str, policy_path: str, pcr_hex: str, rounds: int) -> None:
    import logging

    from keylime.agentstates import AgentAttestState
    from keylime.common.algorithms import Hash
    from keylime.ima import ima

    logging.disable(logging.CRITICAL)        # a logger call per entry would time logging, not checking
    lines = Path(log_path).read_text().splitlines()
    policy_text = Path(policy_path).read_text()
    seconds, running_hash, failures = [], "", 0
    for _ in range(rounds):
        policy = json.loads(policy_text)     # process_measurement_list edits the policy it is given
        t0 = time.process_time()
        running_hash, failure = ima.process_measurement_list(AgentAttestState("bench"), lines, policy,
                                                              pcrval=pcr_hex, hash_alg=Hash.SHA256)
        seconds.append(time.process_time() - t0)
        failures = len(failure.get_event_ids())
    print(json.dumps({"seconds": seconds, "running_hash": running_hash, "failures": failures}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
