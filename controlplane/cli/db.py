"""`cwlite db`: build, show, diff and verify the measurement DB (prima.measuredb)."""
from __future__ import annotations

import contextlib
import os
import re
import sys
from pathlib import Path
from typing import Callable, Iterator

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from controlplane.cli.log import read_any
from controlplane.cli.output import emit
from controlplane.core.errors import FileError, MeasureDBError
from controlplane.core.paths import DEFAULT_DATA_DIR
from controlplane.core.policy import load_policy
from prima.measuredb import MeasureDB, Measurement, diff

DEFAULT_DB = str(DEFAULT_DATA_DIR / "measure.db")
_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")

db_option = click.option(
    "--db", "db_path", default=DEFAULT_DB, show_default=True, envvar="CWLITE_DB", metavar="PATH",
    help="The measurement DB file (env CWLITE_DB).",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")


@click.group()
def db() -> None:
    """The measurement DB: trusted code (SHA-256) with its origin, in named trust sets.

    Sources of trust: Debian archives checked back to apt's signed InRelease,
    dpkg's installed packages cross-checked with their md5sums, and local
    directories. A build replaces one trust set atomically.

    \b
    Examples:
      # trust set "build-tools": these packages and their dependencies, as installed
      cwlite db build --trust-set build-tools --from-dpkg gcc binutils make distcc coreutils libc6
      # .debs fetched with apt-get download, checked against apt's signed lists
      cwlite db build --trust-set tools --from-deb ./debs
      # what the DB holds, and where a measurement comes from
      cwlite db show --json
      cwlite db show /usr/bin/gcc-12
    """


@contextlib.contextmanager
def _progress() -> Iterator[Callable[[str, int, int], None] | None]:
    """A rich progress bar on a terminal (stderr); nothing otherwise."""
    if not sys.stderr.isatty():
        yield None
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=True) as bar:
        tasks: dict[str, int] = {}

        def tick(phase: str, done: int, total: int) -> None:
            if phase not in tasks:
                tasks[phase] = bar.add_task(f"measuring {phase}", total=total)
            bar.update(tasks[phase], completed=done, total=total)

        yield tick


@db.command("build")
@db_option
@click.option("--trust-set", "trust_set", required=True, metavar="NAME", help="The trust set this build (re)defines.")
@click.option("--from-deb", "from_deb", multiple=True, metavar="DIR",
              help="A directory of .deb files (repeatable); with PKG arguments, only those and their dependencies.")
