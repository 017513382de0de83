"""Abuse suite (issue 28 §6): hostile bytes into every parser a remote party or a file can reach.

Each target is fed what hypothesis makes of a valid input (flipped bytes, cuts, junk appended,
values swapped for any JSON/TOML value) and plain random input. The only acceptable answers are
a result or an exception of the project's own family (controlplane.core.errors.CwliteError)
whose message is one line: a KeyError, TypeError, IndexError, UnicodeError, struct.error or
RecursionError escaping a parser is a defect (a 500 in the service, a traceback in the CLI).
"""
from __future__ import annotations

import base64
import copy
import hashlib
import json
import os
import tomllib
from pathlib import Path
from typing import Any, Callable

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings, strategies as st

from controlplane.core import imalog
from controlplane.core import proof as proof_mod
from controlplane.core.errors import CwliteError
from controlplane.core.events import parse_ima_name
from controlplane.core.policy import decode_signature, parse_policy
from controlplane.core.quote import Quote, parse_public, parse_quote_attest, verify_quote
from controlplane.verifier.evidence import parse_page

VECTORS = Path(__file__).resolve().parents[1] / "vectors"
FUZZ = settings(max_examples=int(os.environ.get("CWLITE_FUZZ_EXAMPLES", "300")), deadline=None, suppress_health_check=[HealthCheck.too_slow])

VALID_POLICY = """\
mode = "enforce"
scope = "labelled"
backend = "auto"
pcr = 10
trust_sets = ["toolchain", "base"]

[labels.tp_build]
entrypoints = ["/usr/bin/distccd"]
trust_set = "toolchain"
on_exec = "keep"
anon_exec = "violation"
transitions = ["tp_link"]

[labels.tp_link]
entrypoints = ["/usr/bin/ld"]
trust_set = "base"

[[cdis]]
path = "/srv/build/out"
writers = ["tp_build"]

[[port_authority.rules]]
port = 3632
protocol = "tcp"
labels = ["tp_build"]
"""

# any JSON value (also valid TOML values, except null): what a hostile file or request can hold
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12)


