"""cffi build script for cext._btf: libbpf's BTF API, out-of-line API mode.

Run by `pip install .` (setup.py names it in cffi_modules). Checks libbpf with
pkg-config first so a missing libbpf-dev is one clear error, not a page of
compiler output.
"""
from __future__ import annotations

import shutil
import subprocess

from cffi import FFI

MIN_LIBBPF = (0, 8)


def _libbpf_version() -> tuple[int, ...]:
    if shutil.which("pkg-config") is None:
        raise SystemExit("cext: pkg-config not found: install Debian's pkg-config (make setup does)")
    proc = subprocess.run(["pkg-config", "--modversion", "libbpf"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit("cext: libbpf not found by pkg-config: install Debian's libbpf-dev (make setup does)")
    version = tuple(int(p) for p in proc.stdout.strip().split(".")[:2])
    if version < MIN_LIBBPF:
        raise SystemExit(f"cext: libbpf {proc.stdout.strip()} is too old; need >= {'.'.join(map(str, MIN_LIBBPF))}")
    return version


ffibuilder = FFI()
ffibuilder.cdef(
    """
    struct btf;
    struct btf *btf__parse(const char *path, void *btf_ext);
    void btf__free(struct btf *btf);
    long long btf__resolve_size(const struct btf *btf, uint32_t type_id);
    int cwl_find_composite(const struct btf *btf, const char *name);
    int cwl_find_member(const struct btf *btf, uint32_t id, const char *name,
                        uint32_t *bit_off, uint32_t *mtype, uint32_t *bitfield_size);
    int cwl_composite_of(const struct btf *btf, uint32_t type_id);
    """
)
ffibuilder.set_source(
    "cext._btf",
    r"""
    #include <errno.h>
    #include <string.h>
    #include <bpf/btf.h>

    /* The id of struct or union `name`, or -ENOENT. */
    static int cwl_find_composite(const struct btf *btf, const char *name)
    {
        int id = btf__find_by_name_kind(btf, name, BTF_KIND_STRUCT);
        if (id < 0)
            id = btf__find_by_name_kind(btf, name, BTF_KIND_UNION);
        return id < 0 ? -ENOENT : id;
    }

    /* The struct/union a member type resolves to through typedefs and
       modifiers, and through an array to its first element (never through
       pointers), or -EINVAL. */
    static int cwl_composite_of(const struct btf *btf, uint32_t type_id)
    {
        int id = btf__resolve_type(btf, type_id);
        if (id >= 0 && btf_is_array(btf__type_by_id(btf, id)))
            id = btf__resolve_type(btf, btf_array(btf__type_by_id(btf, id))->type);
        if (id < 0)
            return -EINVAL;
        return btf_is_composite(btf__type_by_id(btf, id)) ? id : -EINVAL;
    }

    /* Find member `name` of composite `id`, descending into anonymous
       structs/unions; the bit offset is relative to `id`. */
    static int cwl_find_member(const struct btf *btf, uint32_t id, const char *name,
                               uint32_t *bit_off, uint32_t *mtype, uint32_t *bitfield_size)
    {
        const struct btf_type *t = btf__type_by_id(btf, id);
        const struct btf_member *m;
        int i, n;

        if (!t || !btf_is_composite(t))
            return -EINVAL;
        m = btf_members(t);
        n = btf_vlen(t);
        for (i = 0; i < n; i++, m++) {
            const char *mname = btf__name_by_offset(btf, m->name_off);
            uint32_t off = btf_member_bit_offset(t, i);

            if (mname && mname[0]) {
                if (strcmp(mname, name) == 0) {
                    *bit_off = off;
                    *mtype = m->type;
                    *bitfield_size = btf_member_bitfield_size(t, i);
                    return 0;
                }
            } else {
                int sub = cwl_composite_of(btf, m->type);
                if (sub > 0 && cwl_find_member(btf, sub, name, bit_off, mtype, bitfield_size) == 0) {
                    *bit_off += off;
                    return 0;
                }
            }
        }
        return -ENOENT;
    }
    """,
    libraries=["bpf"],
)

if __name__ == "__main__":
    _libbpf_version()
    ffibuilder.compile(verbose=True)
else:
    _libbpf_version()
