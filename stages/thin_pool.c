#include "stages/thin_pool.h"

/*
 * Design
 *
 * Serialisation. libdevmapper keeps process-wide state and guards none of it: the control fd
 * it opens on first use, the queue of /dev/mapper node operations that dm_udev_wait()
 * applies, the count of devices it has suspended, the ioctl buffer size it has learnt, the
 * name-mangling mode and the log callback. Two threads inside dm_task_run() at once race on
 * all of these. So every call into the library happens under thin_pool_lock, and an
 * operation whose steps must not interleave with another thread's (suspend, create_snap,
 * resume) holds it across all of them. It is released while we sleep between remove retries
 * and while thin_dump runs, so one slow caller does not stall every other job for seconds.
 *
 * Other processes. Several workers (and the CLI) share a pool on one host, and a mutex does
 * not reach them. Three sequences must not interleave across processes, and each holds a
 * lock file of its pool (flock, dropped by the kernel when a holder dies): creating a device
 * (create, load, resume), create_snap with the suspend and resume around it, and the
 * metadata snapshot around thin_dump. The file lock comes first, then the mutex. Holding the
 * lock also makes leftovers recognisable: a device of ours without a table, a suspended
 * origin, or a held metadata snapshot seen under it was left by a process killed half-way,
 * because a live one would still hold the lock.
 *
 * Errors. The library reports failure as a 0 return, the kernel's errno through
 * dm_task_get_errno() and text through its log callback. thin_pool_run() is the one place
 * that turns this into a negative errno plus a message; callers add the device name with
 * err_wrap() or reword the well-known cases (ENXIO: no such device, ENODATA: no such thin
 * id, EEXIST: id taken).
 *
 * Logging. Our log callback keeps the first error the library reports during a call (the
 * ioctl failure; what follows is usually a consequence, such as a revert) and forwards every
 * line at debug level only: the worker decides what deserves a warning.
 *
 * udev. Creates, removes and resumes take a cookie and wait on it. With udev running we
 * trust it to manage /dev/mapper (DM_UDEV_DISABLE_LIBRARY_FALLBACK, as LVM does); without
 * udev the library does it itself when dm_udev_wait() flushes its node queue, which is why
 * the wait happens after failures too.
 */

#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <pthread.h>
#include <spawn.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/wait.h>
#include <unistd.h>

#include <libdevmapper.h>

#include "common/err.h"
#include "common/log.h"
#include "common/util.h"

#define THIN_POOL_SECTOR 512u
#define THIN_POOL_METADATA_BLOCK 4096u
#define THIN_POOL_DM_TEXT_MAX 512
#define THIN_POOL_TOKENS_MAX 24
#define THIN_POOL_MIN_BLOCK_SECTORS 128u
#define THIN_POOL_MAX_BLOCK_SECTORS 2097152u
/* thin_dump prints about 150 bytes per device with --skip-mappings; 2^24 devices fit. */
#define THIN_POOL_DUMP_MAX (UINT64_C(4) << 30)

static pthread_mutex_t thin_pool_lock = PTHREAD_MUTEX_INITIALIZER;
/* One metadata snapshot per pool: one thin_dump reader at a time (the lock file: per host). */
static pthread_mutex_t thin_pool_metadata_snap_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_once_t thin_pool_log_once = PTHREAD_ONCE_INIT;
/* First error text libdevmapper logged during the current call on this thread. */
static _Thread_local char thin_pool_dm_error[THIN_POOL_DM_TEXT_MAX];

struct thin_pool_tokens {
        char buf[512];
        char *tok[THIN_POOL_TOKENS_MAX];
        size_t count;
};

static void thin_pool_dm_log(int level, const char *file, int line, int dm_errno_or_class,
                             const char *fmt, ...) __attribute__((format(printf, 5, 6)));

static void thin_pool_dm_log(int level, const char *file, int line, int dm_errno_or_class,
                             const char *fmt, ...)
{
        char text[THIN_POOL_DM_TEXT_MAX];
        /* The low bits are the syslog-like level; higher bits are library flags. */
        int severity = level & 0x0f;
        bool is_error = severity <= 3;
        va_list ap;

        if (!is_error && !log_enabled(LOG_LEVEL_DEBUG))
                return;
        va_start(ap, fmt);
        (void)vsnprintf(text, sizeof(text), fmt, ap);
        va_end(ap);
        if (is_error && thin_pool_dm_error[0] == '\0')
                (void)snprintf(thin_pool_dm_error, sizeof(thin_pool_dm_error), "%s", text);
        if (!log_enabled(LOG_LEVEL_DEBUG))
                return;
        log_debug("libdevmapper", "dm_level=%d dm_errno=%d src=%s:%d text=%s", severity,
                  dm_errno_or_class, file, line, log_quote(text));
}

static void thin_pool_log_init(void)
{
        dm_log_with_errno_init(thin_pool_dm_log);
}

static void thin_pool_enter(void)
{
        int e = pthread_once(&thin_pool_log_once, thin_pool_log_init);

        FIM_ASSERT(e == 0);
        e = pthread_mutex_lock(&thin_pool_lock);
        FIM_ASSERT(e == 0);
}

static void thin_pool_leave(void)
{
        int e = pthread_mutex_unlock(&thin_pool_lock);

        FIM_ASSERT(e == 0);
}

/*
 * Take the pool's lock file for @what ("dev", "metadata"), blocking until other holders let
 * go. flock() locks belong to the open file, so threads of this process that open the file
 * themselves exclude each other too. Returns the fd to pass to thin_pool_funlock().
 */
static int thin_pool_flock(const char *pool_name, const char *what, int *ret_fd)
{
        char path[PATH_MAX];
        int fd, r;

        if (mkdir(THIN_POOL_LOCK_DIR, 0700) < 0 && errno != EEXIST)
                return err_set(-errno, "failed to create '%s': %s", THIN_POOL_LOCK_DIR,
                               strerror(errno));
        r = util_snprintf(path, sizeof(path), "%s/pool-%s.%s.lock", THIN_POOL_LOCK_DIR, pool_name,
                          what);
        if (r < 0)
                return err_set(r, "lock file name for pool '%s' is too long", pool_name);
        fd = open(path, O_RDWR | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0600);
        if (fd < 0)
                return err_set(-errno, "failed to open lock file '%s': %s", path, strerror(errno));
        while (flock(fd, LOCK_EX) < 0) {
                if (errno == EINTR)
                        continue;
                r = -errno;
                (void)close(fd);
                return err_set(r, "failed to lock '%s': %s", path, strerror(-r));
        }
        *ret_fd = fd;
        return 0;
}

static void thin_pool_funlock(int fd)
{
        if (fd >= 0)
                (void)close(fd);
}

bool thin_pool_name_is_valid(const char *name)
{
        size_t len = strnlen(name, THIN_POOL_NAME_MAX + 1);

        return len > 0 && len <= THIN_POOL_NAME_MAX && !strchr(name, '/') &&
               strcmp(name, ".") != 0 && strcmp(name, "..") != 0;
}

static int thin_pool_check_name(const char *name)
{
        if (!thin_pool_name_is_valid(name))
                return err_set(-EINVAL, "invalid device-mapper name '%s'", name);
        return 0;
}

/* ---- libdevmapper plumbing (callers hold thin_pool_lock) ---- */

/*
 * Whether the kernel has device-mapper. Without it libdevmapper would still mknod
 * /dev/mapper/control and only then fail; we say so first and leave /dev alone. Where sysfs
 * is not mounted we cannot tell and let the library try. Once seen, it stays (under the lock).
 */
static bool thin_pool_driver_loaded(void)
{
        static bool seen;

        if (!seen)
                seen = access("/sys/class/misc/device-mapper", F_OK) == 0 ||
                       access("/sys/class/misc", F_OK) != 0;
        return seen;
}

static struct dm_task *thin_pool_task(int type, const char *name)
{
        struct dm_task *dmt;

        thin_pool_dm_error[0] = '\0';
        if (!thin_pool_driver_loaded()) {
                (void)snprintf(thin_pool_dm_error, sizeof(thin_pool_dm_error),
                               "the kernel has no device-mapper driver (modprobe dm-thin-pool)");
                return NULL;
        }
        dmt = dm_task_create(type);

        if (!dmt)
                return NULL;
        if (name && !dm_task_set_name(dmt, name)) {
                dm_task_destroy(dmt);
                return NULL;
        }
        return dmt;
}

