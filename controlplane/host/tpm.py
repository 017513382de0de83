"""The TPM: PCR extend/read, an attestation key, quotes, and their software checks.

tpm2-pytss types never leave this module: callers see bytes (marshalled TPM
structures where a verifier needs them), ints and frozen dataclasses. Every
TSS/TPM failure becomes a `TpmError` carrying the TPM's own code (`.rc`) and
its decoded meaning (`.detail`).

`open_tpm` picks `/dev/tpmrm0` (the kernel's resource manager) when present,
otherwise starts cwlite's embedded swtpm under the data dir.

The attestation key (AK) is a restricted signing key: a primary key of the
endorsement hierarchy (ECC P-256 by default, RSA-2048 on request), made
persistent so its name is stable across daemon restarts. A verifier binds it
to the EK with `make_credential` (pure software) and the TPM's
`activate_credential`.

`verify_quote` runs anywhere (no TPM): it checks the signature over the
attestation bytes first, and parses them only after, as the STYLE asks.
"""
from __future__ import annotations

import base64
import hashlib
import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Sequence

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from tpm2_pytss import ESAPI, TSS2_Exception
from tpm2_pytss.constants import (
    ESYS_TR,
    TPM2_ALG,
    TPM2_CAP,
    TPM2_GENERATED,
    TPM2_PT,
    TPM2_SE,
    TPM2_ST,
    TPMA_OBJECT,
)
from tpm2_pytss.types import (
    TPM2B_ENCRYPTED_SECRET,
    TPM2B_ID_OBJECT,
    TPM2B_NAME,
    TPM2B_PUBLIC,
    TPML_DIGEST_VALUES,
    TPML_PCR_SELECTION,
    TPMS_ATTEST,
    TPMS_PCR_SELECTION,
    TPMT_HA,
    TPMT_SIG_SCHEME,
    TPMT_SIGNATURE,
    TPMT_SYM_DEF,
)
from tpm2_pytss import utils as tss_utils

from controlplane.core.errors import TpmError, VerifyError

# ESYS prints its own error lines to stderr; cwlite reports each failure once, as a TpmError.
os.environ.setdefault("TSS2_LOG", "all+NONE")

DEVICE = "/dev/tpmrm0"
SHA256_SIZE = 32
PCR_COUNT = 24
# Persistent handles for the AK (owner range, outside the TCG EK range 0x81010000-0x8101ffff).
AK_HANDLES: Mapping[str, int] = {"ecc": 0x81000C10, "rsa": 0x81000C11}
RSA_EK_HANDLE = 0x81010001          # TCG EK Credential Profile: persistent RSA-2048 EK
_PT_FIRMWARE_VERSION_1 = int(TPM2_PT.FIXED) + 11   # TPM2_PT_FIRMWARE_VERSION_1 (pytss names no constant)
_AK_ATTRS = (
    TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT | TPMA_OBJECT.SENSITIVEDATAORIGIN
    | TPMA_OBJECT.USERWITHAUTH | TPMA_OBJECT.RESTRICTED | TPMA_OBJECT.SIGN_ENCRYPT | TPMA_OBJECT.NODA
)
_AK_ALGS: Mapping[str, str] = {"ecc": "ecc256:ecdsa-sha256:null", "rsa": "rsa2048:rsassa-sha256:null"}
_HASHES = {TPM2_ALG.SHA256: hashes.SHA256, TPM2_ALG.SHA384: hashes.SHA384, TPM2_ALG.SHA512: hashes.SHA512}


# ---------------------------------------------------------------------------------------------
# Quotes: what travels to the verifier, and what the verifier learns from one.

