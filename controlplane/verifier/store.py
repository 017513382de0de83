"""The verifier's memory: enrolled hosts, their last verified state, verdicts and proofs.

SQLAlchemy 2.0, so one schema serves one verifier (SQLite file, the default)
and a fleet of verifiers sharing a PostgreSQL database (any SQLAlchemy URL,
psycopg 3). Every change is one transaction: a crash never leaves a host's
state ahead of the proof that justified it.
"""
from __future__ import annotations

import contextlib
import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from sqlalchemy import (
    JSON,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    create_engine,
    event,
    select,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from controlplane.core.errors import StoreError


class _Base(DeclarativeBase):
    pass


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class HostRow(_Base):
    __tablename__ = "hosts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(253), unique=True)
    url: Mapped[str] = mapped_column(String(2048))
    ek_public: Mapped[bytes] = mapped_column(LargeBinary)
    ek_cert: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    ak_public: Mapped[bytes] = mapped_column(LargeBinary)
    pcr: Mapped[int] = mapped_column(Integer, default=10)
    interval_s: Mapped[float] = mapped_column(Float, default=30.0)
    # last verified state: the PCR value after `log_offset` entries, and the boot aggregate seen
    pcr_value: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    log_offset: Mapped[int] = mapped_column(Integer, default=0)
    boot_aggregate: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    daemon_starts: Mapped[int] = mapped_column(Integer, default=0)
    facts: Mapped[dict] = mapped_column(JSON, default=dict)   # what earlier entries established (keys, digests)
    enrolled_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=_now)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=_now)


class PolicySerialRow(_Base):
    """The highest policy serial a proof for this host was made against: a verifier never goes back below it.

    A table of its own (not a hosts column) so stores made before it gain it by create_all."""

    __tablename__ = "policy_serials"
    host_id: Mapped[int] = mapped_column(ForeignKey("hosts.id", ondelete="CASCADE"), primary_key=True)
    serial: Mapped[int] = mapped_column(Integer, default=0)


class ProofRow(_Base):
    __tablename__ = "proofs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    host_id: Mapped[int] = mapped_column(ForeignKey("hosts.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=_now)
    digest: Mapped[str] = mapped_column(String(64))          # SHA-256 hex of the signed document
    document: Mapped[str] = mapped_column(Text)               # the signed proof, canonical JSON


class VerdictRow(_Base):
    __tablename__ = "verdicts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    host_id: Mapped[int] = mapped_column(ForeignKey("hosts.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=_now)
    verdict: Mapped[str] = mapped_column(String(16))          # trusted | untrusted | error
    reason: Mapped[str] = mapped_column(String(64), default="")
    message: Mapped[str] = mapped_column(Text, default="")
    log_start: Mapped[int] = mapped_column(Integer, default=0)
    log_end: Mapped[int] = mapped_column(Integer, default=0)
    findings: Mapped[list] = mapped_column(JSON, default=list)
    proof_id: Mapped[int | None] = mapped_column(ForeignKey("proofs.id", ondelete="SET NULL"), nullable=True)


@dataclass(frozen=True)
class Host:
    """An enrolled host as the verifier pinned it, with its last verified state."""

    name: str
    url: str
    ek_public: bytes
    ek_cert: bytes | None
    ak_public: bytes
    pcr: int = 10
    interval_s: float = 30.0
    pcr_value: bytes | None = None
    log_offset: int = 0
    boot_aggregate: bytes | None = None
    daemon_starts: int = 0
    facts: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Verdict:
    """One attestation outcome; `proof_id` names the signed proof when there is one."""

    host: str
    verdict: str
    reason: str
    message: str
    log_start: int
    log_end: int
    findings: list
    proof_id: int | None
    created_at: dt.datetime


_HOST_FIELDS = tuple(Host.__dataclass_fields__)


def _host(row: HostRow) -> Host:
    values = {f: getattr(row, f) for f in _HOST_FIELDS}
    values["facts"] = dict(values["facts"] or {})
    return Host(**values)


def default_url(data_dir: Path) -> str:
    """SQLite in the verifier's data dir: the single-verifier default."""
    return f"sqlite:///{Path(data_dir) / 'attest.db'}"