/* dm_task_create() and friends fail on a missing driver as well as on a lack of memory. */
static int thin_pool_task_failed(const char *name)
{
        if (thin_pool_dm_error[0] == '\0')
                return err_set(-ENOMEM, "failed to prepare a device-mapper task for '%s'", name);
        /* The misc device exists only while the driver is loaded. */
        return err_set(access("/sys/class/misc/device-mapper", F_OK) == 0 ? -EIO : -ENODEV,
                       "failed to prepare a device-mapper task for '%s': %s", name,
                       thin_pool_dm_error);
}

/*
 * Run @dmt. On failure return the kernel's negative errno (or -EIO when the library failed
 * before or after the ioctl) and set the message to the bare cause, for the caller to wrap.
 */
static int thin_pool_run(struct dm_task *dmt)
{
        int e;

        thin_pool_dm_error[0] = '\0';
        if (dm_task_run(dmt))
                return 0;
        e = dm_task_get_errno(dmt);
        if (e > 0)
                return err_set(-e, "%s", strerror(e));
        return err_set(-EIO, "%s",
                       thin_pool_dm_error[0] ? thin_pool_dm_error : "libdevmapper call failed");
}

/* thin_pool_run() for tasks that create, remove or resume a device: with a udev cookie. */
static int thin_pool_run_udev(struct dm_task *dmt)
{
        uint16_t flags = dm_udev_get_sync_support() ? DM_UDEV_DISABLE_LIBRARY_FALLBACK : 0;
        uint32_t cookie = 0;
        int r;

        if (!dm_task_set_cookie(dmt, &cookie, flags))
                return err_set(-EIO, "failed to set up udev synchronisation");
        r = thin_pool_run(dmt);
        /* Also after a failure: the wait releases the cookie and applies queued node ops. */
        if (!dm_udev_wait(cookie))
                log_debug("udev wait failed", "cookie=%" PRIu32, cookie);
        return r;
}

/* ---- parsers ---- */

static int thin_pool_tokenize(const char *s, struct thin_pool_tokens *t)
{
        size_t len = strlen(s);
        char *p = t->buf;

        if (len >= sizeof(t->buf))
                return -EBADMSG;
        memcpy(t->buf, s, len + 1);
        t->count = 0;
        for (;;) {
                while (isspace((unsigned char)*p))
                        p++;
                if (*p == '\0')
                        return 0;
                if (t->count == THIN_POOL_TOKENS_MAX)
                        return -EBADMSG;
                t->tok[t->count++] = p;
                while (*p != '\0' && !isspace((unsigned char)*p))
                        p++;
                if (*p != '\0')
                        *p++ = '\0';
        }
}

/* "used/total" */
static int thin_pool_parse_ratio(char *s, uint64_t *ret_used, uint64_t *ret_total)
{
        char *slash = strchr(s, '/');
        uint64_t used, total;

        if (!slash)
                return -EBADMSG;
        *slash = '\0';
        if (util_parse_u64(s, &used) < 0 || util_parse_u64(slash + 1, &total) < 0)
                return -EBADMSG;
        if (used > total)
                return -EBADMSG;
        *ret_used = used;
        *ret_total = total;
        return 0;
}

/* "major:minor" */
static int thin_pool_parse_dev(const char *s, dev_t *ret_dev)
{
        unsigned long maj, min;
        char *end;

        if (!isdigit((unsigned char)s[0]))
                return -EBADMSG;
        errno = 0;
        maj = strtoul(s, &end, 10);
        if (errno != 0 || *end != ':' || !isdigit((unsigned char)end[1]) || maj > UINT32_MAX)
                return -EBADMSG;
        min = strtoul(end + 1, &end, 10);
        if (errno != 0 || *end != '\0' || min > UINT32_MAX)
                return -EBADMSG;
        *ret_dev = makedev((unsigned)maj, (unsigned)min);
        return 0;
}

/* Index of @word in @words (NULL-terminated), or -1. */
static int thin_pool_word(const char *word, const char *const *words)
{
        for (int i = 0; words[i]; i++) {
                if (strcmp(word, words[i]) == 0)
                        return i;
        }
        return -1;
}

/*
 * "<transaction id> <used>/<total metadata blocks> <used>/<total data blocks> <held root>
 *  ro|rw|out_of_data_space [no_]discard_passdown|ignore_discard
 *  error|queue_if_no_space needs_check|- [metadata low watermark]", or "Fail" / "Error".
 */
FIM_TESTABLE int thin_pool_parse_status(const char *params, struct thin_pool_status *ret_status)
{
        static const char *const modes[] = {"rw", "out_of_data_space", "ro", NULL};
        static const char *const discards[] = {"discard_passdown", "no_discard_passdown",
                                               "ignore_discard", NULL};
        static const char *const spaces[] = {"queue_if_no_space", "error_if_no_space", NULL};
        static const char *const checks[] = {"-", "needs_check", NULL};
        struct thin_pool_status s = {0};
        struct thin_pool_tokens t;
        int mode, discard, space, check, r;

        if (thin_pool_tokenize(params, &t) < 0 || t.count == 0)
                return -EBADMSG;
        if (strcmp(t.tok[0], "Fail") == 0 || strcmp(t.tok[0], "Error") == 0) {
                s.mode = THIN_POOL_MODE_FAIL;
                *ret_status = s;
                return 0;
        }
        if (t.count < 8 || util_parse_u64(t.tok[0], &s.transaction_id) < 0)
                return -EBADMSG;
        r = thin_pool_parse_ratio(t.tok[1], &s.metadata_used_blocks, &s.metadata_total_blocks);
        if (r == 0)
                r = thin_pool_parse_ratio(t.tok[2], &s.data_used_blocks, &s.data_total_blocks);
        if (r < 0)
                return -EBADMSG;
        if (strcmp(t.tok[3], "-") != 0 && util_parse_u64(t.tok[3], &s.held_metadata_root) < 0)
                return -EBADMSG;

        mode = thin_pool_word(t.tok[4], modes);
        discard = thin_pool_word(t.tok[5], discards);
        space = thin_pool_word(t.tok[6], spaces);
        check = thin_pool_word(t.tok[7], checks);
        if (mode < 0 || discard < 0 || space < 0 || check < 0)
                return -EBADMSG;
        if (t.count > 8 && util_parse_u64(t.tok[8], &s.metadata_low_watermark) < 0)
                return -EBADMSG;
        s.mode = (enum thin_pool_mode)mode;
        s.discard = (enum thin_pool_discard)discard;
        s.error_if_no_space = space == 1;
        s.needs_check = check == 1;
        *ret_status = s;
        return 0;
}

/* "<metadata dev> <data dev> <block sectors> <low water mark> [<#features> <feature>...]" */
FIM_TESTABLE int thin_pool_parse_table(const char *params, struct thin_pool_table *ret_table)
{
        struct thin_pool_table tb = {0};
        struct thin_pool_tokens t;
        uint64_t block_sectors, nfeatures = 0;

        if (thin_pool_tokenize(params, &t) < 0 || t.count < 4)
                return -EBADMSG;
        if (thin_pool_parse_dev(t.tok[0], &tb.metadata_dev) < 0 ||
            thin_pool_parse_dev(t.tok[1], &tb.data_dev) < 0 ||
            util_parse_u64(t.tok[2], &block_sectors) < 0 || block_sectors == 0 ||
            block_sectors > UINT32_MAX || util_parse_u64(t.tok[3], &tb.low_water_mark) < 0)
                return -EBADMSG;
        tb.block_sectors = (uint32_t)block_sectors;
        if (t.count > 4 && util_parse_u64(t.tok[4], &nfeatures) < 0)
                return -EBADMSG;
        if (t.count != (t.count > 4 ? 5 + nfeatures : 4))
                return -EBADMSG;
        for (size_t i = 5; i < t.count; i++) {
                const char *f = t.tok[i];

                tb.skip_block_zeroing |= strcmp(f, "skip_block_zeroing") == 0;
                tb.ignore_discard |= strcmp(f, "ignore_discard") == 0;
                tb.no_discard_passdown |= strcmp(f, "no_discard_passdown") == 0;
                tb.read_only |= strcmp(f, "read_only") == 0;
                tb.error_if_no_space |= strcmp(f, "error_if_no_space") == 0;
        }
        *ret_table = tb;
        return 0;
}

