#include "stages/pool_setup.h"

/*
 * Loop devices are attached with LOOP_CTL_GET_FREE + LOOP_CONFIGURE (one ioctl, Linux 5.8+),
 * falling back to LOOP_SET_FD + LOOP_SET_STATUS64 on older kernels. Autoclear stays off: the
 * loops must outlive this process, since the pool holds them and nothing else re-attaches
 * them. Another process can take the free loop between our two ioctls; that shows as EBUSY
 * and we ask for the next free one.
 *
 * Every step of a create is undone on failure in reverse order (pool, loops we attached,
 * files we created), so a failed setup can simply be run again.
 */

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/loop.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include "common/err.h"
#include "common/log.h"
#include "common/util.h"
#include "stages/thin_pool.h"

#define POOL_SETUP_SECTOR 512u
#define POOL_SETUP_METADATA_BLOCK 4096u
#define POOL_SETUP_MIN_BLOCK (UINT64_C(64) << 10)
#define POOL_SETUP_MAX_BLOCK (UINT64_C(1) << 30)
#define POOL_SETUP_NAME_MAX 100 /* so that "FIM-pool-<name>" fits a dm uuid */
#define POOL_SETUP_ATTACH_TRIES 16

struct pool_setup_paths {
        char data[4096];
        char meta[4096];
        char uuid[128];
};

/* One backing file and the loop device it is (or will be) attached to. */
struct pool_setup_loop {
        const char *path;
        dev_t dev;
        char node[32];
        bool attached_here;
};

uint64_t pool_setup_metadata_size(uint64_t data_size, uint64_t block_size)
{
        uint64_t blocks = (data_size + block_size - 1) / block_size;
        uint64_t size;

        if (blocks > POOL_SETUP_MAX_METADATA_SIZE / 48)
                return POOL_SETUP_MAX_METADATA_SIZE;
        size = blocks * 48;
        size = (size + POOL_SETUP_METADATA_BLOCK - 1) / POOL_SETUP_METADATA_BLOCK *
               POOL_SETUP_METADATA_BLOCK;
        if (size < POOL_SETUP_MIN_METADATA_SIZE)
                return POOL_SETUP_MIN_METADATA_SIZE;
        return size > POOL_SETUP_MAX_METADATA_SIZE ? POOL_SETUP_MAX_METADATA_SIZE : size;
}

static int pool_setup_paths_init(const char *name, const char *dir, struct pool_setup_paths *p)
{
        size_t len = strlen(name);

        if (!thin_pool_name_is_valid(name) || len > POOL_SETUP_NAME_MAX)
                return err_set(-EINVAL, "invalid pool name '%s': 1 to %d characters, no '/'", name,
                               POOL_SETUP_NAME_MAX);
        if (dir[0] == '\0')
                return err_set(-EINVAL, "the pool directory must not be empty");
        if (util_snprintf(p->data, sizeof(p->data), "%s/%s.data", dir, name) < 0 ||
            util_snprintf(p->meta, sizeof(p->meta), "%s/%s.meta", dir, name) < 0)
                return err_set(-ENAMETOOLONG, "pool directory '%s' is too long", dir);
        (void)snprintf(p->uuid, sizeof(p->uuid), "FIM-pool-%s", name);
        return 0;
}

static int pool_setup_check_sizes(const struct pool_setup_opts *o)
{
        if (o->block_size < POOL_SETUP_MIN_BLOCK || o->block_size > POOL_SETUP_MAX_BLOCK ||
            o->block_size % POOL_SETUP_MIN_BLOCK != 0)
                return err_set(-EINVAL,
                               "invalid block size %" PRIu64
                               ": must be a multiple of 64 KiB between 64 KiB and 1 GiB",
                               o->block_size);
        if (o->data_size == 0 || o->data_size % o->block_size != 0)
                return err_set(-EINVAL,
                               "invalid data size %" PRIu64
                               ": must be a non-zero multiple of the block size (%" PRIu64 ")",
                               o->data_size, o->block_size);
        if (o->metadata_size != 0 && (o->metadata_size < POOL_SETUP_MIN_METADATA_SIZE ||
                                      o->metadata_size > POOL_SETUP_MAX_METADATA_SIZE ||
                                      o->metadata_size % POOL_SETUP_METADATA_BLOCK != 0))
                return err_set(-EINVAL,
                               "invalid metadata size %" PRIu64
                               ": must be a multiple of 4 KiB between 2 MiB and %" PRIu64 " bytes",
                               o->metadata_size, (uint64_t)POOL_SETUP_MAX_METADATA_SIZE);
        return 0;
}

