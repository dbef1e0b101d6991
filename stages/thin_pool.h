#pragma once

/*
 * Thin pool layer: device-mapper thin-pool messages, thin device activation and pool health,
 * through libdevmapper only (never the dmsetup binary).
 *
 * Everything is addressed by dm name: the pool ("pool") and the devices mapped on it
 * ("thin-42", "snapshot-<image_id>"). Thin device ids are 24-bit numbers inside the pool's
 * metadata; the caller allocates them (db/) and this module never picks one.
 *
 * Errors are negative errno values with a message in err_last() that names the pool or
 * device. Kernel ioctl errors keep their errno (EBUSY, EEXIST, ENODATA, EINVAL, ...); a pool or
 * device that does not exist is -ENODEV. Functions that find the work already done return a
 * documented positive value instead of an error, so the FSMs can repeat a step after a crash.
 *
 * Every function may be called from any thread: the calls into libdevmapper are serialised
 * inside this module (see the design note at the top of thin_pool.c). Steps that must not
 * interleave with another process on the same pool (creating a device, suspend around
 * create_snap, the metadata snapshot) also take a per-pool lock file in THIN_POOL_LOCK_DIR,
 * so every process that uses a pool must see the same directory.
 *
 * udev: removes and resumes take a udev cookie and wait on it. A new device becomes usable
 * at its resume, so a bare create (before its table is loaded) takes none. Where no udev
 * runs (VMs, containers; or DM_DISABLE_UDEV=1 in the environment at exec time) libdevmapper
 * creates and removes the /dev/mapper nodes itself.
 */

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

/* Where the per-pool lock files live (created 0700 on first use). */
#define THIN_POOL_LOCK_DIR "/run/flyio-image-manager"

/* Highest thin device id the kernel accepts (24 bits). */
#define THIN_POOL_DEV_ID_MAX 0xffffffu

/* Longest dm device name, without the terminating NUL (the kernel's DM_NAME_LEN - 1). */
#define THIN_POOL_NAME_MAX 127

/* Positive results for "nothing to do". */
enum {
        THIN_POOL_ALREADY = 1,  /* already in the wanted state: gone, or active as asked */
        THIN_POOL_DEFERRED = 2, /* removal deferred by the kernel until the last close */
};

/* What the pool accepts. Ordered by how bad it is. */
enum thin_pool_mode {
        THIN_POOL_MODE_RW,
        THIN_POOL_MODE_OUT_OF_DATA_SPACE, /* no data block can be allocated; metadata rw */
        THIN_POOL_MODE_RO,                /* metadata read-only: no messages accepted */
        THIN_POOL_MODE_FAIL,              /* all I/O fails; status carries no numbers */
};

enum thin_pool_discard {
        THIN_POOL_DISCARD_PASSDOWN,
        THIN_POOL_DISCARD_NO_PASSDOWN,
        THIN_POOL_DISCARD_IGNORE,
};

/*
 * The thin-pool target status, plus the data block size from its table and derived sizes.
 * Metadata blocks are always 4 KiB. In THIN_POOL_MODE_FAIL every number is 0.
 */
struct thin_pool_status {
        uint64_t transaction_id;
        uint64_t metadata_used_blocks;
        uint64_t metadata_total_blocks;
        uint64_t data_used_blocks;
        uint64_t data_total_blocks;
        uint64_t held_metadata_root; /* block of the held metadata snapshot; 0 when none */
        enum thin_pool_mode mode;
        enum thin_pool_discard discard;
        bool error_if_no_space;          /* false: I/O is queued while the pool is out of space */
        bool needs_check;                /* thin_check must run before the pool can be used rw */
        uint64_t metadata_low_watermark; /* blocks; 0 when the kernel does not report it */

        /* From the table. */
        uint64_t data_block_size; /* bytes */
        uint64_t low_water_mark;  /* data blocks */

        /* Derived. */
        uint64_t data_used_bytes;
        uint64_t data_total_bytes;
        uint64_t metadata_used_bytes;
        uint64_t metadata_total_bytes;
        double data_used_percent;
        double metadata_used_percent;
};

/* The pool's table: "<metadata dev> <data dev> <block size> <low water mark> [features]". */
struct thin_pool_table {
        dev_t metadata_dev;
        dev_t data_dev;
        uint64_t data_sectors; /* length of the pool device */
        uint32_t block_sectors;
        uint64_t low_water_mark; /* data blocks */
        bool skip_block_zeroing;
        bool ignore_discard;
        bool no_discard_passdown;
        bool read_only;
        bool error_if_no_space;
};

/* What pool-setup needs to create a pool device. */
struct thin_pool_params {
        const char *name;
        const char *uuid; /* dm uuid, NULL for none; marks who owns the pool */
        dev_t metadata_dev;
        dev_t data_dev;
        uint64_t data_sectors;   /* the whole data device, a multiple of block_sectors */
        uint32_t block_sectors;  /* 128 (64 KiB) .. 2097152 (1 GiB), a multiple of 128 */
        uint64_t low_water_mark; /* data blocks */
        bool skip_block_zeroing;
        bool error_if_no_space;
};

