"""PRIMA: only code measured as trusted for a TP label may run under that label."""
