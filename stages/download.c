#include "stages/download.h"

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <libgen.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <openssl/evp.h>

#include "common/err.h"
#include "common/util.h"
#include "stages/prefix_hasher.h"

/*
 * DESIGN
 *
 * HEAD first: it gives the size (checked against the cap and the free space) and the ETag
 * that guards every later GET with If-Match, so bytes from two versions of an object are
 * never mixed.
 *
 * Single stream (objects up to the parallel threshold): one GET from the resume offset to
 * the end, each chunk written at its offset.
 *
 * Parts (larger objects): ranged GETs of part_size bytes, at most max_connections in flight
 * on the client's curl multi loop, each written with pwrite at its offset.
 *
 * Hashing: SHA-256 runs on a thread of its own (prefix_hasher), which reads back from the
 * file (page cache) the prefix that is complete on disk: for a stream, what has been written;
 * for parts, the parts that follow each other without a gap from byte zero. At 1-2 GB/s,
 * hashing costs about as much CPU as receiving, so doing both on curl's thread halved the
 * speed. Memory stays at the hasher's 1 MiB read buffer plus the write buffers and curl's,
 * whatever the object size.
 *
 * Writes: curl hands the body over in 16 KiB pieces. Each piece is copied into a write
 * buffer (64 KiB for a stream and per part in flight, see DOWNLOAD_STREAM_BUF) that goes to
 * the file in one pwrite, so the data path costs one syscall per buffer, not per piece.
 * Every 32 MiB written, sync_file_range starts writeback without waiting, so the final fsync
 * finds little left to do and disk and network work at the same time.
 *
 * Resume: the sidecar records the ETag, the size and what is on disk: for a single stream
 * the number of bytes written and fdatasync'ed, for parts a 0/1 flag per part. It is
 * rewritten (write to a temporary file, fsync, rename) after an fdatasync of the data at
 * checkpoints (every checkpoint_ms, 2 s by default) and whenever a transient error ends the
 * call. A later call whose HEAD shows the same ETag and size keeps those bytes, re-hashes the
 * kept prefix from disk and fetches the rest; anything else (no sidecar, another ETag, a
 * damaged sidecar) starts from zero. A sidecar written in one mode is converted to the other
 * through its contiguous prefix, so changing the threshold between attempts loses nothing
 * before the first gap.
 *
 * Already there: a caller that recorded an earlier call's result (before_rename runs just
 * before the rename, so the record exists whenever the file does) passes it back as
 * p->recorded. After the HEAD, a dest_path with the recorded size whose SHA-256 is the recorded
 * one, of an object whose ETag and size have not changed, is kept: a crash between the rename
 * and the caller's own bookkeeping then costs one read of the file, not a new transfer.
 *
 * Servers that ignore Range: a ranged GET answered with the whole object (HTTP 200) makes
 * resuming and parts impossible, so the download falls back to one stream from byte zero.
 *
 * Space: before any byte is fetched, the object's blocks are reserved with fallocate where
 * the filesystem supports it, so that concurrent downloads count each other's needs and a
 * full disk is found at the start, with the numbers, not half way through.
 */

#define DOWNLOAD_META_MAGIC "fim-download-meta 1"
#define DOWNLOAD_META_MAX (1u << 20)
/*
 * Received bytes are written in 64 KiB pieces (a stream's, and each part's). Larger writes cost
 * more, not less: with 512 KiB and 1 MiB pieces, copying into the page cache took 1-1.6 s of
 * system time per 512 MiB in most runs on this machine's 6.18 kernel (perf: nearly all in
 * copy_folio_from_iter_atomic), against 0.15-0.3 s with 64 KiB; the whole download went from
 * about 1.4 s to 0.65 s, with much less spread. curl writes 16 KiB at a time.
 */
#define DOWNLOAD_STREAM_BUF (64u << 10)
#define DOWNLOAD_HASH_FILE_BUF (1u << 20)
#define DOWNLOAD_PART_BUF (64u << 10)
/*
 * Writeback is started every 32 MiB. With 8 MiB windows, writeback of the fallocated (still
 * "unwritten") extents competed with the writes into the next ones: 512 MiB cost 0.7-1.0 s
 * of system time against 0.4-0.5 s with 16-128 MiB windows (ext4, 2 cores).
 */
#define DOWNLOAD_WRITEBACK_BYTES (32ull << 20)
#define DOWNLOAD_CHECKPOINT_MS 2000
#define DOWNLOAD_PROGRESS_MS 250
/* Opening the partial file races with its holder renaming or removing it; see below. */
#define DOWNLOAD_LOCK_TRIES 5

#ifdef FIM_UNIT_TEST
void (*download_test_after_open)(const char *part_path);
#endif

/* What the sidecar says is on disk. */
struct download_meta {
        char etag[S3_ETAG_MAX];
        uint64_t size;
        uint64_t part_size; /* 0: single stream */
        uint64_t verified;  /* single stream: bytes on disk, synced */
        char *parts;        /* parts: '0'/'1' per part, NUL-terminated */
        size_t n_parts;
};

struct download_ctx {
        struct s3_client *client;
        const struct download_params *p;
        download_progress_fn progress_cb;
        void *userdata;
        struct s3_limits limits;

        char *part_path;
        char *meta_path;
        char *meta_tmp_path;
        int fd;

