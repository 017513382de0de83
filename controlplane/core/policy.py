"""The policy bundle: one TOML file, parsed once into frozen dataclasses.

Schema (every key is checked; unknown keys and wrong types are errors naming
`file:line: key`)::

    mode = "enforce"            # "enforce" | "audit"
    scope = "labelled"          # PRIMA mediates processes under a TP label (the only scope)
    backend = "auto"            # "auto" | "lsm" | "tracepoint"
    pcr = 10                    # measurement-log PCR, 0..23
    serial = 7                  # optional, >= 0 (absent: 0): a host refuses a policy older than the one it runs
    expires = 2027-01-01T00:00:00Z      # optional TOML offset date-time: refused (host) and untrusted (verifier) after it
    trust_sets = ["core", "toolchain"]   # order fixes the kernel bitmask (bit i = trust_sets[i])

    [labels.tp_build]
    entrypoints = ["/usr/bin/distccd"]   # absolute paths of measured executables
    trust_set = "toolchain"
    on_exec = "keep"            # "keep" (default: the new image must be trusted) | "drop"
    anon_exec = "violation"     # "violation" (default) | "allow" (JITs)
    transitions = ["tp_sign"]   # labels this label may enter by exec of their entrypoint (default: none)
    compat_syscalls = "deny"    # "deny" (default) | "allow": 32-bit syscalls (int 0x80) from a 64-bit TP
    io_uring = "deny"           # "deny" (default) | "allow": io_uring_setup by a TP

    [[cdis]]
    path = "/srv/build/out"
    writers = ["tp_build"]

    [port_authority]
    unlabelled = "unaffected"   # processes under no label: not mediated (the only choice today)

    [[port_authority.rules]]
    port = 3632
    protocol = "tcp"            # "tcp" | "udp"
    labels = ["tp_build"]       # TP labels trusted to receive untrusted input on this port
    op = "listen"               # "listen" (default: bind, listen, accept and receive on local `port`)
                                # | "connect" (connect or send to `port` of a peer, receive its replies)
    peers = ["10.0.0.0/8"]      # remote networks that may reach it (default: any, IPv4 and IPv6)
    address = "0.0.0.0"         # listen: the one local address it may bind (default: any)

A TP label no rule names receives nothing from the network, not even replies.

The canonical digest is SHA-256 over the policy's normalised form (defaults
filled, canonical JSON): stable over key order, whitespace and comments.
`serial` and `expires` are in it (so they are signed) only when set: a policy
without them keeps the digest it had before they existed.
A signature is Ed25519 by the controller over that digest, stored beside the
policy as `<policy>.sig`: base64 text (what `cwlite policy sign` writes) or the
raw 64 bytes (both are read).
"""
from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import ipaddress
import json
import re
import tomllib
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Mapping

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from controlplane.core.errors import PolicyError, PolicyReason
from controlplane.core.keys import load_public_key


class Mode(StrEnum):
    """What a violation does: `enforce` stops it (killed / EPERM), `audit` only logs it."""

    ENFORCE = "enforce"
    AUDIT = "audit"


class OnExec(StrEnum):
    """A labelled process exec'ing a non-entrypoint: `keep` its label (the new image must be trusted) or `drop` it."""

    KEEP = "keep"
    DROP = "drop"


class AnonExec(StrEnum):
    """Anonymous executable memory in a labelled process: a `violation`, or `allow`ed (JITs)."""

    VIOLATION = "violation"
    ALLOW = "allow"


MODES = tuple(m.value for m in Mode)
SCOPES = ("labelled",)
BACKENDS = ("auto", "lsm", "tracepoint")
ON_EXEC = tuple(m.value for m in OnExec)
ANON_EXEC = tuple(m.value for m in AnonExec)
DENY_ALLOW = ("deny", "allow")
PROTOCOLS = ("tcp", "udp")
PA_OPS = ("listen", "connect")
UNLABELLED = ("unaffected",)
ANY_PEERS = ("0.0.0.0/0", "::/0")
MAX_TRUST_SETS = 64  # one bit each in the kernel's 64-bit mask
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,62}$")  # labels: they become SELinux types (cwlite_L_t)
# Trust sets are only names in the policy and the DB (never an SELinux or ima-ng identifier), so `-` is allowed
# too: `cwlite db build --trust-set build-tools` must make a set the policy can name. prima.sources uses this.
TRUST_SET_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,62}$")
TRUST_SET_RULE = "letters, digits, _ and -, starting with a letter, at most 63"


