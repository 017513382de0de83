"""The attestation service: HTTPS answers to a verifier, bound to a fresh TLS key.

At start the service makes a fresh TLS key pair and self-signed certificate
(the paper's "fresh public key") and records SHA-256(SubjectPublicKeyInfo DER)
as a TLS_KEY measurement-log entry, so the PCR commits to it. Every quote uses
qualifying data SHA-256(nonce || SHA-256(SPKI)): a verifier that checks the
quote against the key its TLS connection saw knows it talks to the attested
host, not a relay. Endpoints (JSON, versioned under /v1):

    POST /v1/quote           {nonce, pcrs} -> quote + TLS key hash + log length
    GET  /v1/log?from=N      measurement-log entries from N (ima-ng ASCII), paged
    GET  /v1/policy          active policy text and digest, measurement-DB digest
    POST /v1/policy          a controller-signed policy: loaded only if the signature checks, then logged
    GET  /v1/health          liveness, log length, TLS key hash
    GET  /v1/enrol           EK public, EK certificate, AK public and name
    POST /v1/enrol/activate  TPM2_ActivateCredential on a verifier's MakeCredential blob

Every request is bounded (body size, rate per client, strict pydantic models):
bad input gets a 4xx with one clear line, never a 500.
"""
from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from controlplane.core.errors import CwliteError, PolicyError
from controlplane.core.events import Event, EventKind
from controlplane.core.wire import API_VERSION, MAX_LOG_PAGE, quote_qualifying_data, spki_sha256

MAX_BODY = 256 * 1024            # bytes; a signed policy is the largest legitimate body
NONCE_HEX = r"^[0-9a-fA-F]{32,128}$"   # 16..64 bytes: fresh enough, bounded
PCR_MAX = 23


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


@dataclass
class ServiceState:
    """What the service answers from. `tpm` and `mlog` follow controlplane.host.tpm / controlplane.mlog.

    `policy_path` is the active policy file (replaced atomically by POST /v1/policy);
    `on_policy(policy)` lets a co-located enforcement engine load a pushed policy;
    `on_quote(nonce)` asks it to log its liveness entry for the nonce before the quote is taken.
    """

    tpm: Any
    mlog: Any
    tls: TlsIdentity
    pcr: int = 10
    policy_path: Path | None = None
    db_digest: bytes | None = None
    controller_key: Any = None          # Ed25519PublicKey or path: who may push policies
    on_policy: Callable[[Any], None] | None = None
    on_quote: Callable[[bytes], object] | None = None
    rate_per_s: float = 50.0
    burst: int = 200
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record_tls_key(self) -> None:
        self.mlog.record(Event(EventKind.TLS_KEY, self.tls.spki_sha256, op="serve", subject="attestation-service"),
                         wait=True)


