"""Enrolment: the verifier learns a host's AK and pins its EK, by TPM credential activation.

The host claims an EK (public part, and the manufacturer's EK certificate
when its TPM has one) and an AK. The verifier checks the EK certificate's
chain to a CA it trusts and that the certificate certifies THIS EK, then seals
a random secret to the EK for the AK's name (`make_credential`, software). Only
a TPM holding both that EK and an AK of that name can unseal it
(`ActivateCredential`), so an AK from another TPM, or a software key, is
refused (reason "activation"). The EK public, EK certificate and AK are then
pinned in the store; later quotes are checked against that AK only.
"""
from __future__ import annotations

import base64
import datetime as dt
import hmac
import os
from pathlib import Path
from typing import Iterable

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import rsa

from controlplane.verifier.client import Channel
from controlplane.core.errors import VerifyError
from controlplane.core.quote import ak_name_of, make_credential
from controlplane.core.wire import API_VERSION
from controlplane.verifier.store import Host, Store


def load_cas(paths: Iterable[Path]) -> list[x509.Certificate]:
    """CA certificates (PEM or DER files, PEM bundles allowed) the EK certificate may chain to."""
    cas: list[x509.Certificate] = []
    for p in paths:
        try:
            data = Path(p).read_bytes()
        except OSError as exc:
            raise VerifyError(f"{p}: cannot read the EK CA certificate: {exc.strerror or exc}", reason="ek-cert") from exc
        try:
            cas.extend(x509.load_pem_x509_certificates(data) if b"-----BEGIN" in data
                       else [x509.load_der_x509_certificate(data)])
        except ValueError as exc:
            raise VerifyError(f"{p}: not an X.509 certificate: {exc}", reason="ek-cert") from exc
    return cas


def check_ek_certificate(ek_cert_der: bytes, ek_public: bytes, cas: list[x509.Certificate], *,
                         now: dt.datetime | None = None) -> x509.Certificate:
    """The EK certificate if it chains to one of `cas` (through the others) and certifies `ek_public`.

    TPM EK certificates are not TLS certificates (no usable subject, a TPM-specific SAN), so the chain
    is checked signature by signature and by validity dates, not by a TLS path validator.
    """
    now = now or dt.datetime.now(dt.timezone.utc)
    try:
        cert = x509.load_der_x509_certificate(ek_cert_der)
    except ValueError as exc:
        raise VerifyError(f"EK certificate: not DER X.509: {exc}", reason="ek-cert") from exc
    key = cert.public_key()
    if not isinstance(key, rsa.RSAPublicKey):
        raise VerifyError(f"EK certificate: {type(key).__name__} key, expected the RSA EK", reason="ek-cert")
    n = key.public_numbers().n.to_bytes((key.key_size + 7) // 8, "big")
    # RSA TPMT_PUBLIC ends with `unique` = TPM2B modulus: the certificate must certify exactly this EK
    if not ek_public.endswith(len(n).to_bytes(2, "big") + n):
        raise VerifyError("EK certificate: certifies another key than the EK the host presented", reason="ek-cert")
    chain, current = [cert], cert
    for _ in range(8):
        if not (current.not_valid_before_utc <= now <= current.not_valid_after_utc):
            raise VerifyError(f"EK certificate chain: {current.subject.rfc4514_string() or 'EK'} is not valid now",
                              reason="ek-cert")
        issuer = next((ca for ca in cas if ca.subject == current.issuer and _signed_by(current, ca)), None)
        if issuer is None:
            raise VerifyError(f"EK certificate chain: no trusted CA issued "
                              f"{current.subject.rfc4514_string() or 'the EK certificate'} "
                              f"(issuer {current.issuer.rfc4514_string()})", reason="ek-cert")
        if issuer.subject == issuer.issuer and _signed_by(issuer, issuer):
            return cert                          # reached a self-signed root we trust
        chain.append(issuer)
        current = issuer
    raise VerifyError("EK certificate chain: longer than 8 certificates", reason="ek-cert")


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
        return True
    except (ValueError, TypeError, InvalidSignature):
        return False


def enrol(url: str, name: str, store: Store, *, cas: list[x509.Certificate] | None = None,
          require_ek_cert: bool = False, pcr: int | None = None, interval_s: float = 30.0) -> Host:
    """Enrol the host serving at `url` under `name`: check its EK, activate a credential, pin EK and AK.

    `pcr`: cwlite's log PCR; None takes the one the host serves (10, or 11 where the kernel's IMA owns 10):
    the quote proves its values, the index only says where to look."""
    with Channel(url) as ch:
        if pcr is None:
            try:
                pcr = int(ch.get(f"/{API_VERSION}/health")["pcr"])
            except (KeyError, TypeError, ValueError) as exc:
                raise VerifyError(f"{url}: enrol: health: no log PCR ({exc})", reason="malformed") from exc
        claim = ch.get(f"/{API_VERSION}/enrol")
        try:
            ek_public = base64.b64decode(claim["ek_public"], validate=True)
            ak_public = base64.b64decode(claim["ak_public"], validate=True)
            ek_cert = base64.b64decode(claim["ek_certificate"], validate=True) if claim.get("ek_certificate") else None
        except (KeyError, TypeError, ValueError) as exc:
            raise VerifyError(f"{url}: enrol: malformed claim ({exc})", reason="malformed") from exc
        if ek_cert is None and (require_ek_cert or cas):
            raise VerifyError(f"{url}: enrol: the TPM presents no EK certificate", reason="ek-cert")
        if ek_cert is not None and cas:
            check_ek_certificate(ek_cert, ek_public, cas)
        # the AK's name is computed here from its public area, never taken from the host
        ak_name = ak_name_of(ak_public)
        secret = os.urandom(32)
        blob, encrypted = make_credential(ek_public, ak_name, secret)
        try:
            answer = ch.post(f"/{API_VERSION}/enrol/activate",
                             {"credential_blob": base64.b64encode(blob).decode(),
                              "secret": base64.b64encode(encrypted).decode()})
        except VerifyError as exc:
            raise VerifyError(f"{url}: enrol: credential activation refused: the AK is not in the TPM of this EK "
                              f"({exc})", reason="activation") from exc
        got = base64.b64decode(str(answer.get("secret", "")) + "==")
        if not hmac.compare_digest(got, secret):
            raise VerifyError(f"{url}: enrol: the activated secret differs: the AK is not in the TPM of this EK",
                              reason="activation")
    return store.enrol(Host(name=name, url=url, ek_public=ek_public, ek_cert=ek_cert, ak_public=ak_public,
                            pcr=pcr, interval_s=interval_s))
