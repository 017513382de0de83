"""The build's provenance: an in-toto Statement v1 with a SLSA provenance v1 predicate, in a DSSE envelope.

Formats as their specs define them, so in-toto's own tooling reads them:
- DSSE (github.com/secure-systems-lab/dsse, protocol.md): the signature is over
  PAE(type, body) = "DSSEv1" SP LEN(type) SP type SP LEN(body) SP body, lengths
  as ASCII decimal; the envelope is {payload (base64), payloadType, signatures:
  [{keyid, sig (base64)}]}.
- in-toto Statement v1 (`_type`, `subject`, `predicateType`, `predicate`) with
  the SLSA provenance v1 predicate (buildDefinition, runDetails).
- The key id is securesystemslib's default: SHA-256 of the canonical JSON of
  {"keytype": "ed25519", "scheme": "ed25519", "keyval": {"public": HEX}}.

A provenance directory holds the envelope, the controller's and the verifier's
public keys, every proof the build relied on (`proofs/`), and the build record
(`build.json`: jobs per host, taint); the statement binds the proofs and the
record by SHA-256 (byproducts), and the outputs as subjects. `check_dir`
re-checks all of it offline.
"""
from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from controlplane.core import digest, proof as proof_mod
from controlplane.core.atomic import write_atomic
from controlplane.core.errors import VerifyError
from controlplane.core.keys import load_public_key, public_pem

PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
SLSA_PROVENANCE = "https://slsa.dev/provenance/v1"
BUILD_TYPE = "https://cwlite.dev/build/distcc/v1"
ENVELOPE = "provenance.intoto.json"
BUILD_RECORD = "build.json"
PROOFS = "proofs"
CONTROLLER_PUB = "controller.pub"
VERIFIER_PUB = "verifier.pub"


def json_bytes(obj: Any) -> bytes:
    """Sorted, compact JSON: the payload, the build record and the key-id input. DSSE signs bytes, so any
    stable form will do; for the key id's all-string object this is securesystemslib's canonical JSON."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


# DSSE --------------------------------------------------------------------------------
def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 Pre-Authentication Encoding: what is signed (never the bare payload)."""
    t = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload)


