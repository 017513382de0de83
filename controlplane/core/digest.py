"""SHA-256 of a file's bytes: one reader for every layer (boot parts in the host log, build outputs in
provenance), so a file is never hashed two ways."""
from __future__ import annotations

import hashlib
import os


def sha256_file(path: str | os.PathLike[str]) -> bytes:
    """The SHA-256 of the file at `path` (read in chunks by hashlib.file_digest)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").digest()
