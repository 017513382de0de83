"""Core layer: pure code every other layer stands on (no kernel, TPM or web server)."""
