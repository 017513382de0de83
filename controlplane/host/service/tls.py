"""The service's TLS identity: a fresh key and self-signed certificate at every start.

SHA-256 of the key's SubjectPublicKeyInfo DER (core.wire.spki_sha256) is what
the measurement log records (TLS_KEY) and what every quote's qualifying data
binds (core.wire.quote_qualifying_data), so a verifier can tell this service
from a relay.
"""
from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from controlplane.core.wire import spki_sha256


@dataclass(frozen=True)
class TlsIdentity:
    """The service's fresh TLS key and self-signed certificate (PEM), made at every start."""

    key_pem: bytes
    cert_pem: bytes
    spki_sha256: bytes

    @classmethod
    def fresh(cls, hostname: str = "localhost", ip: str = "127.0.0.1") -> "TlsIdentity":
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"cwlite attestation {hostname}")])
        now = dt.datetime.now(dt.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=7))
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname),
                                                            x509.IPAddress(ipaddress.ip_address(ip))]), False)
                .sign(key, hashes.SHA256()))
        return cls(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()),
                   cert.public_bytes(serialization.Encoding.PEM), spki_sha256(cert))
