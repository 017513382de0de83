"""The API's routes: each endpoint answers from the ServiceState; bad input is a 4xx with one line, never a 500."""
from __future__ import annotations

import base64
from pathlib import Path
from typing import Annotated

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from controlplane.core.atomic import write_atomic
from controlplane.core.errors import CwliteError, PolicyError, PolicyReason
from controlplane.core.events import Event, EventKind
from controlplane.core.policy import check_signature, decode_signature, parse_policy, signature_path
from controlplane.core.wire import API_VERSION, MAX_LOG_PAGE, quote_qualifying_data
from controlplane.host.service.limits import Bounds, Reject
from controlplane.host.service.models import (
    ActivateRequest,
    ActivateResponse,
    EnrolResponse,
    ErrorResponse,
    HealthResponse,
    ImaLogResponse,
    LogResponse,
    PolicyPush,
    PolicyResponse,
    QuoteRequest,
    QuoteResponse,
)
from controlplane.host.policy_floor import admit
from controlplane.host.service.state import ActivePolicy, ServiceState

PUSHED = "pushed policy"     # how a pushed policy is named in messages (it has no file yet)
FORBIDDEN = frozenset({PolicyReason.UNSIGNED, PolicyReason.SIGNATURE})   # 403
STALE = frozenset({PolicyReason.ROLLBACK, PolicyReason.EXPIRED})          # 409; any other refusal is 422


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode()


def _unb64(value: str, what: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except ValueError as exc:
        raise Reject(422, f"{what}: not base64") from exc


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:3]:
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or "body"
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    return "; ".join(parts)


def _known_query_only(request: Request) -> None:
    """422 for a query parameter the route does not take: `?start=99` must not quietly mean `from=0`."""
    route = request.scope.get("route")
    known = {p.alias for p in route.dependant.query_params} if route is not None else set()
    unknown = sorted(set(request.query_params) - known)
    if unknown:
        raise Reject(422, f"{unknown[0]}: unknown query parameter (this endpoint takes: "
                          f"{', '.join(sorted(known)) or 'none'})")


FromQuery = Annotated[int, Query(alias="from", ge=0, le=2**31, description="first entry to return")]
LimitQuery = Annotated[int, Query(ge=1, le=MAX_LOG_PAGE)]


def page_of(entries: list, start: int, limit: int, pcr: int, what: str) -> dict:
    """One page of a log, as /v1/log and /v1/ima-log answer it (416 past its end)."""
    if start > len(entries):
        raise Reject(416, f"from: {start} is past the end of {what} ({len(entries)} entries)")
    page = entries[start:start + limit]
    return {"start": start, "count": len(page), "total": len(entries), "pcr": pcr,
            "ascii": "".join(e.ascii() + "\n" for e in page)}


