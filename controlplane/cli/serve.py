"""`cwlite serve`: run the attestation service over HTTPS, optionally with PRIMA enforcement in-process.

The measurement log has one writer (it is locked), so when enforcement runs
on the same host it runs inside the serving process (`--enforce`): the engine
and the service share one log and one TPM connection.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator

import click

from controlplane.cli.enforce import Daemon, Tee
from controlplane.core.errors import EnforcementError
from controlplane.core.paths import DEFAULT_DATA_DIR
from controlplane.core.policy import read_policy
from controlplane.host import mlog as mlog_mod
from controlplane.host.control import ControlServer, socket_path
from controlplane.host.kernel_ima import IMA_BINARY_LOG, KernelImaLog
from controlplane.host.policy_floor import admit
from prima.measuredb import MeasureDB


@dataclass
class Running:
    """A serving host: the service's state and server, and the embedded enforcement daemon if any."""

    state: object
    server: object
    daemon: object | None
    log: object
    failure: list            # an exception that stopped the embedded enforcement daemon

    @property
    def url(self) -> str:
        return self.server.url


@contextlib.contextmanager
def running_service(data_dir: Path, *, host: str = "127.0.0.1", port: int = 0, pcr: int | None = None,
                    policy_path: Path | None = None, db_path: Path | None = None, enforce: bool = False,
                    backend: str = "auto", controller_key: Path | None = None, device: str | None = None,
                    rate: float = 50.0, say: IO[str] | None = None,
                    kernel_ima_log: Path | None = IMA_BINARY_LOG) -> Iterator[Running]:
    """TPM + measurement log (+ enforcement daemon thread) + HTTPS service; all stopped on exit.

    `kernel_ima_log`: the kernel's own IMA log, served at /v1/ima-log when it can be read (None: not served)."""
    # Loaded only when serving: FastAPI/uvicorn and tpm2-pytss take over 1 s to import, paid by every
    # `cwlite` start if at the top.
    from controlplane.host import tpm as tpm_mod
    from controlplane.host.metrics import ServiceMetrics
    from controlplane.host.service import ActivePolicy, Server, ServiceState, TlsIdentity

    if enforce and (policy_path is None or db_path is None):
        raise click.UsageError("--enforce needs --policy and --db")
    active = None
    if policy_path is not None:
        # parsed once: the service serves it and the embedded engine starts from it (signature checked for that)
        checked = enforce and controller_key is not None
        active = ActivePolicy.of(*read_policy(policy_path, controller_key=controller_key if checked else None,
                                              require_signature=checked))
        admit(active.policy, data_dir)     # never start from a policy older than one this host ran
    pcr = mlog_mod.choose_pcr(active.policy.pcr if active else mlog_mod.DEFAULT_PCR) if pcr is None else pcr
    db_digest = None
    if db_path is not None:
        with MeasureDB.open(db_path) as db:
            db_digest = db.digest()
    Path(data_dir).mkdir(parents=True, exist_ok=True)
    with tpm_mod.open_tpm(data_dir, device=device) as tpm, \
            mlog_mod.MeasurementLog.open(Path(data_dir) / "measurements.log", tpm, pcr=pcr) as log:
        metrics = ServiceMetrics(log)
        state = ServiceState(tpm=tpm, mlog=log, tls=TlsIdentity.fresh(), pcr=pcr, policy_path=policy_path,
                             policy=active, db_digest=db_digest, controller_key=controller_key, rate_per_s=rate,
                             metrics=metrics, data_dir=Path(data_dir),
                             kernel_ima=KernelImaLog.if_present(kernel_ima_log) if kernel_ima_log else None)
        server = Server(state, host=host, port=port)     # bind first: a service that cannot listen records nothing
        with contextlib.closing(server.sock), \
                ControlServer(socket_path(data_dir), log):   # `cwlite vm up` records through it
            state.record_tls_key()
            daemon = thread = None
            failure: list[BaseException] = []
            if enforce:
                daemon = Daemon(policy_path, db_path, Tee([log, metrics]), backend=backend, controller_key=controller_key,
                                log=say, policy=active.policy, data_dir=Path(data_dir))

                def run() -> None:
                    try:
                        daemon.run()
                    except BaseException as exc:  # noqa: BLE001 - reported by the serving thread
                        failure.append(exc)

                thread = threading.Thread(target=run, name="cwlite-enforce", daemon=True)
                thread.start()
                state.on_policy = lambda _policy: setattr(daemon, "reload_requested", True)
                state.on_quote = daemon.request_alive
            try:
                with server:
                    yield Running(state, server, daemon, log, failure)
            finally:
                if daemon is not None:
                    daemon.stop_requested = True
                    thread.join(timeout=30)
                log.flush()
            if failure:
                raise EnforcementError(f"enforcement stopped: {failure[0]}") from failure[0]


