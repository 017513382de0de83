"""Where cwlite lives on a host by default: one definition each, for every layer."""
from __future__ import annotations

from pathlib import Path

DEFAULT_DATA_DIR = Path("/var/lib/cwlite")     # the daemon's state: log, swtpm, keys, measurement DB
TPM_DEVICE = "/dev/tpmrm0"                      # the kernel's TPM resource manager
