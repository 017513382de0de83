"""The build controller: distcc builds on verified hosts, and their signed provenance."""