@click.option("--from-dpkg", "from_dpkg", is_flag=True, help="Installed packages: the PKG arguments (all when none).")
@click.option("--from-dir", "from_dir", multiple=True, metavar="DIR", help="A local directory of site-built code (repeatable).")
@click.option("--note", default="", help="Recorded with every measurement of this build (e.g. who built the code).")
@click.option("--no-deps", is_flag=True, help="With PKG arguments: only the named packages, not their dependencies.")
@click.option("--lists-dir", default=None, metavar="DIR", help="apt lists (InRelease, Packages) [default: /var/lib/apt/lists].")
@click.option("--keyring", "keyrings", multiple=True, metavar="FILE", help="OpenPGP keyring(s) for InRelease [default: apt's].")
@click.option("--dpkg-root", default="/", show_default=True, metavar="DIR", help="Read dpkg's files under this root.")
@json_option
@click.argument("packages", nargs=-1, metavar="[PKG...]")
def build_cmd(db_path: str, trust_set: str, from_deb: tuple[str, ...], from_dpkg: bool, from_dir: tuple[str, ...], note: str,
              no_deps: bool, lists_dir: str | None, keyrings: tuple[str, ...], dpkg_root: str, as_json: bool,
              packages: tuple[str, ...]) -> None:
    """Measure the given sources and make trust set NAME hold exactly what they trust.

    Nothing is written until every source is measured and checked; a build
    interrupted at any point leaves the previous DB as it was. Unchanged
    files (same dev, inode, size, mtime, ctime) are not read again.

    \b
    Examples:
      # installed packages and their dependencies; md5sums mismatches stored as untrusted
      cwlite db build --trust-set build-tools --from-dpkg gcc make distcc
      # every installed package
      cwlite db build --trust-set system --from-dpkg
      # .debs (apt-get download coreutils distcc) checked back to the signed InRelease
      cwlite db build --trust-set tools --from-deb ./debs
      # code the site builds itself, with a note
      cwlite db build --trust-set site --from-dir /opt/site/bin --note "ci job 4211"
    """
    # Here, not at the top: prima.sources brings python-debian (~30 ms), which only `db build` needs.
    from prima.sources import build

    if packages and not (from_dpkg or from_deb) or packages and from_dpkg and from_deb:
        raise click.UsageError("package names go with exactly one of --from-dpkg or --from-deb")
    with _progress() as tick:
        result = build(
            db_path, from_deb=list(from_deb), deb_packages=list(packages) if from_deb else [], from_dpkg=(list(packages) or True) if from_dpkg else (), from_dir=list(from_dir),
            trust_set=trust_set, note=note, deps=not no_deps, lists_dir=lists_dir,
            keyrings=list(keyrings) if keyrings else None, dpkg_root=dpkg_root, progress=tick,
        )
    data = {"db": db_path, "trust_set": result.trust_set, "measured": result.measured, "untrusted": result.untrusted,
            "reused": result.reused, "digest": result.digest.hex(), "sources": result.sources}
    emit(data, as_json, lambda d: click.echo(
        f"{d['db']}: trust set {d['trust_set']}: {d['measured']} measurements ({d['untrusted']} untrusted, "
        f"{d['reused']} unchanged files reused); DB digest {d['digest']}"))


def _origin_dict(m: Measurement) -> dict:
    return {"trust_set": m.trust_set, "kind": m.origin, "package": m.package, "version": m.version, "path": m.path,
            "note": m.note, "trusted": not m.untrusted, "untrusted": m.untrusted, "code": m.code.kind,
            "interpreter": m.code.interpreter}


@db.command("show")
@db_option
@json_option
@click.argument("what", required=False, metavar="[PATH|DIGEST]")
def show(db_path: str, as_json: bool, what: str | None) -> None:
    """Summarise the DB, or show where a file or a SHA-256 DIGEST comes from.

    For a PATH, also measures the file now and says whether its current
    content is trusted, and in which trust sets.

    \b
    Examples:
      cwlite db show
      cwlite db show --json | jq .trust_sets
      cwlite db show /usr/bin/make
      cwlite db show 3f5c...e1 (a 64-hex-digit SHA-256)
    """
    with MeasureDB.open(db_path, readonly=True) as mdb:
        if what is None:
            emit(mdb.summary(), as_json, _print_summary)
            return
        if _HEX64.match(what) and not os.path.exists(what):
            data = {"digest": what.lower(), "origins": [_origin_dict(o) for o in mdb.lookup(bytes.fromhex(what), include_untrusted=True)]}
        else:
            if not os.path.exists(what):
                raise MeasureDBError(f"{what}: no such file (give a path or a 64-hex-digit SHA-256)")
            now = mdb.measure_paths([what]).get(what)
            current = now.sha256 if now is not None else None
            data = {
                "path": what,
                "digest": current.hex() if current else None,
                "code": bool(now is not None and now.kind),
                "recorded_here": [_origin_dict(o) for o in mdb.origins_at(what)],
                "origins": [_origin_dict(o) for o in mdb.lookup(current, include_untrusted=True)] if current else [],
                "trusted_in": sorted({o.trust_set for o in mdb.lookup(current)}) if current else [],
            }
        emit(data, as_json, _print_lookup)


