"""The control plane: policy, TPM, measurement log, attestation service, verifier, CLI."""
