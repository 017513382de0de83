"""controlplane.host.tpm against a real swtpm: PCRs, the AK, quotes and their software check, credentials."""
from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from tpm2_pytss.types import TPM2B_PUBLIC   # test-side only: an independent reading of the EK

from controlplane.core.errors import TpmError, VerifyError
from controlplane.core.quote import Quote, ak_name_of, make_credential, pcr_composite_digest, public_pem, verify_quote
from controlplane.host.tpm import Tpm, open_tpm
from tests.conftest import requires
from tests.tpm_fixtures import tpm2_pcrread, rsa_tpm, swtpm, swtpm_template, tpm, tpm_tools_env  # noqa: F401

pytestmark = requires(tool="swtpm")


@requires(tool="tpm2_pcrread")
def test_extend_matches_software_and_tpm2tpm2_pcrread(tpm, tpm_tools_env) -> None:
    value = bytes(32)
    for i in range(5):
        d = hashlib.sha256(b"%d" % i).digest()
        tpm.extend(12, d)
        value = hashlib.sha256(value + d).digest()
    assert tpm.read_pcr(12) == value == tpm2_pcrread(tpm_tools_env, 12)
    assert tpm.read_pcrs(range(0, 24))[12] == value


@pytest.mark.parametrize("fixture", ["tpm", "rsa_tpm"])
def test_quote_verifies_in_software(fixture: str, request) -> None:
    t = request.getfixturevalue(fixture)
    t.extend(10, hashlib.sha256(b"x").digest())
    nonce = hashlib.sha256(b"nonce").digest()
    q = t.quote(nonce, [0, 10, 23])
    info = verify_quote(t.ak_public(), Quote.from_dict(q.to_dict()), nonce)
    assert info.pcrs == (0, 10, 23)
    assert info.pcr_values[10] == t.read_pcr(10)
    assert info.pcr_digest == pcr_composite_digest(q.pcr_values, [0, 10, 23])
    assert info.signer_name and info.reset_count >= 0 and info.firmware_version > 0


def test_quote_failures_have_their_reason(tpm, rsa_tpm) -> None:
    nonce = b"n" * 32
    q = tpm.quote(nonce, [10])
    ak = tpm.ak_public()

    def reason(ak_public: bytes, quote: Quote, qd: bytes = nonce) -> str:
        with pytest.raises(VerifyError) as err:
            verify_quote(ak_public, quote, qd)
        return err.value.reason

    assert reason(ak, q, b"other") == "nonce"
    assert reason(ak, replace(q, pcr_values={10: b"\x01" * 32})) == "pcr-digest"
    assert reason(ak, replace(q, pcrs=(10, 11), pcr_values={**q.pcr_values, 11: bytes(32)})) == "pcr-digest"
    assert reason(rsa_tpm.ak_public(), q) == "signature"                 # another AK
    sig = bytearray(q.signature)
    sig[-5] ^= 1
    assert reason(ak, replace(q, signature=bytes(sig))) == "signature"
    # the signature is checked before the attest bytes are read: tampering with
    # the nonce inside them is a signature failure, never a "nonce" one
    att = bytearray(q.attest)
    att[att.find(nonce)] ^= 1
    tampered = bytes([nonce[0] ^ 1]) + nonce[1:]
    assert reason(ak, replace(q, attest=bytes(att)), tampered) == "signature"
    assert reason(ak, replace(q, signature=b"\x00\x01")) == "malformed"
    assert reason(b"junk", q) == "malformed"
    with pytest.raises(VerifyError) as err:
        Quote.from_dict({**q.to_dict(), "pcr_values": {"10": "abcd"}})
    assert err.value.reason == "malformed"


@requires(tool="tpm2_checkquote")
@pytest.mark.parametrize("fixture", ["tpm", "rsa_tpm"])
def test_tpm2_checkquote_accepts_the_quote(fixture: str, request, tmp_path) -> None:
    t = request.getfixturevalue(fixture)
    q = t.quote(b"abc", [10])
    (tmp_path / "ak.pem").write_bytes(public_pem(t.ak_public()))
    (tmp_path / "msg").write_bytes(q.attest)
    (tmp_path / "sig").write_bytes(q.signature)

    def check(qualification: str) -> int:
        return subprocess.run(["tpm2_checkquote", "-u", str(tmp_path / "ak.pem"), "-m", str(tmp_path / "msg"),
                               "-s", str(tmp_path / "sig"), "-g", "sha256", "-q", qualification],
                              capture_output=True).returncode

    assert check(b"abc".hex()) == 0
    assert check(b"abd".hex()) != 0