@dataclass(frozen=True)
class Label:
    """A TP subject label: entered by exec of a trusted entrypoint; runs only its trust set."""

    name: str
    entrypoints: tuple[str, ...]
    trust_set: str
    on_exec: OnExec = OnExec.KEEP
    anon_exec: AnonExec = AnonExec.VIOLATION
    transitions: tuple[str, ...] = ()   # labels it may enter (exec of their trusted entrypoint)
    compat_syscalls: str = "deny"       # 32-bit syscalls of a 64-bit TP (tracepoint backend: unmediated)
    io_uring: str = "deny"              # io_uring_setup (tracepoint backend: its ops are unmediated)

    def subject_keys(self) -> dict[str, Any]:
        """transitions, compat_syscalls, io_uring where they differ from the default: the digest
        covers every setting, and a policy that leaves them at their defaults keeps the digest
        (and the signature) it had before these keys existed."""
        keys = {"transitions": list(self.transitions), "compat_syscalls": self.compat_syscalls, "io_uring": self.io_uring}
        return {k: v for k, v in keys.items() if v != {"transitions": [], "compat_syscalls": "deny", "io_uring": "deny"}[k]}


@dataclass(frozen=True)
class Cdi:
    """High-integrity data: only the named TP labels may write under `path`."""

    path: str
    writers: tuple[str, ...]


@dataclass(frozen=True)
class PortRule:
    """Port Authority: untrusted input on this port may reach only these labels (enforced by portauthority).

    `op` "listen": the labels may bind `address` (empty: any) port `port`, listen, accept and receive
    there from `peers`; "connect": they may connect/send to `port` of `peers` and receive the replies.
    """

    port: int
    protocol: str
    labels: tuple[str, ...]
    op: str = "listen"
    peers: tuple[str, ...] = ANY_PEERS   # normalised CIDRs
    address: str = ""                    # local address (listen), "" = any

    def canonical(self) -> dict[str, Any]:
        """The digested form: op, peers and address only when not at their defaults, so policies
        written before they existed keep their digests (and signatures)."""
        out: dict[str, Any] = {"port": self.port, "protocol": self.protocol, "labels": list(self.labels)}
        if self.op != "listen":
            out["op"] = self.op
        if self.peers != ANY_PEERS:
            out["peers"] = list(self.peers)
        if self.address:
            out["address"] = self.address
        return out


@dataclass(frozen=True)
class PortAuthority:
    rules: tuple[PortRule, ...] = ()
    unlabelled: str = "unaffected"