def _print_summary(s: dict) -> None:
    click.echo(f"{s['path']}: schema {s['schema_version']}, digest {s['digest']}")
    for name, t in s["trust_sets"].items():
        counts = ", ".join(f"{k} {v}" for k, v in sorted(t["measurements"].items())) or "empty"
        click.echo(f"  {name}: {counts}  (built {t['built_at']}{'; ' + t['note'] if t['note'] else ''})")


def _print_lookup(d: dict) -> None:
    if "path" in d:
        state = "not code" if not d["code"] else f"sha256 {d['digest']}: " + (
            f"trusted in {', '.join(d['trusted_in'])}" if d["trusted_in"] else "NOT trusted")
        click.echo(f"{d['path']}: {state}")
        if d["code"] and not d["trusted_in"]:
            for o in d["recorded_here"]:
                click.echo(f"  recorded here: [{o['trust_set']}] {o['kind']} {o['package']} {o['version']}"
                           + ("" if o["trusted"] else f"  UNTRUSTED: {o['untrusted']}"))
    else:
        click.echo(f"{d['digest']}: {len(d['origins'])} origin(s)" if d["origins"] else f"{d['digest']}: unknown")
    for o in d["origins"]:
        flag = "" if o["trusted"] else f"  UNTRUSTED: {o['untrusted']}"
        click.echo(f"  [{o['trust_set']}] {o['kind']} {o['package']} {o['version']} {o['path']}{flag}")


@db.command("diff")
@json_option
@click.argument("old")
@click.argument("new")
def diff_cmd(as_json: bool, old: str, new: str) -> None:
    """Trusted measurements added, removed or changed from DB OLD to DB NEW.

    \b
    Examples:
      cwlite db diff /var/lib/cwlite/measure.db.old /var/lib/cwlite/measure.db
      cwlite db diff --json a.db b.db | jq '.changed | length'
    """
    def human(d: dict) -> None:
        click.echo(f"digest {d['old_digest']} -> {d['new_digest']}")
        for sign, key in (("+", "added"), ("-", "removed")):
            for r in d[key]:
                click.echo(f"{sign} [{r['trust_set']}] {r['origin']} {r['package']} {r['path']} {r['digest']}")
        for r in d["changed"]:
            click.echo(f"~ [{r['trust_set']}] {r['origin']} {r['package']} {r['path']} {r['old_digest']} -> {r['new_digest']}")

    emit(diff(old, new).to_dict(), as_json, human)


@db.command("verify")
@db_option
@click.option("--trust-set", "trust_sets", multiple=True, metavar="NAME", help="Only these trust sets (repeatable).")
@json_option
def verify(db_path: str, trust_sets: tuple[str, ...], as_json: bool) -> None:
    """Re-hash every measured file present on this machine; report what no longer matches (exit 1 if any).

    \b
    Examples:
      cwlite db verify
      cwlite db verify --trust-set build-tools --json
    """
    with MeasureDB.open(db_path) as mdb:
        found = mdb.verify(list(trust_sets) or None)
    data = {"db": db_path, "mismatches": [
        {"trust_set": m.trust_set, "path": m.path, "expected": m.expected.hex(), "actual": m.actual.hex() if m.actual else None}
        for m in found]}

    def human(d: dict) -> None:
        for m in d["mismatches"]:
            click.echo(f"{m['path']}: [{m['trust_set']}] expected {m['expected']}, found {m['actual'] or 'nothing (missing or not code)'}")
        if not d["mismatches"]:
            click.echo(f"{d['db']}: every measured file present here matches")

    emit(data, as_json, human)
    if found:
        raise MeasureDBError(f"{db_path}: verify: {len(found)} file(s) no longer match their measurement (first: {found[0].path})")


