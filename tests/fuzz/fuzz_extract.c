/*
 * libFuzzer target for stages/extract: each input is extracted into a fresh root directory,
 * which is then removed. Besides the sanitizers, three oracles, checked after every input
 * whatever it said:
 *   - the root's parent holds nothing but the root;
 *   - a sentinel tree at an absolute path outside it (FIM_FUZZ_SENTINEL, default
 *     /tmp/fim-fuzz-sentinel; the seeds' symlinks and hardlinks aim at it) is unchanged:
 *     types, modes, owners, link counts, sizes, mtimes, ctimes, xattrs and contents;
 *   - no file descriptor was left open.
 *
 * The input's size also picks how the decompressed stream is chunked for libarchive (a
 * third of the inputs get the default, the rest odd sizes), so that the stream scan is
 * fuzzed across block boundaries too; memory input would otherwise arrive in one piece. And
 * it picks the entry point, independently of the chunking: half the inputs go through
 * extract_memory(), the other half through extract_fd() on a memfd holding the input, which
 * is how the unpack stage reads a tarball (the read callback, its own xz detection, the 1 MiB
 * read buffer).
 *
 * The limits are low, so that inputs of a few KiB reach them: 16 MiB of file data, 10000
 * entries, 4096 sparse map entries. Memory is a fourth oracle: libarchive keeps what it parses
 * (a sparse map, for one) until the member is done, so a limit the extractor fails to apply
 * shows as heap growth. The heap held at once during an input must stay below
 * FUZZ_HEAP_MAX, which leaves room for what the extractor may legitimately hold (the xz
 * decoder's 128 MiB, buffers) but not for millions of sparse map entries. libFuzzer's own
 * -rss_limit_mb only sees the whole process, whose baseline under ASan is a few hundred MiB.
 *
 * Built only with FIM_FUZZ=ON and clang; tests/fuzz/run.sh builds and runs it.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/xattr.h>
#include <unistd.h>

#include <sanitizer/allocator_interface.h>

#include "common/err.h"
#include "stages/extract.h"

/*
 * Heap the extractor may hold at once for one input (see the oracles above), in bytes and in
 * allocations: a sparse map is millions of 32-byte ones.
 */
#define FUZZ_HEAP_MAX ((size_t)256 << 20)
#define FUZZ_HEAP_BLOCKS_MAX ((size_t)1 << 20)

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* Heap allocated and not freed since the input started, and its peaks (one thread). */
static size_t fuzz_heap;
static size_t fuzz_heap_peak;
static size_t fuzz_blocks;
static size_t fuzz_blocks_peak;
static int fuzz_counting;

static int fuzz_base_fd = -1;
static char fuzz_base[PATH_MAX];
static char fuzz_sentinel[PATH_MAX];
static char *fuzz_sentinel_snap;
static int fuzz_fds;

static void fuzz_remove_contents(int dirfd);

static void fuzz_malloc_hook(const volatile void *ptr, size_t size)
{
        (void)ptr;
        if (!__atomic_load_n(&fuzz_counting, __ATOMIC_RELAXED))
                return;
        fuzz_heap += size;
        if (fuzz_heap > fuzz_heap_peak)
                fuzz_heap_peak = fuzz_heap;
        if (++fuzz_blocks > fuzz_blocks_peak)
                fuzz_blocks_peak = fuzz_blocks;
}

/* Frees of what was allocated before the input only make the count lower: it is a floor. */
static void fuzz_free_hook(const volatile void *ptr)
{
        size_t size;

        if (!ptr || !__atomic_load_n(&fuzz_counting, __ATOMIC_RELAXED))
                return;
        size = __sanitizer_get_allocated_size((const void *)ptr);
        fuzz_heap = fuzz_heap > size ? fuzz_heap - size : 0;
        fuzz_blocks -= fuzz_blocks > 0;
}

static void fuzz_die(const char *what)
{
        fprintf(stderr, "fuzz_extract: %s: %s (base %s)\n", what, strerror(errno), fuzz_base);
        abort();
}

static void fuzz_cleanup(void)
{
        if (fuzz_base[0] != '\0')
                (void)rmdir(fuzz_base);
}