def answers_or_refuses(fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
    """Call a parser: a result, or a one-line CwliteError (any other exception fails the test)."""
    try:
        return fn(*args, **kw)
    except CwliteError as exc:
        assert "\n" not in str(exc), f"{type(exc).__name__} over several lines: {exc!r}"
        return None


def mutate_bytes(data, blob: bytes) -> bytes:
    """Up to 6 byte flips, a cut, and junk appended."""
    b = bytearray(blob)
    for _ in range(data.draw(st.integers(0, 6))):
        if b:
            b[data.draw(st.integers(0, len(b) - 1))] = data.draw(st.integers(0, 255))
    b = b[: data.draw(st.integers(0, len(b)))] if data.draw(st.booleans()) else b
    return bytes(b) + data.draw(st.binary(max_size=24))


def mutate_tree(data, obj: Any, depth: int = 0) -> Any:
    """Replace, drop or retype values anywhere in a JSON-like tree."""
    choice = data.draw(st.integers(0, 9))
    if choice == 0 or depth > 6:
        return data.draw(json_values)
    if isinstance(obj, dict) and obj:
        out = dict(obj)
        key = data.draw(st.sampled_from(sorted(out)))
        if choice == 1:
            del out[key]
        elif choice == 2:
            out[data.draw(st.text(max_size=10))] = data.draw(json_values)
        else:
            out[key] = mutate_tree(data, out[key], depth + 1)
        return out
    if isinstance(obj, list) and obj:
        out = list(obj)
        i = data.draw(st.integers(0, len(out) - 1))
        out[i] = mutate_tree(data, out[i], depth + 1)
        return out
    return obj


def toml_dump(obj: Any, prefix: str = "") -> str:
    """A dict as TOML text (inline values; enough to carry any mutated policy tree to the parser)."""
    def val(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ", ".join(val(x) for x in v if x is not None) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{json.dumps(k)} = {val(x)}" for k, x in v.items() if x is not None) + "}"
        return '""'
    return "".join(f"{json.dumps(k)} = {val(v)}\n" for k, v in obj.items() if v is not None)


# policy parser ---------------------------------------------------------------------------
@FUZZ
@given(st.data())
def test_policy_parser_refuses_any_mutated_tree_with_a_policy_error(data) -> None:
    tree = mutate_tree(data, mutate_tree(data, tomllib.loads(VALID_POLICY)))
    text = toml_dump(tree) if isinstance(tree, dict) else str(tree)
    answers_or_refuses(parse_policy, text, source="fuzz.toml")


@FUZZ
@given(st.data())
def test_policy_parser_refuses_damaged_text_with_a_policy_error(data) -> None:
    text = VALID_POLICY
    cut = data.draw(st.integers(0, len(text)))
    text = text[:cut] + data.draw(st.text(max_size=40)) + text[cut + data.draw(st.integers(0, 20)):]
    answers_or_refuses(parse_policy, text, source="fuzz.toml")


@FUZZ
@given(st.binary(max_size=200))
def test_policy_signature_decoder(blob: bytes) -> None:
    raw = answers_or_refuses(decode_signature, blob, source="fuzz.sig")
    assert raw is None or len(raw) == 64


# log parsers -----------------------------------------------------------------------------
LOG_SAMPLES = [(VECTORS / f"{n}.bin").read_bytes() for n in ("ima_ng_sample", "kernel_ima", "kernel_ima_sig")]
ASCII_SAMPLES = [(VECTORS / f"{n}.ascii").read_text() for n in ("ima_ng_sample", "kernel_ima", "kernel_ima_sig")]


@FUZZ
@given(st.data())
def test_binary_log_parsers_answer_or_raise_log_errors(data) -> None:
    blob = mutate_bytes(data, data.draw(st.sampled_from(LOG_SAMPLES)))
    answers_or_refuses(imalog.parse_binary, blob, source="fuzz.bin")
    scan = imalog.scan_binary(blob, source="fuzz.bin")      # never raises: it reports
    assert scan.end <= len(blob) and (scan.error is None) == (scan.end == len(blob))


@FUZZ
@given(st.data())
def test_ascii_log_parsers_answer_or_raise_log_errors(data) -> None:
    text = data.draw(st.sampled_from(ASCII_SAMPLES))
    cut = data.draw(st.integers(0, len(text)))
    text = text[:cut] + data.draw(st.text(max_size=60)) + text[cut + data.draw(st.integers(0, 80)):]
    answers_or_refuses(imalog.parse_ascii, text, source="fuzz.ascii")
    answers_or_refuses(parse_page, text, data.draw(st.integers(0, 10**6)))


@FUZZ
@given(st.binary(min_size=32, max_size=32), st.text(max_size=120))
def test_ima_names_decode_or_are_foreign(digest: bytes, name: str) -> None:
    event = parse_ima_name(digest, name)
    assert event is None or event.digest == digest


# proof checker ---------------------------------------------------------------------------
VERIFIER_KEY = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"fuzz verifier").digest())
_QV = json.loads((VECTORS / "quote_ecc.json").read_text())
PROOF_DOC = {
    "host": {"name": "build-vm-1", "url": "https://127.0.0.1:8443", "ak_public": _QV["ak_public"],
             "ak_sha256": hashlib.sha256(base64.b64decode(_QV["ak_public"])).hexdigest(),
             "ek_sha256": "00" * 32, "tls_spki_sha256": "11" * 32},
    "nonce": "22" * 32, "quote": _QV["quote"], "quote_info": {"reset_count": 1},
    "log": {"pcr": 10, "start": 0, "end": 3, "pcr_start": "00" * 32, "pcr_value": "33" * 32},
    "policy_digest": "44" * 32, "db_digest": "55" * 32, "entries": [], "trusted_entries": 3,
    "previously_untrusted": 0, "verdict": "trusted", "reasons": [],
}
PROOF = proof_mod.sign(PROOF_DOC, VERIFIER_KEY)