@dataclass(frozen=True)
class Quote:
    """A TPM2_Quote: the signed TPMS_ATTEST bytes, the TPMT_SIGNATURE, and the claimed PCR values."""

    attest: bytes
    signature: bytes
    pcrs: tuple[int, ...]
    pcr_values: dict[int, bytes] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "attest": base64.b64encode(self.attest).decode(),
            "signature": base64.b64encode(self.signature).decode(),
            "pcrs": list(self.pcrs),
            "pcr_values": {str(k): v.hex() for k, v in sorted(self.pcr_values.items())},
            "bank": "sha256",
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> "Quote":
        """Parse untrusted JSON; a bad field raises VerifyError(reason="malformed") naming it."""
        def need(key: str):
            if key not in data:
                raise VerifyError(f"quote: {key}: missing", reason="malformed")
            return data[key]

        try:
            attest = base64.b64decode(need("attest"), validate=True)
            signature = base64.b64decode(need("signature"), validate=True)
        except (ValueError, TypeError) as exc:
            raise VerifyError(f"quote: attest/signature: not base64 ({exc})", reason="malformed") from exc
        if data.get("bank", "sha256") != "sha256":
            raise VerifyError(f"quote: bank: {data.get('bank')!r} (only sha256)", reason="malformed")
        try:
            pcrs = tuple(int(p) for p in need("pcrs"))
            values = {int(k): bytes.fromhex(v) for k, v in dict(need("pcr_values")).items()}
        except (ValueError, TypeError, AttributeError) as exc:
            raise VerifyError(f"quote: pcrs/pcr_values: {exc}", reason="malformed") from exc
        for pcr in pcrs:
            if not 0 <= pcr < PCR_COUNT:
                raise VerifyError(f"quote: pcrs: {pcr} out of range 0..{PCR_COUNT - 1}", reason="malformed")
        for pcr, value in values.items():
            if len(value) != SHA256_SIZE:
                raise VerifyError(f"quote: pcr_values.{pcr}: {len(value)} bytes, want {SHA256_SIZE}",
                                  reason="malformed")
        return cls(attest, signature, pcrs, values)


@dataclass(frozen=True)
class QuoteInfo:
    """What a verified quote proves: the PCRs (sha256 bank), their digest and values, the TPM's clock."""

    pcrs: tuple[int, ...]
    pcr_digest: bytes
    pcr_values: dict[int, bytes]
    qualifying_data: bytes
    signer_name: bytes
    clock: int
    reset_count: int
    restart_count: int
    safe: bool
    firmware_version: int

    def to_dict(self) -> dict:
        return {
            "pcrs": list(self.pcrs), "pcr_digest": self.pcr_digest.hex(),
            "pcr_values": {str(k): v.hex() for k, v in sorted(self.pcr_values.items())},
            "qualifying_data": self.qualifying_data.hex(), "signer_name": self.signer_name.hex(),
            "clock": self.clock, "reset_count": self.reset_count, "restart_count": self.restart_count,
            "safe": self.safe, "firmware_version": f"{self.firmware_version:016x}",
        }


def pcr_composite_digest(pcr_values: Mapping[int, bytes], pcrs: Sequence[int]) -> bytes:
    """SHA-256 over the selected PCR values in ascending PCR order, as TPM2_Quote computes pcrDigest."""
    h = hashlib.sha256()
    for pcr in sorted(set(pcrs)):
        h.update(pcr_values[pcr])
    return h.digest()


def _unmarshal(cls, data: bytes, what: str):
    """One whole marshalled TPM structure of type `cls`, or VerifyError(malformed) naming `what`."""
    try:
        obj, used = cls.unmarshal(data)
    except (TSS2_Exception, ValueError, TypeError) as exc:
        raise VerifyError(f"{what}: not a {cls.__name__}: {exc}", reason="malformed") from exc
    if used != len(data):
        raise VerifyError(f"{what}: {len(data) - used} trailing bytes after the {cls.__name__}", reason="malformed")
    return obj


def _public_key(ak_public: bytes):
    """The cryptography key inside a marshalled TPM2B_PUBLIC (trusted input: from enrolment)."""
    pub = _unmarshal(TPM2B_PUBLIC, ak_public, "ak_public")
    attrs = pub.publicArea.objectAttributes
    if not attrs & TPMA_OBJECT.RESTRICTED or not attrs & TPMA_OBJECT.SIGN_ENCRYPT:
        raise VerifyError("ak_public: not a restricted signing key", reason="malformed")
    try:
        return serialization.load_der_public_key(pub.publicArea.to_der())
    except (TSS2_Exception, ValueError, TypeError) as exc:
        raise VerifyError(f"ak_public: unusable public key: {exc}", reason="malformed") from exc