static uint64_t fuzz_hash(const void *data, size_t len, uint64_t h)
{
        const unsigned char *p = data;

        for (size_t i = 0; i < len; i++)
                h = (h ^ p[i]) * UINT64_C(0x100000001b3);
        return h;
}

/* Append to a growing string; aborts when out of memory. */
static void fuzz_append(char **s, size_t *len, const char *line)
{
        size_t n = strlen(line);
        char *v = realloc(*s, *len + n + 1);

        if (!v)
                fuzz_die("realloc");
        memcpy(v + *len, line, n + 1);
        *s = v;
        *len += n;
}

/* One line per path below @path (@rel inside the sentinel), depth first, sorted by readdir. */
static void fuzz_snap_walk(const char *path, const char *rel, char **s, size_t *len)
{
        char line[PATH_MAX * 2 + 256];
        char buf[4096];
        uint64_t h = UINT64_C(0xcbf29ce484222325);
        uint64_t xh = 0;
        struct stat st;
        ssize_t n;

        if (lstat(path, &st) < 0)
                fuzz_die("lstat sentinel");
        n = llistxattr(path, buf, sizeof(buf));
        for (ssize_t i = 0; i < n; i += (ssize_t)strlen(buf + i) + 1) {
                char value[256];
                ssize_t v = lgetxattr(path, buf + i, value, sizeof(value));

                xh += fuzz_hash(buf + i, strlen(buf + i), h) ^
                      fuzz_hash(value, v > 0 ? (size_t)v : 0, h);
        }
        if (S_ISREG(st.st_mode)) {
                int fd = open(path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);

                if (fd < 0)
                        fuzz_die("open sentinel file");
                while ((n = read(fd, buf, sizeof(buf))) > 0)
                        h = fuzz_hash(buf, (size_t)n, h);
                (void)close(fd);
        } else if (S_ISLNK(st.st_mode)) {
                n = readlink(path, buf, sizeof(buf) - 1);
                h = fuzz_hash(buf, n > 0 ? (size_t)n : 0, h);
        }
        (void)snprintf(
                line, sizeof(line), "%s %o %u:%u n%lu s%lld m%lld.%ld c%lld.%ld x%llx h%llx\n", rel,
                (unsigned)st.st_mode, (unsigned)st.st_uid, (unsigned)st.st_gid,
                (unsigned long)st.st_nlink, (long long)st.st_size, (long long)st.st_mtim.tv_sec,
                st.st_mtim.tv_nsec, (long long)st.st_ctim.tv_sec, st.st_ctim.tv_nsec,
                (unsigned long long)xh, (unsigned long long)h);
        fuzz_append(s, len, line);
        if (S_ISDIR(st.st_mode)) {
                DIR *d = opendir(path);
                struct dirent *de;

                if (!d)
                        fuzz_die("opendir sentinel");
                while ((de = readdir(d)) != NULL) {
                        char child[PATH_MAX];
                        char child_rel[PATH_MAX];

                        if (strcmp(de->d_name, ".") == 0 || strcmp(de->d_name, "..") == 0)
                                continue;
                        (void)snprintf(child, sizeof(child), "%s/%s", path, de->d_name);
                        (void)snprintf(child_rel, sizeof(child_rel), "%s/%s", rel, de->d_name);
                        fuzz_snap_walk(child, child_rel, s, len);
                }
                (void)closedir(d);
        }
}

static char *fuzz_snapshot(void)
{
        char *s = NULL;
        size_t len = 0;

        fuzz_append(&s, &len, "");
        fuzz_snap_walk(fuzz_sentinel, ".", &s, &len);
        return s;
}

static int fuzz_count_fds(void)
{
        DIR *d = opendir("/proc/self/fd");
        int n = 0;

        if (!d)
                fuzz_die("opendir /proc/self/fd");
        while (readdir(d) != NULL)
                n++;
        (void)closedir(d);
        return n;
}

static void fuzz_write(const char *rel, const char *data, mode_t mode)
{
        char path[PATH_MAX];
        int fd;

        (void)snprintf(path, sizeof(path), "%s/%s", fuzz_sentinel, rel);
        fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, mode);
        if (fd < 0 || write(fd, data, strlen(data)) != (ssize_t)strlen(data) ||
            fchmod(fd, mode) < 0)
                fuzz_die("write sentinel file");
        (void)close(fd);
}

