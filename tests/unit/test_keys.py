"""One Ed25519 key loader for the controller's policy key and the verifier's proof key."""
from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from controlplane.core.errors import KeyFileError
from controlplane.core.keys import load_public_key, load_signing_key, private_pem, write_key_pair


def test_created_once_then_loaded_and_the_public_key_in_every_form(tmp_path):
    key = load_signing_key(tmp_path / "v.key", create=True)
    assert (tmp_path / "v.key").stat().st_mode & 0o777 == 0o600
    assert load_signing_key(tmp_path / "v.key").public_key() == key.public_key()
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    (tmp_path / "raw.pub").write_bytes(raw)
    (tmp_path / "hex.pub").write_text(raw.hex() + "\n")
    for name in ("v.pub", "raw.pub", "hex.pub"):
        assert load_public_key(tmp_path / name) == key.public_key()
    pub = key.public_key()
    assert load_public_key(pub) is pub


def test_refusals_name_the_file(tmp_path):
    with pytest.raises(KeyFileError, match=r"missing\.key: cannot read the private key"):
        load_signing_key(tmp_path / "missing.key")
    ec_key = tmp_path / "ec.key"
    ec_key.write_bytes(private_pem(ec.generate_private_key(ec.SECP256R1())))
    with pytest.raises(KeyFileError, match=r"ec\.key: not an Ed25519 key"):
        load_signing_key(ec_key)
    (tmp_path / "junk.pub").write_text("junk")
    with pytest.raises(KeyFileError, match=r"junk\.pub: not an Ed25519 public key") as info:
        load_public_key(tmp_path / "junk.pub")
    assert info.value.path == str(tmp_path / "junk.pub")


def test_write_key_pair_makes_a_matching_pair(tmp_path):
    key = write_key_pair(tmp_path / "c.key", tmp_path / "c.pub")
    assert load_public_key(tmp_path / "c.pub") == key.public_key()
    assert (tmp_path / "c.pub").stat().st_mode & 0o777 == 0o644


def test_a_raw_key_that_begins_and_ends_with_whitespace_bytes_loads(tmp_path):
    """A raw 32-byte key is random: 1 in ~20 begins or ends with a byte such as 0x20 or 0x0a."""
    raw = b"\n" + bytes(range(1, 31)) + b" "
    (tmp_path / "ws.pub").write_bytes(raw)
    assert load_public_key(tmp_path / "ws.pub").public_bytes_raw() == raw
