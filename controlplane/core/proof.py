"""The proof: what a verifier concluded about a host, signed so anyone can check it offline.

A proof names the host (EK/AK/TLS key digests), holds the quote it checked,
the measurement-log range it replayed, the policy and measurement-DB digests
it judged against, the verdict of every entry that was not simply trusted, and
the overall verdict. It is canonical JSON as RFC 8785 (JCS) defines it, so any
JCS library re-derives the signed bytes, with an Ed25519 signature by the
verifier's key over that canonical form minus the `signature` field. Every
number in a proof is an integer a JSON tool reads exactly (|n| < 2^53); wider
values (the TPM's 64-bit firmware_version) are decimal strings. A proof file must BE its canonical form: any changed
byte either breaks the JSON, changes a signed value, or makes the text
non-canonical, and each of those is refused.
"""
from __future__ import annotations

import base64
import hashlib
import json
from typing import Any, Iterator, Mapping

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from controlplane.core.errors import VerifyError
from controlplane.core.quote import Quote, verify_quote
from controlplane.core.wire import quote_qualifying_data

FORMAT = "cwlite-proof/2"
LEGACY_FORMAT = "cwlite-proof/1"     # before JCS: Python's sorted compact JSON; big integers as numbers
TRUSTED, UNTRUSTED = "trusted", "untrusted"
MAX_SAFE_INT = 2**53 - 1             # I-JSON (RFC 7493): beyond it a JSON number loses digits in most tools


def canonical(obj: Any) -> bytes:
    """The one byte form of a JSON value that is signed and digested: RFC 8785 (JCS), UTF-8.

    Object keys sorted by their UTF-16 code units, no whitespace, strings escaped as ECMAScript's
    JSON.stringify does. Only integers within +-(2^53 - 1) are numbers here (a float or a wider
    integer raises ValueError: the proof writer turns those into strings first).
    """
    return "".join(_jcs(obj)).encode()


def _jcs(v: Any) -> Iterator[str]:
    if isinstance(v, str):
        yield json.dumps(v, ensure_ascii=False)       # escapes exactly what JCS escapes, the same way
    elif v is None or isinstance(v, bool):
        yield "null" if v is None else ("true" if v else "false")
    elif isinstance(v, int):
        if abs(v) > MAX_SAFE_INT:
            raise ValueError(f"integer {v} is wider than 2^53: write it as a string")
        yield str(v)
    elif isinstance(v, dict):
        yield "{"
        for i, k in enumerate(sorted(v, key=lambda k: k.encode("utf-16-be"))):
            if not isinstance(k, str):
                raise ValueError(f"object key {k!r} is not a string")
            yield from ("," if i else "", json.dumps(k, ensure_ascii=False), ":")
            yield from _jcs(v[k])
        yield "}"
    elif isinstance(v, (list, tuple)):
        yield "["
        for i, item in enumerate(v):
            if i:
                yield ","
            yield from _jcs(item)
        yield "]"
    else:
        raise ValueError(f"{type(v).__name__} is not a proof value (strings, integers, booleans, null, arrays, objects)")


def _legacy_canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def json_safe(v: Any) -> Any:
    """An integer wider than 2^53 as its decimal string; anything else unchanged."""
    return str(v) if isinstance(v, int) and not isinstance(v, bool) and abs(v) > MAX_SAFE_INT else v


# the verifier's name in a proof (keys are loaded by controlplane.core.keys) ------------
def key_id(key: Ed25519PublicKey) -> str:
    """SHA-256 of the raw public key, hex: names the verifier inside a proof."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


# sign / check ------------------------------------------------------------------
def sign(document: Mapping[str, Any], key: Ed25519PrivateKey) -> bytes:
    """The proof file's bytes: canonical JSON of `document` plus its signature, and a newline."""
    body = dict(document)
    body.pop("signature", None)
    body["format"] = FORMAT
    body["verifier_key"] = key_id(key.public_key())
    body["signature"] = base64.b64encode(key.sign(canonical(body))).decode()
    return canonical(body) + b"\n"