@FUZZ
@given(st.data())
def test_proof_checker_refuses_damaged_proof_files(data) -> None:
    blob = mutate_bytes(data, PROOF)
    doc = answers_or_refuses(proof_mod.check, blob, VERIFIER_KEY.public_key())
    if blob != PROOF:
        assert doc is None, "a changed proof file was accepted"


@FUZZ
@given(st.data())
def test_proof_checker_refuses_edited_documents_even_when_re_signed_by_another_key(data) -> None:
    """Any field changed, removed or retyped: canonical re-encoding and a foreign signature are refused;
    re-signed with the verifier's own key, the offline quote re-check still only answers with VerifyError."""
    doc = mutate_tree(data, copy.deepcopy(PROOF_DOC))
    if not isinstance(doc, dict):
        return
    try:
        forged = proof_mod.sign(doc, Ed25519PrivateKey.generate())
        mine = proof_mod.sign(doc, VERIFIER_KEY)
    except (TypeError, ValueError):     # not JSON-serialisable (e.g. a float key): not a proof anyone can write
        return
    assert answers_or_refuses(proof_mod.check, forged, VERIFIER_KEY.public_key()) is None
    checked = answers_or_refuses(proof_mod.check, mine, VERIFIER_KEY.public_key())
    if checked is not None:
        answers_or_refuses(proof_mod.check_quote, checked)


# the quote inside a proof / a /v1/quote answer -----------------------------------------------
@FUZZ
@given(st.data())
def test_quote_parsers_refuse_damaged_tpm_structures(data) -> None:
    ak = base64.b64decode(_QV["ak_public"])
    q = _QV["quote"]
    attest, sig = base64.b64decode(q["attest"]), base64.b64decode(q["signature"])
    which = data.draw(st.sampled_from(["ak", "attest", "signature", "dict"]))
    if which == "ak":
        ak = mutate_bytes(data, ak)
        answers_or_refuses(parse_public, ak)
    elif which == "attest":
        attest = mutate_bytes(data, attest)
        answers_or_refuses(parse_quote_attest, attest)
    elif which == "signature":
        sig = mutate_bytes(data, sig)
    qdict = dict(q, attest=base64.b64encode(attest).decode(), signature=base64.b64encode(sig).decode())
    if which == "dict":
        qdict = mutate_tree(data, qdict)
    quote = answers_or_refuses(Quote.from_dict, qdict) if isinstance(qdict, dict) else None
    if quote is not None:
        answers_or_refuses(verify_quote, ak, quote, bytes.fromhex(_QV["qualifying_data"]))


def test_the_fuzzed_originals_are_accepted() -> None:
    """The seeds are valid, so the mutations start from inputs the parsers accept (not all refusals)."""
    assert parse_policy(VALID_POLICY, source="seed.toml").labels["tp_build"].trust_set == "toolchain"
    assert all(imalog.parse_binary(b) for b in LOG_SAMPLES) and all(imalog.parse_ascii(t) for t in ASCII_SAMPLES)
    assert proof_mod.check(PROOF, VERIFIER_KEY.public_key())["verdict"] == "trusted"
    quote = Quote.from_dict(_QV["quote"])
    verify_quote(base64.b64decode(_QV["ak_public"]), quote, bytes.fromhex(_QV["qualifying_data"]))


def test_a_key_holding_a_newline_is_named_on_one_line() -> None:
    """Found by the fuzzer: an unknown key "\\n" made a two-line PolicyError; keys are now quoted as TOML quotes them."""
    try:
        parse_policy(VALID_POLICY + '"\\n" = 1\n', source="p.toml")
    except CwliteError as exc:
        assert '"\\n": unknown key' in str(exc) and "\n" not in str(exc), str(exc)
    else:
        raise AssertionError("an unknown key was accepted")
