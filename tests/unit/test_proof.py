"""Proofs: canonical, signed, and refused after any one-byte change."""
from __future__ import annotations

import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from controlplane.core import proof
from controlplane.cli.main import main
from controlplane.core.errors import VerifyError
from controlplane.core.keys import load_public_key, load_signing_key


def _doc():
    return {"host": {"name": "build1", "url": "https://127.0.0.1:1", "ak_sha256": "aa" * 32},
            "log": {"pcr": 10, "start": 0, "end": 3, "pcr_value": "bb" * 32},
            "policy_digest": "cc" * 32, "db_digest": "dd" * 32, "trusted_entries": 2,
            "entries": [{"index": 2, "verdict": "untrusted", "reason": "violation", "label": "tp",
                         "op": "exec", "subject": "/tmp/évil x", "digest": "ee" * 32}],
            "verdict": "untrusted", "reasons": ["entry 2: violation"]}


def test_sign_then_check_round_trip(tmp_path):
    key = load_signing_key(tmp_path / "v.key", create=True)
    data = proof.sign(_doc(), key)
    doc = proof.check(data, load_public_key(tmp_path / "v.pub"))
    assert doc["verdict"] == "untrusted" and doc["entries"][0]["subject"] == "/tmp/évil x"
    assert doc["verifier_key"] == proof.key_id(key.public_key())
    assert (tmp_path / "v.key").stat().st_mode & 0o777 == 0o600
    # the same key loads back
    assert load_signing_key(tmp_path / "v.key").public_key() == key.public_key()


def test_every_one_byte_change_is_refused():
    key = Ed25519PrivateKey.generate()
    data = proof.sign(_doc(), key)
    pub = key.public_key()
    reasons = set()
    for i in range(len(data)):
        for delta in (1, 0x20):
            bad = bytearray(data)
            bad[i] ^= delta
            with pytest.raises(VerifyError) as exc:
                proof.check(bytes(bad), pub)
            reasons.add(exc.value.reason)
    assert reasons == {"proof-format", "proof-signature"}


def test_other_key_and_reformatted_file_are_refused():
    key = Ed25519PrivateKey.generate()
    data = proof.sign(_doc(), key)
    with pytest.raises(VerifyError) as exc:
        proof.check(data, Ed25519PrivateKey.generate().public_key())
    assert exc.value.reason == "proof-signature"
    pretty = json.dumps(json.loads(data), indent=2).encode()
    with pytest.raises(VerifyError) as exc:
        proof.check(pretty, key.public_key())
    assert exc.value.reason == "proof-format"


def test_cli_check(tmp_path, capsys):
    key = load_signing_key(tmp_path / "v.key", create=True)
    p = tmp_path / "p.json"
    p.write_bytes(proof.sign(_doc(), key))
    # signed, but carrying no TPM quote: the offline quote check refuses it (real proofs: test_attest_cli)
    assert main(["proof", "check", str(p), "--key", str(tmp_path / "v.pub"), "--json"]) == 1
    assert "quote: fields missing or malformed" in capsys.readouterr().err
    raw = bytearray(p.read_bytes())
    raw[raw.index(b"untrusted")] = ord("U")
    p.write_bytes(bytes(raw))
    assert main(["proof", "check", str(p), "--key", str(tmp_path / "v.pub")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"cwlite: error: {p}: signature: does not verify") and err.count("\n") == 1
