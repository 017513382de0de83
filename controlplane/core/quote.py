"""TPM 2.0 quotes and keys as a verifier sees them: bytes, checked in pure Python (struct + cryptography).

A verifier runs where the build controller runs, with no TPM and no TSS: it
reads the marshalled TPM structures the host sends (TPM 2.0 Library, Part 2:
big-endian integers, TPM2B = u16 size + bytes) with the small reader below,
and checks them with pyca/cryptography. The host side (controlplane.host.tpm)
produces these bytes with tpm2-pytss; the unit tests check this module against
tpm2-pytss's own unmarshalling on real swtpm output.

`verify_quote` checks the signature over the attestation bytes first and
parses them only after (as STYLE asks). `make_credential` is the verifier's
half of enrolment (Part 1, §24): a secret sealed to the EK for one AK name,
which only the TPM holding both can recover with TPM2_ActivateCredential.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import os
import struct
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.kbkdf import KBKDFHMAC, CounterLocation, Mode

try:   # TPM credentials are AES-CFB (Part 1, §24.4); cryptography >= 47 files CFB under "decrepit"
    from cryptography.hazmat.decrepit.ciphers.modes import CFB
except ImportError:                                     # cryptography < 47
    from cryptography.hazmat.primitives.ciphers.modes import CFB

from controlplane.core.errors import VerifyError

SHA256_SIZE = 32
PCR_COUNT = 24

# TPM 2.0 Library Part 2 constants (TPM_ALG_ID, TPM_ST, TPM_GENERATED, TPMA_OBJECT, TPM_ECC_CURVE).
ALG_RSA, ALG_ECC, ALG_NULL = 0x0001, 0x0023, 0x0010
ALG_SHA1, ALG_SHA256, ALG_SHA384, ALG_SHA512 = 0x0004, 0x000B, 0x000C, 0x000D
ALG_AES, ALG_CFB = 0x0006, 0x0043
ALG_RSASSA, ALG_RSAES, ALG_RSAPSS, ALG_OAEP = 0x0014, 0x0015, 0x0016, 0x0017
ALG_ECDSA, ALG_ECDAA = 0x0018, 0x001A
TPM_GENERATED_VALUE = 0xFF544347
ST_ATTEST_QUOTE = 0x8018
ATTR_RESTRICTED, ATTR_DECRYPT, ATTR_SIGN_ENCRYPT = 0x00010000, 0x00020000, 0x00040000
_CURVES: Mapping[int, Callable[[], ec.EllipticCurve]] = {
    0x0003: ec.SECP256R1, 0x0004: ec.SECP384R1, 0x0005: ec.SECP521R1}
_HASHES: Mapping[int, Callable[[], hashes.HashAlgorithm]] = {
    ALG_SHA1: hashes.SHA1, ALG_SHA256: hashes.SHA256, ALG_SHA384: hashes.SHA384, ALG_SHA512: hashes.SHA512}
_RSA_DEFAULT_EXPONENT = 65537          # TPMS_RSA_PARMS.exponent 0 means 2^16 + 1


class _Reader:
    """Bounds-checked reads of a marshalled TPM structure; running short is VerifyError(malformed)."""

    def __init__(self, data: bytes, what: str) -> None:
        self.data, self.off, self.what = bytes(data), 0, what

    def take(self, n: int) -> bytes:
        if self.off + n > len(self.data):
            raise VerifyError(f"{self.what}: truncated at byte {self.off} (wanted {n} more)", reason="malformed")
        out = self.data[self.off: self.off + n]
        self.off += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return struct.unpack(">H", self.take(2))[0]

    def u32(self) -> int:
        return struct.unpack(">I", self.take(4))[0]

    def u64(self) -> int:
        return struct.unpack(">Q", self.take(8))[0]

    def tpm2b(self) -> bytes:
        return self.take(self.u16())

    def end(self) -> None:
        if self.off != len(self.data):
            raise VerifyError(f"{self.what}: {len(self.data) - self.off} trailing bytes", reason="malformed")


def _tpm2b(data: bytes) -> bytes:
    return struct.pack(">H", len(data)) + data


def _hash(alg: int, what: str) -> hashes.HashAlgorithm:
    try:
        return _HASHES[alg]()
    except KeyError:
        raise VerifyError(f"{what}: hash algorithm 0x{alg:04x} unsupported", reason="malformed") from None


# ---------------------------------------------------------------------------------------------
# Public keys: a marshalled TPM2B_PUBLIC (Part 2, 12.2.5) as a cryptography key, its name.

@dataclass(frozen=True)
class TpmPublic:
    """The parts of a TPMT_PUBLIC a verifier uses. `area` is the marshalled TPMT_PUBLIC (what the name hashes)."""

    type: int
    name_alg: int
    attributes: int
    sym_alg: int            # parameters.symmetric: AES for an EK (storage parent), NULL for an AK
    sym_bits: int
    sym_mode: int
    key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey
    area: bytes

    @property
    def name(self) -> bytes:
        """The TPM name: nameAlg (u16) || nameAlg digest of the TPMT_PUBLIC."""
        h = hashes.Hash(_hash(self.name_alg, "public: nameAlg"))
        h.update(self.area)
        return struct.pack(">H", self.name_alg) + h.finalize()


def _skip_scheme(r: _Reader) -> None:
    """TPMT_RSA_SCHEME / TPMT_ECC_SCHEME / TPMT_KDF_SCHEME: scheme, then its details."""
    scheme = r.u16()
    if scheme in (ALG_NULL, ALG_RSAES):
        return                     # TPMS_EMPTY
    r.u16()                        # hashAlg
    if scheme == ALG_ECDAA:
        r.u16()                    # count


def parse_public(tpm2b_public: bytes, what: str = "public") -> TpmPublic:
    """A marshalled TPM2B_PUBLIC (RSA or ECC); anything else raises VerifyError(malformed) naming `what`."""
    outer = _Reader(tpm2b_public, what)
    area = outer.tpm2b()
    outer.end()
    r = _Reader(area, what)
    type_, name_alg, attrs = r.u16(), r.u16(), r.u32()
    r.tpm2b()                                      # authPolicy
    sym_alg, sym_bits, sym_mode = r.u16(), 0, ALG_NULL
    if sym_alg != ALG_NULL:
        sym_bits, sym_mode = r.u16(), r.u16()
    _skip_scheme(r)
    try:
        if type_ == ALG_RSA:
            r.u16()                                # keyBits
            exponent = r.u32() or _RSA_DEFAULT_EXPONENT
            modulus = r.tpm2b()
            r.end()
            key = rsa.RSAPublicNumbers(exponent, int.from_bytes(modulus, "big")).public_key()
        elif type_ == ALG_ECC:
            curve_id = r.u16()
            _skip_scheme(r)                        # kdf
            x, y = r.tpm2b(), r.tpm2b()
            r.end()
            if curve_id not in _CURVES:
                raise VerifyError(f"{what}: ECC curve 0x{curve_id:04x} unsupported", reason="malformed")
            key = ec.EllipticCurvePublicNumbers(int.from_bytes(x, "big"), int.from_bytes(y, "big"),
                                                _CURVES[curve_id]()).public_key()
        else:
            raise VerifyError(f"{what}: key type 0x{type_:04x} (RSA or ECC only)", reason="malformed")
    except ValueError as exc:
        raise VerifyError(f"{what}: unusable public key: {exc}", reason="malformed") from exc
    return TpmPublic(type_, name_alg, attrs, sym_alg, sym_bits, sym_mode, key, area)


def public_pem(tpm2b_public: bytes) -> bytes:
    """A marshalled TPM2B_PUBLIC (AK or EK) as a PEM SubjectPublicKeyInfo (for tpm2_checkquote, openssl)."""
    return parse_public(tpm2b_public).key.public_bytes(serialization.Encoding.PEM,
                                                       serialization.PublicFormat.SubjectPublicKeyInfo)


def ak_name_of(ak_public: bytes) -> bytes:
    """The TPM name (nameAlg || digest of the public area) of a marshalled TPM2B_PUBLIC."""
    return parse_public(ak_public, "ak_public").name


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


@dataclass(frozen=True)
class QuoteAttest:
    """A parsed TPMS_ATTEST of type quote (Part 2, 10.12.12). `selection` is [(hash alg, [PCRs])]."""

    signer_name: bytes
    extra_data: bytes
    clock: int
    reset_count: int
    restart_count: int
    safe: bool
    firmware_version: int
    selection: tuple[tuple[int, tuple[int, ...]], ...]
    pcr_digest: bytes


def parse_quote_attest(attest: bytes) -> QuoteAttest:
    """Parse TPMS_ATTEST bytes of a quote. Call only on bytes whose AK signature verified
    (or that the TPM itself just returned): unverified attest bytes prove nothing."""
    r = _Reader(attest, "quote: attest")
    if r.u32() != TPM_GENERATED_VALUE or r.u16() != ST_ATTEST_QUOTE:
        raise VerifyError("quote: attest: not a TPM-generated quote (magic/type)", reason="malformed")
    signer, extra = r.tpm2b(), r.tpm2b()
    clock, reset_count, restart_count, safe = r.u64(), r.u32(), r.u32(), r.u8()
    firmware = r.u64()
    selection = []
    for _ in range(r.u32()):
        alg, bitmap = r.u16(), r.take(r.u8())
        selection.append((alg, tuple(i for i in range(len(bitmap) * 8) if bitmap[i // 8] >> (i % 8) & 1)))
    digest = r.tpm2b()
    r.end()
    return QuoteAttest(signer, extra, clock, reset_count, restart_count, bool(safe), firmware,
                       tuple(selection), digest)


def pcr_composite_digest(pcr_values: Mapping[int, bytes], pcrs: Sequence[int]) -> bytes:
    """SHA-256 over the selected PCR values in ascending PCR order, as TPM2_Quote computes pcrDigest."""
    h = hashlib.sha256()
    for pcr in sorted(set(pcrs)):
        h.update(pcr_values[pcr])
    return h.digest()


def _check_signature(key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey, signature: bytes, signed: bytes) -> None:
    """Raise VerifyError(signature) unless `signature` (a marshalled TPMT_SIGNATURE) by `key` covers `signed`."""
    r = _Reader(signature, "quote: signature")
    alg, halg = r.u16(), r.u16()
    if alg == ALG_ECDSA and isinstance(key, ec.EllipticCurvePublicKey):
        sig_r, sig_s = r.tpm2b(), r.tpm2b()
        sig = encode_dss_signature(int.from_bytes(sig_r, "big"), int.from_bytes(sig_s, "big"))
    elif alg in (ALG_RSASSA, ALG_RSAPSS) and isinstance(key, rsa.RSAPublicKey):
        sig = r.tpm2b()
    else:
        raise VerifyError(f"quote: signature: scheme 0x{alg:04x} does not match the AK", reason="signature")
    r.end()
    if halg not in _HASHES:
        raise VerifyError(f"quote: signature: hash algorithm 0x{halg:04x} unsupported", reason="signature")
    h = _HASHES[halg]()
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(sig, signed, ec.ECDSA(h))
        elif alg == ALG_RSASSA:
            key.verify(sig, signed, padding.PKCS1v15(), h)
        else:
            key.verify(sig, signed, padding.PSS(mgf=padding.MGF1(h), salt_length=padding.PSS.AUTO), h)
    except InvalidSignature as exc:
        raise VerifyError("quote: signature: does not verify with the AK", reason="signature") from exc


def verify_quote(ak_public: bytes, quote: Quote, qualifying_data: bytes) -> QuoteInfo:
    """Check a quote in software: signature, then freshness (qualifying data), then the claimed PCR values.

    Raises VerifyError with reason "signature", "nonce", "pcr-digest" or "malformed".
    """
    ak = parse_public(ak_public, "ak_public")         # trusted: from enrolment
    if not ak.attributes & ATTR_RESTRICTED or not ak.attributes & ATTR_SIGN_ENCRYPT:
        raise VerifyError("ak_public: not a restricted signing key", reason="malformed")
    _unverified_attest = quote.attest                 # untrusted until the signature check below passes
    _check_signature(ak.key, quote.signature, _unverified_attest)
    att = parse_quote_attest(_unverified_attest)      # verified now: the AK signed exactly these bytes
    if att.extra_data != bytes(qualifying_data):
        raise VerifyError("quote: extraData: does not match the qualifying data sent (stale or replayed quote)",
                          reason="nonce")
    selected: list[int] = []
    for alg, pcrs in att.selection:
        if pcrs and alg != ALG_SHA256:
            raise VerifyError(f"quote: pcrSelect: bank 0x{alg:04x} (only sha256)", reason="malformed")
        selected += pcrs
    if sorted(selected) != sorted(set(quote.pcrs)):
        raise VerifyError(f"quote: pcrs: claimed {sorted(set(quote.pcrs))}, signed selection {sorted(selected)}",
                          reason="pcr-digest")
    missing = [p for p in selected if p not in quote.pcr_values]
    if missing:
        raise VerifyError(f"quote: pcr_values: no value for PCR {missing[0]}", reason="malformed")
    if pcr_composite_digest(quote.pcr_values, selected) != att.pcr_digest:
        raise VerifyError("quote: pcr_values: their digest differs from the signed pcrDigest", reason="pcr-digest")
    return QuoteInfo(
        pcrs=tuple(sorted(selected)), pcr_digest=att.pcr_digest,
        pcr_values={p: quote.pcr_values[p] for p in sorted(selected)},
        qualifying_data=att.extra_data, signer_name=att.signer_name,
        clock=att.clock, reset_count=att.reset_count, restart_count=att.restart_count,
        safe=att.safe, firmware_version=att.firmware_version,
    )


# ---------------------------------------------------------------------------------------------
# Credential activation, verifier side (TPM 2.0 Library Part 1, §24 "Credential Protection").

def kdfa(hash_alg: int, key: bytes, label: bytes, context_u: bytes, context_v: bytes, bits: int) -> bytes:
    """KDFa (Part 1, §11.4.10.2): SP 800-108 HMAC counter mode; `label` without its NUL (the KDF adds it)."""
    return KBKDFHMAC(algorithm=_hash(hash_alg, "kdfa"), mode=Mode.CounterMode, length=bits // 8, rlen=4, llen=4,
                     location=CounterLocation.BeforeFixed, label=label, context=context_u + context_v,
                     fixed=None).derive(key)


def make_credential(ek_public: bytes, ak_name: bytes, secret: bytes) -> tuple[bytes, bytes]:
    """Verifier side of enrolment, in software: seal `secret` to the EK for the key named `ak_name`.

    Returns (credential_blob, encrypted_secret), marshalled TPM2B_ID_OBJECT and
    TPM2B_ENCRYPTED_SECRET, for `Tpm.activate_credential`. The EK is the RSA
    one cwlite's hosts present (controlplane.host.tpm `ek_public`): the seed
    is RSA-OAEP encrypted with label "IDENTITY\\0" (Part 1, §B.10.3).
    """
    ek = parse_public(ek_public, "ek_public")
    if not 0 < len(secret) <= SHA256_SIZE:
        raise VerifyError(f"secret: {len(secret)} bytes (1..{SHA256_SIZE})", reason="malformed")
    if ek.type != ALG_RSA or not isinstance(ek.key, rsa.RSAPublicKey):
        raise VerifyError("ek_public: not an RSA key (cwlite seals credentials to the RSA EK)", reason="malformed")
    if ek.sym_alg != ALG_AES or ek.sym_mode != ALG_CFB or not ek.attributes & ATTR_DECRYPT:
        raise VerifyError("ek_public: not a storage key with AES-CFB (not an EK template)", reason="malformed")
    name_hash = _hash(ek.name_alg, "ek_public: nameAlg")
    seed = os.urandom(name_hash.digest_size)
    encrypted_seed = ek.key.encrypt(seed, padding.OAEP(mgf=padding.MGF1(name_hash), algorithm=name_hash,
                                                       label=b"IDENTITY\0"))
    sym_key = kdfa(ek.name_alg, seed, b"STORAGE", ak_name, b"", ek.sym_bits)
    encryptor = Cipher(algorithms.AES(sym_key), CFB(bytes(16))).encryptor()
    enc_identity = encryptor.update(_tpm2b(secret)) + encryptor.finalize()
    hmac_key = kdfa(ek.name_alg, seed, b"INTEGRITY", b"", b"", name_hash.digest_size * 8)
    outer_hmac = hmac.new(hmac_key, enc_identity + ak_name, name_hash.name).digest()
    return _tpm2b(_tpm2b(outer_hmac) + enc_identity), _tpm2b(encrypted_seed)
