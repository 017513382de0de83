"""BPF C sources (bcc dialect), shipped as package data, and the one loader that compiles them.

`ebpf.loader` is the only place that calls bcc's compiler: every engine loads its
programs through it, so the BTF offsets and compile-error reporting are the same
everywhere.
"""
