"""The embedded software TPM: Debian's swtpm, manufactured and supervised by cwlite.

When a machine has no `/dev/tpmrm0`, cwlite runs its own swtpm with its state
under the data dir, so the demo and the tests need no hardware. The TPM is
manufactured once (`swtpm_setup`) with EK certificates signed by a local CA
kept beside the state, so enrolment sees the same objects as on a real TPM:
an RSA-2048 EK (persisted at 0x81010001, certificate in NV 0x01c00002), an
ECC EK and a platform certificate.

swtpm listens on two loopback TCP ports: commands on P and control on P + 1
(the layout the swtpm TCTI assumes). A free pair is chosen just before the
start; if another process takes one in between, swtpm exits and the start is
retried on a new pair.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from controlplane.core.atomic import write_atomic
from controlplane.core.errors import TpmError

SWTPM = "swtpm"
SWTPM_SETUP = "swtpm_setup"
SWTPM_LOCALCA = "swtpm_localca"
STATE_FILE = "tpm2-00.permall"
RUNNING_FILE = "running.json"   # pid and port of the swtpm serving this state, for other cwlite commands
START_TIMEOUT = 10.0
_PORT_RANGE = (20000, 32000)
STOP_TIMEOUT = 5.0


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise TpmError(f"{name}: not installed (Debian packages swtpm, swtpm-tools; `make setup` installs them)")
    return path


def manufacture(data_dir: Path) -> Path:
    """Create the TPM state under `data_dir/state` (once) with EK and platform certificates.

    The local CA (root + signing key) lives in `data_dir/ca`; swtpm_localca
    creates it on first use. Returns the state directory. Idempotent.
    """
    data_dir = Path(data_dir)
    state = data_dir / "state"
    if (state / STATE_FILE).exists():
        return state
    ca = data_dir / "ca"
    try:
        for d in (state, ca):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise TpmError(f"{data_dir}: cannot create the embedded TPM's state ({exc.strerror})") from exc
    localca_conf = data_dir / "swtpm-localca.conf"
    localca_conf.write_text(
        f"statedir = {ca}\nsigningkey = {ca}/signkey.pem\n"
        f"issuercert = {ca}/issuercert.pem\ncertserial = {ca}/certserial\n"
    )
    localca_opts = data_dir / "swtpm-localca.options"
    localca_opts.write_text("--platform-manufacturer cwlite\n--platform-version 2.1\n--platform-model swtpm\n")
    setup_conf = data_dir / "swtpm_setup.conf"
    setup_conf.write_text(
        f"create_certs_tool = {_tool(SWTPM_LOCALCA)}\n"
        f"create_certs_tool_config = {localca_conf}\n"
        f"create_certs_tool_options = {localca_opts}\n"
        "active_pcr_banks = sha256\n"
    )
    cmd = [
        _tool(SWTPM_SETUP), "--tpm2", "--tpmstate", str(state), "--config", str(setup_conf),
        "--create-ek-cert", "--create-platform-cert", "--overwrite", "--logfile", str(data_dir / "swtpm_setup.log"),
    ]
    if os.geteuid() == 0:
        cmd += ["--runas", "root"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0 or not (state / STATE_FILE).exists():
        try:
            log_lines = (data_dir / "swtpm_setup.log").read_text(errors="replace").strip().splitlines()
        except FileNotFoundError:
            log_lines = []
        last = (log_lines or proc.stderr.strip().splitlines() or [""])[-1]
        raise TpmError(f"{state}: swtpm_setup failed (exit {proc.returncode}): {last}", rc=proc.returncode)
    return state


def _free_pair() -> int:
    """A port P with P and P + 1 both free on loopback right now.

    Chosen below the kernel's ephemeral range: the swtpm TCTI connects once per
    command, so the ephemeral range fills with TIME_WAIT sockets of our own.
    """
    low, high = _PORT_RANGE
    for _ in range(256):
        port = random.randrange(low, high - 1)
        try:
            for p in (port, port + 1):
                with socket.socket() as s:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as swtpm binds
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        return port
    raise TpmError(f"swtpm: no two consecutive free loopback ports in {low}-{high}")


class _PortTaken(Exception):
    """swtpm lost the race for its port pair; start again on another."""


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@dataclass
class Swtpm:
    """A running swtpm; `tcti` is the string tpm2-pytss and tpm2-tools take (TPM2TOOLS_TCTI)."""

    data_dir: Path
    port: int
    process: subprocess.Popen | None   # None: attached to an swtpm another process supervises
    _pid: int = 0

    @property
    def tcti(self) -> str:
        return f"swtpm:host=127.0.0.1,port={self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid if self.process is not None else self._pid

    @classmethod
    def attach(cls, data_dir: Path) -> "Swtpm | None":
        """The swtpm another cwlite process runs on this state (e.g. `cwlite serve`), if it still answers."""
        data_dir = Path(data_dir).resolve()
        try:
            info = json.loads((data_dir / RUNNING_FILE).read_text())
            pid, port = int(info["pid"]), int(info["port"])
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return None
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return None
        # the pid may have been reused: it must be swtpm, on this very state directory
        if argv[0].rsplit(b"/", 1)[-1] != SWTPM.encode() or f"dir={data_dir / 'state'}".encode() not in argv:
            return None
        if not (_answers(port) and _answers(port + 1)):
            return None
        return cls(data_dir, port, None, pid)

    @classmethod
    def start(cls, data_dir: Path, *, attempts: int = 5) -> "Swtpm":
        """Manufacture (if needed) and start swtpm; return once both ports answer."""
        data_dir = Path(data_dir).resolve()
        state = manufacture(data_dir)
        for attempt in range(attempts):
            try:
                return cls._start_once(data_dir, state, _free_pair())
            except _PortTaken:
                continue
        raise TpmError(f"{state}: swtpm could not bind a port pair in {attempts} attempts")

    @classmethod
    def _start_once(cls, data_dir: Path, state: Path, port: int) -> "Swtpm":
        log = data_dir / "swtpm.log"
        cmd = [
            _tool(SWTPM), "socket", "--tpm2", "--tpmstate", f"dir={state}",
            "--server", f"type=tcp,port={port},bindaddr=127.0.0.1",
            "--ctrl", f"type=tcp,port={port + 1},bindaddr=127.0.0.1",
            "--flags", "not-need-init,startup-clear", "--log", f"file={log},level=1",
        ]
        # Its own session: a terminal's Ctrl-C to the daemon does not power the TPM off, and
        # after a daemon crash the TPM (PCRs included) lives on, as hardware does; the next
        # cwlite process attaches to it and recovers the measurement log against it.
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                start_new_session=True)
        tpm = cls(data_dir, port, proc)
        deadline = time.monotonic() + START_TIMEOUT
        while not (_answers(port) and _answers(port + 1)):
            if proc.poll() is not None:
                err = (proc.stderr.read() or b"").decode(errors="replace").strip().splitlines()
                last = err[-1] if err else ""
                if "Address already in use" in last or "bind" in last.lower():
                    raise _PortTaken(last)
                raise TpmError(f"{state}: swtpm exited with {proc.returncode} at start: {last or log}",
                               rc=proc.returncode)
            if time.monotonic() > deadline:
                tpm.stop()
                raise TpmError(f"{state}: swtpm did not answer on ports {port}/{port + 1} within {START_TIMEOUT:.0f} s")
            time.sleep(0.02)
        running = data_dir / RUNNING_FILE
        write_atomic(running, json.dumps({"pid": proc.pid, "port": port}).encode(), mode=0o644)
        return tpm

    def exit_status(self) -> int | None:
        """swtpm's exit code if the swtpm this process started has died, else None."""
        return self.process.poll() if self.process is not None else None

    def stop(self) -> None:
        """terminate, wait, then kill: swtpm writes its state on SIGTERM. Attached: nothing to stop."""
        proc = self.process
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
        running = self.data_dir / RUNNING_FILE
        try:
            if json.loads(running.read_text()).get("pid") == proc.pid:
                running.unlink()
        except (FileNotFoundError, ValueError):
            pass

    def __enter__(self) -> "Swtpm":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