def _check_signature(key, signature: bytes, signed: bytes) -> None:
    """Raise VerifyError(signature) unless `signature` (TPMT_SIGNATURE) by `key` covers `signed`."""
    sig = _unmarshal(TPMT_SIGNATURE, signature, "quote: signature")
    try:
        if sig.sigAlg == TPM2_ALG.ECDSA and isinstance(key, ec.EllipticCurvePublicKey):
            halg = _HASHES[sig.signature.ecdsa.hash]
            der = encode_dss_signature(int.from_bytes(bytes(sig.signature.ecdsa.signatureR), "big"),
                                       int.from_bytes(bytes(sig.signature.ecdsa.signatureS), "big"))
            key.verify(der, signed, ec.ECDSA(halg()))
        elif sig.sigAlg == TPM2_ALG.RSASSA and isinstance(key, rsa.RSAPublicKey):
            halg = _HASHES[sig.signature.rsassa.hash]
            key.verify(bytes(sig.signature.rsassa.sig), signed, padding.PKCS1v15(), halg())
        elif sig.sigAlg == TPM2_ALG.RSAPSS and isinstance(key, rsa.RSAPublicKey):
            halg = _HASHES[sig.signature.rsapss.hash]
            key.verify(bytes(sig.signature.rsapss.sig), signed,
                       padding.PSS(mgf=padding.MGF1(halg()), salt_length=padding.PSS.AUTO), halg())
        else:
            raise VerifyError(f"quote: signature: scheme {TPM2_ALG(sig.sigAlg)} does not match the AK",
                              reason="signature")
    except KeyError as exc:
        raise VerifyError("quote: signature: unsupported hash algorithm", reason="signature") from exc
    except InvalidSignature as exc:
        raise VerifyError("quote: signature: does not verify with the AK", reason="signature") from exc


def _signed_attest(attest: bytes) -> TPMS_ATTEST:
    """Parse TPMS_ATTEST bytes. Call only once the AK's signature over exactly these bytes verified."""
    parsed = _unmarshal(TPMS_ATTEST, attest, "quote: attest")
    if parsed.magic != TPM2_GENERATED.VALUE or parsed.type != TPM2_ST.ATTEST_QUOTE:
        raise VerifyError("quote: attest: not a TPM-generated quote (magic/type)", reason="malformed")
    return parsed