        struct s3_object_info info;
        struct download_meta meta;    /* the plan for this call, kept current */
        EVP_MD_CTX *sha;              /* the hasher's while it runs */
        struct prefix_hasher *hasher; /* from download_begin to download_finish */
        unsigned char *wbuf;          /* single stream: DOWNLOAD_STREAM_BUF of received bytes */
        size_t wbuf_len;              /* bytes in wbuf, to be written at offset written */
        uint64_t hashed;              /* bytes handed to the hasher, always a prefix */
        uint64_t written;             /* single stream: end of what was written to the file */
        uint64_t resumed;
        uint64_t done_bytes; /* for progress reports */
        uint64_t kicked_at;  /* single stream: writeback started up to here */
        bool planned;        /* d->meta describes this call's plan: checkpoints may save it */
        int64_t start_ms;
        int64_t checkpoint_ms;
        int64_t last_checkpoint_ms;
        int64_t last_progress_ms;
};

/* One ranged part in flight. */
struct download_part {
        struct download_ctx *d;
        size_t index;
        uint64_t offset;
        uint64_t len;
        uint64_t received;  /* bytes of this part that arrived */
        uint64_t written;   /* of those, written to the file */
        unsigned char *buf; /* DOWNLOAD_PART_BUF, while the part is in flight */
};

static void download_meta_done(struct download_meta *m)
{
        free(m->parts);
        *m = (struct download_meta){0};
}

static uint64_t download_part_len(const struct download_meta *m, size_t i)
{
        uint64_t off = (uint64_t)i * m->part_size;

        return m->size - off < m->part_size ? m->size - off : m->part_size;
}

/* Bytes from offset 0 that are known to be on disk without a gap. */
static uint64_t download_meta_prefix(const struct download_meta *m)
{
        uint64_t prefix = 0;

        if (m->part_size == 0)
                return m->verified;
        for (size_t i = 0; i < m->n_parts && m->parts[i] == '1'; i++)
                prefix += download_part_len(m, i);
        return prefix;
}

static uint64_t download_meta_kept(const struct download_meta *m)
{
        uint64_t kept = 0;

        if (m->part_size == 0)
                return m->verified;
        for (size_t i = 0; i < m->n_parts; i++) {
                if (m->parts[i] == '1')
                        kept += download_part_len(m, i);
        }
        return kept;
}

/* ---- Files ---------------------------------------------------------------------------- */

static int download_write_all(int fd, const void *data, size_t len, uint64_t offset,
                              const char *path)
{
        const unsigned char *p = data;

        while (len > 0) {
                ssize_t n = pwrite(fd, p, len, (off_t)offset);

                if (n < 0 && errno == EINTR)
                        continue;
                if (n < 0)
                        return err_set(-errno, "failed to write '%s': %s", path, strerror(errno));
                p += n;
                len -= (size_t)n;
                offset += (uint64_t)n;
        }
        return 0;
}

