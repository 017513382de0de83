"""Host layer: the live measurement log, the TPM, swtpm, and the attestation service."""
