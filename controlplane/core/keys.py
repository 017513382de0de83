"""Ed25519 key files: the one loader for the controller's policy key and the verifier's proof key.

Private keys are unencrypted PKCS#8 PEM (mode 0600); public keys are
SubjectPublicKeyInfo PEM, or the 32 raw bytes / their 64 hex digits. Every
failure is a KeyFileError naming the file.
"""
from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from controlplane.core.atomic import write_atomic
from controlplane.core.errors import KeyFileError


def private_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def public_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def write_key_pair(key_path: Path, pub_path: Path) -> Ed25519PrivateKey:
    """A new key: private PEM at `key_path` (0600), public PEM at `pub_path` (0644), each written atomically."""
    key = Ed25519PrivateKey.generate()
    Path(key_path).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(Path(key_path), private_pem(key), mode=0o600)
    write_atomic(Path(pub_path), public_pem(key.public_key()), mode=0o644)
    return key


def load_signing_key(path: str | Path, *, create: bool = False) -> Ed25519PrivateKey:
    """The Ed25519 private key at `path`; made (with its `.pub` beside it) when missing and `create`."""
    path = Path(path)
    if create and not path.exists():
        return write_key_pair(path, path.with_suffix(".pub"))
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read the private key: {exc.strerror}", path=str(path)) from exc
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path}: not an unencrypted PEM private key ({exc})", path=str(path)) from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path}: not an Ed25519 key ({type(key).__name__})", path=str(path))
    return key


def load_public_key(key: Ed25519PublicKey | str | Path) -> Ed25519PublicKey:
    """An Ed25519PublicKey as given, or read from a PEM file (SubjectPublicKeyInfo) or 32 raw/hex bytes."""
    if isinstance(key, Ed25519PublicKey):
        return key
    path = Path(key)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read the public key: {exc.strerror}", path=str(path)) from exc
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            pub = serialization.load_pem_public_key(data)
        else:
            # 32 raw bytes are taken as they are: a raw key may begin or end with a byte that looks like
            # whitespace (1 key in ~20), so only the hex form is stripped.
            pub = Ed25519PublicKey.from_public_bytes(data if len(data) == 32 else bytes.fromhex(data.strip().decode()))
    except (ValueError, TypeError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"{path}: not an Ed25519 public key ({exc})", path=str(path)) from exc
    if not isinstance(pub, Ed25519PublicKey):
        raise KeyFileError(f"{path}: not an Ed25519 public key ({type(pub).__name__})", path=str(path))
    return pub