/* ---- loop devices ---- */

/* 1 when @node is a loop device backed by the file @st, 0 when not (or unbound). */
static int pool_setup_loop_backs(const char *node, const struct stat *st)
{
        struct loop_info64 info;
        int fd = open(node, O_RDONLY | O_CLOEXEC);
        int r;

        if (fd < 0)
                return err_set(-errno, "failed to open '%s': %s", node, strerror(errno));
        r = ioctl(fd, LOOP_GET_STATUS64, &info);
        if (r < 0) {
                int e = errno;

                (void)close(fd);
                if (e == ENXIO || e == ENOTTY || e == EINVAL)
                        return 0; /* unbound, or not a loop device at all */
                return err_set(-e, "failed to query loop device '%s': %s", node, strerror(e));
        }
        (void)close(fd);
        return info.lo_inode == (uint64_t)st->st_ino && info.lo_device == (uint64_t)st->st_dev;
}

/* Whether dm table device @dev is a loop over @path. 1 yes, 0 no, negative on error. */
static int pool_setup_dev_backs(dev_t dev, const char *path)
{
        struct stat st;
        char node[64];
        int r;

        if (stat(path, &st) < 0)
                return errno == ENOENT
                               ? 0
                               : err_set(-errno, "failed to stat '%s': %s", path, strerror(errno));
        r = thin_pool_devnode(dev, node, sizeof(node));
        if (r < 0)
                return r;
        return pool_setup_loop_backs(node, &st);
}

/*
 * The first bound loop device backed by @st (1, in @ret_dev/@ret_node), or 0 when none.
 * Scans /sys/block; a loop is bound when its "loop" sysfs directory exists.
 */
static int pool_setup_find_loop(const struct stat *st, dev_t *ret_dev, char *ret_node, size_t size)
{
        struct dirent *de;
        DIR *dir = opendir("/sys/block");
        int r = 0;

        if (!dir)
                return err_set(-errno, "failed to open '/sys/block': %s", strerror(errno));
        while (r == 0 && (de = readdir(dir))) {
                char path[300], node[64];
                struct stat lst;

                if (strncmp(de->d_name, "loop", 4) != 0)
                        continue;
                (void)snprintf(path, sizeof(path), "/sys/block/%s/loop", de->d_name);
                if (access(path, F_OK) < 0)
                        continue;
                if (util_snprintf(node, sizeof(node), "/dev/%s", de->d_name) < 0)
                        continue;
                r = pool_setup_loop_backs(node, st);
                if (r == 1 && stat(node, &lst) == 0) {
                        *ret_dev = lst.st_rdev;
                        (void)snprintf(ret_node, size, "%s", node);
                } else if (r == 1) {
                        r = err_set(-errno, "failed to stat '%s': %s", node, strerror(errno));
                }
        }
        (void)closedir(dir);
        return r;
}

/* Bind @file_fd to @loop_fd, with autoclear off. -EBUSY when someone else took the loop. */
static int pool_setup_loop_bind(int loop_fd, int file_fd, const char *path)
{
        struct loop_info64 info = {0};

        (void)snprintf((char *)info.lo_file_name, sizeof(info.lo_file_name), "%s", path);
#ifdef LOOP_CONFIGURE
        struct loop_config cfg = {.fd = (uint32_t)file_fd, .info = info};

        if (ioctl(loop_fd, LOOP_CONFIGURE, &cfg) == 0)
                return 0;
        if (errno != EINVAL && errno != ENOTTY)
                return -errno;
#endif
        if (ioctl(loop_fd, LOOP_SET_FD, file_fd) < 0)
                return -errno;
        if (ioctl(loop_fd, LOOP_SET_STATUS64, &info) < 0) {
                int e = errno;

                (void)ioctl(loop_fd, LOOP_CLR_FD, 0);
                return -e;
        }
        return 0;
}

