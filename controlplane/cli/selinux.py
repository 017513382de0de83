"""`cwlite selinux render|link|load|check`: the SELinux module from the cwlite policy, its measured load, and CW-Lite
checks of SELinux policies."""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import click

from controlplane.cli.output import emit
from controlplane.core.events import Event, EventKind
from controlplane.core.paths import DEFAULT_DATA_DIR
from controlplane.core.policy import load_policy
from controlplane.core.selinux_render import MODULE, render
from controlplane.host import mlog as mlog_mod
from controlplane.host import selinux_module

_json = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
_policy = click.argument("policy", type=click.Path(dir_okay=False, path_type=Path))


@click.group("selinux")
def selinux() -> None:
    """SELinux: the TP domains and CDI types rendered from the cwlite policy; CW-Lite checks of any binary policy.

    \b
    Examples:
      # the module sources for this policy (byte-for-byte the same for the same policy)
      cwlite selinux render /etc/cwlite/policy.toml --out /tmp/cwlite-selinux
      # build it and link it into a scratch copy of selinux-policy-default
      cwlite selinux link /etc/cwlite/policy.toml --root /tmp/store
      # install it into the running store, its digest first in the measurement log
      cwlite selinux load /etc/cwlite/policy.toml
      # CW-Lite: flows from low-integrity types into the TCB, with the rules per step
      cwlite selinux check /tmp/store/etc/selinux/default/policy/policy.33 --graph flows.png
    """


def _render_human(d: dict) -> None:
    for f in d["files"]:
        click.echo(f"wrote {f}")
    click.echo(f"module digest {d['module_digest']} (policy digest {d['policy_digest']})")


@selinux.command("render")
@_policy
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Directory for cwlite.te, cwlite.fc, cwlite.if and cwlite.ports.")
@_json
def render_cmd(policy: Path, out: Path, as_json: bool) -> None:
    """Render the SELinux module's sources from POLICY into --out, and print their digest.

    The digest (SHA-256 over the four files) is what to record when the
    module is loaded: the same policy always renders the same bytes.

    \b
    Examples:
      cwlite selinux render policy.toml --out selinux-policy
      cwlite selinux render policy.toml --out /tmp/m --json
    """
    rendered = render(load_policy(policy))
    paths = selinux_module.write_sources(rendered, out)
    emit({"policy": str(policy), "files": [str(p) for p in paths], "module_digest": rendered.digest(),
          "policy_digest": rendered.policy_digest}, as_json, _render_human)


@selinux.command("link")
@_policy
@click.option("--root", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Scratch directory: a copy of the installed policy store goes here.")
@click.option("--store", default="default", show_default=True, help="The installed store to copy (selinux-policy-default).")
@click.option("--extra", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="More modules (.pp or .cil) to link in, e.g. a site's own rules.")
@_json
def link_cmd(policy: Path, root: Path, store: str, extra: tuple[Path, ...], as_json: bool) -> None:
    """Render, build and link the module into a scratch copy of the installed policy store.

    Needs root (a private mount namespace); the host's own store is not
    touched and SELinux need not be enabled. Prints the binary policy to check.

    \b
    Examples:
      cwlite selinux link policy.toml --root /tmp/store
      cwlite selinux link policy.toml --root /tmp/store --extra site.cil --json
    """
    rendered = render(load_policy(policy))
    selinux_module.scratch_store(root, store=store)
    src = Path(tempfile.mkdtemp(prefix="cwlite-selinux-", dir=root))
    selinux_module.write_sources(rendered, src)
    pp = selinux_module.build(src)
    binary = selinux_module.link(root, pp, rendered, extra=list(extra), store=store)
    emit({"policy": str(policy), "module": str(pp), "binary_policy": str(binary), "module_digest": rendered.digest()},
         as_json, lambda d: click.echo(f"{d['binary_policy']} (module {d['module']}, digest {d['module_digest']})"))


def _record_load(event: Event, data_dir: Path, device: str | None, pcr: int | None, policy_pcr: int | None) -> int:
    """Append `event` to DATA_DIR's measurement log and wait until the PCR holds it; the entry's index."""
    # tpm2-pytss costs ~0.15 s at import: only the commands that extend pay it
    from controlplane.host import tpm as tpm_mod

    path = data_dir / "measurements.log"
    if pcr is None:
        pcr = mlog_mod.log_pcr(path)
    if pcr is None:
        pcr = mlog_mod.choose_pcr(mlog_mod.DEFAULT_PCR if policy_pcr is None else policy_pcr)
    with tpm_mod.open_tpm(data_dir, device=device) as tpm, mlog_mod.MeasurementLog.open(path, tpm, pcr=pcr) as log:
        return log.record(event, wait=True).index


@selinux.command("load")
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.option("--root", type=click.Path(file_okay=False, path_type=Path),
              help="Install into a scratch store under this directory (made from the installed one if absent) "
                   "instead of the running store.")
@click.option("--store", default="default", show_default=True, help="The policy store.")
@click.option("-N", "--no-reload", is_flag=True, help="Running store: do not reload the kernel's policy (semodule -N).")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_DATA_DIR, show_default=True,
              help="Where the measurement log and the embedded swtpm live.")
