"""Write quote vectors (ECC and RSA AK) from a fresh swtpm: `python -m tests.vectors.make_quote_vectors`.

Each file holds the AK's TPM2B_PUBLIC, the qualifying data and a quote over
PCRs 0, 10 and 23 (PCR 10 and 23 extended first) as `Quote.to_dict()`.
tpm2_checkquote accepts them (tests/unit/test_tpm.py checks both ways).
"""
from __future__ import annotations

import base64
import hashlib
import json
import tempfile
from pathlib import Path

from controlplane.host.swtpm import Swtpm
from controlplane.host.tpm import Tpm

HERE = Path(__file__).parent
QUALIFYING = hashlib.sha256(b"cwlite quote vector").digest()


def main() -> None:
    with tempfile.TemporaryDirectory() as d, Swtpm.start(Path(d)) as sw:
        for alg in ("ecc", "rsa"):
            with Tpm(sw.tcti, ak_alg=alg) as t:
                if alg == "ecc":
                    t.extend(10, hashlib.sha256(b"ten").digest())
                    t.extend(23, hashlib.sha256(b"twenty-three").digest())
                q = t.quote(QUALIFYING, [0, 10, 23])
                (HERE / f"quote_{alg}.json").write_text(json.dumps({
                    "ak_alg": alg, "ak_public": base64.b64encode(t.ak_public()).decode(),
                    "qualifying_data": QUALIFYING.hex(), "quote": q.to_dict()}, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
