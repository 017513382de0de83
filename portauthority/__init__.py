"""Port Authority: untrusted network input reaches only the programs trusted to filter it."""
