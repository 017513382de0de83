"""Build the rendered cwlite module and link it into an SELinux policy store.

Building uses Debian's reference-policy devel Makefile (selinux-policy-dev).
Linking uses `semodule -N` (no reload) and `semanage port` on a *scratch
store*: a copy of the installed store (selinux-policy-default) under a
directory of our own, mounted over /var/lib/selinux and /etc/selinux in a
private mount namespace (`unshare -m`), so the host's own store is never
touched and SELinux need not be enabled. The result is the store's binary
policy (`etc/selinux/<name>/policy/policy.NN`), which `selinux_check` reads.
"""
from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Sequence

from controlplane.core.errors import SelinuxError
from controlplane.core.selinux_render import FILES, MODULE, Rendered, parse_ports

DEVEL_MAKEFILE = Path("/usr/share/selinux/devel/Makefile")
STORE_ROOT = Path("/var/lib/selinux")
ETC_ROOT = Path("/etc/selinux")


def write_sources(rendered: Rendered, out: str | Path) -> list[Path]:
    """Write the module sources and the Port Authority port labels into `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in FILES:
        p = out / name
        p.write_text(rendered.files[name])
        paths.append(p)
    return paths


def read_sources(src: str | Path) -> Rendered:
    """The module sources as found in `src` (rendered earlier, or edited since: the digest says which)."""
    src = Path(src)
    files = {}
    for name in FILES:
        try:
            files[name] = (src / name).read_text()
        except FileNotFoundError:
            raise SelinuxError(f"{src / name}: module source missing (run `cwlite selinux render`)", source=str(src / name)) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise SelinuxError(f"{src / name}: unreadable module source ({exc})", source=str(src / name)) from exc
    return Rendered(files=files, policy_digest="", ports=parse_ports(files["cwlite.ports"], str(src / "cwlite.ports")))


def _run(argv: list[str], what: str, *, cwd: Path | None = None, tool: str = "") -> str:
    try:
        proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError:
        raise SelinuxError(f"{argv[0]}: not installed (make setup installs the SELinux tools)", source=argv[0]) from None
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip() and "not in password file" not in ln]
        # the first neverallow or error line says why; tools end with a bare "Failed!"
        key = [ln for ln in lines if ln.startswith(("(neverallow", "neverallow")) or "rror" in ln]
        why = " ".join(key[:2]) if key else (lines[-1] if lines else f"exit {proc.returncode}")
        raise SelinuxError(f"{what}: {tool or argv[0]} failed: {why}", source=what)
    return proc.stdout


def build(src: str | Path) -> Path:
    """Compile `src`/cwlite.{te,fc,if} into `src`/cwlite.pp with the reference-policy Makefile."""
    src = Path(src)
    if not DEVEL_MAKEFILE.exists():
        raise SelinuxError(f"{DEVEL_MAKEFILE}: missing (make setup installs selinux-policy-dev)", source=str(DEVEL_MAKEFILE))
    for name in FILES:
        if not (src / name).is_file():
            raise SelinuxError(f"{src / name}: module source missing (run `cwlite selinux render`)", source=str(src / name))
    _run(["make", "-f", str(DEVEL_MAKEFILE), f"{MODULE}.pp"], str(src / f"{MODULE}.te"), cwd=src)
    return src / f"{MODULE}.pp"


def scratch_store(root: str | Path, *, store: str = "default", expand_check: bool = True) -> Path:
    """Copy the installed store `store` (and /etc/selinux) under `root`; returns `root`.

    Debian's semanage.conf says `expand-check=0`: neverallow rules are not
    checked when modules are linked. The scratch store turns it on, so the
    module's neverallows (CDI writers, Port Authority ports) hold at link.
    """
    root = Path(root)
    if not (STORE_ROOT / store / "active").is_dir():
        raise SelinuxError(f"{STORE_ROOT / store}: no SELinux policy store (make setup installs selinux-policy-default)",
                           source=str(STORE_ROOT / store))
    (root / "var/lib/selinux").mkdir(parents=True, exist_ok=True)
    (root / "etc").mkdir(parents=True, exist_ok=True)
    shutil.copytree(STORE_ROOT / store, root / "var/lib/selinux" / store, symlinks=True, dirs_exist_ok=True)
    shutil.copytree(ETC_ROOT, root / "etc/selinux", symlinks=True, dirs_exist_ok=True)
    conf = root / "etc/selinux/semanage.conf"
    lines = [ln for ln in conf.read_text().splitlines() if not ln.replace(" ", "").startswith("expand-check=")]
    conf.write_text("\n".join(lines + [f"expand-check={int(expand_check)}"]) + "\n")
    return root


def _in_store(root: Path, commands: list[list[str]], what: str) -> None:
    """Run commands with `root`'s store mounted over the system's, in a private mount namespace."""
    script = " && ".join(["mount --make-rprivate /",
                          f"mount --bind {shlex.quote(str(root / 'var/lib/selinux'))} {STORE_ROOT}",
                          f"mount --bind {shlex.quote(str(root / 'etc/selinux'))} {ETC_ROOT}"]
                         + [shlex.join(c) for c in commands])
    _run(["unshare", "-m", "sh", "-c", script], what, tool=" && ".join(c[0] if c[0] != "sh" else "semanage" for c in commands))


def _install_commands(pp: Path, ports: Sequence[tuple[str, int, str]], *, store: str, extra: Sequence[str | Path] = (),
                      reload: bool = False) -> list[list[str]]:
    """`semodule -i` (`-N`: no policy reload) and one `semanage port` per port label of the module."""
    no_reload = [] if reload else ["-N"]
    cmds = [["semodule", *no_reload, "-s", store, "-i", str(pp), *map(str, extra)]]
    for proto, port, type_ in ports:
        # -a when the base policy does not label the port yet, else -m (a local label takes precedence)
        n = " ".join(no_reload)
        cmds.append(["sh", "-c", f"semanage port {n} -S {store} -a -t {type_} -p {proto} {port} 2>/dev/null || "
                                 f"semanage port {n} -S {store} -m -t {type_} -p {proto} {port}"])
    return cmds


def _binary_policy(root: Path, store: str) -> Path:
    policies = sorted((root / "etc/selinux" / store / "policy").glob("policy.*"))
    if not policies:
        raise SelinuxError(f"{root}: semodule wrote no binary policy", source=str(root))
    return policies[-1]


def link(root: str | Path, pp: str | Path, rendered: Rendered, *, extra: Sequence[str | Path] = (), store: str = "default") -> Path:
    """Install `pp` (and `extra` modules) into the scratch store at `root`, label its ports; the new binary policy."""
    root = Path(root)
    _in_store(root, _install_commands(Path(pp), rendered.ports, store=store, extra=extra), str(pp))
    return _binary_policy(root, store)


def store_dir(root: str | Path | None, store: str = "default") -> Path:
    """The policy store directory `install` writes: the running one, or the scratch one under `root`."""
    return STORE_ROOT / store if root is None else Path(root) / "var/lib/selinux" / store


def install(pp: str | Path, rendered: Rendered, *, root: str | Path | None = None, store: str = "default",
            reload: bool = True) -> Path:
    """Install `pp` and its port labels into the running store (`root` None) or the scratch store at `root`
    (never reloaded: it is not the kernel's); returns the store directory it went into.

    `reload=False` is `semodule -N`: the running store changes, the kernel's policy at the next load."""
    pp = Path(pp)
    if root is None:
        for c in _install_commands(pp, rendered.ports, store=store, reload=reload):
            _run(c, str(pp), tool="semanage" if c[0] == "sh" else c[0])
        return store_dir(None, store)
    root = Path(root)
    if not (store_dir(root, store) / "active").is_dir():
        scratch_store(root, store=store)
    _in_store(root, _install_commands(pp, rendered.ports, store=store), str(pp))
    return store_dir(root, store)
