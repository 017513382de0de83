"""Roof: the `cwlite` command and the demo, which compose every layer."""