/* "<pool dev> <dev id> [<external origin dev>]" */
FIM_TESTABLE int thin_pool_parse_thin_table(const char *params, dev_t *ret_pool_dev,
                                            uint32_t *ret_dev_id)
{
        struct thin_pool_tokens t;
        uint64_t id;
        dev_t pool_dev;

        if (thin_pool_tokenize(params, &t) < 0 || t.count < 2 || t.count > 3)
                return -EBADMSG;
        if (thin_pool_parse_dev(t.tok[0], &pool_dev) < 0 || util_parse_u64(t.tok[1], &id) < 0 ||
            id > THIN_POOL_DEV_ID_MAX)
                return -EBADMSG;
        *ret_pool_dev = pool_dev;
        *ret_dev_id = (uint32_t)id;
        return 0;
}

static int thin_pool_cmp_u32(const void *a, const void *b)
{
        uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;

        return (x > y) - (x < y);
}

/* The dev_id="N" attribute of every <device> element of thin_dump's XML, sorted, unique. */
FIM_TESTABLE int thin_pool_parse_dump_ids(const char *xml, uint32_t **ret_ids, size_t *ret_count)
{
        static const char tag[] = "<device dev_id=\"";
        uint32_t *ids = NULL;
        size_t n = 0, cap = 0, out = 0;
        const char *p = xml;

        if (!strstr(xml, "<superblock"))
                return -EBADMSG;
        while ((p = strstr(p, tag))) {
                uint64_t id = 0;

                p += sizeof(tag) - 1;
                if (!isdigit((unsigned char)*p))
                        goto bad;
                while (isdigit((unsigned char)*p) && id <= THIN_POOL_DEV_ID_MAX)
                        id = id * 10 + (uint64_t)(*p++ - '0');
                if (*p != '"' || id > THIN_POOL_DEV_ID_MAX)
                        goto bad;
                if (n == cap) {
                        size_t ncap = cap ? 2 * cap : 64;
                        uint32_t *grown = realloc(ids, ncap * sizeof(*ids));

                        if (!grown) {
                                free(ids);
                                return -ENOMEM;
                        }
                        ids = grown;
                        cap = ncap;
                }
                ids[n++] = (uint32_t)id;
        }
        if (n > 0)
                qsort(ids, n, sizeof(*ids), thin_pool_cmp_u32);
        for (size_t i = 0; i < n; i++) {
                if (out == 0 || ids[out - 1] != ids[i])
                        ids[out++] = ids[i];
        }
        *ret_ids = ids;
        *ret_count = out;
        return 0;
bad:
        free(ids);
        return -EBADMSG;
}

/* ---- queries (callers hold thin_pool_lock) ---- */

/*
 * Run a DM_DEVICE_TABLE or DM_DEVICE_STATUS task on @name and hand it back for reading.
 * -ENODEV "<noun> '<name>' not found" when the device does not exist.
 */
static int thin_pool_query_locked(int type, const char *noun, const char *name,
                                  struct dm_task **ret_dmt, struct dm_info *ret_info)
{
        struct dm_task *dmt = thin_pool_task(type, name);
        struct dm_info info;
        int r;

        if (!dmt)
                return thin_pool_task_failed(name);
        r = thin_pool_run(dmt);
        if (r == -ENXIO)
                r = err_set(-ENODEV, "%s '%s' not found", noun, name);
        else if (r < 0)
                r = err_wrap(r, "failed to query %s '%s'", noun, name);
        else if (!dm_task_get_info(dmt, &info))
                r = err_set(-EIO, "failed to read the info of %s '%s'", noun, name);
        else if (!info.exists)
                r = err_set(-ENODEV, "%s '%s' not found", noun, name);
        if (r < 0) {
                dm_task_destroy(dmt);
                return r;
        }
        *ret_dmt = dmt;
        *ret_info = info;
        return 0;
}

/* Count the targets of @dmt; the first one's type, params (borrowed) and the total length. */
static unsigned thin_pool_targets(struct dm_task *dmt, const char **ret_type,
                                  const char **ret_params, uint64_t *ret_length)
{
        uint64_t start, length, total = 0;
        char *type = NULL, *params = NULL;
        void *next = NULL;
        unsigned n = 0;

        *ret_type = "";
        *ret_params = "";
        do {
                next = dm_get_next_target(dmt, next, &start, &length, &type, &params);
                if (!type)
                        break;
                if (n == 0) {
                        *ret_type = type;
                        *ret_params = params ? params : "";
                }
                total += length;
                n++;
        } while (next);
        *ret_length = total;
        return n;
}

/* The single thin-pool target of @dmt, or -EINVAL. */
static int thin_pool_pool_target(struct dm_task *dmt, const char *pool_name,
                                 const char **ret_params, uint64_t *ret_length)
{
        const char *type;

        if (thin_pool_targets(dmt, &type, ret_params, ret_length) != 1 ||
            strcmp(type, "thin-pool") != 0)
                return err_set(-EINVAL, "device '%s' is not a thin pool (target '%s')", pool_name,
                               type);
        return 0;
}

static int thin_pool_table_locked(const char *pool_name, struct thin_pool_table *ret_table)
{
        struct thin_pool_table tb;
        struct dm_task *dmt = NULL;
        struct dm_info info;
        const char *params;
        uint64_t length;
        int r;

        r = thin_pool_query_locked(DM_DEVICE_TABLE, "pool", pool_name, &dmt, &info);
        if (r < 0)
                return r;
        r = thin_pool_pool_target(dmt, pool_name, &params, &length);
        if (r == 0 && thin_pool_parse_table(params, &tb) < 0)
                r = err_set(-EBADMSG, "failed to parse the table of pool '%s': '%s'", pool_name,
                            params);
        dm_task_destroy(dmt);
        if (r < 0)
                return r;
        tb.data_sectors = length;
        *ret_table = tb;
        return 0;
}

static int thin_pool_device_info_locked(const char *name, struct thin_pool_device_info *ret_info)
{
        struct thin_pool_device_info d = {0};
        struct dm_task *dmt = thin_pool_task(DM_DEVICE_TABLE, name);
        struct dm_info info;
        const char *type, *params, *uuid;
        int r;

        if (!dmt)
                return thin_pool_task_failed(name);
        r = thin_pool_run(dmt);
        if (r == -ENXIO) {
                err_clear();
                goto done;
        }
        if (r < 0) {
                r = err_wrap(r, "failed to read the table of device '%s'", name);
                goto out;
        }
        if (!dm_task_get_info(dmt, &info)) {
                r = err_set(-EIO, "failed to read the info of device '%s'", name);
                goto out;
        }
        if (!info.exists)
                goto done;
        d.exists = true;
        d.suspended = info.suspended != 0;
        d.read_only = info.read_only != 0;
        d.open_count = info.open_count;
        d.major = info.major;
        d.minor = info.minor;
        d.target_count = thin_pool_targets(dmt, &type, &params, &d.size_sectors);
        (void)snprintf(d.target_type, sizeof(d.target_type), "%s", type);
        uuid = dm_task_get_uuid(dmt);
        (void)snprintf(d.uuid, sizeof(d.uuid), "%s", uuid ? uuid : "");
        d.is_thin = d.target_count == 1 && strcmp(type, "thin") == 0 &&
                    thin_pool_parse_thin_table(params, &d.thin_pool_dev, &d.thin_dev_id) == 0;
done:
        *ret_info = d;
        r = 0;
out:
        dm_task_destroy(dmt);
        return r;
}

/* The pool's device number, for thin tables and comparisons. */
static int thin_pool_pool_dev_locked(const char *pool_name, dev_t *ret_dev)
{
        struct thin_pool_device_info d;
        int r = thin_pool_device_info_locked(pool_name, &d);

        if (r < 0)
                return r;
        if (!d.exists)
                return err_set(-ENODEV, "pool '%s' not found", pool_name);
        if (d.target_count != 1 || strcmp(d.target_type, "thin-pool") != 0)
                return err_set(-EINVAL, "device '%s' is not a thin pool (target '%s')", pool_name,
                               d.target_type);
        *ret_dev = makedev(d.major, d.minor);
        return 0;
}

static int thin_pool_cmp_active(const void *a, const void *b)
{
        const struct thin_pool_active_thin *x = a, *y = b;

        if (x->dev_id != y->dev_id)
                return (x->dev_id > y->dev_id) - (x->dev_id < y->dev_id);
        return strcmp(x->name, y->name);
}

