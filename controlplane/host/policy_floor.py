"""Rollback protection on the host: never load a policy older than one this host already ran.

A signed policy carries `serial` (and optionally `expires`) inside what is
signed. The highest serial this host has loaded is kept in the data dir
(`policy.serial`, replaced atomically), so it survives restarts: an attacker
who replays an older, genuinely signed policy (one that trusted a since-revoked
binary, say) is refused at start, on SIGHUP and on a push alike.
"""
from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

from controlplane.core.atomic import write_atomic
from controlplane.core.errors import PolicyError, PolicyReason
from controlplane.core.policy import Policy, expires_text

FLOOR_FILE = "policy.serial"


def floor_path(data_dir: Path) -> Path:
    return Path(data_dir) / FLOOR_FILE


def read_floor(data_dir: Path) -> int:
    """The highest policy serial this host has loaded (0 when none was recorded)."""
    path = floor_path(data_dir)
    try:
        data = json.loads(path.read_text())
        serial = data["serial"]
    except FileNotFoundError:
        return 0
    except (OSError, ValueError, KeyError, TypeError) as exc:
        # fail closed: an unreadable floor must not silently become 0
        raise PolicyError(f"{path}: unreadable policy serial record ({exc}); fix or remove it by hand",
                          reason=PolicyReason.ROLLBACK, source=str(path)) from exc
    if not isinstance(serial, int) or isinstance(serial, bool) or serial < 0:
        raise PolicyError(f"{path}: serial: {serial!r} is not a serial", reason=PolicyReason.ROLLBACK, source=str(path))
    return serial


def admit(policy: Policy, data_dir: Path, *, now: dt.datetime | None = None) -> int:
    """Refuse `policy` if it expired or is older than the host's floor; else raise the floor to its serial.

    Call it after the signature checked and before the policy takes effect. Returns the floor before.
    """
    if policy.expired(now):
        raise PolicyError(f"{policy.source}: expires: {expires_text(policy.expires)} is past: refusing an expired "
                          "policy", reason=PolicyReason.EXPIRED, source=policy.source, key="expires")
    floor = read_floor(data_dir)
    if policy.serial < floor:
        raise PolicyError(f"{policy.source}: serial: {policy.serial} is older than serial {floor} this host already "
                          f"ran ({floor_path(data_dir)}): refusing a policy rollback", reason=PolicyReason.ROLLBACK,
                          source=policy.source, key="serial")
    if policy.serial > floor:
        Path(data_dir).mkdir(parents=True, exist_ok=True)
        write_atomic(floor_path(data_dir), json.dumps({"serial": policy.serial, "digest": policy.digest().hex()},
                                                      sort_keys=True).encode() + b"\n", mode=0o644)
    return floor