class Store:
    """Hosts, verdicts and proofs behind one SQLAlchemy URL. Use as a context manager."""

    def __init__(self, url: str) -> None:
        self.url = url
        try:
            # pre-ping: a pooled connection a restarted server dropped is replaced, not handed out dead
            self._engine = create_engine(url, future=True, pool_pre_ping=True)
            if self._engine.dialect.name == "sqlite":
                event.listen(self._engine, "connect", _sqlite_pragmas)
            _Base.metadata.create_all(self._engine)
        except (SQLAlchemyError, ImportError, ValueError) as exc:
            raise StoreError(f"{_redact(url)}: cannot open the attestation store: {_one_line(exc)}") from exc

    @classmethod
    def open(cls, url: str) -> "Store":
        return cls(url)

    def close(self) -> None:
        self._engine.dispose()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _session(self) -> Session:
        return Session(self._engine, expire_on_commit=False)

    @contextlib.contextmanager
    def _db(self, what: str) -> Iterator[None]:
        """A database failure (server down or restarting, disk full) as one StoreError line: nothing of
        the transaction was applied, and the caller may try again."""
        try:
            yield
        except SQLAlchemyError as exc:
            raise StoreError(f"{self.where()}: {what}: {_one_line(exc)}") from exc

    # hosts ---------------------------------------------------------------
    def enrol(self, host: Host) -> Host:
        """Pin a host's EK and AK. Re-enrolling a name with a different EK is refused (a new machine)."""
        with self._db(f"enrol {host.name!r}"), self._session() as s, s.begin():
            row = s.scalars(select(HostRow).where(HostRow.name == host.name)).one_or_none()
            if row is not None and row.ek_public != host.ek_public:
                raise StoreError(f"{self.where()}: host {host.name!r}: already enrolled with a different EK "
                                 "(remove it first to enrol a new machine under this name)")
            if row is None:
                row = HostRow(name=host.name)
                s.add(row)
            for f in _HOST_FIELDS:
                setattr(row, f, getattr(host, f))
            row.updated_at = _now()
            try:
                s.flush()
            except IntegrityError as exc:
                raise StoreError(f"{self.where()}: host {host.name!r}: {_one_line(exc)}") from exc
            return _host(row)

    def host(self, name: str) -> Host:
        with self._db(f"read host {name!r}"), self._session() as s:
            row = s.scalars(select(HostRow).where(HostRow.name == name)).one_or_none()
            if row is None:
                raise StoreError(f"{self.where()}: host {name!r} is not enrolled (enrol it: cwlite enrol URL {name})")
            return _host(row)

    def hosts(self) -> list[Host]:
        with self._db("list hosts"), self._session() as s:
            return [_host(r) for r in s.scalars(select(HostRow).order_by(HostRow.name))]

    def remove(self, name: str) -> None:
        with self._db(f"remove {name!r}"), self._session() as s, s.begin():
            row = s.scalars(select(HostRow).where(HostRow.name == name)).one_or_none()
            if row is None:
                raise StoreError(f"{self.where()}: host {name!r} is not enrolled")
            s.delete(row)

    # verdicts and proofs -------------------------------------------------
    def record(self, name: str, *, verdict: str, reason: str = "", message: str = "", log_start: int = 0,
               log_end: int = 0, findings: list | None = None, proof_document: str | None = None,
               proof_digest: str = "", state: dict | None = None) -> Verdict:
        """Store a verdict (and its proof), and advance the host's verified state, in ONE transaction.

        `state` holds the Host fields to update (pcr_value, log_offset, boot_aggregate, daemon_starts);
        it is applied only together with the verdict that justified it.
        """
        with self._db(f"record a verdict for {name!r}"), self._session() as s, s.begin():
            row = s.scalars(select(HostRow).where(HostRow.name == name).with_for_update()).one_or_none()
            if row is None:
                raise StoreError(f"{self.where()}: host {name!r} is not enrolled")
            proof_id = None
            if proof_document is not None:
                proof = ProofRow(host_id=row.id, digest=proof_digest, document=proof_document)
                s.add(proof)
                s.flush()
                proof_id = proof.id
            v = VerdictRow(host_id=row.id, verdict=verdict, reason=reason, message=message,
                           log_start=log_start, log_end=log_end, findings=list(findings or []),
                           proof_id=proof_id)
            s.add(v)
            state = dict(state or {})
            serial = state.pop("policy_serial", None)
            if serial is not None:
                seen = s.get(PolicySerialRow, row.id)
                if seen is None:
                    s.add(PolicySerialRow(host_id=row.id, serial=serial))
                elif serial > seen.serial:
                    seen.serial = serial
            for key, value in state.items():
                if key not in ("pcr_value", "log_offset", "boot_aggregate", "daemon_starts", "ak_public", "facts"):
                    raise StoreError(f"{self.where()}: host state field {key!r} cannot be recorded")
                setattr(row, key, value)
            row.updated_at = _now()
            s.flush()
            return _verdict(name, v)

    def policy_serial(self, name: str) -> int:
        """The highest policy serial a stored proof for host `name` was made against (0: none)."""
        with self._db(f"read the policy floor of {name!r}"), self._session() as s:
            serial = s.execute(select(PolicySerialRow.serial).join(HostRow, HostRow.id == PolicySerialRow.host_id)
                               .where(HostRow.name == name)).scalar_one_or_none()
            return serial or 0

    def verdicts(self, name: str, *, limit: int = 20) -> list[Verdict]:
        """The host's latest verdicts, newest first."""
        with self._db(f"read verdicts of {name!r}"), self._session() as s:
            rows = s.execute(select(VerdictRow).join(HostRow).where(HostRow.name == name)
                             .order_by(VerdictRow.id.desc()).limit(limit)).scalars()
            return [_verdict(name, r) for r in rows]

    def proof(self, proof_id: int) -> str:
        """The signed proof document (canonical JSON) stored under `proof_id`."""
        with self._db(f"read proof #{proof_id}"), self._session() as s:
            row = s.get(ProofRow, proof_id)
            if row is None:
                raise StoreError(f"{self.where()}: no proof #{proof_id}")
            return row.document

    def where(self) -> str:
        return _redact(self.url)


def _verdict(name: str, r: VerdictRow) -> Verdict:
    return Verdict(name, r.verdict, r.reason, r.message, r.log_start, r.log_end, list(r.findings or []),
                   r.proof_id, r.created_at)


def _sqlite_pragmas(dbapi_conn, _record) -> None:  # noqa: ANN001 - DBAPI connection
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.close()


def _redact(url: str) -> str:
    """The URL without its password, for messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - a malformed URL is itself the message
        return url


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]