static int thin_pool_list_locked(dev_t pool_dev, struct thin_pool_active_thin **ret_devs,
                                 size_t *ret_count)
{
        struct thin_pool_active_thin *devs = NULL;
        struct dm_task *dmt = thin_pool_task(DM_DEVICE_LIST, NULL);
        struct dm_names *names;
        size_t n = 0, cap = 0;
        unsigned next = 0;
        int r;

        if (!dmt)
                return thin_pool_task_failed("(list)");
        r = thin_pool_run(dmt);
        if (r < 0) {
                r = err_wrap(r, "failed to list device-mapper devices");
                goto out;
        }
        names = dm_task_get_names(dmt);
        if (!names || names->dev == 0)
                goto done;
        do {
                struct thin_pool_device_info d;

                names = (struct dm_names *)((char *)names + next);
                next = names->next;
                r = thin_pool_device_info_locked(names->name, &d);
                if (r < 0)
                        goto out;
                if (!d.exists || !d.is_thin || d.thin_pool_dev != pool_dev)
                        continue;
                if (n == cap) {
                        size_t ncap = cap ? 2 * cap : 16;
                        struct thin_pool_active_thin *grown = realloc(devs, ncap * sizeof(*devs));

                        if (!grown) {
                                r = err_set(-ENOMEM, "out of memory listing thin devices");
                                goto out;
                        }
                        devs = grown;
                        cap = ncap;
                }
                devs[n].dev_id = d.thin_dev_id;
                devs[n].size_bytes = d.size_sectors * THIN_POOL_SECTOR;
                devs[n].suspended = d.suspended;
                (void)snprintf(devs[n].name, sizeof(devs[n].name), "%s", names->name);
                n++;
        } while (next);
done:
        if (n > 0)
                qsort(devs, n, sizeof(*devs), thin_pool_cmp_active);
        *ret_devs = n > 0 ? steal_ptr(devs) : NULL;
        *ret_count = n;
        r = 0;
out:
        free(devs);
        dm_task_destroy(dmt);
        return r;
}

/* ---- messages ---- */

static int thin_pool_message_locked(const char *pool_name, const char *msg)
{
        struct dm_task *dmt = thin_pool_task(DM_DEVICE_TARGET_MSG, pool_name);
        int r;

        if (!dmt)
                return thin_pool_task_failed(pool_name);
        if (!dm_task_set_sector(dmt, 0) || !dm_task_set_message(dmt, msg)) {
                dm_task_destroy(dmt);
                return thin_pool_task_failed(pool_name);
        }
        r = thin_pool_run(dmt);
        dm_task_destroy(dmt);
        if (r == -ENXIO)
                return err_set(-ENODEV, "pool '%s' not found", pool_name);
        if (r < 0)
                return err_wrap(r, "failed to send '%s' to pool '%s'", msg, pool_name);
        return 0;
}

int thin_pool_message(const char *pool_name, const char *msg)
{
        int r = thin_pool_check_name(pool_name);

        if (r < 0)
                return r;
        thin_pool_enter();
        r = thin_pool_message_locked(pool_name, msg);
        thin_pool_leave();
        return r;
}

static int thin_pool_check_id(const char *pool_name, uint32_t dev_id)
{
        int r = thin_pool_check_name(pool_name);

        if (r < 0)
                return r;
        if (dev_id > THIN_POOL_DEV_ID_MAX)
                return err_set(-EINVAL, "thin device id %" PRIu32 " is out of range (max %u)",
                               dev_id, THIN_POOL_DEV_ID_MAX);
        return 0;
}

int thin_pool_set_transaction_id(const char *pool_name, uint64_t old_id, uint64_t new_id)
{
        char msg[64];
        int r = thin_pool_check_name(pool_name);

        if (r < 0)
                return r;
        (void)snprintf(msg, sizeof(msg), "set_transaction_id %" PRIu64 " %" PRIu64, old_id, new_id);
        r = thin_pool_message(pool_name, msg);
        if (r == -EINVAL)
                return err_set(r,
                               "failed to set the transaction id of pool '%s': it is not %" PRIu64,
                               pool_name, old_id);
        return r;
}

int thin_pool_create_thin(const char *pool_name, uint32_t dev_id)
{
        char msg[32];
        int r = thin_pool_check_id(pool_name, dev_id);

        if (r < 0)
                return r;
        (void)snprintf(msg, sizeof(msg), "create_thin %" PRIu32, dev_id);
        r = thin_pool_message(pool_name, msg);
        if (r == -EEXIST)
                return err_set(r, "thin device id %" PRIu32 " already exists in pool '%s'", dev_id,
                               pool_name);
        return r;
}

int thin_pool_delete(const char *pool_name, uint32_t dev_id)
{
        char msg[32];
        int r = thin_pool_check_id(pool_name, dev_id);

        if (r < 0)
                return r;
        (void)snprintf(msg, sizeof(msg), "delete %" PRIu32, dev_id);
        r = thin_pool_message(pool_name, msg);
        if (r == -ENODATA) {
                err_clear();
                return THIN_POOL_ALREADY;
        }
        if (r == -EBUSY)
                return err_set(r,
                               "failed to delete thin device id %" PRIu32
                               " of pool '%s': it is active; deactivate it first",
                               dev_id, pool_name);
        return r;
}

/* ---- suspend / resume ---- */

static int thin_pool_suspend_locked(const char *name)
{
        struct dm_task *dmt = thin_pool_task(DM_DEVICE_SUSPEND, name);
        int r;

        if (!dmt)
                return thin_pool_task_failed(name);
        /* Defaults on purpose: flush queued I/O and freeze a mounted filesystem. */
        r = thin_pool_run(dmt);
        dm_task_destroy(dmt);
        if (r == -ENXIO)
                return err_set(-ENODEV, "device '%s' not found", name);
        if (r < 0)
                return err_wrap(r, "failed to suspend device '%s'", name);
        return 0;
}

static int thin_pool_resume_locked(const char *name)
{
        struct dm_task *dmt = thin_pool_task(DM_DEVICE_RESUME, name);
        int r;

        if (!dmt)
                return thin_pool_task_failed(name);
        r = thin_pool_run_udev(dmt);
        dm_task_destroy(dmt);
        if (r == -ENXIO)
                return err_set(-ENODEV, "device '%s' not found", name);
        if (r < 0)
                return err_wrap(r, "failed to resume device '%s'", name);
        return 0;
}

int thin_pool_suspend(const char *name)
{
        int r = thin_pool_check_name(name);

        if (r < 0)
                return r;
        thin_pool_enter();
        r = thin_pool_suspend_locked(name);
        thin_pool_leave();
        return r;
}

int thin_pool_resume(const char *name)
{
        int r = thin_pool_check_name(name);

        if (r < 0)
                return r;
        thin_pool_enter();
        r = thin_pool_resume_locked(name);
        thin_pool_leave();
        return r;
}

/* ---- snapshots ---- */

/*
 * The active devices that map @origin_id on @pool_dev, each with whether it is suspended
 * already (by somebody else: create_snap leaves those alone). With @named, that one device,
 * which must map the origin.
 */
static int thin_pool_origin_users_locked(const char *pool_name, dev_t pool_dev, uint32_t origin_id,
                                         const char *named, struct thin_pool_active_thin **ret_devs,
                                         size_t *ret_count)
{
        struct thin_pool_active_thin *devs = NULL;
        struct thin_pool_device_info d;
        size_t n = 0, kept = 0;
        int r;

        if (!named) {
                r = thin_pool_list_locked(pool_dev, &devs, &n);
                if (r < 0)
                        return r;
                for (size_t i = 0; i < n; i++) {
                        if (devs[i].dev_id == origin_id)
                                devs[kept++] = devs[i];
                }
                n = kept;
        } else {
                r = thin_pool_device_info_locked(named, &d);
                if (r < 0)
                        return r;
                if (!d.exists || !d.is_thin || d.thin_pool_dev != pool_dev ||
                    d.thin_dev_id != origin_id)
                        return err_set(-EINVAL,
                                       "device '%s' is not an active thin device of id %" PRIu32
                                       " on pool '%s'",
                                       named, origin_id, pool_name);
                devs = calloc(1, sizeof(*devs));
                if (!devs)
                        return err_set(-ENOMEM, "out of memory");
                devs[0].dev_id = origin_id;
                devs[0].suspended = d.suspended;
                (void)snprintf(devs[0].name, sizeof(devs[0].name), "%s", named);
                n = 1;
        }
        *ret_devs = devs;
        *ret_count = n;
        return 0;
}

/*
 * The devices create_snap suspends are written to a file next to the pool's lock before it
 * suspends them, and the file is removed once they are all resumed. Found while holding the
 * lock, the file names what a process killed in between left suspended; a device suspended
 * by somebody else is in no such file and is left alone.
 */
