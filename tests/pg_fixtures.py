"""A real PostgreSQL server for tests, from Debian's postgresql package.

initdb + pg_ctl in a temporary directory, listening only on a unix socket
there (no TCP port to collide with anyone), as the `postgres` user when we
are root (PostgreSQL refuses to run as root). Stopped when the test process exits.
"""
from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

PG_BIN = Path("/usr/lib/postgresql/15/bin")


def _as_pg(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


class PgServer:
    """A private PostgreSQL server: `url` (SQLAlchemy, psycopg 3) and stop/start/restart (a fault test's lever)."""

    def __init__(self, base: Path) -> None:
        self.base, self.data, self.sock = base, base / "data", base / "sock"
        self.url = f"postgresql+psycopg://cwlite@/postgres?host={self.sock}"

    def ctl(self, *args: str, check: bool = True) -> None:
        subprocess.run(_as_pg([str(PG_BIN / "pg_ctl"), "-D", str(self.data), *args]), check=check, capture_output=True)

    def start(self) -> None:
        opts = f"-k {self.sock} -c listen_addresses='' -c fsync=off"
        self.ctl("-o", opts, "-l", str(self.base / "log"), "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (`fast`: disconnect every client; `immediate`: as after a crash)."""
        self.ctl("-m", mode, "-w", "stop")

    def restart(self) -> None:
        self.stop()
        self.start()


_SERVER: list[PgServer] = []


def session_server() -> PgServer:
    """The test session's PostgreSQL server (initdb + pg_ctl on first use; stopped when the session's
    process exits), shared by both fixtures so a test module may import either alone."""
    if _SERVER:
        return _SERVER[0]
    if not (PG_BIN / "initdb").exists():   # in the Makefile's APT_PACKAGES: a set-up machine has it
        pytest.fail(f"{PG_BIN}/initdb missing: run `make setup` (Debian package postgresql)")
    server = PgServer(Path(tempfile.mkdtemp(prefix="cwlite-pg-")))
    server.sock.mkdir()
    if os.geteuid() == 0:
        shutil.chown(server.base, "postgres")
        shutil.chown(server.sock, "postgres")
        server.base.chmod(0o755)
    subprocess.run(_as_pg([str(PG_BIN / "initdb"), "-D", str(server.data), "-A", "trust", "-U", "cwlite",
                           "--no-sync", "-E", "UTF8"]), check=True, capture_output=True)
    server.start()

    def stop() -> None:
        server.ctl("-m", "immediate", "-w", "stop", check=False)
        shutil.rmtree(server.base, ignore_errors=True)

    atexit.register(stop)
    _SERVER.append(server)
    return server


@pytest.fixture(scope="session")
def postgres_server() -> PgServer:
    """A fresh PostgreSQL server on a private unix socket, with stop/start/restart (fault tests)."""
    return session_server()


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """SQLAlchemy URL (psycopg 3) of the session's PostgreSQL server."""
    return session_server().url


def new_database(server_url: str, name: str) -> str:
    """CREATE DATABASE `name` on the server at `server_url`; the SQLAlchemy URL of the new database."""
    engine = create_engine(server_url)
    try:
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
            c.execute(text(f"CREATE DATABASE {name}"))
    finally:
        engine.dispose()
    return server_url.replace("/postgres?", f"/{name}?")