@dataclass(frozen=True)
class Policy:
    """A validated policy bundle. `source` is where it came from (for messages only, not digested)."""

    mode: Mode
    scope: str
    backend: str
    pcr: int
    trust_set_names: tuple[str, ...]
    labels: Mapping[str, Label]
    cdis: tuple[Cdi, ...]
    port_authority: PortAuthority
    source: str = field(default="", compare=False)
    serial: int = 0                        # rollback protection: hosts and verifiers never go back to a lower one
    expires: dt.datetime | None = None     # aware (UTC offset given); None: never

    def expired(self, now: dt.datetime | None = None) -> bool:
        """True once `expires` is past (`now`: the caller's clock, default the system's UTC time)."""
        return self.expires is not None and (now or dt.datetime.now(dt.timezone.utc)) >= self.expires

    def trust_sets(self) -> list[str]:
        """Trust sets in the order that fixes the kernel bitmask (bit i = trust_sets()[i])."""
        return list(self.trust_set_names)

    def canonical(self) -> dict[str, Any]:
        """The normalised form the digest covers (defaults filled, labels by name)."""
        return {
            "mode": self.mode.value,
            "scope": self.scope,
            "backend": self.backend,
            "pcr": self.pcr,
            "trust_sets": list(self.trust_set_names),
            "labels": {
                n: {"entrypoints": list(lb.entrypoints), "trust_set": lb.trust_set,
                    "on_exec": lb.on_exec.value, "anon_exec": lb.anon_exec.value, **lb.subject_keys()}
                for n, lb in sorted(self.labels.items())
            },
            "cdis": [{"path": c.path, "writers": list(c.writers)} for c in self.cdis],
            "port_authority": {"rules": [r.canonical() for r in self.port_authority.rules]},
            **({"serial": self.serial} if self.serial else {}),
            **({"expires": expires_text(self.expires)} if self.expires is not None else {}),
        }

    def digest(self) -> bytes:
        """SHA-256 of the canonical JSON of `canonical()`: stable over key order and whitespace."""
        text = json.dumps(self.canonical(), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return hashlib.sha256(text.encode()).digest()


def expires_text(when: dt.datetime) -> str:
    """`expires` as the digest covers it and messages show it: UTC, RFC 3339, seconds."""
    return when.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---- where keys are: tomllib gives no positions, so the text is scanned once ----------

_HEADER = re.compile(r"^\s*(\[\[?)\s*(?P<key>[^\]]+?)\s*\]\]?\s*(#.*)?$")
_KEYLINE = re.compile(r"^\s*(?P<key>(?:[A-Za-z0-9_-]+|\"[^\"]*\"|'[^']*')(?:\s*\.\s*(?:[A-Za-z0-9_-]+|\"[^\"]*\"|'[^']*'))*)\s*=")
_STRINGS = re.compile(r"\"(?:[^\"\\]|\\.)*\"|'[^']*'")
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _split_key(key: str) -> tuple[str, ...]:
    parts = re.findall(r"\"[^\"]*\"|'[^']*'|[^.\s]+", key)
    return tuple(p[1:-1] if p[:1] in "\"'" else p for p in parts)


def key_lines(text: str) -> dict[tuple, int]:
    """Map each key path to its 1-based line. Array-of-table items are indexed: ("cdis", 0, "path"), and so
    are their sub-tables: `[hosts.vm]` after the second `[[hosts]]` is ("hosts", 1, "vm")."""
    lines: dict[tuple, int] = {}
    counters: dict[tuple, int] = {}
    table: tuple = ()
    depth = 0          # open [ / { of a multi-line value
    in_multi = None    # open ''' or """ string
    for no, raw in enumerate(text.splitlines(), start=1):
        line = raw
        if in_multi:
            if in_multi in line:
                in_multi = None
            continue
        if depth == 0:
            m = _HEADER.match(line)
            if m and not _KEYLINE.match(line):
                path = _split_key(m["key"])
                if m.group(1) == "[[":
                    idx = counters.get(path, -1) + 1
                    counters[path] = idx
                    table = (*path, idx)
                else:   # [a.b] under an array of tables [[a]] is a table of a's latest item
                    parent = next((path[:n] for n in range(len(path) - 1, 0, -1) if path[:n] in counters), None)
                    table = path if parent is None else (*parent, counters[parent], *path[len(parent):])
                lines.setdefault(table, no)
                lines.setdefault(path, no)
                continue
            k = _KEYLINE.match(line)
            if k:
                full = (*table, *_split_key(k["key"]))
                lines.setdefault(full, no)
                line = line[k.end():]
        for quote in ('"""', "'''"):
            if line.count(quote) % 2 == 1:
                in_multi = quote
                break
        if in_multi:
            continue
        bare = _STRINGS.sub("", line).split("#", 1)[0]
        depth = max(0, depth + bare.count("[") + bare.count("{") - bare.count("]") - bare.count("}"))
    return lines


def _key_part(part: str) -> str:
    """A key as TOML writes it: bare when it can be, else quoted (a key holding a newline stays one line)."""
    return part if _BARE_KEY.fullmatch(part) else json.dumps(part)


class _Ctx:
    """Error construction: every message is `source:line: key: what`."""

    def __init__(self, text: str, source: str) -> None:
        self.source = source
        self.lines = key_lines(text)

    def line_of(self, path: tuple) -> int | None:
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return None

    def fail(self, path: tuple, what: str) -> PolicyError:
        key = ".".join(_key_part(p) if not isinstance(p, int) else f"[{p}]" for p in path).replace(".[", "[")
        line = self.line_of(path)
        where = f"{self.source}:{line}" if line else self.source
        return PolicyError(f"{where}: {key}: {what}", source=self.source, line=line, key=key)


def _type_name(v: Any) -> str:
    return {bool: "boolean", int: "integer", str: "string", list: "array", dict: "table", float: "float"}.get(type(v), type(v).__name__)


def _table(ctx: _Ctx, obj: Any, path: tuple, allowed: Mapping[str, bool]) -> dict:
    """Check a table: no unknown keys, required ones (allowed[k] is True) present."""
    if not isinstance(obj, dict):
        raise ctx.fail(path, f"expected a table, got {_type_name(obj)}")
    for k in obj:
        if k not in allowed:
            raise ctx.fail((*path, k), f"unknown key (allowed: {', '.join(sorted(allowed))})")
    for k, required in allowed.items():
        if required and k not in obj:
            raise ctx.fail((*path, k), "required key missing")
    return obj


def _get(ctx: _Ctx, obj: dict, path: tuple, key: str, kind: type, default: Any = None, choices: tuple = ()) -> Any:
    if key not in obj:
        return default
    v = obj[key]
    if kind is int and (isinstance(v, bool) or not isinstance(v, int)) or kind is not int and not isinstance(v, kind):
        raise ctx.fail((*path, key), f"expected {_type_name(kind())}, got {_type_name(v)}")
    if choices and v not in choices:
        raise ctx.fail((*path, key), f"{v!r} is not one of {', '.join(choices)}")
    return v


def _strings(ctx: _Ctx, obj: dict, path: tuple, key: str, *, nonempty: bool = True) -> tuple[str, ...]:
    v = _get(ctx, obj, path, key, list, [])
    for i, item in enumerate(v):
        if not isinstance(item, str):
            raise ctx.fail((*path, key), f"item {i}: expected string, got {_type_name(item)}")
    if nonempty and not v:
        raise ctx.fail((*path, key), "must not be empty")
    if len(set(v)) != len(v):
        raise ctx.fail((*path, key), "duplicate entries")
    return tuple(v)


def _known(ctx: _Ctx, path: tuple, names: tuple[str, ...], known, what: str) -> None:
    for n in names:
        if n not in known:
            raise ctx.fail(path, f"unknown {what} {n!r} (defined: {', '.join(sorted(known)) or 'none'})")


def parse_policy(text: str, *, source: str) -> Policy:
    """Parse and validate a policy's TOML text; errors name `source:line` and the key."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"\(at line (\d+), column \d+\)", str(exc))
        line = int(m.group(1)) if m else None
        msg = re.sub(r"\s*\(at line \d+, column \d+\)", "", str(exc))
        raise PolicyError(f"{source}:{line}: TOML syntax: {msg}" if line else f"{source}: TOML syntax: {msg}",
                          reason=PolicyReason.SYNTAX, source=source, line=line, key="") from None
    ctx = _Ctx(text, source)
    top = _table(ctx, data, (), {"mode": True, "scope": False, "backend": False, "pcr": False, "trust_sets": True,
                                 "labels": True, "cdis": False, "port_authority": False, "serial": False,
                                 "expires": False})
    mode = Mode(_get(ctx, top, (), "mode", str, choices=MODES))
    scope = _get(ctx, top, (), "scope", str, "labelled", SCOPES)
    backend = _get(ctx, top, (), "backend", str, "auto", BACKENDS)
    pcr = _get(ctx, top, (), "pcr", int, 10)
    if not 0 <= pcr <= 23:
        raise ctx.fail(("pcr",), f"{pcr} is not a PCR index (0..23)")
    serial = _get(ctx, top, (), "serial", int, 0)
    if not 0 <= serial < 2**53:      # a JSON number any tool reads exactly
        raise ctx.fail(("serial",), f"{serial} is not a serial (0..2^53-1)")
    expires = top.get("expires")
    if expires is not None and not (isinstance(expires, dt.datetime) and expires.tzinfo is not None):
        raise ctx.fail(("expires",), f"expected an offset date-time (e.g. 2027-01-01T00:00:00Z), got {_type_name(expires)}"
                       + ("" if not isinstance(expires, dt.datetime) else " without a UTC offset"))
    sets = _strings(ctx, top, (), "trust_sets")
    if len(sets) > MAX_TRUST_SETS:
        raise ctx.fail(("trust_sets",), f"{len(sets)} trust sets; at most {MAX_TRUST_SETS} (one bit each)")
    for s in sets:
        if not TRUST_SET_NAME.match(s):
            raise ctx.fail(("trust_sets",), f"{s!r}: trust set names are {TRUST_SET_RULE}")

    labels_raw = _table(ctx, top["labels"], ("labels",), {k: False for k in top["labels"]} if isinstance(top["labels"], dict) else {})
    if not labels_raw:
        raise ctx.fail(("labels",), "at least one label is required")
    labels: dict[str, Label] = {}
    entry_owner: dict[str, str] = {}
    for name, body in labels_raw.items():
        path = ("labels", name)
        if not _NAME.match(name):
            raise ctx.fail(path, "label names are letters, digits and _, starting with a letter")
        _table(ctx, body, path, {"entrypoints": True, "trust_set": True, "on_exec": False, "anon_exec": False,
                                 "transitions": False, "compat_syscalls": False, "io_uring": False})
        entrypoints = _strings(ctx, body, path, "entrypoints")
        for ep in entrypoints:
            if not ep.startswith("/"):
                raise ctx.fail((*path, "entrypoints"), f"{ep!r} is not an absolute path")
            if ep in entry_owner:
                raise ctx.fail((*path, "entrypoints"), f"{ep!r} is already the entrypoint of label {entry_owner[ep]!r}")
            entry_owner[ep] = name
        trust_set = _get(ctx, body, path, "trust_set", str)
        if trust_set not in sets:
            raise ctx.fail((*path, "trust_set"), f"unknown trust set {trust_set!r} (defined: {', '.join(sets)})")
        transitions = _strings(ctx, body, path, "transitions", nonempty=False)
        if name in transitions:
            raise ctx.fail((*path, "transitions"), f"{name!r} names itself (re-entering its own entrypoint needs no transition)")
        labels[name] = Label(name, entrypoints, trust_set,
                             OnExec(_get(ctx, body, path, "on_exec", str, "keep", ON_EXEC)),
                             AnonExec(_get(ctx, body, path, "anon_exec", str, "violation", ANON_EXEC)),
                             transitions,
                             _get(ctx, body, path, "compat_syscalls", str, "deny", DENY_ALLOW),
                             _get(ctx, body, path, "io_uring", str, "deny", DENY_ALLOW))
    for name, lb in labels.items():
        _known(ctx, ("labels", name, "transitions"), lb.transitions, labels, "label")

    cdis: list[Cdi] = []
    cdis_raw = _get(ctx, top, (), "cdis", list, [])
    for i, body in enumerate(cdis_raw):
        path = ("cdis", i)
        _table(ctx, body, path, {"path": True, "writers": True})
        p = _get(ctx, body, path, "path", str)
        if not p.startswith("/"):
            raise ctx.fail((*path, "path"), f"{p!r} is not an absolute path")
        writers = _strings(ctx, body, path, "writers")
        _known(ctx, (*path, "writers"), writers, labels, "label")
        cdis.append(Cdi(p, writers))

    rules: list[PortRule] = []
    pa = _table(ctx, top.get("port_authority", {}), ("port_authority",), {"rules": False, "unlabelled": False})
    unlabelled = _get(ctx, pa, ("port_authority",), "unlabelled", str, "unaffected", UNLABELLED)
    for i, body in enumerate(_get(ctx, pa, ("port_authority",), "rules", list, [])):
        path = ("port_authority", "rules", i)
        _table(ctx, body, path, {"port": True, "protocol": False, "labels": True, "op": False, "peers": False,
                                 "address": False})
        port = _get(ctx, body, path, "port", int)
        if not 1 <= port <= 65535:
            raise ctx.fail((*path, "port"), f"{port} is not a port (1..65535)")
        rule_labels = _strings(ctx, body, path, "labels")
        _known(ctx, (*path, "labels"), rule_labels, labels, "label")
        op = _get(ctx, body, path, "op", str, "listen", PA_OPS)
        peers = ANY_PEERS
        if "peers" in body:
            nets = []
            for text in _strings(ctx, body, path, "peers"):
                try:
                    nets.append(str(ipaddress.ip_network(text, strict=True)))
                except ValueError as exc:
                    raise ctx.fail((*path, "peers"), f"{text!r}: {exc}") from None
            peers = tuple(nets)
        address = _get(ctx, body, path, "address", str, "")
        if address:
            if op != "listen":
                raise ctx.fail((*path, "address"), "a local address applies to op = \"listen\" only")
            try:
                address = str(ipaddress.ip_address(address))
            except ValueError as exc:
                raise ctx.fail((*path, "address"), str(exc)) from None
        rules.append(PortRule(port, _get(ctx, body, path, "protocol", str, "tcp", PROTOCOLS), rule_labels,
                              op, peers, address))

    return Policy(mode=mode, scope=scope, backend=backend, pcr=pcr, trust_set_names=sets, labels=labels,
                  cdis=tuple(cdis), port_authority=PortAuthority(tuple(rules), unlabelled), source=source,
                  serial=serial, expires=expires)


# ---- signatures -----------------------------------------------------------------------

def signature_path(policy_path: str | Path) -> Path:
    p = Path(policy_path)
    return p.with_name(p.name + ".sig")


def decode_signature(data: bytes, *, source: str) -> bytes:
    """A signature as stored or sent: raw 64 bytes, or their base64 text."""
    if len(data) == 64:
        return data
    try:
        raw = base64.b64decode(data.strip(), validate=True)
    except binascii.Error:
        raw = b""
    if len(raw) != 64:
        raise PolicyError(f"{source}: signature malformed (want 64 raw bytes or their base64)",
                          reason=PolicyReason.SIGNATURE, source=source)
    return raw


def read_signature(sig_path: Path) -> bytes:
    """A .sig file: raw 64 bytes, or their base64 text."""
    try:
        data = sig_path.read_bytes()
    except FileNotFoundError:
        raise PolicyError(f"{sig_path}: signature missing (a controller key is configured)",
                          reason=PolicyReason.UNSIGNED, source=str(sig_path)) from None
    except OSError as exc:
        raise PolicyError(f"{sig_path}: cannot read the signature: {exc.strerror or exc}",
                          reason=PolicyReason.READ, source=str(sig_path)) from exc
    return decode_signature(data, source=str(sig_path))


def sign_policy(policy: Policy, key: Ed25519PrivateKey) -> bytes:
    """The 64-byte Ed25519 signature over the policy's canonical digest."""
    return key.sign(policy.digest())


def check_signature(policy: Policy, signature: bytes, controller_key: Ed25519PublicKey | str | Path, *,
                    source: str) -> None:
    """Fail closed unless `signature` is the controller's over the policy's digest; `source` names the signature."""
    try:
        load_public_key(controller_key).verify(signature, policy.digest())
    except InvalidSignature:
        raise PolicyError(f"{source}: signature does not verify with the controller key "
                          f"(policy digest {policy.digest().hex()})", reason=PolicyReason.SIGNATURE,
                          source=source) from None


def read_policy(path: str | Path, *, controller_key: Ed25519PublicKey | str | Path | None = None,
                require_signature: bool = False) -> tuple[str, Policy]:
    """The policy file's text and the policy parsed from it (read once, parsed once); with a controller key
    its `.sig` must verify (fail closed)."""
    p = Path(path)
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError(f"{p}: cannot read policy ({exc})", reason=PolicyReason.READ, source=str(p)) from exc
    if require_signature and controller_key is None:
        raise PolicyError(f"{p}: a signature is required but no controller key is configured",
                          reason=PolicyReason.UNSIGNED, source=str(p))
    policy = parse_policy(text, source=str(p))
    if controller_key is not None:
        sig_path = signature_path(p)
        check_signature(policy, read_signature(sig_path), controller_key, source=str(sig_path))
    return text, policy


def load_policy(path: str | Path, *, controller_key: Ed25519PublicKey | str | Path | None = None,
                require_signature: bool = False) -> Policy:
    """Read, parse and validate a policy; with a controller key its `.sig` must verify (fail closed)."""
    return read_policy(path, controller_key=controller_key, require_signature=require_signature)[1]