static int thin_pool_marker_path(const char *pool_name, char *buf, size_t size)
{
        int r = util_snprintf(buf, size, "%s/pool-%s.suspended", THIN_POOL_LOCK_DIR, pool_name);

        return r < 0 ? err_set(r, "marker file name for pool '%s' is too long", pool_name) : 0;
}

static int thin_pool_mark_suspending(const char *pool_name,
                                     const struct thin_pool_active_thin *users, size_t n)
{
        char path[PATH_MAX], *text = NULL;
        size_t len = 0, todo = 0;
        FILE *f;
        int fd, r;

        for (size_t i = 0; i < n; i++)
                todo += !users[i].suspended;
        if (todo == 0)
                return 0;
        r = thin_pool_marker_path(pool_name, path, sizeof(path));
        if (r < 0)
                return r;
        f = open_memstream(&text, &len);
        if (!f)
                return err_set(-ENOMEM, "out of memory");
        for (size_t i = 0; i < n; i++) {
                if (!users[i].suspended)
                        fprintf(f, "%s\n", users[i].name);
        }
        if (fclose(f) != 0) {
                free(text);
                return err_set(-ENOMEM, "out of memory");
        }
        fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, 0600);
        if (fd < 0)
                r = err_set(-errno, "failed to create '%s': %s", path, strerror(errno));
        else if (write(fd, text, len) != (ssize_t)len)
                r = err_set(-EIO, "failed to write '%s'", path);
        if (fd >= 0)
                (void)close(fd);
        free(text);
        return r;
}

static void thin_pool_unmark(const char *pool_name)
{
        char path[PATH_MAX];

        if (thin_pool_marker_path(pool_name, path, sizeof(path)) == 0)
                (void)unlink(path);
}

/*
 * Resume what the marker file of a killed create_snap names (callers hold the device lock and
 * the mutex). Appends the names resumed to @names, one per line. Returns how many were
 * resumed.
 */
