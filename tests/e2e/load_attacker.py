"""The load test's attacker, as its own process: `python -m tests.e2e.load_attacker PORT SECONDS SLOW FLOOD ADDR`.

For SECONDS it holds SLOW TLS connections to 127.0.0.1:PORT that send a request's headers one byte a
second (reopening each one the service cuts), and fires waves of FLOOD concurrent POST /v1/quote,
all from source address ADDR. Prints one JSON object: the answers counted by status (or exception
name), how long each cut slowloris connection lived after its handshake, and how long the attack ran.
"""
from __future__ import annotations

import asyncio
import collections
import json
import os
import ssl
import sys
import time

import httpx


def _tls() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class Attacker:
    """Slowloris connections and waves of concurrent quote requests from one source address."""

    def __init__(self, port: int, seconds: float, slow: int, flood: int, addr: str) -> None:
        self.port, self.seconds, self.slow, self.flood, self.addr = port, seconds, slow, flood, addr
        self.end = time.monotonic() + seconds
        self.statuses: collections.Counter = collections.Counter()
        self.slow_cut: list[float] = []          # seconds each slowloris connection lived before the cut

    def stopped(self) -> bool:
        return time.monotonic() > self.end

    async def _slowloris(self) -> None:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port, ssl=_tls(),
                                                           local_addr=(self.addr, 0))
        except OSError as exc:
            self.statuses[f"slowloris connect: {type(exc).__name__}"] += 1
            return
        self.statuses["slowloris connected"] += 1
        t0 = time.monotonic()                      # its life from the handshake on
        try:
            writer.write(b"POST /v1/quote HTTP/1.1\r\nHost: cwlite\r\n")
            while not self.stopped():
                writer.write(b"X")                 # one byte of a header that never ends
                await writer.drain()
                try:
                    if await asyncio.wait_for(reader.read(1), timeout=1.0) == b"":
                        break                      # the service closed it
                except asyncio.TimeoutError:
                    continue
            else:
                return
            self.slow_cut.append(time.monotonic() - t0)
        except OSError as exc:
            self.statuses[f"slowloris cut: {type(exc).__name__}"] += 1
            self.slow_cut.append(time.monotonic() - t0)
        finally:
            writer.close()

    async def _flood(self) -> None:
        transport = httpx.AsyncHTTPTransport(verify=_tls(), local_address=self.addr,
                                             limits=httpx.Limits(max_connections=self.flood, max_keepalive_connections=0))
        async with httpx.AsyncClient(transport=transport, base_url=f"https://127.0.0.1:{self.port}",
                                     timeout=30) as client:
            async def one() -> None:
                try:
                    r = await client.post("/v1/quote", json={"nonce": os.urandom(32).hex(), "pcrs": [10]})
                    self.statuses[r.status_code] += 1
                except httpx.HTTPError as exc:
                    self.statuses[type(exc).__name__] += 1
            while not self.stopped():
                await asyncio.gather(*(one() for _ in range(self.flood)))

    async def _main(self) -> None:
        async def slow_forever() -> None:
            while not self.stopped():         # a cut connection is opened again
                await self._slowloris()
        await asyncio.gather(self._flood(), *(slow_forever() for _ in range(self.slow)))

    def run(self) -> dict:
        t0 = time.monotonic()
        asyncio.run(self._main())
        return {"statuses": {str(k): v for k, v in self.statuses.items()}, "slow_cut": self.slow_cut,
                "seconds": time.monotonic() - t0}


if __name__ == "__main__":
    port, seconds, slow, flood, addr = sys.argv[1:6]
    print(json.dumps(Attacker(int(port), float(seconds), int(slow), int(flood), addr).run()))
