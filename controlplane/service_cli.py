"""`cwlite serve`: run the attestation service over HTTPS."""
from __future__ import annotations

import signal
import threading
from pathlib import Path

import click

DEFAULT_DATA = Path("/var/lib/cwlite")


@click.command("serve")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_DATA, show_default=True,
              help="Where the measurement log and the embedded swtpm live.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8443, show_default=True, help="TCP port (0: any free).")
@click.option("--pcr", type=click.IntRange(0, 23), default=10, show_default=True, help="The measurement-log PCR.")
@click.option("--policy", "policy_path", type=click.Path(dir_okay=False, path_type=Path),
              help="The active policy file (served; replaced by a pushed, signed policy).")
@click.option("--db", "db_path", type=click.Path(dir_okay=False, path_type=Path), help="The measurement DB (its digest is served).")
@click.option("--controller-key", type=click.Path(dir_okay=False, path_type=Path),
              help="Ed25519 public key whose signed policies may be pushed (POST /v1/policy).")
@click.option("--device", help="TPM device or TCTI (default: /dev/tpmrm0, else the embedded swtpm).")
@click.option("--rate", type=float, default=50.0, show_default=True, help="Requests per second per client.")
def serve(data_dir: Path, host: str, port: int, pcr: int, policy_path: Path | None, db_path: Path | None,
          controller_key: Path | None, device: str | None, rate: float) -> None:
    """Serve fresh TPM quotes bound to a fresh TLS key, the measurement log and the policy.

    At start a new TLS key pair and self-signed certificate are made and the
    SHA-256 of the key's SubjectPublicKeyInfo is recorded in the measurement
    log (a tls-key entry extended into the PCR). Every quote's qualifying data
    is SHA-256(nonce || that hash), so a verifier can tell this service from a
    relay. The OpenAPI schema is at /openapi.json. Stops on SIGINT/SIGTERM.

    \b
    Examples:
      # the embedded swtpm under /var/lib/cwlite, port 8443 on loopback
      cwlite serve
      # a policy the controller may replace by pushing a signed one
      cwlite serve --policy /etc/cwlite/policy.toml --controller-key controller.pub
      # any free port, a private data dir
      cwlite serve --data-dir /tmp/cw --port 0
    """
    from controlplane import mlog as mlog_mod
    from controlplane import tpm as tpm_mod
    from controlplane.service import Server, ServiceState, TlsIdentity

    data_dir.mkdir(parents=True, exist_ok=True)
    db_digest = None
    if db_path is not None:
        from prima.measuredb import MeasureDB

        with MeasureDB.open(db_path) as db:
            db_digest = db.digest()
    with tpm_mod.open_tpm(data_dir, device=device) as tpm:
        log = mlog_mod.MeasurementLog.open(data_dir / "measurements.log", tpm, pcr=pcr)
        state = ServiceState(tpm=tpm, mlog=log, tls=TlsIdentity.fresh(), pcr=pcr, policy_path=policy_path,
                             db_digest=db_digest, controller_key=controller_key, rate_per_s=rate)
        state.record_tls_key()
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        with Server(state, host=host, port=port) as server:
            click.echo(f"cwlite serve: {server.url} (TLS key {state.tls.spki_sha256.hex()[:16]}, PCR {pcr}, "
                       f"log {data_dir / 'measurements.log'})", err=True)
            stop.wait()