static int thin_pool_resume_marked_locked(const char *pool_name, char *names, size_t size)
{
        char path[PATH_MAX], buf[8192];
        ssize_t len;
        int fd, count = 0, r;

        r = thin_pool_marker_path(pool_name, path, sizeof(path));
        if (r < 0)
                return r;
        fd = open(path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
        if (fd < 0 && errno == ENOENT)
                return 0;
        if (fd < 0)
                return err_set(-errno, "failed to open '%s': %s", path, strerror(errno));
        len = read(fd, buf, sizeof(buf) - 1);
        (void)close(fd);
        if (len < 0)
                return err_set(-EIO, "failed to read '%s'", path);
        buf[len] = '\0';
        for (char *line = buf, *end; *line && r == 0; line = end) {
                struct thin_pool_device_info d;

                end = line + strcspn(line, "\n");
                if (*end)
                        *end++ = '\0';
                if (!thin_pool_name_is_valid(line))
                        continue;
                r = thin_pool_device_info_locked(line, &d);
                if (r < 0 || !d.exists || !d.suspended)
                        continue;
                r = thin_pool_resume_locked(line);
                if (r < 0)
                        break;
                log_debug("resumed a device left suspended by a killed snapshot",
                          "pool=%s device=%s", log_quote(pool_name), log_quote(line));
                if (names && strlen(names) + strlen(line) + 2 < size)
                        (void)snprintf(names + strlen(names), size - strlen(names), "%s\n", line);
                count++;
        }
        if (r < 0)
                return r; /* the file stays: the next caller tries again */
        (void)unlink(path);
        return count;
}

int thin_pool_resume_leftovers(const char *pool_name, char *names, size_t size)
{
        int lock_fd = -1;
        int r = thin_pool_check_name(pool_name);

        if (r < 0)
                return r;
        if (names && size > 0)
                names[0] = '\0';
        r = thin_pool_flock(pool_name, "dev", &lock_fd);
        if (r < 0)
                return r;
        thin_pool_enter();
        r = thin_pool_resume_marked_locked(pool_name, names, size);
        thin_pool_leave();
        thin_pool_funlock(lock_fd);
        return r;
}

int thin_pool_create_snap(const char *pool_name, uint32_t snap_id, uint32_t origin_id,
                          const char *origin_active_name)
{
        struct thin_pool_active_thin *users = NULL;
        size_t n_users = 0, n_suspended = 0;
        bool resume_failed = false;
        dev_t pool_dev;
        char msg[64];
        int lock_fd = -1;
        int r;

        r = thin_pool_check_id(pool_name, snap_id);
        if (r == 0)
                r = thin_pool_check_id(pool_name, origin_id);
        if (r == 0 && origin_active_name)
                r = thin_pool_check_name(origin_active_name);
        if (r < 0)
                return r;
        (void)snprintf(msg, sizeof(msg), "create_snap %" PRIu32 " %" PRIu32, snap_id, origin_id);

        r = thin_pool_flock(pool_name, "dev", &lock_fd);
        if (r < 0)
                return r;
        thin_pool_enter();
        r = thin_pool_resume_marked_locked(pool_name, NULL, 0);
        if (r >= 0)
                r = thin_pool_pool_dev_locked(pool_name, &pool_dev);
        if (r == 0)
                r = thin_pool_origin_users_locked(pool_name, pool_dev, origin_id,
                                                  origin_active_name, &users, &n_users);
        if (r == 0)
                r = thin_pool_mark_suspending(pool_name, users, n_users);
        /* One that somebody else had suspended stays suspended: not ours to resume. */
        for (size_t i = 0; r == 0 && i < n_users; i++) {
                if (users[i].suspended)
                        continue;
                r = thin_pool_suspend_locked(users[i].name);
                n_suspended = i + 1; /* resume also the one that failed half-way */
        }
        util_crash_point("dm.create_snap.after_suspend");
        if (r == 0)
                r = thin_pool_message_locked(pool_name, msg);
        if (r == -EEXIST)
                r = err_set(r,
                            "failed to snapshot thin device id %" PRIu32
                            " in pool '%s': id %" PRIu32 " already exists",
                            origin_id, pool_name, snap_id);
        else if (r == -ENODATA)
                r = err_set(r,
                            "failed to snapshot thin device id %" PRIu32
                            " in pool '%s': no such origin",
                            origin_id, pool_name);
        /* Always resume: a device left suspended hangs every process that touches it. */
        for (size_t i = 0; i < n_suspended; i++) {
                int rr = users[i].suspended ? 0 : thin_pool_resume_locked(users[i].name);

                if (rr < 0) {
                        r = rr; /* worse than any earlier error: report this one */
                        resume_failed = true;
                }
        }
        if (!resume_failed)
                thin_pool_unmark(pool_name);
        thin_pool_leave();
        thin_pool_funlock(lock_fd);
        free(users);
        return r;
}

/* ---- activation ---- */

static int thin_pool_remove_locked(const char *name, bool deferred)
{
        struct dm_task *dmt = thin_pool_task(DM_DEVICE_REMOVE, name);
        int r;

        if (!dmt)
                return thin_pool_task_failed(name);
        if (deferred && !dm_task_deferred_remove(dmt)) {
                dm_task_destroy(dmt);
                return thin_pool_task_failed(name);
        }
        r = thin_pool_run_udev(dmt);
        dm_task_destroy(dmt);
        return r;
}

/*
 * Create dm device @name with one target and make it live: create, load the table, resume.
 * libdevmapper's create-with-table takes the same steps, but (1.02.185) does not pass the
 * kernel's errno on, and callers classify failures by it; so we take them one by one. On
 * failure the half-made device is removed again, so -EBUSY means either the name is taken
 * (the device still exists) or a device in the table is busy (it does not).
 */
static int thin_pool_create_device_locked(const char *name, const char *uuid, uint64_t sectors,
                                          const char *type, const char *params)
{
        char cause[ERR_MSG_MAX];
        struct dm_task *dmt;
        int r;

        dmt = thin_pool_task(DM_DEVICE_CREATE, name);
        if (!dmt || (uuid && !dm_task_set_uuid(dmt, uuid)))
                r = thin_pool_task_failed(name);
        else
                r = thin_pool_run(dmt);
        if (dmt)
                dm_task_destroy(dmt);
        if (r < 0)
                return r;
        util_crash_point("dm.after_create");

        dmt = thin_pool_task(DM_DEVICE_RELOAD, name);
        if (!dmt || !dm_task_add_target(dmt, 0, sectors, type, params))
                r = thin_pool_task_failed(name);
        else
                r = thin_pool_run(dmt);
        if (dmt)
                dm_task_destroy(dmt);
        util_crash_point("dm.after_load");
        if (r == 0)
                r = thin_pool_resume_locked(name);
        if (r == 0)
                return 0;
        (void)snprintf(cause, sizeof(cause), "%s", err_last());
        if (thin_pool_remove_locked(name, false) < 0)
                log_debug("failed to remove a half-created device", "device=%s error=%s",
                          log_quote(name), log_quote(err_last()));
        return err_set(r, "%s", cause);
}

/* After a create failed with EBUSY: does @name exist, and is it already what we wanted? */
static int thin_pool_activate_conflict_locked(const char *pool_name, dev_t pool_dev,
                                              uint32_t dev_id, const char *name, uint64_t sectors,
                                              int r)
{
        struct thin_pool_device_info d;
        int rr = thin_pool_device_info_locked(name, &d);

        if (rr < 0)
                return rr;
        if (!d.exists)
                return err_wrap(
                        r, "failed to activate thin device id %" PRIu32 " of pool '%s' as '%s'",
                        dev_id, pool_name, name);
        if (d.is_thin && d.thin_pool_dev == pool_dev && d.thin_dev_id == dev_id &&
            d.size_sectors == sectors) {
                err_clear();
                return THIN_POOL_ALREADY;
        }
        return err_set(-EEXIST,
                       "device '%s' already exists with another table (%s, %" PRIu64 " sectors)",
                       name, d.target_type, d.size_sectors);
}

/*
 * Remove @name when it exists without a live table. Callers hold the pool's device lock, under
 * which such a device can only be the leftover of a process killed between creating it and
 * resuming it with its table. Returns 1 when one was removed, else 0 or a negative errno.
 */
static int thin_pool_remove_tableless_locked(const char *name)
{
        struct thin_pool_device_info d;
        int r = thin_pool_device_info_locked(name, &d);

        if (r < 0 || !d.exists || d.target_count > 0)
                return r;
        log_debug("removing a device left without a table", "device=%s", log_quote(name));
        r = thin_pool_remove_locked(name, false);
        if (r < 0)
                return err_wrap(r, "failed to remove device '%s', left without a table", name);
        return 1;
}

static int thin_pool_activate_locked(const char *pool_name, uint32_t dev_id, const char *name,
                                     uint64_t sectors)
{
        char params[64];
        dev_t pool_dev;
        int r;

        r = thin_pool_pool_dev_locked(pool_name, &pool_dev);
        if (r < 0)
                return r;
        (void)snprintf(params, sizeof(params), "%u:%u %" PRIu32, major(pool_dev), minor(pool_dev),
                       dev_id);
        r = thin_pool_create_device_locked(name, NULL, sectors, "thin", params);
        if (r == -EBUSY) {
                int rr = thin_pool_remove_tableless_locked(name);

                if (rr < 0)
                        return rr;
                if (rr > 0)
                        r = thin_pool_create_device_locked(name, NULL, sectors, "thin", params);
        }
        if (r == -EBUSY)
                return thin_pool_activate_conflict_locked(pool_name, pool_dev, dev_id, name,
                                                          sectors, r);
        if (r == -ENODATA)
                return err_set(r,
                               "failed to activate '%s': thin device id %" PRIu32
                               " does not exist in pool '%s'",
                               name, dev_id, pool_name);
        if (r < 0)
                return err_wrap(
                        r, "failed to activate thin device id %" PRIu32 " of pool '%s' as '%s'",
                        dev_id, pool_name, name);
        return 0;
}

int thin_pool_activate(const char *pool_name, uint32_t dev_id, const char *name,
                       uint64_t size_bytes, char **ret_path)
{
        char *path = NULL;
        int lock_fd = -1;
        int r;

        r = thin_pool_check_id(pool_name, dev_id);
        if (r == 0)
                r = thin_pool_check_name(name);
        if (r < 0)
                return r;
        if (size_bytes == 0 || size_bytes % THIN_POOL_SECTOR != 0)
                return err_set(-EINVAL,
                               "invalid size %" PRIu64
                               " for device '%s': must be a non-zero multiple of 512 bytes",
                               size_bytes, name);

        r = thin_pool_flock(pool_name, "dev", &lock_fd);
        if (r < 0)
                return r;
        thin_pool_enter();
        r = thin_pool_activate_locked(pool_name, dev_id, name, size_bytes / THIN_POOL_SECTOR);
        if (r >= 0 && ret_path && asprintf(&path, "%s/%s", dm_dir(), name) < 0) {
                path = NULL;
                r = err_set(-ENOMEM, "out of memory");
        }
        thin_pool_leave();
        thin_pool_funlock(lock_fd);
        if (r >= 0 && ret_path)
                *ret_path = steal_ptr(path);
        free(path);
        return r;
}

int thin_pool_remove_leftover(const char *pool_name, const char *name)
{
        int lock_fd = -1;
        int r = thin_pool_check_name(pool_name);

        if (r == 0)
                r = thin_pool_check_name(name);
        if (r < 0)
                return r;
        r = thin_pool_flock(pool_name, "dev", &lock_fd);
        if (r < 0)
                return r;
        thin_pool_enter();
        r = thin_pool_remove_tableless_locked(name);
        thin_pool_leave();
        thin_pool_funlock(lock_fd);
        return r;
}

/* ---- deactivation ---- */

/* "held by 'snap' (dm-4)" from sysfs holders, or "" when nothing is stacked on the device. */
static void thin_pool_holder_hint(uint32_t maj, uint32_t min, char *buf, size_t size)
{
        char path[128], name_path[300], holder[THIN_POOL_NAME_MAX + 2] = "";
        struct dirent *de;
        FILE *f;
        DIR *dir;

        buf[0] = '\0';
        (void)snprintf(path, sizeof(path), "/sys/dev/block/%u:%u/holders", maj, min);
        dir = opendir(path);
        if (!dir)
                return;
        while ((de = readdir(dir))) {
                if (de->d_name[0] == '.')
                        continue;
                (void)snprintf(name_path, sizeof(name_path), "/sys/block/%s/dm/name", de->d_name);
                f = fopen(name_path, "re");
                if (f) {
                        if (!fgets(holder, sizeof(holder), f))
                                holder[0] = '\0';
                        holder[strcspn(holder, "\n")] = '\0';
                        (void)fclose(f);
                }
                (void)snprintf(buf, size, "held by '%s' (%s)", holder[0] ? holder : de->d_name,
                               de->d_name);
                break;
        }
        (void)closedir(dir);
}

/* "mounted at '/mnt'" from our mount namespace, or "" when not mounted here. */
static void thin_pool_mount_hint(uint32_t maj, uint32_t min, char *buf, size_t size)
{
        char want[32], *line = NULL;
        size_t cap = 0;
        FILE *f = fopen("/proc/self/mountinfo", "re");

        buf[0] = '\0';
        if (!f)
                return;
        (void)snprintf(want, sizeof(want), "%u:%u", maj, min);
        /* "<id> <parent> <major:minor> <root> <mount point> ..." */
        while (getline(&line, &cap, f) > 0) {
                char dev[32], mnt[256];

                if (sscanf(line, "%*s %*s %31s %*s %255s", dev, mnt) == 2 &&
                    strcmp(dev, want) == 0) {
                        (void)snprintf(buf, size, "mounted at '%s'", mnt);
                        break;
                }
        }
        free(line);
        (void)fclose(f);
}

/* Who holds @d: a holder device, a mount point here, or a generic phrase. */
static void thin_pool_busy_hint(const struct thin_pool_device_info *d, char *buf, size_t size)
{
        buf[0] = '\0';
        if (d->exists) {
                thin_pool_holder_hint(d->major, d->minor, buf, size);
                if (buf[0] == '\0')
                        thin_pool_mount_hint(d->major, d->minor, buf, size);
        }
        if (buf[0] == '\0')
                (void)snprintf(buf, size, "mounted or open by a process");
}

static int thin_pool_busy_error(const char *name, unsigned attempts)
{
        struct thin_pool_device_info d = {0};
        char hint[640];

        thin_pool_enter();
        (void)thin_pool_device_info_locked(name, &d);
        thin_pool_leave();
        thin_pool_busy_hint(&d, hint, sizeof(hint));
        return err_set(
                -EBUSY,
                "failed to deactivate device '%s': still busy after %u attempts (open count %" PRId32
                "): %s",
                name, attempts, d.open_count, hint);
}

int thin_pool_check_unused(const char *name)
{
        struct thin_pool_device_info d = {0};
        char hint[640];
        int r = thin_pool_check_name(name);

        if (r < 0)
                return r;
        /* 50, 100, 200, 400 ms: outlast a probe that opens it for a moment (udev's blkid). */
        for (unsigned delay = 50;; delay *= 2) {
                thin_pool_enter();
                r = thin_pool_device_info_locked(name, &d);
                thin_pool_leave();
                if (r < 0 || !d.exists || d.open_count == 0)
                        return r;
                if (delay > 400)
                        break;
                util_sleep_ms(delay);
        }
        thin_pool_busy_hint(&d, hint, sizeof(hint));
        return err_set(-EBUSY, "device '%s' is in use (open count %" PRId32 "): %s", name,
                       d.open_count, hint);
}

int thin_pool_deactivate(const char *name, const struct thin_pool_remove_opts *opts)
{
        static const struct thin_pool_remove_opts defaults = THIN_POOL_REMOVE_OPTS_INIT;
        const struct thin_pool_remove_opts *o = opts ? opts : &defaults;
        unsigned attempts = o->attempts > 0 ? o->attempts : 1;
        unsigned delay = o->delay_ms;
        unsigned attempt;
        int r = thin_pool_check_name(name);

        if (r < 0)
                return r;
        for (attempt = 1;; attempt++) {
                thin_pool_enter();
                r = thin_pool_remove_locked(name, false);
                thin_pool_leave();
                if (r != -EBUSY || attempt >= attempts)
                        break;
                log_debug("device busy, will retry", "device=%s attempt=%u delay_ms=%u",
                          log_quote(name), attempt, delay);
                util_sleep_ms(delay);
                delay = delay * 2 > o->max_delay_ms ? o->max_delay_ms : delay * 2;
        }
        if (r == -ENXIO) {
                err_clear();
                return THIN_POOL_ALREADY;
        }
        if (r == -EBUSY && o->deferred) {
                thin_pool_enter();
                r = thin_pool_remove_locked(name, true);
                thin_pool_leave();
                if (r == 0)
                        return THIN_POOL_DEFERRED;
        }
        if (r == -EBUSY)
                return thin_pool_busy_error(name, attempt);
        if (r < 0)
                return err_wrap(r, "failed to deactivate device '%s'", name);
        return 0;
}

/* ---- pool status and creation ---- */

static void thin_pool_derive(struct thin_pool_status *s, uint32_t block_sectors,
                             uint64_t low_water_mark)
{
        s->data_block_size = (uint64_t)block_sectors * THIN_POOL_SECTOR;
        s->low_water_mark = low_water_mark;
        s->data_used_bytes = s->data_used_blocks * s->data_block_size;
        s->data_total_bytes = s->data_total_blocks * s->data_block_size;
        s->metadata_used_bytes = s->metadata_used_blocks * THIN_POOL_METADATA_BLOCK;
        s->metadata_total_bytes = s->metadata_total_blocks * THIN_POOL_METADATA_BLOCK;
        s->data_used_percent = s->data_total_blocks == 0 ? 0.0
                                                         : 100.0 * (double)s->data_used_blocks /
                                                                   (double)s->data_total_blocks;
        s->metadata_used_percent = s->metadata_total_blocks == 0
                                           ? 0.0
                                           : 100.0 * (double)s->metadata_used_blocks /
                                                     (double)s->metadata_total_blocks;
}

static int thin_pool_status_locked(const char *pool_name, struct thin_pool_status *ret_status)
{
        struct thin_pool_status s;
        struct thin_pool_table tb;
        struct dm_task *dmt = NULL;
        struct dm_info info;
        const char *params;
        uint64_t length;
        int r;

        r = thin_pool_query_locked(DM_DEVICE_STATUS, "pool", pool_name, &dmt, &info);
        if (r < 0)
                return r;
        r = thin_pool_pool_target(dmt, pool_name, &params, &length);
        if (r == 0 && thin_pool_parse_status(params, &s) < 0)
                r = err_set(-EBADMSG, "failed to parse the status of pool '%s': '%s'", pool_name,
                            params);
        dm_task_destroy(dmt);
        if (r == 0)
                r = thin_pool_table_locked(pool_name, &tb);
        if (r < 0)
                return r;
        thin_pool_derive(&s, tb.block_sectors, tb.low_water_mark);
        *ret_status = s;
        return 0;
}

int thin_pool_status(const char *pool_name, struct thin_pool_status *ret_status)
{
        int r = thin_pool_check_name(pool_name);

        if (r < 0)
                return r;
        thin_pool_enter();
        r = thin_pool_status_locked(pool_name, ret_status);
        thin_pool_leave();
        return r;
}

int thin_pool_check_space(const char *pool_name, double max_used_percent,
                          struct thin_pool_status *ret_status)
{
        struct thin_pool_status s;
        int r = thin_pool_status(pool_name, &s);

        if (r < 0)
                return r;
        if (ret_status)
                *ret_status = s;
        if (s.mode == THIN_POOL_MODE_FAIL)
                return err_set(-EROFS, "pool '%s' has failed: all I/O errors", pool_name);
        if (s.needs_check)
                return err_set(-EUCLEAN, "pool '%s' needs a metadata check (thin_check)",
                               pool_name);
        if (s.mode == THIN_POOL_MODE_RO)
                return err_set(-EROFS, "pool '%s' is read-only", pool_name);
        if (s.mode == THIN_POOL_MODE_OUT_OF_DATA_SPACE)
                return err_set(-ENOSPC,
                               "pool '%s' is out of data space (%" PRIu64 " of %" PRIu64
                               " bytes used)",
                               pool_name, s.data_used_bytes, s.data_total_bytes);
        if (s.data_used_percent >= max_used_percent)
                return err_set(-ENOSPC, "pool '%s' data is %.1f%% full (limit %.1f%%)", pool_name,
                               s.data_used_percent, max_used_percent);
        if (s.metadata_used_percent >= max_used_percent)
                return err_set(-ENOSPC, "pool '%s' metadata is %.1f%% full (limit %.1f%%)",
                               pool_name, s.metadata_used_percent, max_used_percent);
        return 0;
}

int thin_pool_get_table(const char *pool_name, struct thin_pool_table *ret_table)
{
        int r = thin_pool_check_name(pool_name);

        if (r < 0)
                return r;
        thin_pool_enter();
        r = thin_pool_table_locked(pool_name, ret_table);
        thin_pool_leave();
        return r;
}

static int thin_pool_check_params(const struct thin_pool_params *p)
{
        int r = thin_pool_check_name(p->name);

        if (r < 0)
                return r;
        if (p->block_sectors < THIN_POOL_MIN_BLOCK_SECTORS ||
            p->block_sectors > THIN_POOL_MAX_BLOCK_SECTORS ||
            p->block_sectors % THIN_POOL_MIN_BLOCK_SECTORS != 0)
                return err_set(
                        -EINVAL,
                        "invalid block size of %" PRIu32
                        " sectors for pool '%s': must be a multiple of 64 KiB between 64 KiB and 1 GiB",
                        p->block_sectors, p->name);
        if (p->data_sectors == 0 || p->data_sectors % p->block_sectors != 0)
                return err_set(
                        -EINVAL,
                        "invalid data size of %" PRIu64
                        " sectors for pool '%s': must be a non-zero multiple of the block size",
                        p->data_sectors, p->name);
        if (p->uuid && strlen(p->uuid) > 128)
                return err_set(-EINVAL, "uuid '%s' is too long", p->uuid);
        return 0;
}

int thin_pool_create(const struct thin_pool_params *p)
{
        struct thin_pool_device_info d;
        char params[160];
        int r = thin_pool_check_params(p);

        if (r < 0)
                return r;
        (void)snprintf(params, sizeof(params), "%u:%u %u:%u %" PRIu32 " %" PRIu64 " %d%s%s",
                       major(p->metadata_dev), minor(p->metadata_dev), major(p->data_dev),
                       minor(p->data_dev), p->block_sectors, p->low_water_mark,
                       (int)p->skip_block_zeroing + (int)p->error_if_no_space,
                       p->skip_block_zeroing ? " skip_block_zeroing" : "",
                       p->error_if_no_space ? " error_if_no_space" : "");
        thin_pool_enter();
        r = thin_pool_create_device_locked(p->name, p->uuid, p->data_sectors, "thin-pool", params);
        if (r == -EBUSY && thin_pool_device_info_locked(p->name, &d) == 0 && d.exists)
                r = err_set(-EEXIST, "failed to create pool '%s': a device of that name exists",
                            p->name);
        else if (r < 0)
                r = err_wrap(r, "failed to create pool '%s' (table '%s')", p->name, params);
        thin_pool_leave();
        return r;
}

/* ---- listings ---- */

int thin_pool_device_info(const char *name, struct thin_pool_device_info *ret_info)
{
        int r = thin_pool_check_name(name);

        if (r < 0)
                return r;
        thin_pool_enter();
        r = thin_pool_device_info_locked(name, ret_info);
        thin_pool_leave();
        return r;
}

int thin_pool_list_thin_ids(const char *pool_name, struct thin_pool_active_thin **ret_devs,
                            size_t *ret_count)
{
        dev_t pool_dev;
        int r = thin_pool_check_name(pool_name);

        if (r < 0)
                return r;
        thin_pool_enter();
        r = thin_pool_pool_dev_locked(pool_name, &pool_dev);
        if (r == 0)
                r = thin_pool_list_locked(pool_dev, ret_devs, ret_count);
        thin_pool_leave();
        return r;
}

int thin_pool_devnode(dev_t dev, char *buf, size_t size)
{
        char path[96], line[256];
        FILE *f;
        int r = -ENOENT;

        (void)snprintf(path, sizeof(path), "/sys/dev/block/%u:%u/uevent", major(dev), minor(dev));
        f = fopen(path, "re");
        if (!f)
                return err_set(-errno, "failed to open '%s': %s", path, strerror(errno));
        while (fgets(line, sizeof(line), f)) {
                if (strncmp(line, "DEVNAME=", 8) != 0)
                        continue;
                line[strcspn(line, "\n")] = '\0';
                r = util_snprintf(buf, size, "/dev/%s", line + 8);
                break;
        }
        (void)fclose(f);
        if (r == -ENOENT)
                return err_set(r, "no DEVNAME in '%s'", path);
        return r;
}

/* Read all of @fd into a NUL-terminated heap buffer. */
static int thin_pool_read_all(int fd, char **ret_buf)
{
        char *buf = NULL;
        size_t len = 0, cap = 0;

        for (;;) {
                ssize_t n;

                if (cap - len < 4096) {
                        size_t ncap = cap ? 2 * cap : 65536;
                        char *grown;

                        if (ncap > THIN_POOL_DUMP_MAX) {
                                free(buf);
                                return err_set(-EFBIG, "thin_dump output is too large");
                        }
                        grown = realloc(buf, ncap);
                        if (!grown) {
                                free(buf);
                                return err_set(-ENOMEM, "out of memory reading thin_dump output");
                        }
                        buf = grown;
                        cap = ncap;
                }
                n = read(fd, buf + len, cap - len - 1);
                if (n < 0 && errno == EINTR)
                        continue;
                if (n < 0) {
                        int e = errno;

                        free(buf);
                        return err_set(-e, "failed to read thin_dump output: %s", strerror(e));
                }
                if (n == 0)
                        break;
                len += (size_t)n;
        }
        buf[len] = '\0';
        *ret_buf = buf;
        return 0;
}

static int thin_pool_spawn_dump(const char *devnode, int out_fd, pid_t *ret_pid)
{
        const char *prog = getenv("FIM_THIN_DUMP");
        char *argv[] = {(char *)"thin_dump",
                        (char *)"-m",
                        (char *)"--skip-mappings",
                        (char *)"-f",
                        (char *)"xml",
                        (char *)devnode,
                        NULL};
        posix_spawn_file_actions_t fa;
        int e;

        e = posix_spawn_file_actions_init(&fa);
        if (e != 0)
                return err_set(-e, "failed to prepare thin_dump: %s", strerror(e));
        e = posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
        if (e == 0)
                e = posix_spawn_file_actions_adddup2(&fa, out_fd, 1);
        if (e == 0)
                e = posix_spawn_file_actions_adddup2(&fa, out_fd, 2);
        if (e == 0)
                e = posix_spawnp(ret_pid, prog ? prog : "thin_dump", &fa, NULL, argv, environ);
        /* Non-root PATHs often lack /usr/sbin, where Debian installs it. */
        if (e == ENOENT && !prog)
                e = posix_spawn(ret_pid, "/usr/sbin/thin_dump", &fa, NULL, argv, environ);
        (void)posix_spawn_file_actions_destroy(&fa);
        if (e != 0)
                return err_set(-e, "failed to run thin_dump: %s", strerror(e));
        return 0;
}

/* Run thin_dump on the held metadata snapshot of @devnode; stdout and stderr in *ret_out. */
static int thin_pool_run_dump(const char *devnode, char **ret_out)
{
        int fds[2] = {-1, -1};
        char *out = NULL;
        pid_t pid;
        int status = 0, r;

        if (pipe2(fds, O_CLOEXEC) < 0)
                return err_set(-errno, "failed to create a pipe: %s", strerror(errno));
        r = thin_pool_spawn_dump(devnode, fds[1], &pid);
        (void)close(fds[1]);
        if (r < 0) {
                (void)close(fds[0]);
                return r;
        }
        r = thin_pool_read_all(fds[0], &out);
        (void)close(fds[0]);
        while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
                ;
        if (r == 0 && (!WIFEXITED(status) || WEXITSTATUS(status) != 0)) {
                size_t len = strlen(out);

                while (len > 0 && out[len - 1] == '\n')
                        out[--len] = '\0';
                r = err_set(-EIO, "thin_dump on '%s' failed (status %d): %s", devnode, status,
                            len > 200 ? out + len - 200 : out);
        }
        if (r < 0) {
                free(out);
                return r;
        }
        *ret_out = out;
        return 0;
}

/*
 * Reserve the pool's metadata snapshot. The caller holds the pool's metadata lock, so one
 * already held was left by a crashed caller (or by an operator's tool: the pool is the
 * worker's, see README): release it and reserve again.
 */
static int thin_pool_reserve_snap_locked(const char *pool_name)
{
        int r = thin_pool_message_locked(pool_name, "reserve_metadata_snap");

        if (r != -EBUSY) /* the kernel's answer while a snapshot is held */
                return r;
        log_debug("releasing a stale metadata snapshot", "pool=%s", log_quote(pool_name));
        r = thin_pool_message_locked(pool_name, "release_metadata_snap");
        if (r == 0)
                r = thin_pool_message_locked(pool_name, "reserve_metadata_snap");
        return r;
}

int thin_pool_metadata_thin_ids(const char *pool_name, uint32_t **ret_ids, size_t *ret_count)
{
        struct thin_pool_table tb;
        char devnode[96], *out = NULL;
        bool reserved = false;
        int lock_fd = -1;
        int r = thin_pool_check_name(pool_name), e;

        if (r < 0)
                return r;
        e = pthread_mutex_lock(&thin_pool_metadata_snap_lock);
        FIM_ASSERT(e == 0);
        r = thin_pool_flock(pool_name, "metadata", &lock_fd);
        if (r < 0) {
                e = pthread_mutex_unlock(&thin_pool_metadata_snap_lock);
                FIM_ASSERT(e == 0);
                return r;
        }
        thin_pool_enter();
        r = thin_pool_table_locked(pool_name, &tb);
        if (r == 0)
                r = thin_pool_reserve_snap_locked(pool_name);
        reserved = r == 0;
        thin_pool_leave();
        if (r == 0)
                r = thin_pool_devnode(tb.metadata_dev, devnode, sizeof(devnode));
        if (r == 0)
                r = thin_pool_run_dump(devnode, &out);
        if (reserved) {
                int rr;

                thin_pool_enter();
                rr = thin_pool_message_locked(pool_name, "release_metadata_snap");
                thin_pool_leave();
                if (rr < 0 && r == 0)
                        r = rr;
        }
        thin_pool_funlock(lock_fd);
        e = pthread_mutex_unlock(&thin_pool_metadata_snap_lock);
        FIM_ASSERT(e == 0);
        if (r == 0) {
                r = thin_pool_parse_dump_ids(out, ret_ids, ret_count);
                if (r == -EBADMSG)
                        r = err_set(r, "failed to parse thin_dump output for pool '%s'", pool_name);
                else if (r < 0)
                        r = err_set(r, "out of memory parsing thin_dump output");
        }
        free(out);
        return r;
}
