"""The verifier's HTTPS channel to one attestation service, and the TLS key it saw.

The service's certificate is fresh and self-signed, so no CA can vouch for it;
the quote does (its qualifying data binds SHA-256 of this key's SPKI). This
client therefore accepts any certificate for the handshake, but records the
SubjectPublicKeyInfo of the peer on EVERY response and refuses a channel whose
key changes midway. The caller compares that key with the one the quote binds.
"""
from __future__ import annotations

import hashlib
import ssl
from typing import Any

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from controlplane.core.errors import VerifyError


class Channel:
    """`with Channel(url) as ch: ch.post("/v1/quote", {...})`; `ch.peer_spki_sha256` after the first call."""

    def __init__(self, url: str, *, timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE      # trust comes from the quote binding, checked by the caller
        self._client = httpx.Client(base_url=self.url, verify=ctx, timeout=timeout,
                                    limits=httpx.Limits(max_connections=1, max_keepalive_connections=1))
        self.peer_spki_sha256: bytes | None = None

    def __enter__(self) -> "Channel":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()

    def get(self, path: str, **params: Any) -> dict:
        return self._call("GET", path, params=params or None)

    def post(self, path: str, body: dict) -> dict:
        return self._call("POST", path, json=body)

    def _call(self, method: str, path: str, **kw: Any) -> dict:
        try:
            with self._client.stream(method, path, **kw) as resp:
                self._note_peer(resp)
                resp.read()
        except httpx.HTTPError as exc:
            raise VerifyError(f"{self.url}{path}: {type(exc).__name__}: {exc}", reason="unreachable") from exc
        try:
            data = resp.json()
        except ValueError as exc:
            raise VerifyError(f"{self.url}{path}: HTTP {resp.status_code}: not JSON", reason="protocol") from exc
        if resp.status_code != 200:
            msg = data.get("error") if isinstance(data, dict) else data
            raise VerifyError(f"{self.url}{path}: HTTP {resp.status_code}: {msg}", reason="protocol")
        if not isinstance(data, dict):
            raise VerifyError(f"{self.url}{path}: response is not a JSON object", reason="protocol")
        return data

    def _note_peer(self, resp: httpx.Response) -> None:
        stream = resp.extensions.get("network_stream")
        ssl_obj = stream.get_extra_info("ssl_object") if stream is not None else None
        der = ssl_obj.getpeercert(True) if ssl_obj is not None else None
        if not der:
            raise VerifyError(f"{self.url}: no TLS peer certificate (is this https?)", reason="tls-key")
        spki = x509.load_der_x509_certificate(der).public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        seen = hashlib.sha256(spki).digest()
        if self.peer_spki_sha256 is not None and seen != self.peer_spki_sha256:
            raise VerifyError(f"{self.url}: the TLS peer key changed during the attestation", reason="tls-key")
        self.peer_spki_sha256 = seen
