"""`cwlite log` (show and verify the measurement log) and `cwlite tpm` (PCRs, quotes, keys)."""
from __future__ import annotations

import base64
from pathlib import Path

import click

from controlplane.cli.output import emit
from controlplane.core import imalog
from controlplane.core.errors import LogError
from controlplane.core.paths import DEFAULT_DATA_DIR
from controlplane.core.quote import public_pem, verify_quote
from controlplane.host.mlog import DEFAULT_PCR, log_pcr

LOG_NAME = "measurements.log"

_data_dir = click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_DATA_DIR,
                         show_default=True, help="cwlite's data dir (the log, the embedded swtpm).")
_device = click.option("--device", help="TPM device or TCTI string (default: /dev/tpmrm0, else the embedded swtpm).")
_json = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")


def _log_path(data_dir: Path, log: Path | None) -> Path:
    return log if log is not None else data_dir / LOG_NAME


def _log_pcr(path: Path, pcr: int | None) -> int:
    """The PCR the log was created for (its .state file), unless given."""
    if pcr is None:
        pcr = log_pcr(path)
    return DEFAULT_PCR if pcr is None else pcr


@click.group("log")
def log() -> None:
    """The measurement log: ima-ng entries, each extended into a TPM PCR.

    \b
    Examples:
      cwlite log show
      cwlite log verify --json
    """


@log.command("show")
@_data_dir
@click.option("--log", "log_file", type=click.Path(dir_okay=False, path_type=Path),
              help="A log file (default: DATA_DIR/measurements.log). Binary (kernel) or ASCII form.")
@click.option("--from", "start", type=click.IntRange(0), default=0, help="First entry to show.")
@_json
def show(data_dir: Path, log_file: Path | None, start: int, as_json: bool) -> None:
    """Print the log as the kernel's ascii_runtime_measurements does (or JSON).

    Accepts a log in the binary form (cwlite's file, the kernel's
    binary_runtime_measurements) or the ASCII form. Each entry's template hash
    is checked against its data while reading: a damaged entry stops the
    listing with an error naming it.

    \b
    Examples:
      # every entry, one line each, as IMA tools expect
      cwlite log show
      # from entry 100, for scripts
      cwlite log show --from 100 --json
      # the kernel's own IMA log
      cwlite log show --log /sys/kernel/security/ima/binary_runtime_measurements
    """
    entries = read_any(_log_path(data_dir, log_file))[start:]
    emit({"entries": [e.to_dict() for e in entries]}, as_json,
         lambda _d: click.echo(imalog.to_ascii(entries), nl=False))


def read_any(path: Path) -> list[imalog.LogEntry]:
    """A log file in either form (binary or ASCII), each entry's template hash checked."""
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise LogError(f"{path}: no such measurement log") from exc
    except IsADirectoryError as exc:
        raise LogError(f"{path}: is a directory") from exc
    return imalog.parse_any(data, source=str(path))


@log.command("verify")
@_data_dir
@click.option("--log", "log_file", type=click.Path(dir_okay=False, path_type=Path),
              help="A log file (default: DATA_DIR/measurements.log).")
@click.option("--pcr", type=click.IntRange(0, 23), help="The log's PCR (default: the one it was created for).")
@_device
@_json
def verify(data_dir: Path, log_file: Path | None, pcr: int | None, device: str | None, as_json: bool) -> None:
    """Replay the log and compare it with the TPM's PCR (sha256 bank).

    Exit 0 when the PCR equals the replay of the whole log, or of a prefix of
    it (a live log whose last entries are written but not yet extended: they
    are reported as pending). A PCR that matches no prefix is an integrity
    error: exit 1 with a one-line message.

    \b
    Examples:
      # the log under /var/lib/cwlite against its PCR
      cwlite log verify
      # a copied log against the vTPM
      cwlite log verify --log /tmp/m.log --device /dev/tpmrm0 --pcr 11
      # for scripts
      cwlite log verify --json | jq .pending
    """
    from controlplane.host.tpm import open_tpm  # here: tpm2-pytss costs ~0.15 s on every `cwlite` start

    path = _log_path(data_dir, log_file)
    entries = read_any(path)
    pcr = _log_pcr(path, pcr)
    foreign = [e for e in entries if e.pcr != pcr]
    if entries and len(foreign) == len(entries):   # every prefix would "match" an untouched (zero) PCR
        raise LogError(f"{path}: no entry of the {len(entries)}-entry log is for PCR {pcr} (entry 0 is for PCR "
                       f"{entries[0].pcr}): give --pcr {entries[0].pcr}", entry=0)
    with open_tpm(data_dir, device=device, create=False) as tpm:
        value = tpm.read_pcr(pcr)
    prefixes = imalog.replay_prefixes(entries, pcr)
    matches = [k for k, v in enumerate(prefixes) if v == value]
    if not matches:
        where = f"PCR {pcr} ({value.hex()[:16]}...) matches no prefix of the {len(entries)}-entry log"
        if foreign:                  # the likeliest cause: an entry's PCR field was changed
            raise LogError(f"{path}: entry {foreign[0].index}: recorded for PCR {foreign[0].pcr}, not {pcr}; {where}",
                           entry=foreign[0].index)
        raise LogError(f"{path}: {where} (entries 0..{len(entries) - 1}): the PCR was extended outside the log "
                       f"or an entry was altered")
    k = matches[-1]
    result = {"log": str(path), "pcr": pcr, "pcr_value": value.hex(), "entries": len(entries), "matched": k,
              "pending": len(entries) - k, "ok": True}
    emit(result, as_json, lambda d: click.echo(
        f"{d['log']}: PCR {d['pcr']} = replay of entries 0..{d['matched'] - 1}"
        + (f" ({d['pending']} pending: logged, not yet extended)" if d["pending"] else " (the whole log)")))


