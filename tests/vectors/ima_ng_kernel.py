"""An independent encoder of kernel IMA `ima-ng` (and `ima-sig`) measurement lists, from the kernel sources.

It shares no code with controlplane.host.mlog: each byte below is placed by reading
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


def template_data(alg: str, digest: bytes, name: str, sig: bytes | None = None) -> bytes:
    # d-ng: hash_algo_name ":" '\0' digest ; n-ng: string + '\0', spaces already '_' ; ima-sig adds sig
    data = field(alg.encode() + b":" + b"\x00" + digest) + field(name.replace(" ", "_").encode() + b"\x00")
    return data if sig is None else data + field(sig)


def entry(pcr: int, alg: str, digest: bytes, name: str, violation: bool = False,
          sig: bytes | None = None) -> tuple[bytes, str, bytes]:
    """(binary record, ascii line, value extended into the sha256 bank); `sig` makes it ima-sig."""
    data = template_data(alg, digest, name, sig)
    tname = b"ima-ng" if sig is None else b"ima-sig"
    sha1 = bytes(20) if violation else hashlib.sha1(data).digest()
    extended = b"\xff" * 32 if violation else hashlib.sha256(data).digest()
    binary = struct.pack("<I", pcr) + sha1 + struct.pack("<I", len(tname)) + tname + struct.pack("<I", len(data)) + data
    line = "%2d %s %s %s:%s %s" % (pcr, sha1.hex(), tname.decode(), alg, digest.hex(), name.replace(" ", "_"))
    line += "\n" if sig is None else " %s\n" % sig.hex()   # ima_show_template_sig: hex, empty when unsigned
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
    sigs = [None] * len(rows) + [b"", bytes([3, 2, 4]) + b"\x00\x00\x00\x01" + b"\x00\x02" + b"\xab\xcd"]
    rows += [(PCR, "sha256", hashlib.sha256(b"unsigned").digest(), "/usr/bin/unsigned", False),
             (PCR, "sha256", hashlib.sha256(b"signed").digest(), "/usr/bin/signed", False)]
    binary, text, value, meta = b"", "", bytes(32), []
    for (pcr, alg, digest, name, violation), sig in zip(rows, sigs):
        b, line, ext = entry(pcr, alg, digest, name, violation, sig)
        binary += b
        text += line
        value = hashlib.sha256(value + ext).digest()
        meta.append({"alg": alg, "digest": digest.hex(), "name": name.replace(" ", "_"), "violation": violation,
                     "template": "ima-ng" if sig is None else "ima-sig", "signature": (sig or b"").hex()})
    return binary, text, value, meta


def main() -> None:
    binary, text, value, meta = sample()
    (HERE / "ima_ng_sample.bin").write_bytes(binary)
    (HERE / "ima_ng_sample.ascii").write_text(text)
    (HERE / "ima_ng_sample.json").write_text(json.dumps({"pcr": PCR, "sha256_pcr": value.hex(), "entries": meta},
                                                        indent=1) + "\n")


if __name__ == "__main__":
    main()
