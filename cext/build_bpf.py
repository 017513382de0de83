"""cffi build script for cext._bpf: the bpf(2) map and link commands cwlite needs beyond bcc, out-of-line API mode.

bcc's Python API cannot create a map outside a BPF object, freeze a map
(BPF_MAP_FREEZE), list the maps a program uses or hold run-time statistics on
(BPF_ENABLE_STATS); libbpf's low-level API (bpf/bpf.h) does all of them. Run by `pip install .` (setup.py names it in
cffi_modules); libbpf is checked with pkg-config first, as for cext._btf.
"""
from __future__ import annotations

import os
import sys

from cffi import FFI

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # cffi execs build scripts without their folder
from build_btf import _libbpf_version  # noqa: E402  (one libbpf check for both modules)

ffibuilder = FFI()
ffibuilder.cdef(
    """
    int cwl_map_create_like(int template_fd, const char *map_name);
    int bpf_map_update_elem(int fd, const void *key, const void *value, uint64_t flags);
    int bpf_map_lookup_elem(int fd, const void *key, void *value);
    int bpf_map_delete_elem(int fd, const void *key);
    int bpf_map_freeze(int fd);
    int bpf_map_get_fd_by_id(uint32_t id);
    int cwl_map_info(int fd, uint32_t *type, uint32_t *id, uint32_t *key_size, uint32_t *value_size,
                     uint32_t *max_entries, uint32_t *map_flags);
    int cwl_prog_ids(int fd, uint32_t *prog_id, uint32_t *map_ids, uint32_t *nr_map_ids);
    int cwl_link_create(int prog_fd, int target_fd, int attach_type);
    int cwl_enable_run_time_stats(void);
    """
)
ffibuilder.set_source(
    "cext._bpf",
    r"""
    #include <errno.h>
    #include <string.h>
    #include <unistd.h>
    #include <bpf/bpf.h>

    /* A new map exactly like `template_fd`: type, sizes, flags and BTF types. A map-of-maps slot takes
       only maps whose metadata equals its template's, and on 6.1 that includes what the BTF says
       (a map made without BTF differs in timer_off from one made with it). The fd, or -errno. */
    static int cwl_map_create_like(int template_fd, const char *map_name)
    {
        struct bpf_map_info info;
        uint32_t len = sizeof(info);
        int err, btf_fd = -1, fd;

        memset(&info, 0, sizeof(info));
        err = bpf_obj_get_info_by_fd(template_fd, &info, &len);
        if (err)
            return err;
        LIBBPF_OPTS(bpf_map_create_opts, opts, .map_flags = info.map_flags);
        if (info.btf_id) {
            btf_fd = bpf_btf_get_fd_by_id(info.btf_id);
            if (btf_fd < 0)
                return btf_fd;
            opts.btf_fd = btf_fd;
            opts.btf_key_type_id = info.btf_key_type_id;
            opts.btf_value_type_id = info.btf_value_type_id;
        }
        fd = bpf_map_create(info.type, map_name, info.key_size, info.value_size, info.max_entries, &opts);
        if (btf_fd >= 0)
            close(btf_fd);
        return fd;
    }

    /* What a map is (BPF_OBJ_GET_INFO_BY_FD): 0 or -errno. */
    static int cwl_map_info(int fd, uint32_t *type, uint32_t *id, uint32_t *key_size, uint32_t *value_size,
                            uint32_t *max_entries, uint32_t *map_flags)
    {
        struct bpf_map_info info;
        uint32_t len = sizeof(info);
        int err;

        memset(&info, 0, sizeof(info));
        err = bpf_obj_get_info_by_fd(fd, &info, &len);
        if (err)
            return err;
        *type = info.type;
        *id = info.id;
        *key_size = info.key_size;
        *value_size = info.value_size;
        *max_entries = info.max_entries;
        *map_flags = info.map_flags;
        return 0;
    }

    /* A program's id and the ids of the maps it uses (at most *nr_map_ids; set to the count): 0 or -errno. */
    static int cwl_prog_ids(int fd, uint32_t *prog_id, uint32_t *map_ids, uint32_t *nr_map_ids)
    {
        struct bpf_prog_info info;
        uint32_t len = sizeof(info);
        int err;

        memset(&info, 0, sizeof(info));
        info.nr_map_ids = *nr_map_ids;
        info.map_ids = (uint64_t)(unsigned long)map_ids;
        err = bpf_obj_get_info_by_fd(fd, &info, &len);
        if (err)
            return err;
        *prog_id = info.id;
        *nr_map_ids = info.nr_map_ids;
        return 0;
    }

    /* Attach a program to a cgroup (or other target) through a BPF link: the attachment lives
       exactly as long as the returned fd (a daemon that dies detaches), unlike BPF_PROG_ATTACH,
       which outlives its process. The link fd, or -errno. */
    static int cwl_link_create(int prog_fd, int target_fd, int attach_type)
    {
        return bpf_link_create(prog_fd, target_fd, (enum bpf_attach_type)attach_type, NULL);
    }

    /* BPF_ENABLE_STATS: the kernel counts every program's runs and run time while the returned fd is
       open, whoever else flips the kernel.bpf_stats_enabled sysctl meanwhile. The fd, or -errno. */
    static int cwl_enable_run_time_stats(void)
    {
        return bpf_enable_stats(BPF_STATS_RUN_TIME);
    }
    """,
    libraries=["bpf"],
)

if __name__ == "__main__":
    _libbpf_version()
    ffibuilder.compile(verbose=True)
else:
    _libbpf_version()