def verify_quote(ak_public: bytes, quote: Quote, qualifying_data: bytes) -> QuoteInfo:
    """Check a quote in software: signature, then freshness (qualifying data), then the claimed PCR values.

    Raises VerifyError with reason "signature", "nonce", "pcr-digest" or "malformed".
    """
    key = _public_key(ak_public)                 # trusted: from enrolment
    _unverified_attest = quote.attest            # untrusted until the signature check below passes
    _check_signature(key, quote.signature, _unverified_attest)
    att = _signed_attest(_unverified_attest)     # verified now: the AK signed exactly these bytes
    if bytes(att.extraData) != bytes(qualifying_data):
        raise VerifyError("quote: extraData: does not match the qualifying data sent (stale or replayed quote)",
                          reason="nonce")
    selected: list[int] = []
    for sel in att.attested.quote.pcrSelect:
        bitmap = bytes(sel.pcrSelect)[: sel.sizeofSelect]
        pcrs = [i for i in range(len(bitmap) * 8) if bitmap[i // 8] >> (i % 8) & 1]
        if pcrs and sel.hash != TPM2_ALG.SHA256:
            raise VerifyError(f"quote: pcrSelect: bank {TPM2_ALG(sel.hash)} (only sha256)", reason="malformed")
        selected += pcrs
    if sorted(selected) != sorted(set(quote.pcrs)):
        raise VerifyError(f"quote: pcrs: claimed {sorted(set(quote.pcrs))}, signed selection {sorted(selected)}",
                          reason="pcr-digest")
    missing = [p for p in selected if p not in quote.pcr_values]
    if missing:
        raise VerifyError(f"quote: pcr_values: no value for PCR {missing[0]}", reason="malformed")
    digest = bytes(att.attested.quote.pcrDigest)
    if pcr_composite_digest(quote.pcr_values, selected) != digest:
        raise VerifyError("quote: pcr_values: their digest differs from the signed pcrDigest", reason="pcr-digest")
    clock = att.clockInfo
    return QuoteInfo(
        pcrs=tuple(sorted(selected)), pcr_digest=digest,
        pcr_values={p: quote.pcr_values[p] for p in sorted(selected)},
        qualifying_data=bytes(att.extraData), signer_name=bytes(att.qualifiedSigner),
        clock=int(clock.clock), reset_count=int(clock.resetCount), restart_count=int(clock.restartCount),
        safe=bool(clock.safe), firmware_version=int(att.firmwareVersion),
    )


def make_credential(ek_public: bytes, ak_name: bytes, secret: bytes) -> tuple[bytes, bytes]:
    """Verifier side of enrolment, in software: seal `secret` to the EK for the key named `ak_name`.

    Returns (credential_blob, encrypted_secret), marshalled TPM2B_ID_OBJECT and
    TPM2B_ENCRYPTED_SECRET, for `Tpm.activate_credential`.
    """
    pub = _unmarshal(TPM2B_PUBLIC, ek_public, "ek_public")
    if not 0 < len(secret) <= SHA256_SIZE:
        raise VerifyError(f"secret: {len(secret)} bytes (1..{SHA256_SIZE})", reason="malformed")
    try:
        blob, enc = tss_utils.make_credential(pub, secret, TPM2B_NAME(ak_name))
    except (ValueError, TypeError) as exc:
        raise VerifyError(f"ek_public: cannot seal a credential to it: {exc}", reason="malformed") from exc
    return blob.marshal(), enc.marshal()


def public_pem(tpm2b_public: bytes) -> bytes:
    """A marshalled TPM2B_PUBLIC (AK or EK) as a PEM SubjectPublicKeyInfo (for tpm2_checkquote, openssl)."""
    return _unmarshal(TPM2B_PUBLIC, tpm2b_public, "public").publicArea.to_pem()


def ak_name_of(ak_public: bytes) -> bytes:
    """The TPM name (nameAlg || digest of the public area) of a marshalled TPM2B_PUBLIC."""
    return bytes(_unmarshal(TPM2B_PUBLIC, ak_public, "ak_public").get_name())


# ---------------------------------------------------------------------------------------------
# The TPM itself.

def _pcr_selection(pcrs: Sequence[int]) -> TPML_PCR_SELECTION:
    for pcr in pcrs:
        if not 0 <= pcr < PCR_COUNT:
            raise TpmError(f"PCR {pcr}: out of range 0..{PCR_COUNT - 1}")
    bitmap = bytearray(3)
    for pcr in pcrs:
        bitmap[pcr // 8] |= 1 << (pcr % 8)
    return TPML_PCR_SELECTION([TPMS_PCR_SELECTION(hash=TPM2_ALG.SHA256, sizeofSelect=3, pcrSelect=bytes(bitmap))])


def _der_length(cert: bytes) -> bytes:
    """An NV certificate without the padding some TPMs append after the DER SEQUENCE."""
    if len(cert) < 2 or cert[0] != 0x30:
        return cert
    n = cert[1]
    if n < 0x80:
        return cert[: 2 + n]
    k = n & 0x7F
    return cert[: 2 + k + int.from_bytes(cert[2: 2 + k], "big")]


@dataclass(frozen=True)
class ClockInfo:
    clock: int
    reset_count: int
    restart_count: int
    safe: bool


class Tpm:
    """One TPM connection (context manager). Calls are serialised: ESAPI contexts are not thread-safe."""

    def __init__(self, tcti: str, *, ak_alg: str = "ecc", swtpm=None) -> None:
        if ak_alg not in AK_HANDLES:
            raise TpmError(f"ak_alg: {ak_alg!r} (choose ecc or rsa)")
        self.tcti = tcti
        self.swtpm = swtpm
        self.ak_alg = ak_alg
        self._lock = threading.RLock()
        self._ek: ESYS_TR | None = None
        self._ek_flush = False
        try:
            self._ectx = ESAPI(tcti)
        except TSS2_Exception as exc:
            raise TpmError(f"{tcti}: cannot connect: {exc}", rc=int(exc.rc), detail=str(exc)) from exc
        try:
            self._ak, self._ak_public = self._load_ak()
        except BaseException:
            self._ectx.close()
            raise

    # -- plumbing ---------------------------------------------------------------------------
    @contextmanager
    def _tss(self, what: str, handle: str = "") -> Iterator[None]:
        """Serialise one TPM command and map its failure to TpmError (rc + decoded text)."""
        with self._lock:
            if self._ectx is None:
                raise TpmError(f"{self.tcti}: {what}: the TPM connection is closed")
            try:
                yield
            except TSS2_Exception as exc:
                rc = int(exc.rc)
                died = self.swtpm.exit_status() if self.swtpm is not None else None
                why = f" (the embedded swtpm exited with status {died})" if died is not None else ""
                raise TpmError(f"{self.tcti}: {what}: {exc} (rc 0x{rc:x}){why}", rc=rc, detail=str(exc),
                               handle=handle) from exc

    def close(self) -> None:
        with self._lock:
            if self._ectx is None:
                return
            try:
                if self._ek is not None and self._ek_flush:
                    self._ectx.flush_context(self._ek)
            except TSS2_Exception:
                pass
            self._ectx.close()
            self._ectx = None
        if self.swtpm is not None:
            self.swtpm.stop()

    def __enter__(self) -> "Tpm":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- keys ----------------------------------------------------------------------------------
    def _persistent(self, handle: int) -> ESYS_TR | None:
        """An ESYS handle for a persistent object, or None when nothing is stored there."""
        with self._tss("GetCapability HANDLES", f"0x{handle:08x}"):
            _, data = self._ectx.get_capability(TPM2_CAP.HANDLES, handle, 1)
            if handle not in [int(h) for h in data.data.handles.handle]:
                return None
            return self._ectx.tr_from_tpmpublic(handle)

    def _load_ak(self) -> tuple[ESYS_TR, bytes]:
        """The persisted AK, created (primary under the endorsement hierarchy) and persisted on first use."""
        handle = AK_HANDLES[self.ak_alg]
        template = TPM2B_PUBLIC.parse(_AK_ALGS[self.ak_alg], objectAttributes=_AK_ATTRS, nameAlg="sha256")
        tr = self._persistent(handle)
        if tr is not None:
            with self._tss("ReadPublic AK", f"0x{handle:08x}"):
                pub, _, _ = self._ectx.read_public(tr)
            area = pub.publicArea
            if area.type != template.publicArea.type or area.objectAttributes != _AK_ATTRS:
                raise TpmError(f"{self.tcti}: persistent handle 0x{handle:08x} holds another key, not cwlite's "
                               f"{self.ak_alg} AK (evict it with tpm2_evictcontrol)", handle=f"0x{handle:08x}")
            return tr, pub.marshal()
        with self._tss("CreatePrimary AK (endorsement hierarchy)", "endorsement"):
            transient, pub, _, _, _ = self._ectx.create_primary(None, template, ESYS_TR.ENDORSEMENT)
        try:
            with self._tss("EvictControl AK", f"0x{handle:08x}"):
                tr = self._ectx.evict_control(ESYS_TR.OWNER, transient, handle)
        finally:
            with self._tss("FlushContext"):
                self._ectx.flush_context(transient)
        return tr, pub.marshal()

    def _ek_handle(self) -> ESYS_TR:
        """The RSA-2048 EK: persisted at 0x81010001 when the TPM has one, else recreated from its template."""
        if self._ek is not None:
            return self._ek
        self._ek = self._persistent(RSA_EK_HANDLE)
        if self._ek is not None:
            return self._ek
        with self._tss("CreatePrimary EK", "endorsement"):
            _, template = tss_utils.create_ek_template("EK-RSA2048", tss_utils.NVReadEK(self._ectx))
            self._ek, _, _, _, _ = self._ectx.create_primary(None, template, ESYS_TR.ENDORSEMENT)
        self._ek_flush = True
        return self._ek

    def ak_public(self) -> bytes:
        """The AK's marshalled TPM2B_PUBLIC (what the verifier enrols and checks quotes with)."""
        return self._ak_public

    def ak_name(self) -> bytes:
        """The AK's TPM name (sha256 nameAlg || digest of its public area)."""
        return ak_name_of(self._ak_public)

    def ek_public(self) -> bytes:
        """The RSA-2048 EK's marshalled TPM2B_PUBLIC. TPM commands: TPM2_ReadPublic (TPM2_CreatePrimary once)."""
        ek = self._ek_handle()
        with self._tss("ReadPublic EK", f"0x{RSA_EK_HANDLE:08x}"):
            pub, _, _ = self._ectx.read_public(ek)
        return pub.marshal()

    def ek_certificate(self) -> bytes | None:
        """The RSA EK certificate (DER) from NV 0x01c00002, or None when the TPM has none. TPM command: TPM2_NV_Read."""
        with self._tss("NV_Read EK certificate", "0x01c00002"):
            try:
                cert, _ = tss_utils.create_ek_template("EK-RSA2048", tss_utils.NVReadEK(self._ectx))
            except tss_utils.NoSuchIndex:
                return None
        return _der_length(cert) if cert else None

    def activate_credential(self, credential_blob: bytes, secret: bytes) -> bytes:
        """TPM2_ActivateCredential with the AK and the EK (EK policy: PolicySecret(endorsement))."""
        try:
            blob, _ = TPM2B_ID_OBJECT.unmarshal(credential_blob)
            enc, _ = TPM2B_ENCRYPTED_SECRET.unmarshal(secret)
        except (TSS2_Exception, ValueError, TypeError) as exc:
            raise TpmError(f"activate_credential: credential blob or secret malformed: {exc}") from exc
        ek = self._ek_handle()
        with self._tss("ActivateCredential", "ek"):
            session = self._ectx.start_auth_session(
                ESYS_TR.NONE, ESYS_TR.NONE, TPM2_SE.POLICY,
                TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL), TPM2_ALG.SHA256)
            try:
                self._ectx.policy_secret(ESYS_TR.ENDORSEMENT, session, b"", b"", b"", 0)
                cert_info = self._ectx.activate_credential(
                    self._ak, ek, blob, enc, session1=ESYS_TR.PASSWORD, session2=session)
            finally:
                self._ectx.flush_context(session)
        return bytes(cert_info)

    # -- PCRs ----------------------------------------------------------------------------------
    def extend(self, pcr: int, digest: bytes) -> None:
        """TPM2_PCR_Extend of one SHA-256 digest into `pcr` (sha256 bank)."""
        if len(digest) != SHA256_SIZE:
            raise TpmError(f"PCR {pcr}: extend digest is {len(digest)} bytes, want {SHA256_SIZE}")
        if not 0 <= pcr < PCR_COUNT:
            raise TpmError(f"PCR {pcr}: out of range 0..{PCR_COUNT - 1}")
        ha = TPMT_HA(hashAlg=TPM2_ALG.SHA256)
        ha.digest.sha256 = digest
        values = TPML_DIGEST_VALUES([ha])
        with self._tss(f"PCR_Extend {pcr}", f"pcr{pcr}"):
            self._ectx.pcr_extend(ESYS_TR.PCR0 + pcr, values)

    def read_pcrs(self, pcrs: Sequence[int]) -> dict[int, bytes]:
        """PCR values (sha256 bank) of several PCRs; a PCR the TPM leaves out is an error. TPM2_PCR_Read."""
        out: dict[int, bytes] = {}
        want = sorted(set(pcrs))
        with self._tss("PCR_Read"):
            for i in range(0, len(want), 8):   # the TPM returns at most 8 digests per call
                chunk = want[i: i + 8]
                _, sel, digests = self._ectx.pcr_read(_pcr_selection(chunk))
                got = [p for s in sel for p in range(24) if bytes(s.pcrSelect)[p // 8] >> (p % 8) & 1]
                out.update({p: bytes(d) for p, d in zip(got, digests)})
        missing = [p for p in want if p not in out]
        if missing:
            raise TpmError(f"PCR {missing[0]}: the TPM has no sha256 bank value for it (bank not allocated?)")
        return out

    def read_pcr(self, pcr: int) -> bytes:
        """One PCR value (sha256 bank)."""
        return self.read_pcrs([pcr])[pcr]

    def reset_pcr(self, pcr: int) -> None:
        """TPM2_PCR_Reset: only the resettable PCRs (16 debug, 23 application) at locality 0."""
        with self._tss(f"PCR_Reset {pcr}", f"pcr{pcr}"):
            self._ectx.pcr_reset(ESYS_TR.PCR0 + pcr)

    def quote(self, qualifying_data: bytes, pcrs: Sequence[int]) -> Quote:
        """TPM2_Quote over `pcrs` (sha256 bank) with the AK, plus the PCR values it covers.

        The values are read before and after the quote and the pair kept only
        when both reads agree and match the signed digest, so a concurrent
        extend (another process; this object's other threads wait) cannot make
        a quote whose values disagree with its signature.
        """
        if len(qualifying_data) > 64:
            raise TpmError(f"quote: qualifying data is {len(qualifying_data)} bytes (at most 64)")
        sel = _pcr_selection(pcrs)
        scheme = TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL)
        for _ in range(16):
            with self._lock:
                before = self.read_pcrs(pcrs)
                with self._tss("Quote", f"0x{AK_HANDLES[self.ak_alg]:08x}"):
                    attest, sig = self._ectx.quote(self._ak, sel, qualifying_data, scheme, session1=ESYS_TR.PASSWORD)
                after = self.read_pcrs(pcrs)
            attest_bytes = bytes(attest)
            parsed, _ = TPMS_ATTEST.unmarshal(attest_bytes)
            if before == after and bytes(parsed.attested.quote.pcrDigest) == pcr_composite_digest(after, pcrs):
                return Quote(attest_bytes, sig.marshal(), tuple(sorted(set(pcrs))), after)
        raise TpmError("quote: PCRs kept changing during 16 attempts (a writer extends continuously)")

    # -- facts ---------------------------------------------------------------------------------
    def clock_info(self) -> ClockInfo:
        """TPM2_ReadClock: reset_count changes on every TPM reset (reboot, swtpm restart)."""
        with self._tss("ReadClock"):
            t = self._ectx.read_clock()
        c = t.clockInfo
        return ClockInfo(int(c.clock), int(c.resetCount), int(c.restartCount), bool(c.safe))

    def info(self) -> dict:
        """Manufacturer, firmware, banks, AK facts, for `cwlite tpm info`. TPM command: TPM2_GetCapability."""
        props: dict[int, int] = {}
        with self._tss("GetCapability TPM_PROPERTIES"):
            more, data = self._ectx.get_capability(TPM2_CAP.TPM_PROPERTIES, TPM2_PT.FIXED, 64)
            props.update({int(p.property): int(p.value) for p in data.data.tpmProperties})
            _, banks = self._ectx.get_capability(TPM2_CAP.PCRS, 0, 1)
        manufacturer = props.get(int(TPM2_PT.MANUFACTURER), 0).to_bytes(4, "big").rstrip(b"\0").decode(errors="replace")
        fw = (props.get(_PT_FIRMWARE_VERSION_1, 0) << 32) | props.get(_PT_FIRMWARE_VERSION_1 + 1, 0)
        allocated = [str(TPM2_ALG(s.hash)) for s in banks.data.assignedPCR if any(bytes(s.pcrSelect))]
        clock = self.clock_info()
        return {
            "tcti": self.tcti, "embedded_swtpm": self.swtpm is not None,
            "manufacturer": manufacturer, "firmware_version": f"{fw:016x}", "pcr_banks": allocated,
            "ak": {"alg": self.ak_alg, "handle": f"0x{AK_HANDLES[self.ak_alg]:08x}", "name": self.ak_name().hex()},
            "reset_count": clock.reset_count, "restart_count": clock.restart_count,
        }


def tcti_for(device: str) -> str:
    """A TCTI configuration for a device path (`/dev/tpmrm0`) or a TCTI string passed through."""
    return f"device:{device}" if device.startswith("/") else device


def open_tpm(data_dir: Path, *, device: str | None = None, ak_alg: str = "ecc") -> Tpm:
    """The TPM cwlite uses: `device` when given (a path or a TCTI string), else /dev/tpmrm0
    when present, else the embedded swtpm with its state under `data_dir/swtpm` (the one
    another cwlite process already runs there, or a new one this Tpm stops on close)."""
    if device is None and os.path.exists(DEVICE):
        device = DEVICE
    if device is not None:
        if device.startswith("/") and not os.path.exists(device):
            raise TpmError(f"{device}: no such TPM device")
        return Tpm(tcti_for(device), ak_alg=ak_alg)
    from controlplane.host.swtpm import Swtpm

    sw = Swtpm.attach(Path(data_dir) / "swtpm") or Swtpm.start(Path(data_dir) / "swtpm")
    try:
        return Tpm(sw.tcti, ak_alg=ak_alg, swtpm=sw)
    except BaseException:
        sw.stop()
        raise
