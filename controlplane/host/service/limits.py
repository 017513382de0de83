"""Request bounds, enforced before any parsing: body size and a token-bucket rate per client.

A pure ASGI middleware, so an oversized or too-frequent request gets a 413 /
429 with one JSON line before FastAPI reads or validates anything.
"""
from __future__ import annotations

import json
import threading
import time
from typing import Any, Protocol

MAX_BODY = 256 * 1024            # bytes; a signed policy is the largest legitimate body
MAX_CLIENTS = 10_000             # rate buckets kept; beyond that they are reset (bounded memory)


class Reject(Exception):
    """A request refused with `status` and a one-line `message` (the JSON body's "error")."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


async def send_error(send: Any, status: int, message: str) -> None:
    """Answer at the ASGI level: {"error": message} with `status`."""
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class RateSettings(Protocol):
    """Where the limits are read from on every request (the service state: they may change while serving)."""

    rate_per_s: float
    burst: int


class RateLimiter:
    """A token bucket per client address: `rate_per_s` refill, at most `burst` tokens."""

    def __init__(self, settings: RateSettings) -> None:
        self.settings = settings
        self.buckets: dict[str, tuple[float, float]] = {}
        self.lock = threading.Lock()

    def allow(self, client: str) -> bool:
        now = time.monotonic()
        burst, rate = float(self.settings.burst), self.settings.rate_per_s
        with self.lock:
            tokens, last = self.buckets.get(client, (burst, now))
            tokens = min(burst, tokens + (now - last) * rate)
            ok = tokens >= 1.0
            self.buckets[client] = (tokens - 1.0 if ok else tokens, now)
            if len(self.buckets) > MAX_CLIENTS:   # bounded memory under a spray of clients
                self.buckets.clear()
            return ok


class Bounds:
    """ASGI middleware: rate per client (429), declared and streamed body size (413)."""

    def __init__(self, app: Any, *, settings: RateSettings, max_body: int = MAX_BODY) -> None:
        self.app = app
        self.limiter = RateLimiter(settings)
        self.max_body = max_body

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        client = (scope.get("client") or ("?", 0))[0]
        if not self.limiter.allow(client):
            return await send_error(send, 429, "rate limit: too many requests, retry later")
        too_big = f"request body larger than {self.max_body} bytes"
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                if not value.isdigit() or int(value) > self.max_body:
                    return await send_error(send, 413, too_big)
        seen = 0

        async def bounded_receive() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise Reject(413, too_big)
            return message

        try:
            return await self.app(scope, bounded_receive, send)
        except Reject as exc:
            return await send_error(send, exc.status, exc.message)