static int download_fsync_dir(const char *path)
{
        char *copy = strdup(path);
        int fd, r = 0;

        if (!copy)
                return -ENOMEM;
        fd = open(dirname(copy), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (fd < 0 || fsync(fd) < 0)
                r = err_set(-errno, "failed to sync the directory of '%s': %s", path,
                            strerror(errno));
        if (fd >= 0)
                (void)close(fd);
        free(copy);
        return r;
}

static void download_remove_partial(struct download_ctx *d)
{
        (void)unlink(d->part_path);
        (void)unlink(d->meta_path);
        (void)unlink(d->meta_tmp_path);
}

static int download_meta_write(struct download_ctx *d)
{
        const struct download_meta *m = &d->meta;
        FILE *f = NULL;
        int fd, r = 0;

        fd = open(d->meta_tmp_path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
        if (fd < 0)
                return err_set(-errno, "failed to create '%s': %s", d->meta_tmp_path,
                               strerror(errno));
        f = fdopen(fd, "w");
        if (!f) {
                r = err_set(-errno, "failed to open '%s': %s", d->meta_tmp_path, strerror(errno));
                (void)close(fd);
                return r;
        }
        fprintf(f,
                "%s\netag %s\nsize %" PRIu64 "\npart_size %" PRIu64 "\nverified %" PRIu64
                "\nparts %s\n",
                DOWNLOAD_META_MAGIC, m->etag, m->size, m->part_size, m->verified,
                m->parts ? m->parts : "-");
        if (fflush(f) != 0 || fsync(fd) < 0)
                r = err_set(-errno, "failed to write '%s': %s", d->meta_tmp_path, strerror(errno));
        if (fclose(f) != 0 && r == 0)
                r = err_set(-errno, "failed to write '%s': %s", d->meta_tmp_path, strerror(errno));
        if (r == 0 && rename(d->meta_tmp_path, d->meta_path) < 0)
                r = err_set(-errno, "failed to rename '%s': %s", d->meta_tmp_path, strerror(errno));
        return r;
}

/* Parse one "name value" line of the sidecar. Returns false on anything unexpected. */
static bool download_meta_line(struct download_meta *m, char *line)
{
        char *sp = strchr(line, ' ');

        if (!sp)
                return false;
        *sp = '\0';
        const char *v = sp + 1;

        if (strcmp(line, "etag") == 0)
                return util_snprintf(m->etag, sizeof(m->etag), "%s", v) == 0;
        if (strcmp(line, "size") == 0)
                return util_parse_u64(v, &m->size) == 0;
        if (strcmp(line, "part_size") == 0)
                return util_parse_u64(v, &m->part_size) == 0;
        if (strcmp(line, "verified") == 0)
                return util_parse_u64(v, &m->verified) == 0;
        if (strcmp(line, "parts") == 0) {
                if (strcmp(v, "-") == 0)
                        return true;
                if (strspn(v, "01") != strlen(v))
                        return false;
                m->parts = strdup(v);
                m->n_parts = strlen(v);
                return m->parts != NULL;
        }
        return false;
}

/* Read the sidecar. Returns true only for a complete, self-consistent one. */
static bool download_meta_read(const char *path, struct download_meta *ret)
{
        struct download_meta m = {0};
        char *text = NULL, *save = NULL;
        bool ok = false;
        FILE *f = fopen(path, "re");
        size_t n;

        if (!f)
                return false;
        text = malloc(DOWNLOAD_META_MAX + 1);
        n = text ? fread(text, 1, DOWNLOAD_META_MAX, f) : 0;
        fclose(f);
        if (!text || n == 0 || n == DOWNLOAD_META_MAX)
                goto out;
        text[n] = '\0';
        char *line = strtok_r(text, "\n", &save);

        if (!line || strcmp(line, DOWNLOAD_META_MAGIC) != 0)
                goto out;
        while ((line = strtok_r(NULL, "\n", &save)) != NULL) {
                if (!download_meta_line(&m, line))
                        goto out;
        }
        if (m.part_size == 0)
                ok = m.etag[0] && m.verified <= m.size && !m.parts;
        else
                ok = m.etag[0] && m.parts && m.n_parts == (m.size + m.part_size - 1) / m.part_size;
        if (ok) {
                *ret = m;
                m = (struct download_meta){0};
        }
out:
        download_meta_done(&m);
        free(text);
        return ok;
}

/*
 * Bytes [0, end) are on disk for good: let the hasher have them. After a failed attempt the
 * hasher is gone, and the checkpoint that saves what is on disk has nothing to hash.
 */
static void download_hash_to(struct download_ctx *d, uint64_t end)
{
        if (end <= d->hashed)
                return;
        d->hashed = end;
        if (d->hasher)
                prefix_hasher_advance(d->hasher, end);
}

/*
 * Start writing a range back to disk without waiting, so the final fsync (and the
 * checkpoints' fdatasync) find little left to do: disk and network then work at the same
 * time instead of one after the other. Only a hint; errors show up at fsync.
 */
static void download_start_writeback(struct download_ctx *d, uint64_t offset, uint64_t len)
{
        (void)sync_file_range(d->fd, (off_t)offset, (off_t)len, SYNC_FILE_RANGE_WRITE);
}

/* Write the single stream's buffered bytes to the file. */
static int download_flush_stream(struct download_ctx *d)
{
        int r;

        if (d->wbuf_len == 0)
                return 0;
        r = download_write_all(d->fd, d->wbuf, d->wbuf_len, d->written, d->part_path);
        if (r < 0)
                return r;
        d->written += d->wbuf_len;
        d->wbuf_len = 0;
        download_hash_to(d, d->written);
        return 0;
}

/* Write out what is buffered, fdatasync the data, then record what is on disk. */
static int download_checkpoint(struct download_ctx *d)
{
        int r;

        if (d->meta.part_size == 0) {
                r = download_flush_stream(d);
                if (r < 0)
                        return r;
        }
        if (fdatasync(d->fd) < 0)
                return err_set(-errno, "failed to sync '%s': %s", d->part_path, strerror(errno));
        if (d->meta.part_size == 0)
                d->meta.verified = d->written;
        d->last_checkpoint_ms = util_now_monotonic_ms();
        return download_meta_write(d);
}

/* ---- Hashing ---------------------------------------------------------------------------- */

int download_hash_file(const char *path, char *ret_hex, uint64_t *ret_size)
{
        unsigned char md[EVP_MAX_MD_SIZE];
        unsigned int md_len = 0;
        unsigned char *buf = malloc(DOWNLOAD_HASH_FILE_BUF);
        EVP_MD_CTX *sha = EVP_MD_CTX_new();
        uint64_t size = 0;
        int fd = -1, r = 0;

        if (!buf || !sha || EVP_DigestInit_ex(sha, EVP_sha256(), NULL) != 1) {
                r = -ENOMEM;
                goto out;
        }
        fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0) {
                r = err_set(-errno, "failed to open '%s': %s", path, strerror(errno));
                goto out;
        }
        for (;;) {
                ssize_t n = read(fd, buf, DOWNLOAD_HASH_FILE_BUF);

                if (n < 0 && errno == EINTR)
                        continue;
                if (n < 0) {
                        r = err_set(-errno, "failed to read '%s': %s", path, strerror(errno));
                        goto out;
                }
                if (n == 0)
                        break;
                if (EVP_DigestUpdate(sha, buf, (size_t)n) != 1) {
                        r = -ENOMEM;
                        goto out;
                }
                size += (uint64_t)n;
        }
        if (EVP_DigestFinal_ex(sha, md, &md_len) != 1) {
                r = -ENOMEM;
                goto out;
        }
        util_hex_encode(md, md_len, ret_hex);
        *ret_size = size;
out:
        if (fd >= 0)
                (void)close(fd);
        EVP_MD_CTX_free(sha);
        free(buf);
        return r;
}

/* ---- Progress --------------------------------------------------------------------------- */

static void download_progress(struct download_ctx *d, bool force)
{
        int64_t now;

        if (!d->progress_cb)
                return;
        now = util_now_monotonic_ms();
        if (!force && now - d->last_progress_ms < DOWNLOAD_PROGRESS_MS)
                return;
        d->last_progress_ms = now;
        d->progress_cb(d->done_bytes, d->info.size, d->userdata);
}

/* ---- Single stream ------------------------------------------------------------------------ */

static int download_on_stream_data(const void *data, size_t len, void *userdata)
{
        struct download_ctx *d = userdata;
        const unsigned char *p = data;
        int r;

        d->done_bytes += len;
        if (d->p->received_bytes)
                *d->p->received_bytes += len;
        while (len > 0) {
                size_t take = DOWNLOAD_STREAM_BUF - d->wbuf_len;

                take = take < len ? take : len;
                memcpy(d->wbuf + d->wbuf_len, p, take);
                d->wbuf_len += take;
                p += take;
                len -= take;
                if (d->wbuf_len < DOWNLOAD_STREAM_BUF)
                        break;
                r = download_flush_stream(d);
                if (r < 0)
                        return r;
        }
        if (d->written - d->kicked_at >= DOWNLOAD_WRITEBACK_BYTES) {
                download_start_writeback(d, d->kicked_at, d->written - d->kicked_at);
                d->kicked_at = d->written;
        }
        if (d->written > d->meta.verified &&
            util_now_monotonic_ms() - d->last_checkpoint_ms >= d->checkpoint_ms) {
                r = download_checkpoint(d);
                if (r < 0)
                        return r;
        }
        download_progress(d, false);
        return 0;
}

static int download_stream(struct download_ctx *d)
{
        uint64_t start = d->meta.verified;
        int r;

        download_hash_to(d, start);
        d->written = d->kicked_at = d->done_bytes = start;
        d->wbuf_len = 0;
        d->resumed = start;
        if (start == d->info.size)
                return 0;

        const struct s3_get get = {
                .bucket = d->p->bucket,
                .key = d->p->key,
                .offset = start,
                .if_match = d->info.etag[0] ? d->info.etag : NULL,
                .write_cb = download_on_stream_data,
                .userdata = d,
        };

        r = s3_client_get(d->client, &get, &d->limits, NULL);
        if (r >= 0)
                r = download_flush_stream(d);
        return r;
}

/* ---- Parts ----------------------------------------------------------------------------- */

/* Write a part's buffered bytes at their place in the file. */
static int download_flush_part(struct download_part *part)
{
        struct download_ctx *d = part->d;
        uint64_t n = part->received - part->written;
        int r;

        if (n == 0)
                return 0;
        r = download_write_all(d->fd, part->buf, (size_t)n, part->offset + part->written,
                               d->part_path);
        if (r < 0)
                return r;
        part->written += n;
        return 0;
}

static int download_on_part_data(const void *data, size_t len, void *userdata)
{
        struct download_part *part = userdata;
        struct download_ctx *d = part->d;
        const unsigned char *p = data;
        int r;

        if (!part->buf) {
                part->buf = malloc(DOWNLOAD_PART_BUF);
                if (!part->buf)
                        return err_set(-ENOMEM, "out of memory for a download buffer");
        }
        d->done_bytes += len;
        if (d->p->received_bytes)
                *d->p->received_bytes += len;
        while (len > 0) {
                size_t used = (size_t)(part->received - part->written);
                size_t take = DOWNLOAD_PART_BUF - used;

                take = take < len ? take : len;
                memcpy(part->buf + used, p, take);
                part->received += take;
                p += take;
                len -= take;
                /* Full, or the part's last byte: its completion must find it all on disk. */
                if (used + take < DOWNLOAD_PART_BUF && part->received < part->len)
                        continue;
                r = download_flush_part(part);
                if (r < 0)
                        return r;
        }
        download_progress(d, false);
        return 0;
}

/* Hash every completed part that follows the hashed prefix without a gap. */
static void download_hash_completed_prefix(struct download_ctx *d)
{
        const struct download_meta *m = &d->meta;
        size_t i = (size_t)(d->hashed / m->part_size);
        uint64_t end = d->hashed;

        while (i < m->n_parts && m->parts[i] == '1') {
                end = (uint64_t)i * m->part_size + download_part_len(m, i);
                i++;
        }
        download_hash_to(d, end);
}

/* Per-part completion, on the client's loop: record, hash what became contiguous. */
static void download_on_part_done(size_t index, int r, void *userdata)
{
        struct download_part *parts = userdata;
        struct download_part *part = &parts[index];
        struct download_ctx *d = parts[0].d;

        free(part->buf);
        part->buf = NULL;
        if (r < 0 || part->written != part->len)
                return;
        d->meta.parts[part->index] = '1';
        download_start_writeback(d, part->offset, part->written);
        download_hash_completed_prefix(d);
        /* A failed checkpoint costs only progress a later attempt would have kept. */
        if (util_now_monotonic_ms() - d->last_checkpoint_ms >= DOWNLOAD_CHECKPOINT_MS)
                (void)download_checkpoint(d);
        err_clear();
}

static int download_parts(struct download_ctx *d, unsigned max_connections)
{
        struct download_meta *m = &d->meta;
        struct download_part *parts = NULL;
        struct s3_get *gets = NULL;
        size_t n = 0;
        int r;

        d->resumed = d->done_bytes = download_meta_kept(m);
        download_hash_completed_prefix(d);
        parts = calloc(m->n_parts, sizeof(*parts));
        gets = calloc(m->n_parts, sizeof(*gets));
        if (!parts || !gets) {
                r = -ENOMEM;
                goto out;
        }
        for (size_t i = 0; i < m->n_parts; i++) {
                if (m->parts[i] == '1')
                        continue;
                parts[n] = (struct download_part){.d = d,
                                                  .index = i,
                                                  .offset = (uint64_t)i * m->part_size,
                                                  .len = download_part_len(m, i)};
                gets[n] = (struct s3_get){
                        .bucket = d->p->bucket,
                        .key = d->p->key,
                        .offset = parts[n].offset,
                        .length = parts[n].len,
                        .if_match = d->info.etag[0] ? d->info.etag : NULL,
                        .write_cb = download_on_part_data,
                        .userdata = &parts[n],
                };
                n++;
        }
        parts[0].d = d; /* download_on_part_done finds the context through parts[0] */
        r = s3_client_get_many(d->client, gets, n, max_connections, &d->limits,
                               download_on_part_done, parts);
out:
        /* Parts cancelled after a failure got no done_cb: their buffers are still here. */
        for (size_t i = 0; parts && i < n; i++)
                free(parts[i].buf);
        free(parts);
        free(gets);
        return r;
}

/* ---- The whole download ------------------------------------------------------------------- */

/*
 * Size the partial file for the plan (a stream keeps its verified prefix; parts need the
 * object's exact size, as a leftover of another version may be longer), then make sure the
 * rest of the object fits. Where the filesystem can, the object's blocks are reserved with
 * fallocate (beyond the end of file, so the size stays what the plan says): a concurrent
 * download then sees them as used, and a full disk is found now, not half way through. On
 * top of that, min_free_bytes must stay free. Truncating drops such a reservation, so this
 * runs again whenever the file is cut back.
 */
static int download_prepare_file(struct download_ctx *d)
{
        const struct download_params *p = d->p;
        uint64_t kept = download_meta_kept(&d->meta);
        uint64_t len = d->meta.part_size ? d->info.size : d->meta.verified;
        uint64_t rest = d->info.size - kept, needed, avail;
        bool reserved = false;
        struct statvfs st;
        char *copy = NULL;
        const char *dir;
        int fr = 0, r = 0;

        if (ftruncate(d->fd, (off_t)len) < 0)
                return err_set(-errno, "failed to size '%s': %s", d->part_path, strerror(errno));
        if (rest > 0) {
                if (fallocate(d->fd, FALLOC_FL_KEEP_SIZE, 0, (off_t)d->info.size) == 0)
                        reserved = true;
                else if (errno == ENOSPC || errno == EDQUOT)
                        fr = -errno;
                /* Otherwise (EOPNOTSUPP on some filesystems) the free-space check alone. */
        }
        copy = strdup(d->part_path);
        if (!copy)
                return -ENOMEM;
        dir = dirname(copy);
        if (statvfs(dir, &st) < 0) {
                r = err_set(-errno, "failed to check the free space in '%s': %s", dir,
                            strerror(errno));
                goto out;
        }
        /* The numbers as before our reservation, which is now counted as used. */
        avail = (uint64_t)st.f_bavail * st.f_frsize + (reserved ? rest : 0);
        needed = rest + p->min_free_bytes;
        if (fr == 0 && avail >= needed)
                goto out;
        r = err_set(-ENOSPC,
                    "failed to download object '%.300s' from bucket '%.100s': %" PRIu64
                    " bytes must be free in '%s' (LOCAL_DIR; object %" PRIu64 " bytes, %" PRIu64
                    " already on disk, margin %" PRIu64 ") but only %" PRIu64
                    " are available%s; free space there or move the download directory",
                    p->key, p->bucket, needed, dir, d->info.size, kept, p->min_free_bytes, avail,
                    fr == -EDQUOT ? " within the disk quota" : "");
out:
        free(copy);
        return r;
}

/* Decide what to keep from an earlier attempt and fill d->meta with this call's plan. */
static int download_plan(struct download_ctx *d, bool parallel, uint64_t part_size)
{
        struct download_meta old = {0};
        struct download_meta *m = &d->meta;
        struct stat st;
        uint64_t prefix = 0;

        if (fstat(d->fd, &st) < 0)
                return err_set(-errno, "failed to stat '%s': %s", d->part_path, strerror(errno));
        if (d->info.etag[0] && download_meta_read(d->meta_path, &old) &&
            strcmp(old.etag, d->info.etag) == 0 && old.size == d->info.size)
                prefix = download_meta_prefix(&old);
        prefix = prefix < (uint64_t)st.st_size ? prefix : (uint64_t)st.st_size;

        download_meta_done(m);
        memcpy(m->etag, d->info.etag, sizeof(m->etag));
        m->size = d->info.size;
        if (!parallel) {
                m->verified = prefix;
                d->written = prefix;
                download_meta_done(&old);
                return 0;
        }
        m->part_size = part_size;
        m->n_parts = (size_t)((m->size + part_size - 1) / part_size);
        m->parts = malloc(m->n_parts + 1);
        if (!m->parts) {
                download_meta_done(&old);
                return -ENOMEM;
        }
        for (size_t i = 0; i < m->n_parts; i++) {
                uint64_t end = (uint64_t)i * part_size + download_part_len(m, i);
                bool same_plan = old.part_size == part_size && old.n_parts == m->n_parts &&
                                 old.etag[0] && strcmp(old.etag, m->etag) == 0;
                bool kept = same_plan ? old.parts[i] == '1' : end <= prefix;

                m->parts[i] = kept && end <= (uint64_t)st.st_size ? '1' : '0';
        }
        m->parts[m->n_parts] = '\0';
        download_meta_done(&old);
        return 0;
}

/*
 * Open and lock the partial file. flock() locks an inode, not a name, and the process that
 * holds the lock may rename the file into place (finished) or unlink it (failed) and unlock
 * between our open() and our flock(). We would then hold a lock on a file that is no longer
 * the partial file, maybe the finished download itself, and go on to truncate it or rename a
 * stale copy over it. So once locked, check that the name still leads to the inode we hold;
 * if not, start over with whatever the name leads to now.
 */
static int download_open_part(struct download_ctx *d)
{
        struct stat held, named;

        for (int i = 0; i < DOWNLOAD_LOCK_TRIES; i++) {
                d->fd = open(d->part_path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
                if (d->fd < 0)
                        return err_set(-errno, "failed to open '%s': %s", d->part_path,
                                       strerror(errno));
#ifdef FIM_UNIT_TEST
                if (download_test_after_open)
                        download_test_after_open(d->part_path);
#endif
                if (flock(d->fd, LOCK_EX | LOCK_NB) < 0) {
                        if (errno == EWOULDBLOCK)
                                return err_set(
                                        -EBUSY,
                                        "failed to download to '%s': another download to the same file is in progress, will retry",
                                        d->p->dest_path);
                        return err_set(-errno, "failed to lock '%s': %s", d->part_path,
                                       strerror(errno));
                }
                if (fstat(d->fd, &held) < 0)
                        return err_set(-errno, "failed to stat '%s': %s", d->part_path,
                                       strerror(errno));
                if (stat(d->part_path, &named) == 0 && named.st_dev == held.st_dev &&
                    named.st_ino == held.st_ino)
                        return 0;
                (void)close(d->fd);
                d->fd = -1;
        }
        return err_set(
                -EBUSY,
                "failed to download to '%s': the partial file kept being replaced by another process, will retry",
                d->p->dest_path);
}

static int download_finish(struct download_ctx *d, struct download_result *ret)
{
        unsigned char md[EVP_MAX_MD_SIZE];
        unsigned int md_len = 0;
        char hex[DOWNLOAD_SHA256_HEX_LEN + 1];
        struct download_result res;
        uint64_t hashed = 0;
        int r;

        if (d->hashed != d->info.size)
                return err_set(
                        -EPIPE,
                        "failed to download object '%.300s' from bucket '%.100s': got %" PRIu64
                        " of %" PRIu64 " bytes; transient, retry later",
                        d->p->key, d->p->bucket, d->hashed, d->info.size);
        r = prefix_hasher_finish(d->hasher, &hashed);
        d->hasher = NULL;
        if (r < 0)
                return r;
        if (hashed != d->hashed)
                return err_set(-EIO, "failed to hash '%s': hashed %" PRIu64 " of %" PRIu64 " bytes",
                               d->part_path, hashed, d->hashed);
        if (EVP_DigestFinal_ex(d->sha, md, &md_len) != 1)
                return err_set(-ENOMEM, "failed to hash '%s': OpenSSL error", d->part_path);
        util_hex_encode(md, md_len, hex);
        if (d->p->expected_sha256 && strcasecmp(hex, d->p->expected_sha256) != 0)
                return err_set(
                        -EBADMSG,
                        "failed to verify object '%.300s' from bucket '%.100s': SHA-256 is %s, expected %s; the object in S3 is not the one the request describes",
                        d->p->key, d->p->bucket, hex, d->p->expected_sha256);
        if (fsync(d->fd) < 0)
                return err_set(-errno, "failed to sync '%s': %s", d->part_path, strerror(errno));
        res = (struct download_result){
                .size = d->info.size,
                .resumed_from_offset = d->resumed,
                .parts = d->meta.part_size ? (unsigned)d->meta.n_parts : 1,
        };
        memcpy(res.sha256, hex, sizeof(res.sha256));
        memcpy(res.etag, d->info.etag, sizeof(res.etag));
        if (d->p->before_rename) {
                r = d->p->before_rename(&res, d->p->before_rename_userdata);
                if (r < 0)
                        return r;
        }
        if (rename(d->part_path, d->p->dest_path) < 0)
                return err_set(-errno, "failed to rename '%s' to '%s': %s", d->part_path,
                               d->p->dest_path, strerror(errno));
        r = download_fsync_dir(d->p->dest_path);
        if (r < 0)
                return r;
        (void)unlink(d->meta_path);
        *ret = res;
        return 0;
}

/*
 * Whether dest_path still holds what p->recorded says an earlier call put there, of an object
 * that the HEAD just made shows unchanged (same ETag and size). The file is hashed to be sure.
 * Returns true and fills @ret (nothing transferred), or false when the object must be
 * downloaded: that also replaces a file that could not be read.
 */
static bool download_keep_existing(struct download_ctx *d, struct download_result *ret)
{
        const struct download_params *p = d->p;
        const struct download_result *rec = p->recorded;
        char hex[DOWNLOAD_SHA256_HEX_LEN + 1];
        uint64_t size = 0;
        struct stat st;

        if (!rec->etag[0] || strcmp(rec->etag, d->info.etag) != 0 || rec->size != d->info.size)
                return false;
        if (p->expected_sha256 && strcasecmp(rec->sha256, p->expected_sha256) != 0)
                return false;
        if (stat(p->dest_path, &st) < 0 || !S_ISREG(st.st_mode) ||
            (uint64_t)st.st_size != rec->size)
                return false;
        if (download_hash_file(p->dest_path, hex, &size) < 0) {
                err_clear();
                return false;
        }
        if (size != rec->size || strcasecmp(hex, rec->sha256) != 0)
                return false;
        /* What download_open_part made, and any partial file: the object is complete. */
        download_remove_partial(d);
        *ret = (struct download_result){
                .size = size,
                .resumed_from_offset = size,
                .parts = 1,
                .kept = true,
        };
        memcpy(ret->sha256, hex, sizeof(ret->sha256));
        memcpy(ret->etag, d->info.etag, sizeof(ret->etag));
        d->done_bytes = size;
        download_progress(d, true);
        return true;
}

/* The effective part size: the requested one, grown so there are at most MAX_PARTS parts. */
static uint64_t download_part_size(const struct download_params *p, uint64_t size)
{
        uint64_t ps = p->part_size ? p->part_size : DOWNLOAD_DEFAULT_PART_SIZE;
        uint64_t min = (size + DOWNLOAD_MAX_PARTS - 1) / DOWNLOAD_MAX_PARTS;

        return ps < min ? min : ps;
}

/* End the hasher's thread, if one runs, without waiting for it to catch up. */
static void download_stop_hashing(struct download_ctx *d)
{
        prefix_hasher_stop(d->hasher);
        d->hasher = NULL;
}

/* Start this call's plan: record it, size the file, start hashing from byte zero. */
static int download_begin(struct download_ctx *d, bool parallel)
{
        int r;

        download_stop_hashing(d); /* a plan made earlier in this call */
        r = download_plan(d, parallel, download_part_size(d->p, d->info.size));
        if (r < 0)
                return r;
        if (EVP_DigestInit_ex(d->sha, EVP_sha256(), NULL) != 1)
                return -ENOMEM;
        d->hashed = 0;
        r = download_meta_write(d);
        if (r < 0)
                return r;
        d->planned = true;
        d->last_checkpoint_ms = util_now_monotonic_ms();
        r = download_prepare_file(d);
        if (r < 0)
                return r;
        return prefix_hasher_start(d->fd, d->part_path, d->sha, 0, &d->hasher);
}

/*
 * The server ignored a Range header: neither resuming nor parts can work with it. Throw away
 * what is on disk and fetch the whole object in one stream from byte zero.
 */
static int download_from_zero(struct download_ctx *d)
{
        download_meta_done(&d->meta);
        (void)unlink(d->meta_path);
        err_clear();
        return download_begin(d, false);
}

/* One attempt: HEAD, keep what is there already or plan, transfer, verify, rename. */
static int download_run(struct download_ctx *d, struct download_result *ret)
{
        const struct download_params *p = d->p;
        bool parallel;
        int r;

        r = s3_client_head(d->client, p->bucket, p->key, &d->limits, &d->info);
        if (r < 0)
                return r;
        if (p->max_object_bytes && d->info.size > p->max_object_bytes)
                return err_set(
                        -EFBIG,
                        "failed to download object '%.300s' from bucket '%.100s': it has %" PRIu64
                        " bytes, above the limit of %" PRIu64
                        " (MAX_OBJECT_SIZE); raise the limit if the image is legitimate",
                        p->key, p->bucket, d->info.size, p->max_object_bytes);
        if (p->recorded && download_keep_existing(d, ret))
                return 0;
        parallel = p->parallel_threshold_bytes > 0 && d->info.size > p->parallel_threshold_bytes &&
                   p->max_connections > 1;
        r = download_begin(d, parallel);
        if (r < 0)
                return r;
        r = parallel ? download_parts(d, p->max_connections) : download_stream(d);
        if (r == -ENOTSUP) {
                r = download_from_zero(d);
                if (r >= 0)
                        r = download_stream(d);
        }
        if (r >= 0) {
                download_progress(d, true);
                r = download_finish(d, ret);
        }
        /* The caller may close or remove the file next: the hasher must be gone by then. */
        download_stop_hashing(d);
        return r;
}

static int download_ctx_init(struct download_ctx *d, struct s3_client *client,
                             const struct download_params *p)
{
        size_t n = strlen(p->dest_path);

        *d = (struct download_ctx){.client = client, .p = p, .fd = -1};
        d->part_path = malloc(n + sizeof(".part"));
        d->meta_path = malloc(n + sizeof(".part.meta"));
        d->meta_tmp_path = malloc(n + sizeof(".part.meta.tmp"));
        d->sha = EVP_MD_CTX_new();
        d->wbuf = malloc(DOWNLOAD_STREAM_BUF);
        if (!d->part_path || !d->meta_path || !d->meta_tmp_path || !d->sha || !d->wbuf)
                return -ENOMEM;
        memcpy(d->part_path, p->dest_path, n);
        memcpy(d->part_path + n, ".part", sizeof(".part"));
        memcpy(d->meta_path, p->dest_path, n);
        memcpy(d->meta_path + n, ".part.meta", sizeof(".part.meta"));
        memcpy(d->meta_tmp_path, p->dest_path, n);
        memcpy(d->meta_tmp_path + n, ".part.meta.tmp", sizeof(".part.meta.tmp"));
        d->start_ms = util_now_monotonic_ms();
        if (p->total_timeout_ms > 0)
                d->limits.deadline_ms = d->start_ms + p->total_timeout_ms;
        d->limits.stall_timeout_ms = p->stall_timeout_ms;
        d->limits.stall_setting = "DOWNLOAD_STALL_TIMEOUT";
        d->checkpoint_ms = p->checkpoint_ms > 0 ? p->checkpoint_ms : DOWNLOAD_CHECKPOINT_MS;
        return 0;
}

static void download_ctx_done(struct download_ctx *d)
{
        download_stop_hashing(d); /* before its file is closed */
        if (d->fd >= 0)
                (void)close(d->fd);
        free(d->part_path);
        free(d->meta_path);
        free(d->meta_tmp_path);
        EVP_MD_CTX_free(d->sha);
        free(d->wbuf);
        download_meta_done(&d->meta);
}

static bool download_is_hex64(const char *s)
{
        size_t n = 0;

        for (; s[n]; n++) {
                if (!isxdigit((unsigned char)s[n]))
                        return false;
        }
        return n == DOWNLOAD_SHA256_HEX_LEN;
}

static int download_check_params(const struct download_params *p)
{
        if (!p->bucket || !p->bucket[0] || !p->key || !p->key[0] || !p->dest_path ||
            !p->dest_path[0])
                return err_set(-EINVAL,
                               "failed to download: bucket, key and destination are required");
        if (p->expected_sha256 && !download_is_hex64(p->expected_sha256))
                return err_set(
                        -EINVAL,
                        "failed to download object '%.300s': expected SHA-256 '%.80s' is not 64 hex digits",
                        p->key, p->expected_sha256);
        return 0;
}

/*
 * Say which limit ran out, with the numbers. The deadline is DOWNLOAD_TIMEOUT's; it bounds one
 * call (one attempt of the job), and the bytes kept on disk let the next attempt resume.
 */
static int download_explain_timeout(struct download_ctx *d, int r)
{
        int64_t now = util_now_monotonic_ms();
        const struct download_params *p = d->p;

        if (d->limits.deadline_ms <= 0 || now < d->limits.deadline_ms)
                return r;
        return err_set(
                -ETIMEDOUT,
                "failed to download object '%.300s' from bucket '%.100s': not finished within DOWNLOAD_TIMEOUT (%.1f s): %" PRIu64
                " of %" PRIu64
                " bytes after %.1f s; transient: the next attempt resumes from what is on disk",
                p->key, p->bucket, (double)p->total_timeout_ms / 1000.0, d->done_bytes,
                d->info.size, (double)(now - d->start_ms) / 1000.0);
}

/* After a failed attempt: keep what is worth resuming, drop what is not. */
static void download_settle(struct download_ctx *d, int r)
{
        char saved[ERR_MSG_MAX];
        struct stat st;

        (void)snprintf(saved, sizeof(saved), "%s", err_text(r));
        if (!err_is_transient(r)) {
                download_remove_partial(d);
        } else if (d->planned) {
                (void)download_checkpoint(d);
        } else if (fstat(d->fd, &st) == 0 && st.st_size == 0 && access(d->meta_path, F_OK) < 0) {
                /* Failed before anything was planned: no empty file left behind. */
                (void)unlink(d->part_path);
        }
        (void)err_set(r, "%s", saved); /* the attempt's error is what counts */
}

int download_object(struct s3_client *client, const struct download_params *p,
                    download_progress_fn progress_cb, void *userdata,
                    struct download_result *ret_result)
{
        struct download_ctx d;
        int r;

        r = download_check_params(p);
        if (r < 0)
                return r;
        r = download_ctx_init(&d, client, p);
        if (r >= 0)
                r = download_open_part(&d);
        if (r < 0)
                goto out; /* nothing of ours on disk to settle (-EBUSY: it is someone else's) */
        d.progress_cb = progress_cb;
        d.userdata = userdata;
        r = download_run(&d, ret_result);
        if (r == -ESTALE) {
                /* The object changed under us: what is on disk is worthless. Once more. */
                download_remove_partial(&d);
                (void)close(d.fd);
                d.fd = -1;
                d.planned = false;
                err_clear();
                r = download_open_part(&d);
                if (r < 0)
                        goto out;
                r = download_run(&d, ret_result);
                if (r == -ESTALE)
                        r = err_set(
                                -EAGAIN,
                                "failed to download object '%.300s' from bucket '%.100s': it changed twice during the download; transient, retry later",
                                p->key, p->bucket);
        }
        if (r == -ETIMEDOUT)
                r = download_explain_timeout(&d, r);
        if (r < 0)
                download_settle(&d, r);
out:
        download_ctx_done(&d);
        return r;
}