static int pool_setup_loop_attach(struct pool_setup_loop *l)
{
        int ctl_fd = -1, file_fd = -1, loop_fd = -1;
        struct stat st;
        int r = 0;

        ctl_fd = open("/dev/loop-control", O_RDWR | O_CLOEXEC);
        if (ctl_fd < 0) {
                r = err_set(-errno, "failed to open '/dev/loop-control': %s", strerror(errno));
                goto out;
        }
        file_fd = open(l->path, O_RDWR | O_CLOEXEC);
        if (file_fd < 0) {
                r = err_set(-errno, "failed to open '%s': %s", l->path, strerror(errno));
                goto out;
        }
        for (int tries = 0; tries < POOL_SETUP_ATTACH_TRIES; tries++) {
                int n = ioctl(ctl_fd, LOOP_CTL_GET_FREE);

                if (n < 0) {
                        r = err_set(-errno, "failed to find a free loop device: %s",
                                    strerror(errno));
                        goto out;
                }
                (void)snprintf(l->node, sizeof(l->node), "/dev/loop%d", n);
                loop_fd = open(l->node, O_RDWR | O_CLOEXEC);
                if (loop_fd < 0) {
                        r = err_set(-errno, "failed to open '%s': %s", l->node, strerror(errno));
                        goto out;
                }
                r = pool_setup_loop_bind(loop_fd, file_fd, l->path);
                if (r != -EBUSY)
                        break;
                (void)close(loop_fd); /* raced with another attach: take the next free one */
                loop_fd = -1;
        }
        if (r < 0) {
                r = err_set(r, "failed to attach '%s' to '%s': %s", l->path, l->node, strerror(-r));
                goto out;
        }
        if (fstat(loop_fd, &st) < 0) {
                r = err_set(-errno, "failed to stat '%s': %s", l->node, strerror(errno));
                (void)ioctl(loop_fd, LOOP_CLR_FD, 0);
                goto out;
        }
        l->dev = st.st_rdev;
        l->attached_here = true;
out:
        if (loop_fd >= 0)
                (void)close(loop_fd);
        if (file_fd >= 0)
                (void)close(file_fd);
        if (ctl_fd >= 0)
                (void)close(ctl_fd);
        return r;
}

/* Use the loop already attached to l->path, or attach one. */
static int pool_setup_loop_get(struct pool_setup_loop *l)
{
        struct stat st;
        int r;

        if (stat(l->path, &st) < 0)
                return err_set(-errno, "failed to stat '%s': %s", l->path, strerror(errno));
        r = pool_setup_find_loop(&st, &l->dev, l->node, sizeof(l->node));
        if (r != 0)
                return r < 0 ? r : 0;
        return pool_setup_loop_attach(l);
}

static int pool_setup_loop_detach(const char *node)
{
        int fd = open(node, O_RDONLY | O_CLOEXEC);
        int r = 0;

        if (fd < 0)
                return err_set(-errno, "failed to open '%s': %s", node, strerror(errno));
        if (ioctl(fd, LOOP_CLR_FD, 0) < 0 && errno != ENXIO)
                r = err_set(-errno, "failed to detach '%s': %s", node, strerror(errno));
        (void)close(fd);
        return r;
}

/* Detach every loop device backed by @path. Returns how many, or a negative errno. */
static int pool_setup_detach_all(const char *path)
{
        struct stat st;
        char node[64];
        dev_t dev;
        int n = 0, r;

        if (stat(path, &st) < 0)
                return errno == ENOENT
                               ? 0
                               : err_set(-errno, "failed to stat '%s': %s", path, strerror(errno));
        while ((r = pool_setup_find_loop(&st, &dev, node, sizeof(node))) == 1) {
                r = pool_setup_loop_detach(node);
                if (r < 0)
                        return r;
                if (++n > 64)
                        return err_set(-EIO, "loop devices over '%s' keep coming back", path);
        }
        return r < 0 ? r : n;
}

/* ---- files ---- */

