#pragma once

/*
 * pool-setup: a loop-backed thin pool for development, tests and demos. The pool POOL lives
 * on two sparse files, DIR/POOL.data and DIR/POOL.meta, attached to loop devices; the pool
 * device carries the dm uuid "FIM-pool-POOL" as our mark.
 *
 * Production pools are made by operators on real disks, and this module never reformats or
 * removes a pool it cannot prove it made: the uuid must match and the pool's metadata and data
 * devices must be loop devices over exactly those two files.
 */

#include <stdbool.h>
#include <stdint.h>

#define POOL_SETUP_DEFAULT_DATA_SIZE (UINT64_C(1) << 30)
#define POOL_SETUP_DEFAULT_BLOCK_SIZE (UINT64_C(64) << 10)
/* The kernel's bounds for the metadata device: 2 MiB, and what its space map can address. */
#define POOL_SETUP_MIN_METADATA_SIZE (UINT64_C(2) << 20)
#define POOL_SETUP_MAX_METADATA_SIZE (UINT64_C(255) * ((1 << 14) - 64) * 4096)
/* low_water_mark value that asks for the default: a tenth of the data blocks. */
#define POOL_SETUP_LOW_WATER_MARK_AUTO UINT64_MAX

/* Positive results. */
enum {
        POOL_SETUP_EXISTED = 1, /* create: the pool was already set up from these files */
        POOL_SETUP_NOTHING = 1, /* teardown: no pool and no files: nothing to remove */
};

struct pool_setup_opts {
        const char *name;
        const char *dir;
        uint64_t data_size;      /* bytes, a multiple of block_size */
        uint64_t metadata_size;  /* bytes; 0: pool_setup_metadata_size() */
        uint64_t block_size;     /* bytes: 64 KiB .. 1 GiB, a multiple of 64 KiB */
        uint64_t low_water_mark; /* data blocks, or POOL_SETUP_LOW_WATER_MARK_AUTO */
        bool error_if_no_space;  /* when full, fail writes at once instead of queueing them */
};

#define POOL_SETUP_OPTS_INIT                                                                       \
        {                                                                                          \
                .data_size = POOL_SETUP_DEFAULT_DATA_SIZE,                                         \
                .block_size = POOL_SETUP_DEFAULT_BLOCK_SIZE,                                       \
                .low_water_mark = POOL_SETUP_LOW_WATER_MARK_AUTO,                                  \
        }

struct pool_setup_result {
        bool existed;    /* already set up: nothing was changed */
        bool reattached; /* the files existed (say, after a reboot): attached, not formatted */
        uint64_t data_size;
        uint64_t metadata_size;
        uint64_t block_size;
        char data_loop[32]; /* "/dev/loopN" */
        char metadata_loop[32];
};

struct pool_setup_teardown_result {
        bool pool_removed;
        unsigned thin_deactivated; /* active thin devices removed because of force */
        unsigned loops_detached;
        unsigned files_removed;
};

/*
 * The kernel's rule for the metadata size: 48 bytes per data block, at least 2 MiB, rounded up
 * to 4 KiB and capped at POOL_SETUP_MAX_METADATA_SIZE (the kernel would not use more).
 */
uint64_t pool_setup_metadata_size(uint64_t data_size, uint64_t block_size);

/*
 * Create pool opts->name from sparse files in opts->dir (created when missing; the directory
 * itself too, one level): create the files, attach them to loop devices, zero the first 4 KiB
 * of the metadata and load the thin-pool table. When both files exist but the pool does not
 * (after a reboot), they are attached and the pool is loaded without formatting anything.
 *
 * Returns 0 when created, POOL_SETUP_EXISTED when the pool already runs from these files.
 * -EPERM when a device of that name exists but is not ours (refused); -EEXIST when only one of
 * the two files exists; -EINVAL for bad sizes or names. A failure undoes what this call did.
 * @ret_result may be NULL.
 */
int pool_setup_create(const struct pool_setup_opts *opts, struct pool_setup_result *ret_result);

/*
 * Remove pool @name that pool_setup_create() made from @dir: deactivate it, detach its loop
 * devices and delete both files. While thin devices on it are active it refuses with -EBUSY
 * and names them, unless @force, which deactivates them first (a mounted one still fails with
 * -EBUSY). -EPERM when the pool exists but is not ours (refused: no files in @dir, another uuid
 * or other backing files). Returns 0 when something was removed, POOL_SETUP_NOTHING when
 * neither the pool nor the files exist. @ret_result may be NULL.
 */
int pool_setup_teardown(const char *name, const char *dir, bool force,
                        struct pool_setup_teardown_result *ret_result);
