"""`cwlite policy check|digest|sign|keygen`: validate, fingerprint and sign a policy bundle."""
from __future__ import annotations

import base64
from pathlib import Path

import click

from controlplane.cli.output import emit
from controlplane.core.atomic import write_atomic
from controlplane.core.errors import KeyFileError
from controlplane.core.keys import load_signing_key, write_key_pair
from controlplane.core.policy import load_policy, sign_policy, signature_path

_json = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
_path = click.argument("policy", type=click.Path(dir_okay=False, path_type=Path))


@click.group("policy")
def policy() -> None:
    """The policy bundle: TP labels, entrypoints, trust sets, CDIs, Port Authority rules, mode.

    A policy is one TOML file. Its canonical digest (SHA-256 over the
    normalised policy) ignores key order, whitespace and comments; the
    controller signs that digest with Ed25519 into POLICY.sig.

    \b
    Examples:
      # validate: errors name file:line and the key
      cwlite policy check /etc/cwlite/policy.toml
      # validate and require a good controller signature
      cwlite policy check /etc/cwlite/policy.toml --controller-key controller.pub
      # the digest the measurement log records
      cwlite policy digest /etc/cwlite/policy.toml
      # make a controller key pair, then sign
      cwlite policy keygen controller && cwlite policy sign policy.toml --key controller.key
    """


def _human(d: dict) -> None:
    click.echo(f"{d['policy']}: ok ({d['mode']}, {len(d['labels'])} label(s), trust sets {', '.join(d['trust_sets'])})")
    for name, lb in d["labels"].items():
        click.echo(f"  {name}: {', '.join(lb['entrypoints'])} -> {lb['trust_set']} (on_exec {lb['on_exec']}, anon_exec {lb['anon_exec']})")
    click.echo(f"  digest {d['digest']}" + ("  signature verified" if d["signed"] else ""))


@policy.command("check")
@_path
@click.option("--controller-key", type=click.Path(dir_okay=False, path_type=Path),
              help="Ed25519 public key (PEM): POLICY.sig must verify with it.")
@_json
def check(policy: Path, controller_key: Path | None, as_json: bool) -> None:
    """Parse and validate POLICY (and its signature with --controller-key); exit 1 with file:line: key on error.

    \b
    Examples:
      cwlite policy check policy.toml
      cwlite policy check policy.toml --controller-key controller.pub --json
    """
    pol = load_policy(policy, controller_key=controller_key, require_signature=controller_key is not None)
    data = {"policy": str(policy), "digest": pol.digest().hex(), "signed": controller_key is not None, **pol.canonical()}
    emit(data, as_json, _human)


@policy.command("digest")
@_path
@_json
def digest(policy: Path, as_json: bool) -> None:
    """Print POLICY's canonical SHA-256 digest (hex).

    \b
    Examples:
      cwlite policy digest policy.toml
      cwlite policy digest policy.toml --json
    """
    emit({"policy": str(policy), "digest": load_policy(policy).digest().hex()}, as_json, lambda d: click.echo(d["digest"]))


@policy.command("sign")
@_path
@click.option("--key", "key_path", required=True, type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="The controller's Ed25519 private key (PEM, unencrypted).")
@_json
def sign(policy: Path, key_path: Path, as_json: bool) -> None:
    """Sign POLICY's canonical digest; write POLICY.sig (base64, atomically).

    \b
    Examples:
      cwlite policy sign policy.toml --key controller.key
      cwlite policy check policy.toml --controller-key controller.pub
    """
    pol = load_policy(policy)
    sig = sign_policy(pol, load_signing_key(key_path))
    out = signature_path(policy)
    write_atomic(out, base64.b64encode(sig) + b"\n")
    emit({"policy": str(policy), "digest": pol.digest().hex(), "signature": str(out)}, as_json,
         lambda d: click.echo(f"{d['signature']}: signed digest {d['digest']}"))


@policy.command("keygen")
@click.argument("prefix", type=click.Path(dir_okay=False, path_type=Path))
@_json
def keygen(prefix: Path, as_json: bool) -> None:
    """Make a controller Ed25519 key pair: PREFIX.key (private, mode 0600) and PREFIX.pub.

    \b
    Examples:
      cwlite policy keygen /etc/cwlite/controller
      cwlite policy keygen ./controller --json
    """
    key_path, pub_path = prefix.with_name(prefix.name + ".key"), prefix.with_name(prefix.name + ".pub")
    if key_path.exists():
        raise KeyFileError(f"{key_path}: exists; not overwriting a key", path=str(key_path))
    write_key_pair(key_path, pub_path)
    emit({"private": str(key_path), "public": str(pub_path)}, as_json,
         lambda d: click.echo(f"{d['private']} (keep secret), {d['public']}"))