static int pool_setup_create_file(const char *path, uint64_t size)
{
        int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
        int r = 0;

        if (fd < 0)
                return err_set(-errno, "failed to create '%s': %s", path, strerror(errno));
        if (ftruncate(fd, (off_t)size) < 0)
                r = err_set(-errno, "failed to size '%s' to %" PRIu64 " bytes: %s", path, size,
                            strerror(errno));
        if (close(fd) < 0 && r == 0)
                r = err_set(-errno, "failed to close '%s': %s", path, strerror(errno));
        if (r < 0)
                (void)unlink(path);
        return r;
}

/* A fresh pool needs an all-zero superblock, or the kernel would try to open old metadata. */
static int pool_setup_zero_head(const char *node)
{
        static const char zeros[POOL_SETUP_METADATA_BLOCK];
        int fd = open(node, O_WRONLY | O_CLOEXEC);
        int r = 0;

        if (fd < 0)
                return err_set(-errno, "failed to open '%s': %s", node, strerror(errno));
        if (pwrite(fd, zeros, sizeof(zeros), 0) != (ssize_t)sizeof(zeros))
                r = err_set(-EIO, "failed to zero the metadata superblock on '%s'", node);
        else if (fsync(fd) < 0)
                r = err_set(-errno, "failed to sync '%s': %s", node, strerror(errno));
        (void)close(fd);
        return r;
}

static int pool_setup_file_state(const struct pool_setup_paths *p, bool *ret_both)
{
        bool data = access(p->data, F_OK) == 0, meta = access(p->meta, F_OK) == 0;

        if (data != meta)
                return err_set(-EEXIST, "found '%s' but not '%s': remove it or run --teardown",
                               data ? p->data : p->meta, data ? p->meta : p->data);
        *ret_both = data;
        return 0;
}

/* ---- ownership ---- */

/*
 * Whether existing pool @name is one we made from these files. 0 when it is, else -EPERM
 * with the reason. Fills @ret_table on success.
 */
static int pool_setup_check_owned(const char *name, const struct pool_setup_paths *p,
                                  struct thin_pool_table *ret_table)
{
        struct thin_pool_device_info info;
        struct thin_pool_table tb;
        int r;

        r = thin_pool_device_info(name, &info);
        if (r < 0)
                return r;
        if (strcmp(info.uuid, p->uuid) != 0)
                return err_set(
                        -EPERM,
                        "pool '%s' was not created by pool-setup (dm uuid '%s'); refusing to touch it",
                        name, info.uuid);
        r = thin_pool_get_table(name, &tb);
        if (r < 0)
                return r;
        r = pool_setup_dev_backs(tb.metadata_dev, p->meta);
        if (r == 1)
                r = pool_setup_dev_backs(tb.data_dev, p->data);
        if (r < 0)
                return r;
        if (r == 0)
                return err_set(-EPERM,
                               "pool '%s' does not run on '%s' and '%s'; refusing to touch it",
                               name, p->meta, p->data);
        *ret_table = tb;
        return 0;
}

/* ---- create ---- */

static void pool_setup_fill_existing(const struct thin_pool_table *tb,
                                     const struct pool_setup_paths *p,
                                     struct pool_setup_result *res)
{
        struct stat st;

        res->existed = true;
        res->block_size = (uint64_t)tb->block_sectors * POOL_SETUP_SECTOR;
        res->data_size = tb->data_sectors * POOL_SETUP_SECTOR;
        res->metadata_size = stat(p->meta, &st) == 0 ? (uint64_t)st.st_size : 0;
        if (thin_pool_devnode(tb->data_dev, res->data_loop, sizeof(res->data_loop)) < 0 ||
            thin_pool_devnode(tb->metadata_dev, res->metadata_loop, sizeof(res->metadata_loop)) < 0)
                err_clear(); /* only for display */
}

