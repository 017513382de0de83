"""Wire constants of the attestation API, shared by the host's service and the verifier.

Both ends must agree on these byte for byte: the API version in every path,
the page size of /v1/log, and the qualifying data every quote signs, which
binds the quote to the TLS key of the channel it travels on.
"""
from __future__ import annotations

import hashlib
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

API_VERSION = "v1"
MAX_LOG_PAGE = 50_000            # entries per /v1/log response


def quote_qualifying_data(nonce: bytes, spki_sha256: bytes) -> bytes:
    """What every quote signs as extra data: SHA-256(nonce || SHA-256(TLS SPKI DER))."""
    return hashlib.sha256(nonce + spki_sha256).digest()


def spki_sha256(cert_or_key: x509.Certificate | Any) -> bytes:
    """SHA-256 of a certificate's (or public key's) SubjectPublicKeyInfo DER."""
    key = cert_or_key.public_key() if isinstance(cert_or_key, x509.Certificate) else cert_or_key
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).digest()
