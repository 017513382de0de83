"""Coverage-guided fuzz targets (atheris/libFuzzer) for the parsers hostile input reaches.

    python -m tests.unit.atheris_targets TARGET CORPUS_DIR -runs=N

TARGET is one of TARGETS. An input may make a parser answer or raise a one-line CwliteError;
any other exception (or a multi-line message) is a crash: libFuzzer prints it and exits non-zero.
tests/unit/test_abuse_atheris.py runs each target from a corpus of valid inputs.
"""
from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from controlplane.core import imalog
    from controlplane.core import proof as proof_mod
    from controlplane.core.errors import CwliteError
    from controlplane.core.policy import parse_policy

PROOF_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32))).public_key()


def _policy(data: bytes) -> None:
    parse_policy(data.decode("utf-8", "replace"), source="fuzz.toml")


def _log_binary(data: bytes) -> None:
    imalog.parse_binary(data, source="fuzz.bin")


def _log_ascii(data: bytes) -> None:
    imalog.parse_ascii(data.decode("utf-8", "replace"), source="fuzz.ascii")


def _proof(data: bytes) -> None:
    doc = proof_mod.check(data, PROOF_KEY)
    proof_mod.check_quote(doc)


TARGETS = {"policy": _policy, "log-binary": _log_binary, "log-ascii": _log_ascii, "proof": _proof}


def one_input(target):
    def run(data: bytes) -> None:
        try:
            target(data)
        except CwliteError as exc:
            if "\n" in str(exc):
                raise AssertionError(f"{type(exc).__name__} over several lines: {exc!r}") from exc
    return run


if __name__ == "__main__":
    name = sys.argv.pop(1)
    atheris.Setup(sys.argv, one_input(TARGETS[name]))
    atheris.Fuzz()