/* Sizes of files from an earlier setup; the data file must fit the block size. */
static int pool_setup_existing_sizes(const struct pool_setup_paths *p, uint64_t block_size,
                                     uint64_t *ret_data, uint64_t *ret_meta)
{
        struct stat sd, sm;

        if (stat(p->data, &sd) < 0 || stat(p->meta, &sm) < 0)
                return err_set(-errno, "failed to stat the pool files: %s", strerror(errno));
        if (sd.st_size <= 0 || (uint64_t)sd.st_size % block_size != 0)
                return err_set(
                        -EINVAL,
                        "existing '%s' has %lld bytes, not a multiple of the block size %" PRIu64,
                        p->data, (long long)sd.st_size, block_size);
        *ret_data = (uint64_t)sd.st_size;
        *ret_meta = (uint64_t)sm.st_size;
        return 0;
}

static int pool_setup_load(const struct pool_setup_opts *o, const struct pool_setup_paths *p,
                           const struct pool_setup_loop *meta, const struct pool_setup_loop *data,
                           uint64_t data_size)
{
        uint64_t blocks = data_size / o->block_size;
        struct thin_pool_params params = {
                .name = o->name,
                .uuid = p->uuid,
                .metadata_dev = meta->dev,
                .data_dev = data->dev,
                .data_sectors = data_size / POOL_SETUP_SECTOR,
                .block_sectors = (uint32_t)(o->block_size / POOL_SETUP_SECTOR),
                .low_water_mark = o->low_water_mark == POOL_SETUP_LOW_WATER_MARK_AUTO
                                          ? blocks / 10
                                          : o->low_water_mark,
                .error_if_no_space = o->error_if_no_space,
        };

        return thin_pool_create(&params);
}

/* Fresh files for a new pool. On failure, the ones made here are removed again. */
static int pool_setup_new_files(const struct pool_setup_opts *o, const struct pool_setup_paths *p,
                                struct pool_setup_result *res)
{
        int r;

        res->data_size = o->data_size;
        res->metadata_size = o->metadata_size
                                     ? o->metadata_size
                                     : pool_setup_metadata_size(o->data_size, o->block_size);
        if (mkdir(o->dir, 0755) < 0 && errno != EEXIST)
                return err_set(-errno, "failed to create directory '%s': %s", o->dir,
                               strerror(errno));
        r = pool_setup_create_file(p->data, res->data_size);
        if (r < 0)
                return r;
        r = pool_setup_create_file(p->meta, res->metadata_size);
        if (r < 0)
                (void)unlink(p->data);
        return r;
}

/* Attach both files (reusing attached loops) and load the pool; undo our attaches on failure. */
static int pool_setup_attach_and_load(const struct pool_setup_opts *o,
                                      const struct pool_setup_paths *p, bool fresh,
                                      struct pool_setup_result *res)
{
        struct pool_setup_loop meta = {.path = p->meta}, data = {.path = p->data};
        char cause[ERR_MSG_MAX];
        int r;

        r = pool_setup_loop_get(&meta);
        if (r == 0)
                r = pool_setup_loop_get(&data);
        if (r == 0 && fresh)
                r = pool_setup_zero_head(meta.node);
        if (r == 0)
                r = pool_setup_load(o, p, &meta, &data, res->data_size);
        if (r == 0) {
                (void)snprintf(res->data_loop, sizeof(res->data_loop), "%s", data.node);
                (void)snprintf(res->metadata_loop, sizeof(res->metadata_loop), "%s", meta.node);
                return 0;
        }
        (void)snprintf(cause, sizeof(cause), "%s", err_last());
        if (data.attached_here)
                (void)pool_setup_loop_detach(data.node);
        if (meta.attached_here)
                (void)pool_setup_loop_detach(meta.node);
        return err_set(r, "%s", cause);
}