@click.command("serve")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_DATA_DIR, show_default=True,
              help="Where the measurement log and the embedded swtpm live.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8443, show_default=True, help="TCP port (0: any free).")
@click.option("--pcr", type=click.IntRange(0, 23), help="The measurement-log PCR (default: the policy's, else 10).")
@click.option("--policy", "policy_path", type=click.Path(dir_okay=False, path_type=Path),
              help="The active policy file (served; replaced by a pushed, signed policy).")
@click.option("--db", "db_path", type=click.Path(dir_okay=False, path_type=Path), help="The measurement DB (its digest is served).")
@click.option("--enforce", is_flag=True, help="Also run PRIMA enforcement (as `cwlite enforce --mlog`) in this process.")
@click.option("--backend", type=click.Choice(["auto", "tracepoint", "lsm"]), default="auto", show_default=True,
              help="With --enforce: the kernel backend.")
@click.option("--controller-key", type=click.Path(dir_okay=False, path_type=Path),
              help="Ed25519 public key whose signed policies may be pushed (POST /v1/policy).")
@click.option("--device", help="TPM device or TCTI (default: /dev/tpmrm0, else the embedded swtpm).")
@click.option("--rate", type=float, default=50.0, show_default=True, help="Requests per second per client.")
@click.option("--kernel-ima-log", default=str(IMA_BINARY_LOG), show_default=True,
              help="The kernel's own IMA log (binary form), served at /v1/ima-log when readable; 'none': not served.")
def serve(data_dir: Path, host: str, port: int, pcr: int | None, policy_path: Path | None, db_path: Path | None,
          enforce: bool, backend: str, controller_key: Path | None, device: str | None, rate: float,
          kernel_ima_log: str) -> None:
    """Serve fresh TPM quotes bound to a fresh TLS key, the measurement log and the policy.

    At start a new TLS key pair and self-signed certificate are made and the
    SHA-256 of the key's SubjectPublicKeyInfo is recorded in the measurement
    log (a tls-key entry extended into the PCR). Every quote's qualifying data
    is SHA-256(nonce || that hash), so a verifier can tell this service from a
    relay. With --enforce, PRIMA runs in the same process and writes the same
    log; a pushed, signed policy is then reloaded by the engine. The OpenAPI
    schema is at /openapi.json. Stops on SIGINT/SIGTERM.

    \b
    Examples:
      # the embedded swtpm under /var/lib/cwlite, port 8443 on loopback
      cwlite serve
      # enforce and serve; the controller may push signed policies
      cwlite serve --enforce --policy /etc/cwlite/policy.toml --db measure.db --controller-key controller.pub
      # any free port, a private data dir
      cwlite serve --data-dir /tmp/cw --port 0
    """
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with running_service(data_dir, host=host, port=port, pcr=pcr, policy_path=policy_path, db_path=db_path,
                         enforce=enforce, backend=backend, controller_key=controller_key, device=device,
                         rate=rate, kernel_ima_log=None if kernel_ima_log == "none" else Path(kernel_ima_log)) as running:
        kima = running.state.kernel_ima
        click.echo(f"cwlite serve: {running.url} (TLS key {running.state.tls.spki_sha256.hex()[:16]}, "
                   f"PCR {running.state.pcr}, log {data_dir / 'measurements.log'}"
                   + (f"; kernel IMA log on PCR {kima.pcr}" if kima is not None else "") + ")", err=True)
        while not stop.wait(0.5):
            if running.failure:
                break
