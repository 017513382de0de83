"""The proof of one round: the document a verifier signs (core.proof's format) from what it checked."""
from __future__ import annotations

import base64
import datetime as dt
import hashlib
from typing import Any, Sequence

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from controlplane.core import proof as proof_mod
from controlplane.verifier.evidence import CheckedQuote
from controlplane.verifier.judge import EntryVerdict, Reference, Verdict
from controlplane.verifier.store import Host

QUOTE_INFO_FIELDS = ("pcr_select", "pcrs", "pcr_digest", "clock", "reset_count", "restart_count", "safe",
                     "firmware_version")
U64_AS_STRING = frozenset({"firmware_version"})   # vendor-defined 64 bits, usually above 2^53: always a string


def listed(verdicts: Sequence[EntryVerdict]) -> list[dict]:
    """The entries a proof lists: those not simply trusted (TLS-key INFO entries are not listed either)."""
    return [v.as_dict() for v in verdicts if v.verdict is Verdict.UNTRUSTED]


def quote_info(info: Any) -> dict:
    """The decoded TPMS_ATTEST facts as plain JSON values."""
    out = {}
    for name in QUOTE_INFO_FIELDS:
        v = getattr(info, name, None)
        if v is None:
            continue
        if isinstance(v, bytes):
            v = v.hex()
        elif isinstance(v, (tuple, list)):
            v = list(v)
        elif isinstance(v, int) and not isinstance(v, bool):
            v = str(v) if name in U64_AS_STRING else proof_mod.json_safe(v)
        elif not isinstance(v, (str, bool)):
            v = str(v)
        out[name] = v
    return out


def document(host: Host, ref: Reference, nonce: bytes, evidence: CheckedQuote, *, log_start: int, log_end: int,
             pcr_start: bytes, verdicts: Sequence[EntryVerdict], verdict: Verdict, reasons: Sequence[str],
             previously_untrusted: int, listeners: Sequence[str] = (), kernel: dict | None = None) -> dict:
    """The proof document (unsigned): who, the quote, the log range replayed, the references, the verdicts,
    and the Port Authority listeners the host's log holds ("label proto/port program-sha256", from boot)."""
    return {
        "host": {"name": host.name, "url": host.url,
                 "ek_sha256": hashlib.sha256(host.ek_public).hexdigest(),
                 "ak_sha256": hashlib.sha256(host.ak_public).hexdigest(),
                 "ak_public": base64.b64encode(host.ak_public).decode(),
                 "tls_spki_sha256": evidence.peer_spki.hex()},
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "nonce": nonce.hex(),
        "quote": evidence.quote.to_dict(),
        "quote_info": quote_info(evidence.info),
        "log": {"pcr": host.pcr, "start": log_start, "end": log_end, "pcr_start": pcr_start.hex(),
                "pcr_value": evidence.pcr_value.hex()},
        "policy_digest": ref.policy_digest.hex(), "policy_serial": ref.policy.serial, "db_digest": ref.db_digest.hex(),
        "entries": listed(verdicts),
        "trusted_entries": sum(1 for v in verdicts if v.verdict is not Verdict.UNTRUSTED),
        "previously_untrusted": previously_untrusted,
        "listeners": list(listeners),
        "verdict": verdict.value, "reasons": list(reasons),
        **({"kernel_ima": kernel} if kernel is not None else {}),
    }


def kernel_section(pcr: int, start: int, end: int, pcr_start: bytes, pcr_value: bytes,
                   verdicts: Sequence[EntryVerdict]) -> dict:
    """The proof's account of the kernel's own IMA log: the range replayed and every entry not trusted."""
    return {"pcr": pcr, "start": start, "end": end, "pcr_start": pcr_start.hex(), "pcr_value": pcr_value.hex(),
            "entries": listed(verdicts),
            "trusted_entries": sum(1 for v in verdicts if v.verdict is Verdict.TRUSTED),
            "excluded_entries": sum(1 for v in verdicts if v.reason == "excluded")}


def sign(doc: dict, key: Ed25519PrivateKey) -> tuple[bytes, dict]:
    """The proof file's bytes and the document as a reader will see it (checked once, as a reader would)."""
    data = proof_mod.sign(doc, key)
    return data, proof_mod.check(data, key.public_key())