def test_ak_is_persisted_and_restricted(swtpm, tpm) -> None:
    name = tpm.ak_name()
    assert name == ak_name_of(tpm.ak_public())
    with Tpm(swtpm.tcti) as again:
        assert again.ak_name() == name
    with pytest.raises(VerifyError):   # an EK (restricted decrypt) is no AK
        verify_quote(tpm.ek_public(), tpm.quote(b"x", [10]), b"x")


def test_ek_certificate_is_for_the_ek(tpm) -> None:
    der = tpm.ek_certificate()
    assert der is not None
    cert = x509.load_der_x509_certificate(der)
    ek, _ = TPM2B_PUBLIC.unmarshal(tpm.ek_public())
    ek_key = serialization.load_der_public_key(ek.publicArea.to_der())
    assert cert.public_key().public_numbers() == ek_key.public_numbers()


def test_credential_activation_round_trip(tpm, rsa_tpm) -> None:
    secret = b"s" * 32
    blob, enc = make_credential(tpm.ek_public(), tpm.ak_name(), secret)
    assert tpm.activate_credential(blob, enc) == secret
    # a credential made for another key's name is refused by the TPM, with its code
    blob, enc = make_credential(tpm.ek_public(), rsa_tpm.ak_name(), secret)
    with pytest.raises(TpmError) as err:
        tpm.activate_credential(blob, enc)
    assert err.value.rc and err.value.detail and "\n" not in str(err.value)


def test_tpm_errors_carry_the_tpm_code(tpm) -> None:
    with pytest.raises(TpmError) as err:
        tpm.reset_pcr(10)                        # not resettable at locality 0
    assert err.value.rc == 0x907 and "locality" in err.value.detail
    tpm.extend(23, b"\x01" * 32)
    tpm.reset_pcr(23)
    assert tpm.read_pcr(23) == bytes(32)
    with pytest.raises(TpmError):
        tpm.extend(10, b"short")


def test_open_tpm_runs_and_reuses_the_embedded_swtpm(tmp_path) -> None:
    with open_tpm(tmp_path) as a:
        assert a.swtpm is not None and a.swtpm.process is not None
        a.extend(13, b"\x02" * 32)
        with open_tpm(tmp_path) as b:      # a second cwlite command attaches, does not restart
            assert b.swtpm.pid == a.swtpm.pid and b.swtpm.process is None
            assert b.read_pcr(13) == a.read_pcr(13) != bytes(32)
        assert a.info()["ak"]["name"] == a.ak_name().hex()
        pid = a.swtpm.pid
    assert a.swtpm.process.returncode is not None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def _vector(alg: str) -> tuple[bytes, Quote, bytes]:
    v = json.loads((Path(__file__).resolve().parents[1] / "vectors" / f"quote_{alg}.json").read_text())
    return base64.b64decode(v["ak_public"]), Quote.from_dict(v["quote"]), bytes.fromhex(v["qualifying_data"])


@pytest.mark.parametrize("alg", ["ecc", "rsa"])
def test_quote_vectors_verify_without_a_tpm(alg: str, tmp_path) -> None:
    ak, q, qd = _vector(alg)
    info = verify_quote(ak, q, qd)
    assert info.pcrs == (0, 10, 23) and info.pcr_values[10] == q.pcr_values[10] != bytes(32)
    other_ak, _, _ = _vector("rsa" if alg == "ecc" else "ecc")
    with pytest.raises(VerifyError) as err:
        verify_quote(other_ak, q, qd)
    assert err.value.reason == "signature"
    if shutil.which("tpm2_checkquote"):
        (tmp_path / "ak.pem").write_bytes(public_pem(ak))
        (tmp_path / "msg").write_bytes(q.attest)
        (tmp_path / "sig").write_bytes(q.signature)
        rc = subprocess.run(["tpm2_checkquote", "-u", str(tmp_path / "ak.pem"), "-m", str(tmp_path / "msg"),
                             "-s", str(tmp_path / "sig"), "-g", "sha256", "-q", qd.hex()], capture_output=True).returncode
        assert rc == 0