def _print_suggestion(d: dict) -> None:
    for f in d["files"]:
        owner = f"{f['package']} {f['version']}" if f["package"] else "NO PACKAGE"
        click.echo(f"{f['label']} {f['op']} {f['path']}: {owner}{' (' + f['why'] + ')' if f['why'] else ''}")
    for s in d["trust_sets"]:
        click.echo(f"\ntrust set {s['trust_set']} (labels {', '.join(s['labels'])}): add {' '.join(s['add']) or 'nothing new'}")
        if s["already"]:
            click.echo(f"  {' '.join(s['already'])}: {s['why_already']}")
        for line in s["command_lines"]:
            click.echo(f"  {line}")
    if d["unowned"]:
        click.echo("\nowned by no installed package (not in any command; trust them only deliberately, e.g. --from-dir):")
        for f in d["unowned"]:
            click.echo(f"  {f['label']} {f['op']} {f['found'] or f['path'] + ' (not found here)'}")
    if d["modified"]:
        click.echo("\nowned, but not what dpkg installed (md5sums differ; a dpkg build stores them untrusted):")
        for f in d["modified"]:
            click.echo(f"  {f['path']} ({f['package']} {f['version']})")
    if d["not_files"]:
        click.echo(f"\n{len(d['not_files'])} violation(s) name no file to trust (e.g. {d['not_files'][0]['op']}): "
                   "no package changes them")
    if d["trust_sets"]:
        click.echo("\nthen: SIGHUP the enforcement daemon, rebuild the verifier's DB the same way, and switch the policy "
                   "to mode = \"enforce\"")


@db.command("suggest")
@db_option
@click.option("--policy", "policy_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The audit run's policy (which trust set each label uses).")
@click.option("--events", "events_path", type=click.Path(dir_okay=False, path_type=Path),
              help="The audit run's `cwlite enforce --events` JSON lines.")
@click.option("--log", "log_path", type=click.Path(dir_okay=False, path_type=Path),
              help="A measurement log (binary or ASCII) [default, without --events: DATA_DIR/measurements.log].")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_DATA_DIR, show_default=True,
              help="Where the measurement log lives.")
@click.option("--dpkg-root", default="/", show_default=True, metavar="DIR", help="Read dpkg's files under this root.")
@json_option
def suggest_cmd(db_path: str, policy_path: Path, events_path: Path | None, log_path: Path | None, data_dir: Path,
                dpkg_root: str, as_json: bool) -> None:
    """Propose the Debian packages that own the code an audit run's violations loaded, and the `db build` for them.

    Reads the violations (events or measurement log), finds the installed
    package owning each file in dpkg's database, and prints, per trust set,
    the command that rebuilds it from the sources it was last built from plus
    those packages (for a set built from .debs: `apt-get download` of the
    installed versions, then the build through the signed archive chain).
    Files no package owns, or that differ from what dpkg installed, are listed
    and left out: nothing is trusted without saying so.

    \b
    Examples:
      # audit: run the build under a mode = "audit" policy, events to a file
      cwlite enforce --policy audit.toml --db measure.db --events audit.jsonl
      # what to add
      cwlite db suggest --db measure.db --policy audit.toml --events audit.jsonl
      # from the measurement log instead, for scripts
      cwlite db suggest --db measure.db --policy audit.toml --json
    """
    # Here, not at the top: prima.suggest brings python-debian (~30 ms), which only `db build`/`suggest` need.
    from prima.suggest import DpkgOwners, suggest, violations_from_events, violations_from_log

    if events_path is not None and log_path is not None:
        raise click.UsageError("give --events or --log, not both")
    policy = load_policy(policy_path)
    if events_path is not None:
        try:
            text = events_path.read_text(encoding="utf-8")
        except OSError as exc:
            raise FileError.from_os(events_path, exc, "read the events file") from exc
        violations = violations_from_events(text.splitlines(), str(events_path))
    else:
        violations = violations_from_log(read_any(log_path or data_dir / "measurements.log"))
    owners = DpkgOwners(root=Path(dpkg_root))
    result = suggest(violations, {name: label.trust_set for name, label in policy.labels.items()},
                     db_path=Path(db_path), owners=owners)
    emit({"violations": len(violations), **result.as_dict()}, as_json, _print_suggestion)