def key_id(key: Ed25519PublicKey) -> str:
    """securesystemslib's default key id for an Ed25519 key (SSlibKey.from_crypto makes the same)."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()
    return hashlib.sha256(json_bytes({"keytype": "ed25519", "keyval": {"public": raw},
                                      "scheme": "ed25519"})).hexdigest()


def sign_envelope(statement: Mapping[str, Any], key: Ed25519PrivateKey) -> dict:
    """The DSSE envelope of `statement` (canonical JSON payload), signed by `key`."""
    payload = json_bytes(statement)
    sig = key.sign(pae(PAYLOAD_TYPE, payload))
    return {"payload": base64.b64encode(payload).decode(), "payloadType": PAYLOAD_TYPE,
            "signatures": [{"keyid": key_id(key.public_key()), "sig": base64.b64encode(sig).decode()}]}


def open_envelope(envelope: Mapping[str, Any], key: Ed25519PublicKey, *, source: str = ENVELOPE) -> dict:
    """The statement inside `envelope` once a signature by `key` verifies over its PAE; VerifyError otherwise.

    Signature first, then parsing (the payload is untrusted until then). Reasons "provenance-format",
    "provenance-signature"."""
    try:
        payload_type = envelope["payloadType"]
        payload = base64.b64decode(envelope["payload"], validate=True)
        sigs = [(s["keyid"], base64.b64decode(s["sig"], validate=True)) for s in envelope["signatures"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise VerifyError(f"{source}: not a DSSE envelope ({exc})", reason="provenance-format") from exc
    if payload_type != PAYLOAD_TYPE:
        raise VerifyError(f"{source}: payloadType {payload_type!r} (expected {PAYLOAD_TYPE!r})",
                          reason="provenance-format")
    kid = key_id(key)
    for sig_kid, sig in sigs:
        if sig_kid != kid:
            continue
        try:
            key.verify(sig, pae(payload_type, payload))
        except InvalidSignature:
            continue
        break
    else:
        raise VerifyError(f"{source}: no signature verifies with the controller key {kid[:16]}",
                          reason="provenance-signature")
    try:
        statement = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise VerifyError(f"{source}: payload is not JSON ({exc})", reason="provenance-format") from exc
    if not isinstance(statement, dict) or statement.get("_type") != STATEMENT_TYPE \
            or statement.get("predicateType") != SLSA_PROVENANCE:
        raise VerifyError(f"{source}: payload is not an in-toto Statement v1 with a SLSA provenance v1 predicate",
                          reason="provenance-format")
    return statement


# the statement ---------------------------------------------------------------------------
def sha256_file(path: Path) -> str:
    """A file's SHA-256, hex (the in-toto subjects' form)."""
    return digest.sha256_file(path).hex()


@dataclass(frozen=True)
class Subject:
    """One output: its path relative to the build directory, SHA-256, and who compiled it."""

    name: str
    sha256: str
    compiled_by: str = ""      # a build host's name, "controller" (compiled or linked locally), or ""
    source: str = ""

    def descriptor(self, tainted: frozenset[str]) -> dict:
        ann: dict[str, Any] = {}
        if self.compiled_by:
            ann["compiledBy"] = self.compiled_by
            ann["tainted"] = self.compiled_by in tainted
        if self.source:
            ann["source"] = self.source
        out: dict[str, Any] = {"name": self.name, "digest": {"sha256": self.sha256}}
        if ann:
            out["annotations"] = ann
        return out


def statement(*, subjects: Iterable[Subject], command: list[str], workdir: str, hosts: list[dict],
              proofs: list[dict], record_sha256: str, parameters: Mapping[str, Any], builder_id: str,
              started: str, finished: str, invocation: str) -> dict:
    """The in-toto Statement: outputs as subjects; each verified host (address, AK, first proof) as a
    resolved dependency; every proof and the build record as byproducts, bound by digest."""
    tainted = frozenset(h["name"] for h in hosts if h.get("tainted"))
    deps = [{"name": f"cwlite-host:{h['name']}", "uri": f"distcc://{h['distcc']}",
             "digest": {"sha256": h["ak_sha256"]},
             "annotations": {"proof": h["first_proof"], "proofSha256": h["first_proof_sha256"],
                             "verdict": h["first_verdict"], "label": h["label"], "jobs": h["jobs"],
                             "tainted": h["name"] in tainted, "droppedBecause": h.get("dropped", "")}
             | ({"verifiedVia": h["via"]} if h.get("via") else {})}
            for h in hosts]
    byproducts = [{"name": p["file"], "digest": {"sha256": p["sha256"]}, "mediaType": "application/json",
                   "annotations": {"host": p["host"], "round": p["round"], "verdict": p["verdict"],
                                   "logStart": p["log_start"], "logEnd": p["log_end"]}
                   | ({"via": p["via"]} if p.get("via") else {})} for p in proofs]
    byproducts.append({"name": BUILD_RECORD, "digest": {"sha256": record_sha256}, "mediaType": "application/json"})
    return {
        "_type": STATEMENT_TYPE,
        "subject": [s.descriptor(tainted) for s in sorted(subjects, key=lambda s: s.name)],
        "predicateType": SLSA_PROVENANCE,
        "predicate": {
            "buildDefinition": {"buildType": BUILD_TYPE,
                                "externalParameters": {"command": list(command), "workdir": workdir},
                                "internalParameters": dict(parameters),
                                "resolvedDependencies": deps},
            "runDetails": {"builder": {"id": builder_id},
                           "metadata": {"invocationId": invocation, "startedOn": started, "finishedOn": finished},
                           "byproducts": byproducts},
        },
    }


def write_dir(out: Path, stmt: dict, record: dict, controller: Ed25519PrivateKey,
              verifier: Ed25519PublicKey) -> Path:
    """Write the envelope and the keys (the proofs and the record are already in `out`); the envelope's path."""
    write_atomic(out / CONTROLLER_PUB, public_pem(controller.public_key()), mode=0o644)
    write_atomic(out / VERIFIER_PUB, public_pem(verifier), mode=0o644)
    path = out / ENVELOPE
    write_atomic(path, json.dumps(sign_envelope(stmt, controller), indent=2).encode() + b"\n", mode=0o644)
    return path


def record_bytes(record: Mapping[str, Any]) -> bytes:
    return json_bytes(record) + b"\n"


# offline check ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Checked:
    """What `check_dir` established: the statement, the build record, and the verdicts it read."""

    statement: dict
    record: dict
    proofs: int
    subjects: int
    tainted: bool
    stopped: bool