/* One dm device as the kernel sees it. */
struct thin_pool_device_info {
        bool exists;
        bool suspended;
        bool read_only;
        int32_t open_count;
        uint32_t major;
        uint32_t minor;
        uint64_t size_sectors;
        char target_type[16]; /* of the first target; "" when there is no table */
        unsigned target_count;
        char uuid[129];
        /* For a single "thin" target only (is_thin): */
        bool is_thin;
        uint32_t thin_dev_id;
        dev_t thin_pool_dev;
};

/* An active thin device on a pool. */
struct thin_pool_active_thin {
        uint32_t dev_id;
        uint64_t size_bytes;
        bool suspended;
        char name[THIN_POOL_NAME_MAX + 1];
};

/*
 * How hard thin_pool_deactivate() tries while the device is busy (open, mounted, held by
 * another dm device). The pause between attempts starts at delay_ms and doubles up to
 * max_delay_ms; the module lock is not held while waiting.
 */
struct thin_pool_remove_opts {
        unsigned attempts; /* remove ioctls in total, at least 1 */
        unsigned delay_ms;
        unsigned max_delay_ms;
        bool deferred; /* still busy after the last attempt: ask for a deferred remove */
};

/* 10 attempts over about 6.5 s: 100, 200, 400, 800, then 1000 ms pauses. */
#define THIN_POOL_REMOVE_OPTS_INIT                                                                 \
        {                                                                                          \
                .attempts = 10, .delay_ms = 100, .max_delay_ms = 1000, .deferred = false           \
        }

/*
 * Read the pool's status and table. -ENODEV when the pool does not exist, -EINVAL when the
 * device is not a thin-pool, -EBADMSG when the kernel's status line cannot be parsed.
 */
int thin_pool_status(const char *pool_name, struct thin_pool_status *ret_status);

/*
 * Refuse new work on a pool that is out of space or unhealthy. Reads the status (returned in
 * @ret_status when not NULL, also on the errors below) and returns 0 when data and metadata
 * usage are both below @max_used_percent and the pool is writable; -ENOSPC when a usage is at
 * or above it or the pool is out of data space; -EROFS when it is read-only or failed;
 * -EUCLEAN when its metadata needs a check.
 */
int thin_pool_check_space(const char *pool_name, double max_used_percent,
                          struct thin_pool_status *ret_status);

/* Read the pool's table. -ENODEV when the pool does not exist, -EINVAL when not a thin-pool. */
int thin_pool_get_table(const char *pool_name, struct thin_pool_table *ret_table);

/* Create and resume a thin-pool device. -EBUSY or -EEXIST when the name is taken. */
int thin_pool_create(const struct thin_pool_params *params);

/*
 * Send @msg to the pool's target (sector 0), e.g. "create_thin 7". The kernel's errno comes
 * back as is; a missing pool is -ENODEV.
 */
int thin_pool_message(const char *pool_name, const char *msg);

/* "set_transaction_id": -EINVAL when @old_id is not the pool's current transaction id. */
int thin_pool_set_transaction_id(const char *pool_name, uint64_t old_id, uint64_t new_id);

/* Create an empty thin device. -EEXIST when @dev_id is taken. */
int thin_pool_create_thin(const char *pool_name, uint32_t dev_id);

/*
 * Snapshot thin device @origin_id as @snap_id. The kernel requires an active origin to be
 * suspended meanwhile: when @origin_active_name is given, that device must map @origin_id on
 * this pool (else -EINVAL) and is suspended (with a flush and a filesystem freeze) around the
 * message; when it is NULL, every active device mapping @origin_id on this pool is found and
 * suspended. The whole sequence holds the pool's device lock, and the devices it suspends are
 * recorded first, so that what a process killed half-way leaves suspended is resumed later
 * (see thin_pool_resume_leftovers(); the next call does it first). The devices suspended
 * here are always resumed, also when the message failed; one that somebody else had
 * suspended is left alone. -EEXIST when @snap_id is taken, -ENODATA when @origin_id does not
 * exist. When a resume fails its error is returned, whatever happened to the message: the
 * device stays suspended and needs attention.
 */
int thin_pool_create_snap(const char *pool_name, uint32_t snap_id, uint32_t origin_id,
                          const char *origin_active_name);

/*
 * Delete thin device @dev_id and free its blocks. Returns 0 when deleted, THIN_POOL_ALREADY
 * when the pool has no such id (the kernel's ENODATA: a repeated delete), -EBUSY when the
 * device is still active.
 */
int thin_pool_delete(const char *pool_name, uint32_t dev_id);