# the application ---------------------------------------------------------------------
def create_app(state: ServiceState) -> FastAPI:
    """The FastAPI application answering from `state` (tests and `cwlite serve` both use this).

    No /docs or /redoc: those pages load Swagger UI and ReDoc from a CDN, a blank page on an
    air-gapped build farm. The schema itself is served at /openapi.json.
    """
    app = FastAPI(title="cwlite attestation service", version=API_VERSION,
                  description="Fresh TPM quotes bound to this TLS key, the measurement log, the active policy.",
                  responses={422: {"model": ErrorResponse}, 429: {"model": ErrorResponse},
                             413: {"model": ErrorResponse}},
                  docs_url=None, redoc_url=None, dependencies=[Depends(_known_query_only)])

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return JSONResponse({"error": _validation_message(exc)}, status_code=422)

    @app.exception_handler(Reject)
    async def _rejected(request: Request, exc: Reject):
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @app.exception_handler(CwliteError)
    async def _cwlite(request: Request, exc: CwliteError):
        # a TPM or log failure on the host: the service cannot vouch for anything right now
        return JSONResponse({"error": str(exc)}, status_code=503)

    def log_length() -> int:
        return len(state.mlog.entries(0))

    if state.metrics is not None:
        @app.get("/metrics", include_in_schema=False)
        def metrics() -> Response:
            """Prometheus metrics (text exposition format)."""
            return Response(state.metrics.exposition(), media_type=state.metrics.content_type)

    @app.post(f"/{API_VERSION}/quote", response_model=QuoteResponse, responses={503: {"model": ErrorResponse}})
    def quote(req: QuoteRequest) -> QuoteResponse:
        """A TPM quote over `pcrs` with qualifying data SHA-256(nonce || SHA-256(this TLS key's SPKI))."""
        if state.metrics is None:
            return _quote(req)
        with state.metrics.quote_latency.time():
            return _quote(req)

    def _quote(req: QuoteRequest) -> QuoteResponse:
        if state.pcr not in req.pcrs:
            raise Reject(422, f"pcrs: must include the measurement-log PCR {state.pcr}")
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
    def log(start: FromQuery = 0, limit: LimitQuery = MAX_LOG_PAGE) -> LogResponse:
        """Measurement-log entries from `start` (incremental fetch), at most `limit` of them."""
        return LogResponse(**page_of(state.mlog.entries(0), start, limit, state.pcr, "the log"))

    @app.get(f"/{API_VERSION}/ima-log", response_model=ImaLogResponse,
             responses={404: {"model": ErrorResponse}, 416: {"model": ErrorResponse}})
    def ima_log(start: FromQuery = 0, limit: LimitQuery = MAX_LOG_PAGE) -> ImaLogResponse:
        """The kernel's own IMA log from `start` (incremental fetch), at most `limit` entries; 404 without IMA."""
        if state.kernel_ima is None:
            raise Reject(404, "ima-log: this host's kernel keeps no IMA log cwlite can read")
        return ImaLogResponse(**page_of(state.kernel_ima.entries(), start, limit, state.kernel_ima.pcr,
                                        "the kernel's IMA log"))

    @app.get(f"/{API_VERSION}/policy", response_model=PolicyResponse)
    def policy() -> PolicyResponse:
        """The active policy (text and canonical digest) and the measurement-DB digest."""
        return _policy_response(state.policy)

    @app.post(f"/{API_VERSION}/policy", response_model=PolicyResponse,
              responses={403: {"model": ErrorResponse}, 409: {"model": ErrorResponse}})
    def push_policy(req: PolicyPush) -> PolicyResponse:
        """Load a controller-signed policy: only if its signature checks; the load is logged (POLICY_LOAD)."""
        if state.controller_key is None or state.policy_path is None:
            raise Reject(409, "policy push disabled: the service was started without --controller-key/--policy")
        active, signature = checked_policy(req, state.controller_key)
        with state.lock:
            if state.data_dir is not None:
                try:
                    admit(active.policy, state.data_dir)     # serial floor: no rollback to an older signed policy
                except PolicyError as exc:
                    raise Reject(409 if exc.reason in STALE else 422, str(exc)) from exc
            path = Path(state.policy_path)
            write_atomic(signature_path(path), signature, mode=0o644)
            write_atomic(path, req.policy.encode(), mode=0o644)
            state.policy = active
            state.mlog.record(Event(EventKind.POLICY_LOAD, active.digest, op="push", subject=str(path)), wait=True)
            if state.on_policy is not None:     # e.g. an embedded enforcement engine re-reads the file
                state.on_policy(active.policy)
        return _policy_response(active)

    def _policy_response(active: ActivePolicy | None) -> PolicyResponse:
        return PolicyResponse(policy_digest=active.digest.hex() if active else None,
                              db_digest=state.db_digest.hex() if state.db_digest else None,
                              mode=active.policy.mode.value if active else None,
                              policy=active.text if active else None)

    @app.get(f"/{API_VERSION}/health", response_model=HealthResponse)
    def health() -> HealthResponse:
        """Liveness, log length and the TLS key hash (no TPM command)."""
        return HealthResponse(status="ok", version=API_VERSION, pcr=state.pcr, log_length=log_length(),
                              tls_spki_sha256=state.tls.spki_sha256.hex(),
                              ima_pcr=state.kernel_ima.pcr if state.kernel_ima is not None else None)

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
            raise Reject(400, f"activate: the TPM refused the credential: {exc}") from exc
        return ActivateResponse(secret=_b64(out))

    app.add_middleware(Bounds, settings=state)
    return app


def checked_policy(req: PolicyPush, controller_key: object) -> tuple[ActivePolicy, bytes]:
    """The pushed policy, parsed once, and its raw signature, if the controller signed it; Reject otherwise.

    403 when the signature is missing, malformed or wrong (PolicyError.reason), 422 for a malformed policy.
    """
    signature = _unb64(req.signature, "signature")
    try:
        pol = parse_policy(req.policy, source=PUSHED)
        raw = decode_signature(signature, source=f"{PUSHED}.sig")
        check_signature(pol, raw, controller_key, source=f"{PUSHED}.sig")
    except PolicyError as exc:
        raise Reject(403 if exc.reason in FORBIDDEN else 422, str(exc)) from exc
    return ActivePolicy.of(req.policy, pol), signature
