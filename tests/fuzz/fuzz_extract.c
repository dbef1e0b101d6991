/*
 * libFuzzer target for stages/extract: each input is extracted from memory into a fresh
 * root directory, which is then removed. Besides the sanitizers, one oracle: after the
 * extraction the root's parent must hold nothing but the root, whatever the input said.
 *
 * The input's size also picks how the decompressed stream is chunked for libarchive (a
 * third of the inputs get the default, the rest odd sizes), so that the stream scan is
 * fuzzed across block boundaries too; memory input would otherwise arrive in one piece.
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
#include <sys/stat.h>
#include <unistd.h>

#include "common/err.h"
#include "stages/extract.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static int fuzz_base_fd = -1;
static char fuzz_base[PATH_MAX];

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

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
        struct extract_options opts;
        struct extract_result res;
        int root_fd;

        if (fuzz_base_fd < 0)
                fuzz_init();
        if (mkdirat(fuzz_base_fd, "root", 0755) < 0)
                fuzz_die("mkdir root");
        root_fd = openat(fuzz_base_fd, "root", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (root_fd < 0)
                fuzz_die("open root");

        extract_options_init(&opts);
        opts.max_total_bytes = 16u << 20;
        opts.max_entries = 10000;
        extract_chunk_size = size % 3 == 0 ? 0 : 1 + size % 1021;
        (void)extract_memory(root_fd, data, size, &opts, &res);
        err_clear();

        fuzz_check_base();
        fuzz_remove_contents(root_fd);
        if (unlinkat(fuzz_base_fd, "root", AT_REMOVEDIR) < 0)
                fuzz_die("rmdir root");
        return 0;
}