@click.option("--device", help="TPM device or TCTI (default: /dev/tpmrm0, else the embedded swtpm).")
@click.option("--pcr", type=click.IntRange(0, 23), help="The log's PCR (default: the log's own, else the policy's).")
@_json
def load_cmd(source: Path, root: Path | None, store: str, no_reload: bool, data_dir: Path, device: str | None,
             pcr: int | None, as_json: bool) -> None:
    """Build and install the module, logging its digest in the measurement log first.

    SOURCE is a cwlite policy (the module is rendered from it) or a directory
    of module sources (`render --out`, as they are now). The digest goes into
    the log before the module can take effect (as IMA measures before use); the
    verifier trusts the entry only when it is the module its own policy renders,
    so an edited module makes the next proof UNTRUSTED. The log has one writer:
    load before `cwlite enforce`/`serve` starts (the systemd units do).

    \b
    Examples:
      cwlite selinux load /etc/cwlite/policy.toml
      cwlite selinux load /etc/cwlite/policy.toml -N          # the kernel loads it at the next policy load
      cwlite selinux load ./reviewed-module --root /tmp/store --data-dir /tmp/cw --json
    """
    policy_pcr = None
    if source.is_dir():
        rendered = selinux_module.read_sources(source)
    else:
        policy = load_policy(source)
        rendered, policy_pcr = render(policy), policy.pcr
    target = selinux_module.store_dir(root, store)
    digest = rendered.digest()
    with tempfile.TemporaryDirectory(prefix="cwlite-selinux-") as build_dir:
        selinux_module.write_sources(rendered, build_dir)
        pp = selinux_module.build(build_dir)
        index = _record_load(Event(EventKind.SELINUX_LOAD, bytes.fromhex(digest), op=MODULE, subject=str(target)),
                             data_dir, device, pcr, policy_pcr)
        selinux_module.install(pp, rendered, root=root, store=store, reload=not no_reload)
    emit({"source": str(source), "store": str(target), "module_digest": digest, "log_entry": index,
          "reloaded": root is None and not no_reload}, as_json,
         lambda d: click.echo(f"loaded {MODULE} into {d['store']} (digest {d['module_digest']}, "
                              f"measurement log entry {d['log_entry']})"))


def _check_human(d: dict) -> None:
    click.echo(f"{d['policy']}: {'CW-Lite holds' if d['ok'] else 'CW-Lite violated'}: "
               f"{d['flows_into_tcb']} flow(s) into the TCB ({len(d['high'])} high type(s), "
               f"{len(d['low'])} low type(s), min weight {d['min_weight']})")
    for tp, types in d["filters"].items():
        click.echo(f"  filtered by {tp} (network input): {len(types)} step(s) in")
    for f in d["flows"]:
        click.echo(f"  {f['low']} -> {f['high']}: {' -> '.join(f['path'])}")
        for s in f["steps"]:
            more = f" (+{len(s['rules']) - 1} more)" if len(s["rules"]) > 1 else ""
            click.echo(f"    {s['source']} -> {s['target']} [w{s['weight']}]: {s['rules'][0] if s['rules'] else '?'}{more}")


@selinux.command("check")
@click.argument("binary_policy", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--low", multiple=True, help="Low-integrity type or attribute (repeat; default: the network types, "
              "user_t guest_t xguest_t, tmp_t var_tmp_t user_tmp_t tmpfs_t public_content_rw_t).")
@click.option("--high", multiple=True, help="High-integrity type or attribute (repeat; default: the module's "
              "cwlite_tp_domain cwlite_entry_type cwlite_cdi_type).")
@click.option("--trusted", multiple=True, help="Subject trusted to filter what it reads: no path passes it "
              "(repeat; default cwlite_t null_device_t zero_device_t).")
@click.option("--min-weight", type=click.IntRange(1, 10), default=3, show_default=True,
              help="Ignore flow steps whose permission weight is below this.")
@click.option("--perm-map", type=click.Path(dir_okay=False, path_type=Path), help="Permission map (default: SETools').")
@click.option("--graph", type=click.Path(dir_okay=False, path_type=Path), help="Draw the flows into the TCB (.dot or .png).")
@_json
def check_cmd(binary_policy: Path, low: tuple[str, ...], high: tuple[str, ...], trusted: tuple[str, ...],
              min_weight: int, perm_map: Path | None, graph: Path | None, as_json: bool) -> None:
    """CW-Lite on BINARY_POLICY: every flow from a low type into a high type must enter through a TP's filter.

    Exit 1 when a flow violates it; each is printed as a path of types with
    the allow rules of every step (SETools information-flow analysis).

    \b
    Examples:
      cwlite selinux check /etc/selinux/default/policy/policy.33
      cwlite selinux check policy.33 --json --graph flows.dot
      cwlite selinux check policy.33 --low user_t --high cwlite_cdi_type --trusted cwlite_t --trusted unconfined_t
    """
    from controlplane.host import selinux_check  # SETools loads in ~0.4 s: only for this command

    result = selinux_check.check_policy(binary_policy, low=low or None, high=high or None, trusted=trusted or None,
                                        min_weight=min_weight, perm_map=perm_map)
    if graph is not None:
        selinux_check.draw(result, graph)
    emit(result.as_dict(), as_json, _check_human)
    if not result.ok:
        sys.exit(1)          # SystemExit: click's Exit would be swallowed in non-standalone mode