def digest(data: bytes) -> str:
    """SHA-256 hex of a proof file's bytes (how the store and the CLI name a proof)."""
    return hashlib.sha256(data).hexdigest()


def check(data: bytes, key: Ed25519PublicKey, *, source: str = "proof") -> dict:
    """The proof document in `data` if it is canonical and signed by `key`; VerifyError otherwise.

    Reasons: "proof-format" (not JSON / not canonical / fields missing) and "proof-signature".
    """
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise VerifyError(f"{source}: not JSON: {exc}", reason="proof-format") from exc
    if not isinstance(doc, dict):
        raise VerifyError(f"{source}: not a JSON object", reason="proof-format")
    canon = _legacy_canonical if doc.get("format") == LEGACY_FORMAT else canonical
    try:
        canonical_data = canon(doc) + b"\n"
    except ValueError as exc:
        raise VerifyError(f"{source}: not canonical JSON: {exc}", reason="proof-format") from exc
    if canonical_data != data:
        raise VerifyError(f"{source}: not in canonical form (was the file edited or re-formatted?)",
                          reason="proof-format")
    for field in ("format", "signature", "verdict", "host", "verifier_key"):
        if field not in doc:
            raise VerifyError(f"{source}: field {field!r} missing", reason="proof-format")
    if doc["format"] not in (FORMAT, LEGACY_FORMAT):
        raise VerifyError(f"{source}: format: {doc['format']!r} (expected {FORMAT!r})", reason="proof-format")
    body = {k: v for k, v in doc.items() if k != "signature"}
    try:
        signature = base64.b64decode(doc["signature"], validate=True)
        key.verify(signature, canon(body))
    except (InvalidSignature, ValueError, TypeError) as exc:
        raise VerifyError(f"{source}: signature: does not verify with verifier key {key_id(key)[:16]}",
                          reason="proof-signature") from exc
    return doc


def check_quote(doc: Mapping[str, Any], *, source: str = "proof") -> None:
    """Re-check the quote a proof carries, offline: AK signature, nonce + TLS key binding, quoted PCR value.

    A signed proof already says the verifier checked this; re-checking lets a third party see the
    TPM's own evidence without trusting the verifier for that part. Reason "proof-quote" on failure.
    """
    try:
        host, log = doc["host"], doc["log"]
        ak_public = base64.b64decode(host["ak_public"], validate=True)
        if hashlib.sha256(ak_public).hexdigest() != host["ak_sha256"]:
            raise ValueError("ak_public does not match ak_sha256")
        qd = quote_qualifying_data(bytes.fromhex(doc["nonce"]), bytes.fromhex(host["tls_spki_sha256"]))
        quote = Quote.from_dict(doc["quote"])
        pcr, value = int(log["pcr"]), bytes.fromhex(log["pcr_value"])
    except (KeyError, TypeError, ValueError) as exc:
        raise VerifyError(f"{source}: quote: fields missing or malformed ({exc})", reason="proof-quote") from exc
    except VerifyError as exc:
        raise VerifyError(f"{source}: {exc}", reason="proof-quote") from exc
    try:
        verify_quote(ak_public, quote, qd)
    except VerifyError as exc:
        raise VerifyError(f"{source}: {exc}", reason="proof-quote") from exc
    if quote.pcr_values.get(pcr) != value:
        raise VerifyError(f"{source}: log.pcr_value is not the quoted PCR {pcr} value", reason="proof-quote")
    kernel = doc.get("kernel_ima")
    if kernel is not None:
        try:
            kpcr, kvalue = int(kernel["pcr"]), bytes.fromhex(kernel["pcr_value"])
        except (KeyError, TypeError, ValueError) as exc:
            raise VerifyError(f"{source}: kernel_ima: fields missing or malformed ({exc})", reason="proof-quote") from exc
        if quote.pcr_values.get(kpcr) != kvalue:
            raise VerifyError(f"{source}: kernel_ima.pcr_value is not the quoted PCR {kpcr} value",
                              reason="proof-quote")
