"""A real PostgreSQL server for tests, from Debian's postgresql package.

initdb + pg_ctl in a temporary directory, listening only on a unix socket
there (no TCP port to collide with anyone), as the `postgres` user when we
are root (PostgreSQL refuses to run as root). Stopped at session end.
"""
from __future__ import annotations

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


@pytest.fixture(scope="session")
def postgres_url():
    """SQLAlchemy URL (psycopg 3) of a fresh PostgreSQL server on a private unix socket."""
    if not (PG_BIN / "initdb").exists():   # in the Makefile's APT_PACKAGES: a set-up machine has it
        pytest.fail(f"{PG_BIN}/initdb missing: run `make setup` (Debian package postgresql)")
    base = Path(tempfile.mkdtemp(prefix="cwlite-pg-"))
    data, sock = base / "data", base / "sock"
    sock.mkdir()
    if os.geteuid() == 0:
        shutil.chown(base, "postgres")
        shutil.chown(sock, "postgres")
        base.chmod(0o755)
    subprocess.run(_as_pg([str(PG_BIN / "initdb"), "-D", str(data), "-A", "trust", "-U", "cwlite",
                           "--no-sync", "-E", "UTF8"]), check=True, capture_output=True)
    opts = f"-k {sock} -c listen_addresses='' -c fsync=off"
    subprocess.run(_as_pg([str(PG_BIN / "pg_ctl"), "-D", str(data), "-o", opts, "-l", str(base / "log"),
                           "-w", "-t", "60", "start"]), check=True, capture_output=True)
    try:
        yield f"postgresql+psycopg://cwlite@/postgres?host={sock}"
    finally:
        subprocess.run(_as_pg([str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"]),
                       capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def new_database(server_url: str, name: str) -> str:
    """CREATE DATABASE `name` on the server at `server_url`; the SQLAlchemy URL of the new database."""
    engine = create_engine(server_url)
    try:
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
            c.execute(text(f"CREATE DATABASE {name}"))
    finally:
        engine.dispose()
    return server_url.replace("/postgres?", f"/{name}?")