/*
 * (Re)create the sentinel: what the seeds' attacks aim at. A previous run's copy is removed
 * first, without following symlinks, so that every run starts from the same tree.
 */
static void fuzz_make_sentinel(void)
{
        const char *dir = getenv("FIM_FUZZ_SENTINEL");
        char path[PATH_MAX];
        int fd;

        (void)snprintf(fuzz_sentinel, sizeof(fuzz_sentinel), "%s",
                       dir ? dir : "/tmp/fim-fuzz-sentinel");
        if (fuzz_sentinel[0] != '/') {
                fprintf(stderr, "fuzz_extract: FIM_FUZZ_SENTINEL must be an absolute path\n");
                abort();
        }
        fd = open(fuzz_sentinel, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        if (fd >= 0)
                fuzz_remove_contents(fd);
        else if (mkdir(fuzz_sentinel, 0755) < 0)
                fuzz_die("mkdir sentinel");
        (void)snprintf(path, sizeof(path), "%s/etc", fuzz_sentinel);
        if (mkdir(path, 0755) < 0)
                fuzz_die("mkdir sentinel/etc");
        fuzz_write("etc/passwd", "sentinel:x:0:0::/:/bin/false\n", 0644);
        fuzz_write("etc/shadow", "sentinel:*:1::::::\n", 0600);
        fuzz_write("exec", "#!/bin/sh\n", 0755);
        (void)snprintf(path, sizeof(path), "%s/exec", fuzz_sentinel);
        if (setxattr(path, "user.sentinel", "kept", 4, 0) < 0)
                fuzz_die("setxattr sentinel");
        (void)snprintf(path, sizeof(path), "%s/link", fuzz_sentinel);
        if (symlink("etc/passwd", path) < 0)
                fuzz_die("symlink sentinel");
        fuzz_sentinel_snap = fuzz_snapshot();
}

/* The sentinel oracle: anything the extraction did to it is a finding. */
static void fuzz_check_sentinel(void)
{
        char *now = fuzz_snapshot();

        if (strcmp(now, fuzz_sentinel_snap) != 0) {
                fprintf(stderr, "fuzz_extract: the sentinel changed\n--- before\n%s--- after\n%s",
                        fuzz_sentinel_snap, now);
                abort();
        }
        free(now);
}

/* A private directory on tmpfs when there is one: the fuzzer creates many small trees. */
static void fuzz_init(void)
{
        const char *dir = getenv("FIM_FUZZ_TMPDIR");

        if (!dir)
                dir = access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp";
        (void)snprintf(fuzz_base, sizeof(fuzz_base), "%s/fim-fuzz-extract-XXXXXX", dir);
        if (!mkdtemp(fuzz_base))
                fuzz_die("mkdtemp");
        fuzz_base_fd = open(fuzz_base, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (fuzz_base_fd < 0)
                fuzz_die("open base");
        (void)atexit(fuzz_cleanup);
        fuzz_make_sentinel();
        if (!__sanitizer_install_malloc_and_free_hooks(fuzz_malloc_hook, fuzz_free_hook)) {
                fprintf(stderr, "fuzz_extract: cannot install the malloc hooks\n");
                abort();
        }
}

/* Remove everything below @dirfd (which is consumed), never following symlinks. */
static void fuzz_remove_contents(int dirfd)
{
        DIR *d = fdopendir(dirfd);
        struct dirent *de;

        if (!d)
                fuzz_die("fdopendir");
        while ((de = readdir(d)) != NULL) {
                struct stat st;

                if (strcmp(de->d_name, ".") == 0 || strcmp(de->d_name, "..") == 0)
                        continue;
                if (fstatat(dirfd, de->d_name, &st, AT_SYMLINK_NOFOLLOW) < 0)
                        fuzz_die("fstatat");
                if (S_ISDIR(st.st_mode)) {
                        int fd = openat(dirfd, de->d_name,
                                        O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);

                        if (fd < 0)
                                fuzz_die("openat");
                        fuzz_remove_contents(fd);
                        if (unlinkat(dirfd, de->d_name, AT_REMOVEDIR) < 0)
                                fuzz_die("rmdir");
                } else if (unlinkat(dirfd, de->d_name, 0) < 0) {
                        fuzz_die("unlink");
                }
        }
        (void)closedir(d);
}

/* The oracle: the base directory holds exactly "root". */
static void fuzz_check_base(void)
{
        int fd = openat(fuzz_base_fd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        DIR *d = fd >= 0 ? fdopendir(fd) : NULL;
        struct dirent *de;

        if (!d)
                fuzz_die("open base for reading");
        while ((de = readdir(d)) != NULL) {
                if (strcmp(de->d_name, ".") != 0 && strcmp(de->d_name, "..") != 0 &&
                    strcmp(de->d_name, "root") != 0) {
                        fprintf(stderr, "fuzz_extract: '%s' appeared beside the root\n",
                                de->d_name);
                        abort();
                }
        }
        (void)closedir(d);
}

/* A memfd holding @size bytes at @data, at offset 0. */
static int fuzz_memfd(const uint8_t *data, size_t size)
{
        int fd = memfd_create("fuzz-input", MFD_CLOEXEC);

        if (fd < 0)
                fuzz_die("memfd_create");
        for (size_t done = 0; done < size;) {
                ssize_t n = write(fd, data + done, size - done);

                if (n < 0 && errno == EINTR)
                        continue;
                if (n <= 0)
                        fuzz_die("write memfd");
                done += (size_t)n;
        }
        if (lseek(fd, 0, SEEK_SET) != 0)
                fuzz_die("lseek memfd");
        return fd;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
        struct extract_options opts;
        struct extract_result res;
        int tar_fd = -1;
        int root_fd;

        if (fuzz_base_fd < 0)
                fuzz_init();
        /*
         * Counted per input: between inputs libFuzzer itself may open descriptors (the pipes to
         * llvm-symbolizer, started the first time it prints a NEW_FUNC line).
         */
        fuzz_fds = fuzz_count_fds();
        if (mkdirat(fuzz_base_fd, "root", 0755) < 0)
                fuzz_die("mkdir root");
        root_fd = openat(fuzz_base_fd, "root", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (root_fd < 0)
                fuzz_die("open root");

        extract_options_init(&opts);
        opts.max_total_bytes = 16u << 20;
        opts.max_entries = 10000;
        opts.max_sparse_entries = 4096;
        extract_chunk_size = size % 3 == 0 ? 0 : 1 + size % 1021;
        if ((size / 3) % 2 == 1)
                tar_fd = fuzz_memfd(data, size);
        fuzz_heap = fuzz_heap_peak = fuzz_blocks = fuzz_blocks_peak = 0;
        __atomic_store_n(&fuzz_counting, 1, __ATOMIC_RELAXED);
        if (tar_fd >= 0)
                (void)extract_fd(root_fd, tar_fd, &opts, &res);
        else
                (void)extract_memory(root_fd, data, size, &opts, &res);
        __atomic_store_n(&fuzz_counting, 0, __ATOMIC_RELAXED);
        err_clear();
        if (tar_fd >= 0)
                (void)close(tar_fd);
        if (fuzz_heap_peak > FUZZ_HEAP_MAX || fuzz_blocks_peak > FUZZ_HEAP_BLOCKS_MAX) {
                fprintf(stderr,
                        "fuzz_extract: the input made the extractor hold %zu MiB in %zu allocations at once\n",
                        fuzz_heap_peak >> 20, fuzz_blocks_peak);
                abort();
        }

        fuzz_check_base();
        fuzz_check_sentinel();
        fuzz_remove_contents(root_fd);
        if (unlinkat(fuzz_base_fd, "root", AT_REMOVEDIR) < 0)
                fuzz_die("rmdir root");
        if (fuzz_count_fds() != fuzz_fds) {
                fprintf(stderr, "fuzz_extract: %d file descriptors open, %d before\n",
                        fuzz_count_fds(), fuzz_fds);
                abort();
        }
        return 0;
}
