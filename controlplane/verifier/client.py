"""The verifier's HTTPS channel to one attestation service, and the TLS key it saw.

The service's certificate is fresh and self-signed, so no CA can vouch for it;
the quote does (its qualifying data binds SHA-256 of this key's SPKI). This
client therefore accepts any certificate for the handshake, but records the
SubjectPublicKeyInfo of the peer on EVERY response and refuses a channel whose
key changes midway. The caller compares that key with the one the quote binds.

An attestation round is written once, as steps (a generator that yields each
`Request` and receives its `Reply`), and run by `drive` over a `Channel`
(one host, blocking) or by `drive_async` over an `AsyncChannel` (many hosts at
once, all sharing one httpx connection pool: `cwlite verify --watch`).
"""
from __future__ import annotations

import hashlib
import ssl
from dataclasses import dataclass
from typing import Any, Generator, NamedTuple, TypeVar

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from controlplane.core.errors import VerifyError

T = TypeVar("T")
TIMEOUT_S = 30.0
POOL_CONNECTIONS = 64          # --watch: one pool for every host, this many connections at most


@dataclass(frozen=True)
class Request:
    """One API call a round needs: method, path, query parameters or a JSON body."""

    method: str
    path: str
    params: dict | None = None
    body: dict | None = None


class Reply(NamedTuple):
    """A 200 answer's JSON object, and SHA-256 of the TLS key of the peer that sent it."""

    data: dict
    peer_spki_sha256: bytes


Steps = Generator[Request, Reply, T]


def _tls_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE      # trust comes from the quote binding, checked by the caller
    return ctx


class _Peer:
    """What both channels check on every response: the peer's TLS key (never changing) and the answer."""

    url: str
    peer_spki_sha256: bytes | None

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

    def _answer(self, path: str, resp: httpx.Response) -> Reply:
        try:
            data = resp.json()
        except ValueError as exc:
            raise VerifyError(f"{self.url}{path}: HTTP {resp.status_code}: not JSON: {resp.text[:120]!r}", reason="protocol") from exc
        if resp.status_code != 200:
            msg = data.get("error") if isinstance(data, dict) else data
            raise VerifyError(f"{self.url}{path}: HTTP {resp.status_code}: {msg}", reason="protocol")
        if not isinstance(data, dict):
            raise VerifyError(f"{self.url}{path}: response is not a JSON object", reason="protocol")
        assert self.peer_spki_sha256 is not None
        return Reply(data, self.peer_spki_sha256)

    def _unreachable(self, path: str, exc: httpx.HTTPError) -> VerifyError:
        return VerifyError(f"{self.url}{path}: {type(exc).__name__}: {exc}", reason="unreachable")


class Channel(_Peer):
    """`with Channel(url) as ch: ch.post("/v1/quote", {...})`; `ch.peer_spki_sha256` after the first call."""

    def __init__(self, url: str, *, timeout: float = TIMEOUT_S) -> None:
        self.url = url.rstrip("/")
        self._client = httpx.Client(base_url=self.url, verify=_tls_context(), timeout=timeout,
                                    limits=httpx.Limits(max_connections=1, max_keepalive_connections=1))
        self.peer_spki_sha256: bytes | None = None

    def __enter__(self) -> "Channel":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()

    def get(self, path: str, **params: Any) -> dict:
        return self.call(Request("GET", path, params=params or None)).data

    def post(self, path: str, body: dict) -> dict:
        return self.call(Request("POST", path, body=body)).data

    def call(self, req: Request) -> Reply:
        try:
            with self._client.stream(req.method, req.path, params=req.params, json=req.body) as resp:
                self._note_peer(resp)
                resp.read()
        except httpx.HTTPError as exc:
            raise self._unreachable(req.path, exc) from exc
        return self._answer(req.path, resp)


def pool(*, timeout: float = TIMEOUT_S) -> httpx.AsyncClient:
    """The one connection pool `AsyncChannel`s share (close it with `await pool.aclose()`)."""
    return httpx.AsyncClient(verify=_tls_context(), timeout=timeout,
                             limits=httpx.Limits(max_connections=POOL_CONNECTIONS,
                                                 max_keepalive_connections=POOL_CONNECTIONS))


class AsyncChannel(_Peer):
    """One host's channel over a shared `pool()`: its own TLS-key record, the pool's connections."""

    def __init__(self, client: httpx.AsyncClient, url: str) -> None:
        self.url = url.rstrip("/")
        self._client = client
        self.peer_spki_sha256: bytes | None = None

    async def call(self, req: Request) -> Reply:
        try:
            async with self._client.stream(req.method, self.url + req.path, params=req.params, json=req.body) as resp:
                self._note_peer(resp)
                await resp.aread()
        except httpx.HTTPError as exc:
            raise self._unreachable(req.path, exc) from exc
        return self._answer(req.path, resp)


def drive(ch: Channel, steps: Steps[T]) -> T:
    """Run `steps` over a blocking channel; a failed call is raised inside the steps (they may recover)."""
    try:
        req = next(steps)
        while True:
            try:
                reply = ch.call(req)
            except VerifyError as exc:
                req = steps.throw(exc)
                continue
            req = steps.send(reply)
    except StopIteration as done:
        return done.value


async def drive_async(ch: AsyncChannel, steps: Steps[T]) -> T:
    """`drive`, over an AsyncChannel: other hosts' rounds run while this one waits for its host."""
    try:
        req = next(steps)
        while True:
            try:
                reply = await ch.call(req)
            except VerifyError as exc:
                req = steps.throw(exc)
                continue
            req = steps.send(reply)
    except StopIteration as done:
        return done.value