def check_dir(out: Path, *, controller_key: Path | Ed25519PublicKey | None = None,
              verifier_key: Path | Ed25519PublicKey | None = None, root: Path | None = None) -> Checked:
    """Re-check a provenance directory offline: the envelope's DSSE signature, every proof's signature and
    TPM quote and its digest in the statement, the build record's digest, and every subject against
    the file under `root` (default: the statement's workdir). VerifyError naming the first failure."""
    out = Path(out)
    ctl = load_public_key(controller_key or out / CONTROLLER_PUB)
    ver = load_public_key(verifier_key or out / VERIFIER_PUB)
    env_path = out / ENVELOPE
    try:
        envelope = json.loads(env_path.read_bytes())
    except (OSError, ValueError) as exc:
        raise VerifyError(f"{env_path}: cannot read the envelope ({exc})", reason="provenance-format") from exc
    stmt = open_envelope(envelope, ctl, source=str(env_path))
    pred = stmt["predicate"]
    byproducts = {b["name"]: b for b in pred["runDetails"]["byproducts"]}
    rec = byproducts.get(BUILD_RECORD)
    if rec is None or _digest_of(out / BUILD_RECORD) != rec["digest"]["sha256"]:
        raise VerifyError(f"{out / BUILD_RECORD}: missing or not the record the statement binds",
                          reason="provenance-record")
    record = json.loads((out / BUILD_RECORD).read_bytes())
    proofs = 0
    for name, b in byproducts.items():
        if name == BUILD_RECORD:
            continue
        path = out / name
        data = _read(path)
        if hashlib.sha256(data).hexdigest() != b["digest"]["sha256"]:
            raise VerifyError(f"{path}: SHA-256 differs from the statement's byproduct", reason="provenance-proof")
        doc = proof_mod.check(data, ver, source=str(path))
        proof_mod.check_quote(doc, source=str(path))
        ann = b.get("annotations", {})
        if doc["verdict"] != ann.get("verdict") or doc["host"]["name"] != ann.get("host"):
            raise VerifyError(f"{path}: verdict/host differ from the statement's annotation", reason="provenance-proof")
        _check_via(doc, ann.get("via"), ver, str(path))
        proofs += 1
    for dep in pred["buildDefinition"]["resolvedDependencies"]:
        first = dep["annotations"]["proof"]
        if first not in byproducts or byproducts[first]["digest"]["sha256"] != dep["annotations"]["proofSha256"]:
            raise VerifyError(f"{env_path}: host {dep['name']}: its proof {first} is not among the byproducts",
                              reason="provenance-proof")
    base = Path(root) if root is not None else Path(pred["buildDefinition"]["externalParameters"]["workdir"])
    for s in stmt["subject"]:
        got = _digest_of(base / s["name"])
        if got != s["digest"]["sha256"]:
            raise VerifyError(f"{base / s['name']}: " + ("missing" if got is None else
                              f"SHA-256 {got[:16]} differs from the subject's {s['digest']['sha256'][:16]}"),
                              reason="provenance-subject")
    return Checked(stmt, record, proofs, len(stmt["subject"]), bool(record.get("tainted")),
                   bool(record.get("stopped")))


def _check_via(doc: Mapping[str, Any], via: str | None, ver: Ed25519PublicKey, source: str) -> None:
    """A Build VM's proof (controlplane.verifier.chain) carries its host's signed proof: that one is checked
    too (signature, quote, digest, the host the statement names), so the chain re-checks offline."""
    link = doc.get("via")
    if (link or {}).get("host") != via:
        raise VerifyError(f"{source}: the proof's host chain ({(link or {}).get('host')}) is not the statement's "
                          f"({via})", reason="provenance-proof")
    if link is None:
        return
    host_proof = str(link.get("host_proof", "")).encode()
    if proof_mod.digest(host_proof) != link.get("host_proof_sha256"):
        raise VerifyError(f"{source}: via.host_proof: SHA-256 is not via.host_proof_sha256", reason="provenance-proof")
    host_doc = proof_mod.check(host_proof, ver, source=f"{source}: via.host_proof")
    proof_mod.check_quote(host_doc, source=f"{source}: via.host_proof")
    if host_doc["host"]["name"] != via or host_doc["verdict"] != link.get("host_verdict"):
        raise VerifyError(f"{source}: via.host_proof is not host {via}'s proof with verdict {link.get('host_verdict')}",
                          reason="provenance-proof")


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise VerifyError(f"{path}: cannot read ({exc.strerror})", reason="provenance-proof") from exc


def _digest_of(path: Path) -> str | None:
    try:
        return sha256_file(path)
    except OSError:
        return None