int pool_setup_create(const struct pool_setup_opts *opts, struct pool_setup_result *ret_result)
{
        struct pool_setup_result res = {0};
        struct thin_pool_device_info info;
        struct thin_pool_table tb;
        struct pool_setup_paths p;
        bool reattach = false;
        int r;

        r = pool_setup_paths_init(opts->name, opts->dir, &p);
        if (r == 0)
                r = pool_setup_check_sizes(opts);
        if (r == 0)
                r = thin_pool_device_info(opts->name, &info);
        if (r == 0 && info.exists) {
                r = pool_setup_check_owned(opts->name, &p, &tb);
                if (r < 0)
                        return r;
                pool_setup_fill_existing(&tb, &p, &res);
                r = POOL_SETUP_EXISTED;
                goto done;
        }
        if (r == 0)
                r = pool_setup_file_state(&p, &reattach);
        if (r < 0)
                return r;

        res.block_size = opts->block_size;
        res.reattached = reattach;
        if (reattach)
                r = pool_setup_existing_sizes(&p, opts->block_size, &res.data_size,
                                              &res.metadata_size);
        else
                r = pool_setup_new_files(opts, &p, &res);
        if (r < 0)
                return r;
        r = pool_setup_attach_and_load(opts, &p, !reattach, &res);
        if (r < 0 && reattach)
                return err_wrap(
                        r,
                        "failed to load pool '%s' from the existing files in '%s' (made with another block size?)",
                        opts->name, opts->dir);
        if (r < 0) { /* the files are ours: made just now */
                (void)unlink(p.data);
                (void)unlink(p.meta);
                return r;
        }
done:
        if (ret_result)
                *ret_result = res;
        return r;
}

/* ---- teardown ---- */

static int pool_setup_refuse_active(const char *name, const struct thin_pool_active_thin *devs,
                                    size_t n)
{
        char list[512] = "";
        size_t len = 0;

        for (size_t i = 0; i < n && len < sizeof(list) - 1; i++) {
                int w = snprintf(list + len, sizeof(list) - len, "%s'%s'", i ? ", " : "",
                                 devs[i].name);

                if (w < 0)
                        break;
                len += (size_t)w;
        }
        return err_set(
                -EBUSY,
                "pool '%s' has %zu active thin device%s (%s): deactivate them first or use --force",
                name, n, n == 1 ? "" : "s", list);
}

/* Remove the pool device itself, with its thin devices when @force. */
static int pool_setup_remove_pool(const char *name, bool force,
                                  struct pool_setup_teardown_result *res)
{
        const struct thin_pool_remove_opts quick = {
                .attempts = 5, .delay_ms = 50, .max_delay_ms = 400, .deferred = false};
        struct thin_pool_active_thin *devs = NULL;
        size_t n = 0;
        int r;

        r = thin_pool_list_thin_ids(name, &devs, &n);
        if (r < 0)
                return r;
        if (n > 0 && !force) {
                r = pool_setup_refuse_active(name, devs, n);
                goto out;
        }
        for (size_t i = 0; i < n; i++) {
                r = thin_pool_deactivate(devs[i].name, &quick);
                if (r < 0)
                        goto out;
                res->thin_deactivated++;
        }
        r = thin_pool_deactivate(name, &quick);
        if (r < 0)
                goto out;
        res->pool_removed = true;
        r = 0;
out:
        free(devs);
        return r;
}

int pool_setup_teardown(const char *name, const char *dir, bool force,
                        struct pool_setup_teardown_result *ret_result)
{
        struct pool_setup_teardown_result res = {0};
        struct thin_pool_device_info info;
        struct thin_pool_table tb;
        struct pool_setup_paths p;
        const char *files[2];
        bool both;
        int r;

        r = pool_setup_paths_init(name, dir, &p);
        if (r == 0)
                r = thin_pool_device_info(name, &info);
        if (r < 0)
                return r;
        if (info.exists) {
                r = pool_setup_check_owned(name, &p, &tb);
                if (r == 0)
                        r = pool_setup_remove_pool(name, force, &res);
                if (r < 0)
                        return r;
        } else if (pool_setup_file_state(&p, &both) == 0 && !both) {
                if (ret_result)
                        *ret_result = res;
                return POOL_SETUP_NOTHING;
        }
        err_clear();

        files[0] = p.meta;
        files[1] = p.data;
        for (size_t i = 0; i < ARRAY_SIZE(files); i++) {
                r = pool_setup_detach_all(files[i]);
                if (r < 0)
                        return r;
                res.loops_detached += (unsigned)r;
                if (unlink(files[i]) == 0)
                        res.files_removed++;
                else if (errno != ENOENT)
                        return err_set(-errno, "failed to remove '%s': %s", files[i],
                                       strerror(errno));
        }
        if (ret_result)
                *ret_result = res;
        return 0;
}