@click.group("tpm")
def tpm() -> None:
    """The TPM cwlite uses: /dev/tpmrm0, or the embedded swtpm.

    A running `cwlite serve` owns the embedded swtpm; these commands attach to
    it, or start one for themselves and stop it when done.

    \b
    Examples:
      cwlite tpm info
      cwlite tpm pcrread 10 --json
      cwlite tpm quote --nonce 00ff
    """


@tpm.command("pcrread")
@click.argument("pcrs", nargs=-1, type=click.IntRange(0, 23))
@_data_dir
@_device
@_json
def pcrread(pcrs: tuple[int, ...], data_dir: Path, device: str | None, as_json: bool) -> None:
    """Read PCRs of the sha256 bank (default: 10 and 11).

    \b
    Examples:
      cwlite tpm pcrread
      cwlite tpm pcrread 0 1 2 3 4 5 6 7 8 9 --json
      # compare with tpm2-tools on the same TPM
      TPM2TOOLS_TCTI=device:/dev/tpmrm0 tpm2_pcrread sha256:10
    """
    from controlplane.host.tpm import open_tpm  # here: tpm2-pytss costs ~0.15 s on every `cwlite` start

    with open_tpm(data_dir, device=device, create=False) as t:
        values = t.read_pcrs(pcrs or (10, 11))
    emit({"bank": "sha256", "pcrs": {str(k): v.hex() for k, v in sorted(values.items())}}, as_json,
         lambda d: [click.echo(f"sha256:{k:>2}: 0x{v.upper()}") for k, v in d["pcrs"].items()])


@tpm.command("quote")
@click.option("--nonce", required=True, help="Qualifying data, hex (at most 64 bytes).")
@click.option("--pcrs", default="10", show_default=True, help="Comma-separated PCRs to quote.")
@_data_dir
@_device
@_json
def quote(nonce: str, pcrs: str, data_dir: Path, device: str | None, as_json: bool) -> None:
    """Quote PCRs with the AK and check the quote in software, as a verifier would.

    \b
    Examples:
      cwlite tpm quote --nonce $(openssl rand -hex 32)
      cwlite tpm quote --nonce 00ff --pcrs 0,7,10 --json > quote.json
    """
    from controlplane.host.tpm import open_tpm  # here: tpm2-pytss costs ~0.15 s on every `cwlite` start

    try:
        qd = bytes.fromhex(nonce)
        selection = [int(p) for p in pcrs.split(",") if p.strip()]
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc
    with open_tpm(data_dir, device=device, create=False) as t:
        q = t.quote(qd, selection)
        ak = t.ak_public()
    info = verify_quote(ak, q, qd)
    data = {"quote": q.to_dict(), "ak_public": base64.b64encode(ak).decode(), "verified": info.to_dict()}
    emit(data, as_json, lambda d: click.echo(
        f"quote over PCRs {','.join(map(str, info.pcrs))}: signature ok, nonce ok, "
        f"pcr digest {info.pcr_digest.hex()[:16]}..., reset count {info.reset_count}"))


@tpm.command("info")
@_data_dir
@_device
@_json
def info(data_dir: Path, device: str | None, as_json: bool) -> None:
    """The TPM's maker and firmware, PCR banks, the AK (handle, name) and whether an EK certificate is present.

    \b
    Examples:
      cwlite tpm info
      cwlite tpm info --json | jq .ak.name
      cwlite tpm info --device swtpm:host=127.0.0.1,port=2321
    """
    from controlplane.host.tpm import open_tpm  # here: tpm2-pytss costs ~0.15 s on every `cwlite` start

    with open_tpm(data_dir, device=device, create=False) as t:
        data = t.info()
        data["ak"]["public_pem"] = public_pem(t.ak_public()).decode()
        data["ek_certificate"] = t.ek_certificate() is not None

    def human(d: dict) -> None:
        for key in ("tcti", "manufacturer", "firmware_version", "pcr_banks", "reset_count", "ek_certificate"):
            click.echo(f"{key:17} {d[key]}")
        click.echo(f"{'ak':17} {d['ak']['alg']} at {d['ak']['handle']}, name {d['ak']['name']}")

    emit(data, as_json, human)
