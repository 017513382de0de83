"""controlplane.core.quote (pure Python) against tpm2-pytss's own unmarshalling and a real swtpm.

The product reads TPM structures without a TSS; these tests read the same
bytes with tpm2-pytss (test-side only) and require the same answers, and let
the swtpm's TPM2_ActivateCredential judge the credentials it makes.
"""
from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from tpm2_pytss import utils as tss_utils
from tpm2_pytss.types import TPM2B_NAME, TPM2B_PUBLIC, TPMS_ATTEST

from controlplane.core.errors import TpmError, VerifyError
from controlplane.core.quote import (
    ALG_ECC,
    ALG_RSA,
    Quote,
    ak_name_of,
    make_credential,
    parse_public,
    parse_quote_attest,
    public_pem,
    verify_quote,
)
from tests.conftest import requires
from tests.tpm_fixtures import rsa_tpm, swtpm, swtpm_template, tpm  # noqa: F401

REPO = Path(__file__).resolve().parents[2]
VECTORS = REPO / "tests" / "vectors"


def _der(key) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _vector(alg: str) -> tuple[bytes, Quote, bytes]:
    v = json.loads((VECTORS / f"quote_{alg}.json").read_text())
    return base64.b64decode(v["ak_public"]), Quote.from_dict(v["quote"]), bytes.fromhex(v["qualifying_data"])


def _same_as_pytss(tpm2b_public: bytes) -> None:
    ours = parse_public(tpm2b_public)
    theirs, used = TPM2B_PUBLIC.unmarshal(tpm2b_public)
    assert used == len(tpm2b_public)
    area = theirs.publicArea
    assert (ours.type, ours.name_alg, ours.attributes) == (int(area.type), int(area.nameAlg),
                                                           int(area.objectAttributes))
    assert _der(ours.key) == area.to_der()
    assert ours.name == ak_name_of(tpm2b_public) == bytes(theirs.get_name())
    assert serialization.load_pem_public_key(public_pem(tpm2b_public)).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) == area.to_der()


def _attest_same_as_pytss(attest: bytes) -> None:
    ours = parse_quote_attest(attest)
    theirs, used = TPMS_ATTEST.unmarshal(attest)
    assert used == len(attest)
    assert ours.signer_name == bytes(theirs.qualifiedSigner)
    assert ours.extra_data == bytes(theirs.extraData)
    clock = theirs.clockInfo
    assert (ours.clock, ours.reset_count, ours.restart_count, ours.safe) == (
        int(clock.clock), int(clock.resetCount), int(clock.restartCount), bool(clock.safe))
    assert ours.firmware_version == int(theirs.firmwareVersion)
    sel = theirs.attested.quote.pcrSelect
    assert [alg for alg, _ in ours.selection] == [int(s.hash) for s in sel]
    assert [pcrs for _, pcrs in ours.selection] == [
        tuple(i for i in range(s.sizeofSelect * 8) if bytes(s.pcrSelect)[i // 8] >> (i % 8) & 1) for s in sel]
    assert ours.pcr_digest == bytes(theirs.attested.quote.pcrDigest)


@pytest.mark.parametrize("alg", ["ecc", "rsa"])
def test_vectors_read_as_tpm2_pytss_reads_them(alg: str) -> None:
    ak, q, qd = _vector(alg)
    _same_as_pytss(ak)
    _attest_same_as_pytss(q.attest)
    assert parse_public(ak).type == (ALG_ECC if alg == "ecc" else ALG_RSA)
    assert verify_quote(ak, q, qd).pcrs == (0, 10, 23)


@requires(tool="swtpm")
@pytest.mark.parametrize("fixture", ["tpm", "rsa_tpm"])
def test_live_keys_and_quotes_read_as_tpm2_pytss_reads_them(fixture: str, request) -> None:
    t = request.getfixturevalue(fixture)
    _same_as_pytss(t.ak_public())
    _same_as_pytss(t.ek_public())                   # RSA-2048 EK: storage key with AES-128-CFB
    q = t.quote(b"q" * 32, [0, 7, 10, 16, 23])
    _attest_same_as_pytss(q.attest)
    info = verify_quote(t.ak_public(), q, b"q" * 32)
    assert info.pcrs == (0, 7, 10, 16, 23) and info.signer_name == parse_quote_attest(q.attest).signer_name


@requires(tool="swtpm")
def test_credentials_are_what_tpm2_pytss_makes_and_the_tpm_activates_them(tpm, rsa_tpm) -> None:
    ek, name, secret = tpm.ek_public(), tpm.ak_name(), b"credential-secret-0123456789abcd"
    ours = make_credential(ek, name, secret)
    pub, _ = TPM2B_PUBLIC.unmarshal(ek)
    blob, enc = tss_utils.make_credential(pub, secret, TPM2B_NAME(name))
    assert [len(x) for x in ours] == [len(blob.marshal()), len(enc.marshal())]   # same structures, new seed
    assert tpm.activate_credential(*ours) == secret                               # the TPM's own judgement
    assert tpm.activate_credential(blob.marshal(), enc.marshal()) == secret
    assert tpm.activate_credential(*make_credential(ek, name, b"\x01")) == b"\x01"
    # the outer HMAC binds the blob to the AK's name and to every encrypted byte
    for bad in (make_credential(ek, rsa_tpm.ak_name(), secret),
                (ours[0][:-1] + bytes([ours[0][-1] ^ 1]), ours[1])):
        with pytest.raises(TpmError) as err:
            tpm.activate_credential(*bad)
        assert err.value.rc


def test_malformed_structures_are_refused_with_their_reason() -> None:
    ak, q, qd = _vector("ecc")
    for data in (ak[:-1], ak + b"\0", b"", b"\x00\x02\x00\x08"):
        with pytest.raises(VerifyError) as err:
            parse_public(data)
        assert err.value.reason == "malformed"
    with pytest.raises(VerifyError) as err:
        parse_quote_attest(q.attest + b"\0")
    assert err.value.reason == "malformed"
    rsa_ak, _, _ = _vector("rsa")
    with pytest.raises(VerifyError, match="not an RSA key"):
        make_credential(ak, ak_name_of(ak), b"s")           # an ECC key: cwlite seals to the RSA EK
    with pytest.raises(VerifyError, match="not a storage key"):
        make_credential(rsa_ak, ak_name_of(rsa_ak), b"s")   # a signing key is no EK
    with pytest.raises(VerifyError, match="secret"):
        make_credential(rsa_ak, ak_name_of(rsa_ak), bytes(33))


def test_core_imports_without_the_tss_or_the_web_stack() -> None:
    """What a verifier needs from the TPM world loads where tpm2-pytss, bcc, FastAPI and uvicorn cannot."""
    code = ("import sys\n"
            "for m in ('tpm2_pytss', 'bcc', 'fastapi', 'uvicorn'): sys.modules[m] = None\n"
            "import controlplane.core.quote, controlplane.core.imalog, controlplane.core.wire, "
            "controlplane.core.proof, controlplane.core.paths\n"
            "print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
