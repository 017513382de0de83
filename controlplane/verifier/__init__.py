"""Verifier layer: attests hosts and builds proofs; imports the core layer only."""
