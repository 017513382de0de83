"""An independent encoder of kernel IMA `ima-ng` measurement lists, written from the kernel sources.

It shares no code with controlplane.mlog: each byte below is placed by reading
security/integrity/ima/ima_fs.c (ima_measurements_show, ima_ascii_measurements_show),
ima_template_lib.c (ima_eventdigest_ng_init, ima_write_template_field_data) and
ima_crypto.c (ima_calc_field_array_hash_tfm, ima_calc_boot_aggregate_tfm). It
writes the vector files beside it (`python -m tests.vectors.ima_ng_kernel`).
"""
from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

HERE = Path(__file__).parent
PCR = 10


def field(data: bytes) -> bytes:
    return struct.pack("<I", len(data)) + data


def template_data(alg: str, digest: bytes, name: str) -> bytes:
    # d-ng: hash_algo_name ":" '\0' digest ; n-ng: string + '\0', spaces already '_'
    return field(alg.encode() + b":" + b"\x00" + digest) + field(name.replace(" ", "_").encode() + b"\x00")


def entry(pcr: int, alg: str, digest: bytes, name: str, violation: bool = False) -> tuple[bytes, str, bytes]:
    """(binary record, ascii line, value extended into the sha256 bank)."""
    data = template_data(alg, digest, name)
    sha1 = bytes(20) if violation else hashlib.sha1(data).digest()
    extended = b"\xff" * 32 if violation else hashlib.sha256(data).digest()
    binary = struct.pack("<I", pcr) + sha1 + struct.pack("<I", 6) + b"ima-ng" + struct.pack("<I", len(data)) + data
    line = "%2d %s ima-ng %s:%s %s\n" % (pcr, sha1.hex(), alg, digest.hex(), name.replace(" ", "_"))
    return binary, line, extended


def sample() -> tuple[bytes, str, bytes, list[dict]]:
    zero_pcrs = b"\x00" * 32 * 10                     # PCRs 0-9 of a TPM with no firmware measurements
    rows = [
        (PCR, "sha256", hashlib.sha256(zero_pcrs).digest(), "boot_aggregate", False),
        (PCR, "sha256", hashlib.sha256(b"#!/bin/sh\n").digest(), "/usr/bin/true", False),
        (PCR, "sha1", hashlib.sha1(b"old kernel").digest(), "/lib/modules/x.ko", False),
        (PCR, "sha256", bytes(32), "/var/log/open for write", True),   # a ToMToU violation
        (PCR, "sha512", hashlib.sha512(b"big").digest(), "/opt/tool", False),
        (PCR, "sha256", hashlib.sha256(b"cw").digest(), "cwlite:trusted-load:tp_build:exec:/usr/bin/cc", False),
    ]
    binary, text, value, meta = b"", "", bytes(32), []
    for pcr, alg, digest, name, violation in rows:
        b, line, ext = entry(pcr, alg, digest, name, violation)
        binary += b
        text += line
        value = hashlib.sha256(value + ext).digest()
        meta.append({"alg": alg, "digest": digest.hex(), "name": name.replace(" ", "_"), "violation": violation})
    return binary, text, value, meta


def main() -> None:
    binary, text, value, meta = sample()
    (HERE / "ima_ng_sample.bin").write_bytes(binary)
    (HERE / "ima_ng_sample.ascii").write_text(text)
    (HERE / "ima_ng_sample.json").write_text(json.dumps({"pcr": PCR, "sha256_pcr": value.hex(), "entries": meta},
                                                        indent=1) + "\n")


if __name__ == "__main__":
    main()
