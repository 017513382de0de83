"""The paper's build workload: OpenSSH 9.2p1 from Debian's source package, configured once.

`openssh_tree()` enables deb-src for the Debian mirror already configured in
apt's sources (idempotently: a deb822 stanza whose Types lack deb-src gets it,
a one-line `deb URI ...` gets its `deb-src` twin), runs `apt-get source
openssh` into /var/cache/cwlite-bench/openssh (once), and `autoreconf -fi`
(installing autoconf if needed) and `./configure --without-pam` there (once). Each benchmark round then runs `make clean`
and its own `make`.
"""
from __future__ import annotations

import fcntl
import re
import shutil
import subprocess
import time
from pathlib import Path

CACHE = Path("/var/cache/cwlite-bench/openssh")
SOURCES_D = Path("/etc/apt/sources.list.d")
SOURCES_LIST = Path("/etc/apt/sources.list")
MIRROR = re.compile(r"https?://[^ ]*debian\.org/debian/?$")


def enable_deb_src() -> bool:
    """Add deb-src wherever the Debian mirror is configured for deb only; True when something changed."""
    changed = False
    for f in sorted(SOURCES_D.glob("*.sources")):
        stanzas = f.read_text().split("\n\n")
        edited = False
        for i, st in enumerate(stanzas):
            uris = re.search(r"^URIs:\s*(.+)$", st, re.M)
            types = re.search(r"^Types:\s*(.+)$", st, re.M)
            if uris and types and any(MIRROR.match(u) for u in uris[1].split()) and "deb-src" not in types[1].split():
                stanzas[i] = st.replace(types[0], f"Types: {types[1].strip()} deb-src", 1)
                edited = changed = True
        if edited:
            f.write_text("\n\n".join(stanzas))
    if SOURCES_LIST.exists():
        lines = SOURCES_LIST.read_text().splitlines()
        src = {ln.replace("deb ", "deb-src ", 1) for ln in lines if ln.startswith("deb ")}
        missing = [ln for ln in sorted(src) if MIRROR.match(ln.split()[1] if len(ln.split()) > 1 else "")
                   and ln not in lines]
        if missing:
            SOURCES_LIST.write_text("\n".join([*lines, *missing]) + "\n")
            changed = True
    return changed


def _apt(*args: str, cwd: Path | None = None) -> None:
    """apt-get, waiting while another apt/dpkg (another session) holds the lock."""
    for _ in range(60):
        r = subprocess.run(["apt-get", "-q", "-o", "DPkg::Lock::Timeout=300", *args], cwd=cwd,
                           capture_output=True, text=True, timeout=1800)
        if r.returncode == 0:
            return
        if "lock" not in r.stderr.lower():
            raise RuntimeError(f"apt-get {' '.join(args)}: {r.stderr.strip()[-800:]}")
        time.sleep(10)
    raise RuntimeError(f"apt-get {' '.join(args)}: lock held for 10 minutes")


def openssh_tree() -> Path:
    """The configured OpenSSH 9.2p1 tree (fetched and configured on first use)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        trees = sorted(p for p in CACHE.glob("openssh-9.2p1*") if p.is_dir())
        if not trees:
            if enable_deb_src() or not list(Path("/var/lib/apt/lists").glob("*_source_Sources*")):
                _apt("update")
            _apt("source", "openssh", cwd=CACHE)
            trees = sorted(p for p in CACHE.glob("openssh-9.2p1*") if p.is_dir())
            if not trees:
                raise RuntimeError(f"{CACHE}: apt-get source openssh made no openssh-9.2p1 tree")
        tree = trees[0]
        stamp = tree / ".cwlite-configured"
        if not stamp.exists():
            # Debian's patches touch configure.ac, and upstream's configure then refuses to run (and,
            # forced, misdetects the compiler): regenerate it as Debian's build does (dh_autoreconf).
            if not shutil.which("autoreconf"):
                _apt("install", "-y", "autoconf")
            subprocess.run(["autoreconf", "-fi"], cwd=tree, check=True, capture_output=True, timeout=1800)
            subprocess.run(["./configure", "--without-pam"], cwd=tree, check=True, capture_output=True, timeout=1800)
            stamp.touch()
        return tree
