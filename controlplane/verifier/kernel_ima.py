"""Judging the kernel's own IMA log: Keylime's core job, against cwlite's measurement DB.

Every file entry the kernel logged is one of:
  trusted    its digest is trusted in the measurement DB (any trust set), or the
             imported runtime policy lists this digest for this path;
  excluded   its path matches an exclude pattern (not judged: logs, caches);
  violation  its path is known (DB or runtime policy) with other content only,
             a kernel IMA violation entry (open-writers / ToMToU: the kernel
             could not measure what was read), or a boot_aggregate that is not
             the quoted PCRs 0-9;
  unknown    neither its content nor its path is known.
Violations and unknown entries make a host untrusted.

A Keylime runtime policy (Keylime 7.x, `keylime-policy create runtime`,
keylime/ima/types.py RuntimePolicyType: meta.version 1, digests {path: [hex]},
excludes [regex]) can be imported as a trust source. Excludes follow Keylime:
a pattern matches at the start of the path (re.match).
"""
from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from controlplane.core.errors import VerifyError
from controlplane.verifier.judge import EntryVerdict, Verdict

KERNEL_KIND = "kernel-ima"
KEYLIME_POLICY_VERSION = 1
_HEX = re.compile(r"^[0-9a-fA-F]{32,128}$")


@dataclass(frozen=True)
class RuntimePolicy:
    """Path -> trusted digests, and exclude patterns: what a Keylime runtime policy says."""

    digests: Mapping[str, frozenset[bytes]] = field(default_factory=dict)
    excludes: tuple[str, ...] = ()
    source: str = ""


def load_keylime_policy(path: Path) -> RuntimePolicy:
    """A Keylime 7.x runtime policy (JSON). VerifyError "runtime-policy" naming the file and field when malformed."""
    src = str(path)

    def bad(what: str) -> VerifyError:
        return VerifyError(f"{src}: {what}", reason="runtime-policy")

    try:
        doc = json.loads(Path(path).read_text())
    except OSError as exc:
        raise bad(f"cannot read: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise bad(f"not JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise bad("not a JSON object (a Keylime runtime policy)")
    meta = doc.get("meta")
    if not isinstance(meta, dict) or meta.get("version") != KEYLIME_POLICY_VERSION:
        raise bad(f"meta.version: {meta.get('version') if isinstance(meta, dict) else meta!r} "
                  f"(reads Keylime runtime policy version {KEYLIME_POLICY_VERSION})")
    raw = doc.get("digests", {})
    if not isinstance(raw, dict):
        raise bad("digests: expected an object {path: [hex digest, ...]}")
    digests: dict[str, frozenset[bytes]] = {}
    for p, values in raw.items():
        if not isinstance(values, list) or not all(isinstance(v, str) and _HEX.match(v) for v in values):
            raise bad(f"digests.{p}: expected a list of hex digests")
        digests[p] = frozenset(bytes.fromhex(v) for v in values)
    excludes = doc.get("excludes", [])
    if not isinstance(excludes, list) or not all(isinstance(x, str) for x in excludes):
        raise bad("excludes: expected a list of regular expressions")
    for x in excludes:
        try:
            re.compile(x)
        except re.error as exc:
            raise bad(f"excludes: {x!r}: {exc}") from exc
    return RuntimePolicy(digests, tuple(excludes), src)


def keylime_policy(entries: Iterable[Any], *, excludes: Sequence[str] = ()) -> dict:
    """A Keylime runtime policy allowing every file entry of `entries` (a known-good machine's log)."""
    digests: dict[str, set[str]] = {}
    for e in entries:
        if e.name != "boot_aggregate" and not e.is_violation:
            digests.setdefault(e.name, set()).add(e.digest.hex())
    return {"meta": {"version": KEYLIME_POLICY_VERSION, "generator": 0}, "release": 0,
            "digests": {p: sorted(d) for p, d in sorted(digests.items())}, "excludes": list(excludes),
            "keyrings": {}, "ima": {"ignored_keyrings": [], "log_hash_alg": "sha1", "dm_policy": None},
            "ima-buf": {}, "verification-keys": ""}


@dataclass(frozen=True)
class KernelImaReference:
    """What the verifier judges a kernel IMA log against: the DB's trusted files, a runtime policy, excludes."""

    db_digests: frozenset[bytes]
    db_paths: Mapping[str, frozenset[bytes]]
    runtime: RuntimePolicy = RuntimePolicy()
    excludes: tuple[str, ...] = ()
    pcr: int = 10

    @classmethod
    def of(cls, db: Any, runtime: RuntimePolicy | None = None, excludes: Sequence[str] = (),
           pcr: int = 10) -> "KernelImaReference":
        """From an open prima.measuredb.MeasureDB (every trust set) and an optional runtime policy."""
        paths: dict[str, set[bytes]] = {}
        for m in db.measurements():
            if not m.untrusted:
                paths.setdefault(m.path, set()).add(m.digest)
        all_digests = frozenset(d for ds in paths.values() for d in ds)
        for x in excludes:
            try:
                re.compile(x)
            except re.error as exc:
                raise VerifyError(f"--ima-exclude {x!r}: {exc}", reason="runtime-policy") from exc
        return cls(all_digests, {p: frozenset(d) for p, d in paths.items()}, runtime or RuntimePolicy(),
                   tuple(excludes), pcr)

    def excluded(self, name: str) -> bool:
        return self._exclude_re is not None and self._exclude_re.match(name) is not None

    @functools.cached_property
    def _exclude_re(self) -> re.Pattern | None:
        patterns = (*self.excludes, *self.runtime.excludes)
        return re.compile("|".join(f"(?:{p})" for p in patterns)) if patterns else None

    def judge(self, entry: Any, boot_aggregate: bytes | None) -> EntryVerdict:
        """One kernel IMA entry's verdict (see the module docstring)."""
        name = entry.name
        verdict, reason = Verdict.UNTRUSTED, "unknown"
        if entry.is_violation:
            reason = "violation"          # the kernel itself could not vouch for what was read
        elif name == "boot_aggregate":
            ok = entry.index == 0 and (boot_aggregate is None or entry.digest == boot_aggregate)
            verdict, reason = (Verdict.TRUSTED, "") if ok else (Verdict.UNTRUSTED, "boot-aggregate")
        elif self.excluded(name):
            verdict, reason = Verdict.INFO, "excluded"
        elif entry.digest in self.runtime.digests.get(name, ()) or entry.digest in self.db_digests:
            verdict, reason = Verdict.TRUSTED, ""
        elif name in self.runtime.digests or name in self.db_paths:
            reason = "violation"          # a known file with other content
        return EntryVerdict(entry.index, verdict, reason, KERNEL_KIND, "", entry.template_name, name,
                            entry.digest.hex())