/*
 * Activate thin device @dev_id as dm device @name of @size_bytes (a non-zero multiple of 512),
 * mapped as "<pool major:minor> <dev_id>". Returns 0 when created and THIN_POOL_ALREADY when
 * @name is already active with exactly this mapping. -EEXIST when @name exists with another
 * table, -ENODATA when the pool has no such id, -ENODEV when the pool does not exist.
 * Creation holds the pool's device lock, so a device named @name that has no table is the
 * leftover of a process killed between creating it and loading its table: it is removed and
 * made again. The caller must own @name (the stages only activate names their rows record).
 * @ret_path (may be NULL) receives "/dev/mapper/<name>", owned by the caller (free()).
 */
int thin_pool_activate(const char *pool_name, uint32_t dev_id, const char *name,
                       uint64_t size_bytes, char **ret_path);

/*
 * Remove dm device @name if it exists without a live table: the leftover of a process killed
 * inside thin_pool_activate() between creating the device and resuming it. One with an
 * inactive (loaded, never resumed) thin table holds its thin id open in the pool, so that
 * delete fails with -EBUSY until it is gone. Holds the pool's device lock, under which no live
 * process is half-way through making @name. The caller must own @name. Returns 1 when one was
 * removed, 0 when there was none (or it has a live table), or a negative errno.
 */
int thin_pool_remove_leftover(const char *pool_name, const char *name);

/*
 * Remove dm device @name (a thin device or a pool), retrying while it is busy (@opts NULL:
 * THIN_POOL_REMOVE_OPTS_INIT). Returns 0 when removed, THIN_POOL_ALREADY when there was no such
 * device, THIN_POOL_DEFERRED when opts->deferred asked for a deferred remove and the kernel
 * accepted it (the device goes away on its last close). When still busy: -EBUSY with a message
 * naming the device and who holds it (mount point, holder device, or "mounted or open").
 */
int thin_pool_deactivate(const char *name, const struct thin_pool_remove_opts *opts);

/*
 * Whether dm device @name can be removed now: 0 when it does not exist or nobody holds it
 * open, -EBUSY with a message saying who holds it (mount point, holder device, or "mounted or
 * open by a process") and its open count otherwise. An open that lasts only a moment (a
 * probe) is waited out, for up to about 0.75 s.
 */
int thin_pool_check_unused(const char *name);

/*
 * Resume the devices of @pool_name that a process killed inside thin_pool_create_snap() left
 * suspended, as recorded by that call (a device suspended by anybody else is left alone).
 * Reconciliation calls it; the next create_snap on the pool does it too. @names (may be NULL)
 * receives the names resumed, one per line. Returns how many were resumed.
 */
int thin_pool_resume_leftovers(const char *pool_name, char *names, size_t size);

/* Suspend (flushing, freezing a mounted filesystem) or resume @name. -ENODEV when missing. */
int thin_pool_suspend(const char *name);
int thin_pool_resume(const char *name);

/* Describe dm device @name. A missing device is not an error: ret_info->exists is false. */
int thin_pool_device_info(const char *name, struct thin_pool_device_info *ret_info);

/*
 * The active thin devices on the pool, sorted by dev id (one id may be active under several
 * names). The kernel has no ioctl that lists a pool's thin ids: inactive ids are visible only
 * in the pool metadata, see thin_pool_metadata_thin_ids(). @ret_devs is owned by the caller
 * (free()); it is NULL when @ret_count is 0.
 */
int thin_pool_list_thin_ids(const char *pool_name, struct thin_pool_active_thin **ret_devs,
                            size_t *ret_count);

/*
 * Every thin id in the pool's metadata, active or not, sorted ascending: reserves a metadata
 * snapshot, runs `thin_dump -m --skip-mappings` on the metadata device and releases the
 * snapshot (also on error). This is the only way to see inactive ids, which reconciliation
 * needs. It runs a child process (read-only): not for hot paths. The kernel holds one
 * metadata snapshot per pool, so the whole sequence holds the pool's metadata lock (threads
 * and processes); a snapshot found held under that lock was left by a crashed caller and is
 * released first. @ret_ids is owned by the caller (free()).
 */
int thin_pool_metadata_thin_ids(const char *pool_name, uint32_t **ret_ids, size_t *ret_count);

/* "/dev/<DEVNAME>" of block device @dev, from its sysfs uevent file. 0 or a negative errno. */
int thin_pool_devnode(dev_t dev, char *buf, size_t size);

/* Whether @name is usable as a dm device name: 1..127 bytes, no '/', not "." or "..". */
bool thin_pool_name_is_valid(const char *name);

#ifdef FIM_UNIT_TEST
/* Parsers, exposed for the unit tests. Each returns 0 or -EBADMSG. */
int thin_pool_parse_status(const char *params, struct thin_pool_status *ret_status);
int thin_pool_parse_table(const char *params, struct thin_pool_table *ret_table);
int thin_pool_parse_thin_table(const char *params, dev_t *ret_pool_dev, uint32_t *ret_dev_id);
int thin_pool_parse_dump_ids(const char *xml, uint32_t **ret_ids, size_t *ret_count);
#endif
