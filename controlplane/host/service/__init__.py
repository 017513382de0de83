"""The attestation service: HTTPS answers to a verifier, bound to a fresh TLS key.

At start the service makes a fresh TLS key pair and self-signed certificate
(the paper's "fresh public key") and records SHA-256(SubjectPublicKeyInfo DER)
as a TLS_KEY measurement-log entry, so the PCR commits to it. Every quote uses
qualifying data SHA-256(nonce || SHA-256(SPKI)): a verifier that checks the
quote against the key its TLS connection saw knows it talks to the attested
host, not a relay. Endpoints (JSON, versioned under /v1):

    POST /v1/quote           {nonce, pcrs} -> quote + TLS key hash + log length
    GET  /v1/log?from=N      measurement-log entries from N (ima-ng ASCII), paged
    GET  /v1/ima-log?from=N  the KERNEL's own IMA log from N (its ASCII form), paged; 404 without IMA
    GET  /v1/policy          active policy text and digest, measurement-DB digest
    POST /v1/policy          a controller-signed policy: loaded only if the signature checks, then logged
    GET  /v1/health          liveness, log length, TLS key hash
    GET  /v1/enrol           EK public, EK certificate, AK public and name
    POST /v1/enrol/activate  TPM2_ActivateCredential on a verifier's MakeCredential blob

Every request is bounded (body size, rate per client, strict pydantic models):
bad input gets a 4xx with one clear line, never a 500.
"""
from __future__ import annotations

from controlplane.host.service.limits import MAX_BODY
from controlplane.host.service.routes import create_app
from controlplane.host.service.server import Server
from controlplane.host.service.state import ActivePolicy, ServiceState
from controlplane.host.service.tls import TlsIdentity

__all__ = ["MAX_BODY", "ActivePolicy", "Server", "ServiceState", "TlsIdentity", "create_app"]