# request/response models ---------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class QuoteRequest(_Strict):
    nonce: str = Field(pattern=NONCE_HEX, description="verifier nonce, 16-64 bytes as hex")
    pcrs: list[Annotated[int, Field(ge=0, le=PCR_MAX)]] = Field(min_length=1, max_length=PCR_MAX + 1)

    @field_validator("pcrs")
    @classmethod
    def _unique(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError("PCR indices must be unique")
        return sorted(v)


class QuoteResponse(BaseModel):
    quote: dict
    tls_spki_sha256: str
    log_length: int
    pcr: int


class LogResponse(BaseModel):
    start: int
    count: int
    total: int
    pcr: int
    ascii: str = Field(description="ima-ng ASCII lines, one entry per line, entries start..start+count-1")


class PolicyResponse(BaseModel):
    policy_digest: str | None
    db_digest: str | None
    mode: str | None
    policy: str | None


class PolicyPush(_Strict):
    policy: str = Field(min_length=1, max_length=MAX_BODY // 2)
    signature: str = Field(min_length=1, max_length=256, description="base64 Ed25519 signature (the .sig file)")


class HealthResponse(BaseModel):
    status: str
    version: str
    pcr: int
    log_length: int
    tls_spki_sha256: str


class EnrolResponse(BaseModel):
    ek_public: str
    ek_certificate: str | None
    ak_public: str
    ak_name: str


class ActivateRequest(_Strict):
    credential_blob: str = Field(min_length=4, max_length=4096, pattern=r"^[A-Za-z0-9+/]+={0,2}$")
    secret: str = Field(min_length=4, max_length=4096, pattern=r"^[A-Za-z0-9+/]+={0,2}$")


class ActivateResponse(BaseModel):
    secret: str


class ErrorResponse(BaseModel):
    error: str


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode()


def _unb64(value: str, what: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except ValueError as exc:
        raise _Reject(422, f"{what}: not base64") from exc


class _Reject(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# middleware: size and rate bounds (pure ASGI so they run before any parsing) --------
class _Bounds:
    def __init__(self, app, state: ServiceState) -> None:
        self.app, self.state = app, state
        self.buckets: dict[str, tuple[float, float]] = {}
        self.lock = threading.Lock()

    def _allow(self, client: str) -> bool:
        now = time.monotonic()
        with self.lock:
            tokens, last = self.buckets.get(client, (float(self.state.burst), now))
            tokens = min(float(self.state.burst), tokens + (now - last) * self.state.rate_per_s)
            ok = tokens >= 1.0
            self.buckets[client] = (tokens - 1.0 if ok else tokens, now)
            if len(self.buckets) > 10_000:   # bounded memory under a spray of clients
                self.buckets.clear()
            return ok

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        client = (scope.get("client") or ("?", 0))[0]
        if not self._allow(client):
            return await _send_error(send, 429, "rate limit: too many requests, retry later")
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                if not value.isdigit() or int(value) > MAX_BODY:
                    return await _send_error(send, 413, f"request body larger than {MAX_BODY} bytes")
        seen = 0

        async def bounded_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > MAX_BODY:
                    raise _Reject(413, f"request body larger than {MAX_BODY} bytes")
            return message

        try:
            return await self.app(scope, bounded_receive, send)
        except _Reject as exc:
            return await _send_error(send, exc.status, exc.message)


async def _send_error(send, status: int, message: str) -> None:
    import json

    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:3]:
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or "body"
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    return "; ".join(parts)


# the application ---------------------------------------------------------------------
def create_app(state: ServiceState) -> FastAPI:
    """The FastAPI application answering from `state` (tests and `cwlite serve` both use this)."""
    app = FastAPI(title="cwlite attestation service", version=API_VERSION,
                  description="Fresh TPM quotes bound to this TLS key, the measurement log, the active policy.",
                  responses={422: {"model": ErrorResponse}, 429: {"model": ErrorResponse},
                             413: {"model": ErrorResponse}})

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return JSONResponse({"error": _validation_message(exc)}, status_code=422)

    @app.exception_handler(_Reject)
    async def _rejected(request: Request, exc: _Reject):
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @app.exception_handler(CwliteError)
    async def _cwlite(request: Request, exc: CwliteError):
        # a TPM or log failure on the host: the service cannot vouch for anything right now
        return JSONResponse({"error": str(exc)}, status_code=503)

    def log_length() -> int:
        return len(state.mlog.entries(0))

    @app.post(f"/{API_VERSION}/quote", response_model=QuoteResponse, responses={503: {"model": ErrorResponse}})
    def quote(req: QuoteRequest) -> QuoteResponse:
        """A TPM quote over `pcrs` with qualifying data SHA-256(nonce || SHA-256(this TLS key's SPKI))."""
        if state.pcr not in req.pcrs:
            raise _Reject(422, f"pcrs: must include the measurement-log PCR {state.pcr}")
        nonce = bytes.fromhex(req.nonce)
        if state.on_quote is not None:
            # the engine logs "alive, nonce N, events up to K" itself; if it is dead nothing is logged,
            # and the verifier's proof says so
            state.on_quote(nonce)
        qd = quote_qualifying_data(nonce, state.tls.spki_sha256)
        q, covered = state.mlog.quote(qd, req.pcrs)   # the quote and exactly the entries its PCR holds
        return QuoteResponse(quote=q.to_dict(), tls_spki_sha256=state.tls.spki_sha256.hex(),
                             log_length=len(covered), pcr=state.pcr)

    @app.get(f"/{API_VERSION}/log", response_model=LogResponse, responses={416: {"model": ErrorResponse}})
    def log(start: Annotated[int, Query(alias="from", ge=0, le=2**31, description="first entry to return")] = 0,
            limit: Annotated[int, Query(ge=1, le=MAX_LOG_PAGE)] = MAX_LOG_PAGE) -> LogResponse:
        """Measurement-log entries from `start` (incremental fetch), at most `limit` of them."""
        entries = state.mlog.entries(0)
        if start > len(entries):
            raise _Reject(416, f"from: {start} is past the end of the log ({len(entries)} entries)")
        page = entries[start:start + limit]
        text = "".join(e.ascii() + "\n" for e in page)
        return LogResponse(start=start, count=len(page), total=len(entries), pcr=state.pcr, ascii=text)

    @app.get(f"/{API_VERSION}/policy", response_model=PolicyResponse)
    def policy() -> PolicyResponse:
        """The active policy (text and canonical digest) and the measurement-DB digest."""
        text = pol = None
        if state.policy_path is not None and Path(state.policy_path).exists():
            from controlplane.core.policy import load_policy

            text = Path(state.policy_path).read_text()
            pol = load_policy(state.policy_path)
        return PolicyResponse(policy_digest=pol.digest().hex() if pol else None,
                              db_digest=state.db_digest.hex() if state.db_digest else None,
                              mode=pol.mode if pol else None, policy=text)

    @app.post(f"/{API_VERSION}/policy", response_model=PolicyResponse,
              responses={403: {"model": ErrorResponse}, 409: {"model": ErrorResponse}})
    def push_policy(req: PolicyPush) -> PolicyResponse:
        """Load a controller-signed policy: only if its signature checks; the load is logged (POLICY_LOAD)."""
        if state.controller_key is None or state.policy_path is None:
            raise _Reject(409, "policy push disabled: the service was started without --controller-key/--policy")
        pol = _checked_policy(state, req)
        from controlplane.core.atomic import write_atomic

        with state.lock:
            path = Path(state.policy_path)
            write_atomic(_sig_path(path), _unb64(req.signature, "signature"), mode=0o644)
            write_atomic(path, req.policy.encode(), mode=0o644)
            state.mlog.record(Event(EventKind.POLICY_LOAD, pol.digest(), op="push", subject=str(path)), wait=True)
            if state.on_policy is not None:     # e.g. an embedded enforcement engine re-reads the file
                state.on_policy(pol)
        return PolicyResponse(policy_digest=pol.digest().hex(),
                              db_digest=state.db_digest.hex() if state.db_digest else None,
                              mode=pol.mode, policy=req.policy)

    @app.get(f"/{API_VERSION}/health", response_model=HealthResponse)
    def health() -> HealthResponse:
        """Liveness, log length and the TLS key hash (no TPM command)."""
        return HealthResponse(status="ok", version=API_VERSION, pcr=state.pcr, log_length=log_length(),
                              tls_spki_sha256=state.tls.spki_sha256.hex())

    @app.get(f"/{API_VERSION}/enrol", response_model=EnrolResponse)
    def enrol() -> EnrolResponse:
        """The TPM's EK public (and EK certificate from NV when present) and its AK public and name."""
        with state.lock:
            return EnrolResponse(ek_public=_b64(state.tpm.ek_public()), ek_certificate=_b64(state.tpm.ek_certificate()),
                                 ak_public=_b64(state.tpm.ak_public()), ak_name=_b64(state.tpm.ak_name()))

    @app.post(f"/{API_VERSION}/enrol/activate", response_model=ActivateResponse,
              responses={400: {"model": ErrorResponse}})
    def activate(req: ActivateRequest) -> ActivateResponse:
        """TPM2_ActivateCredential: recovers the verifier's secret only if the AK and EK share this TPM."""
        blob, secret = _unb64(req.credential_blob, "credential_blob"), _unb64(req.secret, "secret")
        try:
            with state.lock:
                out = state.tpm.activate_credential(blob, secret)
        except CwliteError as exc:
            raise _Reject(400, f"activate: the TPM refused the credential: {exc}") from exc
        return ActivateResponse(secret=_b64(out))

    app.add_middleware(_Bounds, state=state)
    return app


def _sig_path(policy_path: Path) -> Path:
    return policy_path.with_name(policy_path.name + ".sig")


def _checked_policy(state: ServiceState, req: PolicyPush):
    """Parse the pushed policy and check its signature with controlplane.core.policy (one implementation)."""
    from controlplane.core.policy import load_policy

    signature = _unb64(req.signature, "signature")
    with tempfile.TemporaryDirectory(prefix="cwlite-push-") as tmp:
        path = Path(tmp) / "pushed-policy.toml"
        path.write_text(req.policy)
        _sig_path(path).write_bytes(signature)
        try:
            return load_policy(path, controller_key=state.controller_key, require_signature=True)
        except PolicyError as exc:
            status = 403 if "signature" in str(exc).lower() else 422
            raise _Reject(status, str(exc).replace(str(path), "pushed policy")) from exc


# running -------------------------------------------------------------------------------
class Server:
    """uvicorn over HTTPS with the fresh TLS identity, in a background thread (`with Server(...) as s`).

    The TLS private key exists on disk only while uvicorn loads it (a private temp dir), then is removed.
    """

    def __init__(self, state: ServiceState, *, host: str = "127.0.0.1", port: int = 0,
                 log_level: str = "warning") -> None:
        import uvicorn

        self.state = state
        with tempfile.TemporaryDirectory(prefix="cwlite-tls-") as tmp:
            keyfile, certfile = Path(tmp) / "key.pem", Path(tmp) / "cert.pem"
            keyfile.touch(mode=0o600)
            keyfile.write_bytes(state.tls.key_pem)
            certfile.write_bytes(state.tls.cert_pem)
            self.config = uvicorn.Config(create_app(state), host=host, port=port, ssl_keyfile=str(keyfile),
                                         ssl_certfile=str(certfile), log_level=log_level, access_log=False,
                                         limit_concurrency=64, timeout_keep_alive=5, h11_max_incomplete_event_size=16384)
            self.config.load()
        self.server = uvicorn.Server(self.config)
        self.thread = threading.Thread(target=self.server.run, name="cwlite-service", daemon=True)

    def __enter__(self) -> "Server":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise CwliteError(f"attestation service: could not listen on {self.config.host}:{self.config.port}")
            time.sleep(0.02)
        return self

    @property
    def port(self) -> int:
        return self.server.servers[0].sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"https://{self.config.host}:{self.port}"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
