/*
 * Unit tests for stages/extract: every hostile archive from tests/extract/make_corpus.py
 * must fail with its exact errno and a message naming the member, and must leave
 * everything outside the root unchanged; valid archives must come out with the right
 * types, modes, owners, times, link targets, xattrs, holes and counts.
 *
 * Layout under a temporary directory:
 *   corpus/          the generated archives
 *   work/root/       the extraction root, recreated for each test
 *   work/sentinel/   a tree beside the root, the target of the attacks, snapshotted
 * Members that aim at the real /etc (and /tmp) only ever create a file named after the
 * canary; the tests check that it does not exist.
 *
 * Runs as root (owners, security.capability, the ENOSPC test's tmpfs mount).
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <sys/wait.h>
#include <sys/xattr.h>
#include <unistd.h>

#include <cmocka.h>

#include "common/err.h"
#include "common/util.h"
#include "stages/extract.h"

#define T0 1600000000

static char base[PATH_MAX];
static char corpus[PATH_MAX];
static char work[PATH_MAX];
static char rootdir[PATH_MAX];
static char sentinel[PATH_MAX];
static char canary[64];
static size_t default_tree_memory_max;

/* --- helpers --- */

static void xsnprintf(char *buf, size_t size, const char *fmt, ...)
        __attribute__((format(printf, 3, 4)));

static void xsnprintf(char *buf, size_t size, const char *fmt, ...)
{
        va_list ap;
        int n;

        va_start(ap, fmt);
        n = vsnprintf(buf, size, fmt, ap);
        va_end(ap);
        assert_true(n >= 0 && (size_t)n < size);
}

static int run_argv(const char *const argv[])
{
        int status;
        pid_t pid = fork();

        if (pid == 0) {
                execvp(argv[0], (char *const *)argv);
                _exit(127);
        }
        if (pid < 0 || waitpid(pid, &status, 0) < 0)
                return -1;
        return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

static void rm_rf(const char *path)
{
        const char *const argv[] = {"rm", "-rf", path, NULL};

        assert_int_equal(run_argv(argv), 0);
}

static void write_file(const char *path, const char *data, mode_t mode)
{
        int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode);

        assert_true(fd >= 0);
        assert_int_equal(write(fd, data, strlen(data)), (ssize_t)strlen(data));
        assert_int_equal(fchmod(fd, mode), 0);
        assert_int_equal(close(fd), 0);
}

static char *read_file(const char *path, size_t *ret_len)
{
        struct stat st;
        char *buf;
        int fd = open(path, O_RDONLY | O_CLOEXEC);

        assert_true(fd >= 0);
        assert_int_equal(fstat(fd, &st), 0);
        buf = malloc((size_t)st.st_size + 1);
        assert_non_null(buf);
        assert_int_equal(read(fd, buf, (size_t)st.st_size), st.st_size);
        buf[st.st_size] = '\0';
        (void)close(fd);
        if (ret_len)
                *ret_len = (size_t)st.st_size;
        return buf;
}

static void rootpath(char *buf, size_t size, const char *rel)
{
        xsnprintf(buf, size, "%s/%s", rootdir, rel);
}

static struct stat lstat_root(const char *rel)
{
        char path[PATH_MAX];
        struct stat st;

        rootpath(path, sizeof(path), rel);
        if (lstat(path, &st) < 0)
                fail_msg("lstat '%s': %s", path, strerror(errno));
        return st;
}

static bool exists_root(const char *rel)
{
        char path[PATH_MAX];
        struct stat st;

        rootpath(path, sizeof(path), rel);
        return lstat(path, &st) == 0;
}

static void assert_root_content(const char *rel, const char *want)
{
        char path[PATH_MAX];
        char *got;

        rootpath(path, sizeof(path), rel);
        got = read_file(path, NULL);
        assert_string_equal(got, want);
        free(got);
}

static void assert_root_link(const char *rel, const char *want)
{
        char path[PATH_MAX];
        char got[PATH_MAX];
        ssize_t n;

        rootpath(path, sizeof(path), rel);
        n = readlink(path, got, sizeof(got) - 1);
        assert_true(n >= 0);
        got[n] = '\0';
        assert_string_equal(got, want);
}

/* --- snapshots of everything outside the root --- */

struct snap {
        char **lines;
        size_t n;
        size_t cap;
};

static uint64_t fnv1a(const char *data, size_t len)
{
        uint64_t h = UINT64_C(0xcbf29ce484222325);

        for (size_t i = 0; i < len; i++) {
                h ^= (unsigned char)data[i];
                h *= UINT64_C(0x100000001b3);
        }
        return h;
}

static void snap_add(struct snap *s, const char *line)
{
        if (s->n == s->cap) {
                s->cap = s->cap ? s->cap * 2 : 64;
                s->lines = realloc(s->lines, s->cap * sizeof(*s->lines));
                assert_non_null(s->lines);
        }
        s->lines[s->n] = strdup(line);
        assert_non_null(s->lines[s->n]);
        s->n++;
}

/* A hash of the extended attributes of @path (not followed): names and values. */
static uint64_t snap_xattrs(const char *path)
{
        char names[4096];
        char value[4096];
        uint64_t h = 0;
        ssize_t n = llistxattr(path, names, sizeof(names));

        assert_true(n >= 0);
        for (ssize_t i = 0; i < n; i += (ssize_t)strlen(names + i) + 1) {
                ssize_t v = lgetxattr(path, names + i, value, sizeof(value));

                assert_true(v >= 0);
                /* Order-independent: llistxattr() makes no promise about the order. */
                h += fnv1a(names + i, strlen(names + i)) ^ fnv1a(value, (size_t)v);
        }
        return h;
}

/*
 * One line per path: type, mode, owner, links, size, mtime, ctime (which any chmod, chown,
 * xattr or new hardlink bumps), xattrs, content hash or link target.
 */
static void snap_walk(struct snap *s, const char *dir, const char *rel, const char *skip)
{
        char path[PATH_MAX];
        char line[PATH_MAX + 256];
        char target[PATH_MAX] = "";
        uint64_t hash = 0;
        struct stat st;
        DIR *d;

        xsnprintf(path, sizeof(path), "%s%s%s", dir, rel[0] ? "/" : "", rel);
        assert_int_equal(lstat(path, &st), 0);
        if (S_ISREG(st.st_mode)) {
                size_t len;
                char *data = read_file(path, &len);

                hash = fnv1a(data, len);
                free(data);
        } else if (S_ISLNK(st.st_mode)) {
                ssize_t n = readlink(path, target, sizeof(target) - 1);

                assert_true(n >= 0);
                target[n] = '\0';
        }
        xsnprintf(line, sizeof(line),
                  "%s %o %u:%u n%lu %lld %lld.%09ld c%lld.%09ld x%016llx %016llx %s",
                  rel[0] ? rel : ".", (unsigned)st.st_mode, (unsigned)st.st_uid,
                  (unsigned)st.st_gid, (unsigned long)st.st_nlink,
                  S_ISDIR(st.st_mode) ? 0LL : (long long)st.st_size, (long long)st.st_mtim.tv_sec,
                  st.st_mtim.tv_nsec, (long long)st.st_ctim.tv_sec, st.st_ctim.tv_nsec,
                  (unsigned long long)snap_xattrs(path), (unsigned long long)hash, target);
        snap_add(s, line);
        if (!S_ISDIR(st.st_mode))
                return;
        d = opendir(path);
        assert_non_null(d);
        for (struct dirent *de; (de = readdir(d));) {
                char child[PATH_MAX];

                if (strcmp(de->d_name, ".") == 0 || strcmp(de->d_name, "..") == 0)
                        continue;
                xsnprintf(child, sizeof(child), "%s%s%s", rel, rel[0] ? "/" : "", de->d_name);
                if (strcmp(child, skip) == 0)
                        continue;
                snap_walk(s, dir, child, skip);
        }
        (void)closedir(d);
}

static int snap_cmp(const void *a, const void *b)
{
        return strcmp(*(char *const *)a, *(char *const *)b);
}

static char *snapshot(void)
{
        struct snap s = {0};
        size_t total = 1;
        size_t o = 0;
        char *out;

        snap_walk(&s, work, "", "root");
        qsort(s.lines, s.n, sizeof(*s.lines), snap_cmp);
        for (size_t i = 0; i < s.n; i++)
                total += strlen(s.lines[i]) + 1;
        out = malloc(total);
        assert_non_null(out);
        for (size_t i = 0; i < s.n; i++) {
                size_t len = strlen(s.lines[i]);

                memcpy(out + o, s.lines[i], len);
                out[o + len] = '\n';
                o += len + 1;
                free(s.lines[i]);
        }
        out[o] = '\0';
        free(s.lines);
        return out;
}

static void assert_no_canary(void)
{
        char path[PATH_MAX];
        struct stat st;

        xsnprintf(path, sizeof(path), "/etc/%s", canary);
        assert_int_not_equal(lstat(path, &st), 0);
        xsnprintf(path, sizeof(path), "/tmp/%s", canary);
        assert_int_not_equal(lstat(path, &st), 0);
}

/* Recreate work/ with an empty root and the sentinel tree beside it. */
static void prepare(bool preexisting)
{
        char path[PATH_MAX];
        struct timespec ts[2] = {{.tv_sec = T0}, {.tv_sec = T0}};

        rm_rf(work);
        assert_int_equal(mkdir(work, 0755), 0);
        assert_int_equal(mkdir(rootdir, 0755), 0);
        assert_int_equal(mkdir(sentinel, 0755), 0);
        xsnprintf(path, sizeof(path), "%s/etc", sentinel);
        assert_int_equal(mkdir(path, 0755), 0);
        xsnprintf(path, sizeof(path), "%s/etc/passwd", sentinel);
        write_file(path, "sentinel:x:0:0::/:/bin/false\n", 0644);
        xsnprintf(path, sizeof(path), "%s/etc/shadow", sentinel);
        write_file(path, "sentinel:*:1::::::\n", 0600);
        xsnprintf(path, sizeof(path), "%s/dir", sentinel);
        assert_int_equal(mkdir(path, 0700), 0);
        xsnprintf(path, sizeof(path), "%s/dir/file", sentinel);
        write_file(path, "data\n", 0640);
        assert_int_equal(setxattr(path, "user.sentinel", "kept", 4, 0), 0);
        xsnprintf(path, sizeof(path), "%s/link", sentinel);
        assert_int_equal(symlink("etc/passwd", path), 0);
        xsnprintf(path, sizeof(path), "%s/exec", sentinel);
        write_file(path, "#!/bin/sh\n", 0755);
        assert_int_equal(utimensat(AT_FDCWD, path, ts, 0), 0);
        if (!preexisting)
                return;
        /* Entries a careless extractor might reuse: not ours, or pointing outside. */
        rootpath(path, sizeof(path), "pre");
        write_file(path, "pre-existing\n", 0644);
        rootpath(path, sizeof(path), "link");
        assert_int_equal(symlink("../sentinel", path), 0);
        rootpath(path, sizeof(path), "s");
        assert_int_equal(symlink("../sentinel/etc/passwd", path), 0);
}

static int extract_corpus(const char *name, const struct extract_options *opts,
                          struct extract_result *ret)
{
        char path[PATH_MAX];
        int root_fd = open(rootdir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        int r;

        assert_true(root_fd >= 0);
        xsnprintf(path, sizeof(path), "%s/%s", corpus, name);
        r = extract_file(root_fd, path, opts, ret);
        (void)close(root_fd);
        return r;
}

/* --- setup --- */

static int group_setup(void **state)
{
        char script[PATH_MAX];
        char sent_arg[PATH_MAX];

        (void)state;
        xsnprintf(base, sizeof(base), "/tmp/fim-test-extract-XXXXXX");
        if (!mkdtemp(base))
                return -1;
        xsnprintf(corpus, sizeof(corpus), "%s/corpus", base);
        xsnprintf(work, sizeof(work), "%s/work", base);
        xsnprintf(rootdir, sizeof(rootdir), "%s/root", work);
        xsnprintf(sentinel, sizeof(sentinel), "%s/sentinel", work);
        xsnprintf(canary, sizeof(canary), "fim-extract-canary-%d", (int)getpid());
        default_tree_memory_max = extract_tree_memory_max;
        xsnprintf(script, sizeof(script), "%s/tests/extract/make_corpus.py", FIM_SOURCE_DIR);
        xsnprintf(sent_arg, sizeof(sent_arg), "%s", sentinel);

        const char *const argv[] = {"python3", script,     corpus, "--sentinel",
                                    sent_arg,  "--canary", canary, NULL};

        if (run_argv(argv) != 0) {
                fprintf(stderr, "make_corpus.py failed\n");
                return -1;
        }
        return 0;
}

static int group_teardown(void **state)
{
        const char *const argv[] = {"rm", "-rf", base, NULL};

        (void)state;
        return run_argv(argv) == 0 ? 0 : -1;
}

/* --- hostile and broken archives --- */

enum {
        CASE_LIMITS = 1 << 0,      /* max_entries 100, max_total_bytes 1 MiB */
        CASE_PREEXISTING = 1 << 1, /* root holds "pre", "link" and "s" beforehand */
        CASE_WALK = 1 << 2,        /* resolve without openat2 */
        CASE_CHUNKED = 1 << 3,     /* feed libarchive 777-byte chunks */
        CASE_SMALL_TREE = 1 << 4,  /* 1 MiB for remembered directories */
        CASE_SPARSE = 1 << 5,      /* max_sparse_entries 100 */
};

struct hostile_case {
        const char *file;
        int err;
        /* Must appear in the message: "@" stands for the sentinel path, "#" for the canary. */
        const char *member;
        unsigned flags;
};

static const struct hostile_case hostile_cases[] = {
        {"dotdot.tar", -EPERM, "'../sentinel/pwned'", 0},
        {"dotdot_deep.tar", -EPERM, "'a/../../pwned'", 0},
        {"dotdot_inside.tar", -EPERM, "'a/../b'", 0},
        {"absolute.tar", -EPERM, "'@/pwned'", 0},
        {"symlink_escape_abs.tar", -EPERM, "'a/passwd'", 0},
        {"symlink_escape_etc.tar", -EPERM, "'a/#'", 0},
        {"symlink_escape_rel.tar", -EPERM, "'a/passwd'", 0},
        {"symlink_dot.tar", -EPERM, "'a/x'", 0},
        {"symlink_dotdot.tar", -EPERM, "'a/sentinel/pwned'", 0},
        {"symlink_chain.tar", -EPERM, "'l1/pwned'", 0},
        {"symlink_deep_parent.tar", -EPERM, "'d/s/tmp/#'", 0},
        {"symlink_dir_member.tar", -EPERM, "'a/newdir/'", 0},
        {"hardlink_abs.tar", -EPERM, "'h'", 0},
        {"hardlink_escape.tar", -EPERM, "'h'", 0},
        {"hardlink_symlink_parent.tar", -EPERM, "'h'", 0},
        {"hardlink_forward.tar", -ENOENT, "'h'", 0},
        {"hardlink_missing_parent.tar", -ENOENT, "'h': hardlink target 'nodir/file'", 0},
        {"hardlink_dir.tar", -EPERM, "'h'", 0},
        {"hardlink_root.tar", -EPERM, "'h'", 0},
        {"hardlink_preexisting.tar", -EPERM, "'h'", CASE_PREEXISTING},
        {"preexisting_symlink.tar", -EPERM, "'link/pwned'", CASE_PREEXISTING},
        {"dir_replaced_by_symlink.tar", -EPERM, "'d/pwned'", 0},
        {"dir_nonempty_replaced.tar", -EEXIST, "'d'", 0},
        {"root_symlink.tar", -EPERM, "'.'", 0},
        {"root_file.tar", -EPERM, "'.'", 0},
        {"file_parent.tar", -ENOTDIR, "'f/g'", 0},
        {"huge_uid.tar", -EBADMSG, "'f'", 0},
        {"symlink_empty_target.tar", -EBADMSG, "'s'", 0},
        {"empty_name.tar", -EBADMSG, "''", 0},
        {"nul_pax_path.tar", -EBADMSG, "'safe'", 0},
        {"nul_pax_linkpath.tar", -EBADMSG, "link target 'f'", 0},
        {"nul_ustar_name.tar", -EBADMSG, "'safe'", 0},
        {"nul_ustar_prefix.tar", -EBADMSG, "'dir'", 0},
        {"nul_gnu_longname.tar", -EBADMSG, "'safe'", 0},
        {"nul_ustar_link.tar", -EBADMSG, "'s': link target 'f' has an embedded NUL", 0},
        {"nul_gnu_longlink.tar", -EBADMSG, "'s': link target 'f' has an embedded NUL", 0},
        {"tab_size_pax.tar", -EBADMSG, "'safe': name has an embedded NUL byte (pax", 0},
        {"tab_size_gnu_longname.tar", -EBADMSG, "'safe': name has an embedded NUL byte (GNU", 0},
        {"overlapping_ext_headers.tar", -EBADMSG, "too many overlapping extension headers", 0},
        {"negative_size.tar", -EBADMSG, "after member 'a': bad header: Tar entry has negative", 0},
        {"hardlink_target_too_long.tar", -ENAMETOOLONG, "'h': hardlink target is longer", 0},
        {"hardlink_target_too_deep.tar", -ENAMETOOLONG, "is 71 levels deep", 0},
        {"pax_path_dotdot.tar", -EPERM, "'../sentinel/pwned': path has a '..' component", 0},
        {"pax_path_absolute.tar", -EPERM, "'@/pwned': absolute member path", 0},
        {"pax_linkpath_dotdot.tar", -EPERM, "'h': hardlink target '../sentinel/etc/passwd' has", 0},
        {"pax_linkpath_up_etc.tar", -EPERM, "'h': hardlink target '../../etc' has a '..'", 0},
        {"pax_linkpath_absolute.tar", -EPERM,
         "'h': hardlink target '@/etc/passwd' is an absolute path", 0},
        {"pax_sparse_name_dotdot.tar", -EPERM, "'../sentinel/pwned': path has a '..' component", 0},
        {"pax_sparse_name_absolute.tar", -EPERM, "'@/pwned': absolute member path", 0},
        {"pax_sparse10_name_dotdot.tar", -EPERM, "'../sentinel/pwned': path has a '..'", 0},
        {"sparse_bad_map.tar", -EBADMSG, "'s': bad header", 0},
        {"sparse_huge_size.tar", -EFBIG, "'s': sparse file is 1099511627777 bytes long", 0},
        {"sparse_map_past_size.tar", -EFBIG, "'s': sparse map puts data at offset", 0},
        {"charset_hides_warning.tar", -EBADMSG, "may hide another warning", 0},
        {"dirs_memory_cap.tar.gz", -E2BIG, "'02557dddd", CASE_SMALL_TREE},
        {"truncated_after_zero_block.tar", -EBADMSG, "truncated after member 'z'", 0},
        {"truncated_after_zero_block.tar.gz", -EBADMSG, "truncated after member 'z'", 0},
        {"huge_xz_dictionary.tar.xz", -E2BIG, "xz stream needs 4096 MiB of memory", 0},
        {"malformed_pax.tar", -EBADMSG, "'f'", 0},
        {"component_too_long.tar", -ENAMETOOLONG, "'d/cccccccccc", 0},
        {"too_many_entries.tar", -E2BIG, "'f100'", CASE_LIMITS},
        {"too_many_bytes.tar", -EFBIG, "'b'", CASE_LIMITS},
        {"bomb_skipped_data.tar.gz", -EFBIG, "member 'h': more than", CASE_LIMITS},
        {"too_deep.tar", -ENAMETOOLONG, "'d/d/d/d", 0},
        {"too_long.tar", -ENAMETOOLONG, "'nnnnnnnnnn", 0},
        {"symlink_target_too_long.tar", -ENAMETOOLONG, "'s'", 0},
        {"truncated_data.tar", -EBADMSG, "'a'", 0},
        {"truncated_header.tar", -EBADMSG, "'a'", 0},
        {"bad_checksum.tar", -EBADMSG, "'a'", 0},
        {"truncated_at_member.tar", -EBADMSG, "after member 'a'", 0},
        {"truncated_at_member.tar.gz", -EBADMSG, "after member 'a'", 0},
        {"garbage.bin", -EBADMSG, "failed to read archive", 0},
        {"empty_file.bin", -EBADMSG, "failed to read archive", 0},
        {"zip_archive.zip", -EBADMSG, "failed to read archive", 0},
        {"truncated.tar.gz", -EBADMSG, "failed to", 0},
        {"garbage_after_gzip_magic.tar.gz", -EBADMSG, "failed to", 0},
        {"basic.tar.bz2", -EBADMSG, "failed to read archive", 0},
        {"symlink_escape_abs.tar.bz2", -EBADMSG, "failed to read archive", 0},
        {"symlink_escape_abs.tar.gz", -EPERM, "'a/passwd'", 0},
        {"symlink_escape_abs.tar.zst", -EPERM, "'a/passwd'", 0},
        {"symlink_escape_abs.tar.xz", -EPERM, "'a/passwd'", 0},
        {"lone_zero_then_member.tar", -EBADMSG, "lone zero block at offset 1024 after member 'a'",
         0},
        {"sparse_old_chain.tar", -E2BIG, "'sp': sparse map has more than 100 entries", CASE_SPARSE},
        {"sparse_10_count.tar", -E2BIG, "'sp': sparse map has more than 100 entries", CASE_SPARSE},
        {"sparse_01_map.tar", -E2BIG, "'sp': sparse map has more than 100 entries", CASE_SPARSE},
        {"sparse_00_records.tar", -E2BIG, "'sp': sparse map has more than 100 entries",
         CASE_SPARSE},
        {"sparse_sun_holes.tar", -E2BIG, "'sp': sparse map has more than 100 entries", CASE_SPARSE},
        {"sparse150_gnu.tar", -E2BIG, "'sparse': sparse map has more than 100", CASE_SPARSE},
        {"sparse150_pax00.tar", -E2BIG, "'sparse': sparse map has more than 100", CASE_SPARSE},
        {"sparse150_pax01.tar", -E2BIG, "'sparse': sparse map has more than 100", CASE_SPARSE},
        {"sparse150_pax10.tar", -E2BIG, "'sparse': sparse map has more than 100", CASE_SPARSE},
        {"sparse_old_huge.tar.gz", -E2BIG, "'sp': sparse map has more than 65536 entries", 0},
        {"sparse_10_huge.tar.gz", -E2BIG, "'sp': sparse map has more than 65536 entries", 0},
        {"sparse_map_longer_than_data.tar", -EBADMSG, "'sp': file data ends at offset 3072", 0},
        {"sparse_map_shorter_than_data.tar", -EBADMSG,
         "'sp': file data ends at offset 2022, inside", 0},
        {"device_over_nonempty_dir.tar", -EEXIST, "'d': would replace a non-empty directory", 0},
        {"device_under_symlink.tar", -EPERM, "'a/null': parent 'a' is a symlink", 0},
        {"dotdot_quoted.tar", -EPERM, "'../x\\x22\\x0akey=v'", 0},
        {"symlink_parent_quoted.tar", -EPERM, "'a\\x09b/x': parent 'a\\x09b' is a symlink", 0},
};

/* The options a hostile case runs with (see its flags). */
static void hostile_options(const struct hostile_case *tc, struct extract_options *opts)
{
        extract_options_init(opts);
        if (tc->flags & CASE_LIMITS) {
                opts->max_entries = 100;
                opts->max_total_bytes = 1 << 20;
        }
        if (tc->flags & CASE_SPARSE)
                opts->max_sparse_entries = 100;
}

/* Expand "@" to the sentinel path and "#" to the canary name. */
static void expand_member(const char *in, char *out, size_t size)
{
        size_t o = 0;

        for (; *in; in++) {
                const char *sub = *in == '@' ? sentinel : *in == '#' ? canary : NULL;
                size_t n = sub ? strlen(sub) : 1;

                assert_true(o + n < size);
                memcpy(out + o, sub ? sub : in, n);
                o += n;
        }
        out[o] = '\0';
}

static void test_extract_hostile(void **state)
{
        const struct hostile_case *tc = *state;
        char member[PATH_MAX];
        struct extract_options opts;
        struct extract_result res = {.file_count = 12345};
        char *before;
        char *after;
        int r;

        hostile_options(tc, &opts);
        extract_disable_openat2 = (tc->flags & CASE_WALK) != 0;
        extract_chunk_size = (tc->flags & CASE_CHUNKED) ? 777 : 0;
        if (tc->flags & CASE_SMALL_TREE)
                extract_tree_memory_max = 1 << 20;
        prepare(tc->flags & CASE_PREEXISTING);
        assert_no_canary();
        before = snapshot();

        r = extract_corpus(tc->file, &opts, &res);
        extract_disable_openat2 = false;
        extract_chunk_size = 0;
        extract_tree_memory_max = default_tree_memory_max;

        expand_member(tc->member, member, sizeof(member));
        if (r != tc->err || !strstr(err_last(), member))
                fail_msg("%s: got %s (%d) '%s', want %s with \"%s\"", tc->file, err_name(r), r,
                         err_last(), err_name(tc->err), member);
        /* Written on failure too, with what came before the refused member. */
        assert_true(res.file_count < 12345);
        after = snapshot();
        if (strcmp(before, after) != 0)
                fail_msg("%s changed things outside the root:\n--- before\n%s--- after\n%s",
                         tc->file, before, after);
        assert_no_canary();
        free(before);
        free(after);
}

/* --- valid archives --- */

static struct extract_result extract_ok(const char *name, const struct extract_options *opts)
{
        struct extract_result res;
        int r = extract_corpus(name, opts, &res);

        if (r < 0)
                fail_msg("%s: %s (%s)", name, err_last(), err_name(r));
        return res;
}

static void assert_mode(const char *rel, mode_t type, mode_t perm, uid_t uid, gid_t gid)
{
        struct stat st = lstat_root(rel);

        if ((st.st_mode & S_IFMT) != type || (st.st_mode & 07777) != perm || st.st_uid != uid ||
            st.st_gid != gid)
                fail_msg("'%s': mode %o %u:%u, want %o %u:%u", rel, (unsigned)st.st_mode,
                         (unsigned)st.st_uid, (unsigned)st.st_gid, (unsigned)(type | perm),
                         (unsigned)uid, (unsigned)gid);
}

static void assert_mtime(const char *rel, time_t sec, long nsec)
{
        struct stat st = lstat_root(rel);

        if (st.st_mtim.tv_sec != sec || st.st_mtim.tv_nsec != nsec)
                fail_msg("'%s': mtime %lld.%09ld, want %lld.%09ld", rel,
                         (long long)st.st_mtim.tv_sec, st.st_mtim.tv_nsec, (long long)sec, nsec);
}

static void check_basic(const struct extract_result *res)
{
        char target[PATH_MAX];
        struct stat a;
        struct stat b;
        uint64_t bytes = 0;
        static const char *const regular[] = {
                "etc/passwd", "etc/shadow", "bin/su", "bin/wall", "home/user/notes",
                "ro/a",       "ro/sub/b",   "empty",  "big",      "usr/lib/deep/file",
        };

        assert_int_equal(res->dir_count, 7);
        assert_int_equal(res->symlink_count, 5);
        assert_int_equal(res->hardlink_count, 2);
        assert_int_equal(res->file_count, 10 + 5 + 2);
        assert_int_equal(res->skipped_devices, 0);
        assert_int_equal(res->skipped_xattrs, 0);
        assert_int_equal(res->skipped_other, 0);
        for (size_t i = 0; i < ARRAY_SIZE(regular); i++)
                bytes += (uint64_t)lstat_root(regular[i]).st_size;
        assert_int_equal(res->size_bytes, bytes);

        /* "./" applies to the root itself, after its contents. */
        assert_mode(".", S_IFDIR, 0750, 0, 0);
        assert_mtime(".", T0 + 1, 0);
        assert_mode("etc", S_IFDIR, 0755, 0, 0);
        assert_mtime("etc", T0 + 3, 0);
        assert_mode("etc/passwd", S_IFREG, 0644, 0, 0);
        assert_mtime("etc/passwd", 1600000010, 123456789);
        assert_root_content("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n");
        assert_mode("etc/shadow", S_IFREG, 0640, 0, 42);
        assert_mode("bin/su", S_IFREG, 04755, 0, 0);
        assert_mode("bin/wall", S_IFREG, 02755, 0, 5);
        assert_mode("tmp", S_IFDIR, 01777, 0, 0);
        assert_mode("home/user", S_IFDIR, 0700, 1234, 5678);
        assert_mode("home/user/notes", S_IFREG, 0600, 1234, 5678);
        assert_mode("home", S_IFDIR, 0755, 0, 0); /* implicit */
        assert_mode("ro", S_IFDIR, 0555, 0, 0);
        assert_mode("ro/a", S_IFREG, 0444, 0, 0);
        assert_mode("ro/sub", S_IFDIR, 0500, 0, 0);
        assert_root_content("ro/sub/b", "b");
        assert_mode("empty", S_IFREG, 0644, 0, 0);
        assert_int_equal(lstat_root("empty").st_size, 0);
        assert_mode("usr/lib/deep", S_IFDIR, 0755, 0, 0);
        assert_root_content("usr/lib/deep/file", "implicit parents");

        /* Symlink targets verbatim, owner and times on the link itself. */
        xsnprintf(target, sizeof(target), "%s/etc/passwd", sentinel);
        assert_root_link("abs", target);
        assert_mode("abs", S_IFLNK, 0777, 1234, 5678);
        assert_mtime("abs", T0 + 2, 0);
        assert_root_link("rel", "etc/passwd");
        assert_root_link("dangling", "nowhere/at/all");
        assert_root_link("loop", "loop");
        assert_root_link("up", "../sentinel/etc/shadow");

        /* Hardlinks share the inode. */
        a = lstat_root("bin/su");
        b = lstat_root("bin/su-hard");
        assert_int_equal(a.st_ino, b.st_ino);
        assert_int_equal(a.st_nlink, 2);
        a = lstat_root("etc/passwd");
        b = lstat_root("etc/passwd-link");
        assert_int_equal(a.st_ino, b.st_ino);

        /* 3 MiB of a repeating pattern. */
        {
                char path[PATH_MAX];
                size_t len;
                char *data;

                rootpath(path, sizeof(path), "big");
                data = read_file(path, &len);
                assert_int_equal(len, 3u << 20);
                for (size_t i = 0; i < len; i++) {
                        if ((unsigned char)data[i] != (i & 0xff))
                                fail_msg("big: byte %zu is %u", i, (unsigned char)data[i]);
                }
                free(data);
        }
}

static void test_extract_basic(void **state)
{
        const char *file = *state;
        struct extract_result res;
        char *before;
        char *after;

        prepare(false);
        before = snapshot();
        res = extract_ok(file, NULL);
        check_basic(&res);
        /* "abs" (owned by 1234) aims at the sentinel: its chown must not have followed it. */
        after = snapshot();
        assert_string_equal(before, after);
        free(before);
        free(after);
}

static void test_extract_basic_walk(void **state)
{
        struct extract_result res;

        (void)state;
        prepare(false);
        extract_disable_openat2 = true;
        res = extract_ok("basic.tar", NULL);
        extract_disable_openat2 = false;
        check_basic(&res);
}

static void test_extract_basic_chunked(void **state)
{
        struct extract_result res;

        (void)state;
        prepare(false);
        extract_chunk_size = 777;
        res = extract_ok("basic.tar.zst", NULL);
        extract_chunk_size = 0;
        check_basic(&res);
}

static void test_extract_basic_from_memory(void **state)
{
        char path[PATH_MAX];
        struct extract_result res;
        size_t len;
        char *data;
        int root_fd;

        (void)state;
        prepare(false);
        xsnprintf(path, sizeof(path), "%s/basic.tar", corpus);
        data = read_file(path, &len);
        root_fd = open(rootdir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        assert_true(root_fd >= 0);
        assert_int_equal(extract_memory(root_fd, data, len, NULL, &res), 0);
        (void)close(root_fd);
        free(data);
        check_basic(&res);
}

static void test_extract_no_same_owner(void **state)
{
        struct extract_options opts;
        struct extract_result res;

        (void)state;
        extract_options_init(&opts);
        opts.preserve_owner = false;
        prepare(false);
        res = extract_ok("basic.tar", &opts);
        assert_int_equal(res.file_count, 17);
        assert_mode("bin/su", S_IFREG, 0755, 0, 0); /* setuid dropped */
        assert_mode("bin/wall", S_IFREG, 0755, 0, 0);
        assert_mode("home/user/notes", S_IFREG, 0600, 0, 0);
        assert_mode("abs", S_IFLNK, 0777, 0, 0);

        prepare(false);
        res = extract_ok("xattrs.tar", &opts);
        assert_int_equal(res.skipped_xattrs, 5); /* the capability too, without owners */
        {
                char path[PATH_MAX];

                rootpath(path, sizeof(path), "f");
                assert_int_equal(getxattr(path, "security.capability", NULL, 0), -1);
                assert_true(getxattr(path, "user.x", NULL, 0) > 0);
        }
}

/*
 * Set-id bits survive on files owned by others than root too: chown() clears them, so the
 * mode must be applied after the owner. Without preserve_owner they are dropped.
 */
static void test_extract_setuid(void **state)
{
        struct extract_options opts;

        (void)state;
        prepare(false);
        (void)extract_ok("setuid.tar", NULL);
        assert_mode("su", S_IFREG, 06755, 0, 0);
        assert_mode("suid-user", S_IFREG, 04755, 1234, 1234);
        assert_mode("sgid-group", S_IFREG, 02755, 1234, 1234);
        assert_mode("both-other", S_IFREG, 06750, 1234, 5678);
        assert_mode("sgid-dir", S_IFDIR, 02775, 1234, 1234);
        assert_mode("sgid-dir/f", S_IFREG, 04711, 1234, 1234);
        assert_root_content("suid-user", "u");

        extract_options_init(&opts);
        opts.preserve_owner = false;
        prepare(false);
        (void)extract_ok("setuid.tar", &opts);
        assert_mode("su", S_IFREG, 0755, 0, 0);
        assert_mode("suid-user", S_IFREG, 0755, 0, 0);
        assert_mode("sgid-group", S_IFREG, 0755, 0, 0);
        assert_mode("both-other", S_IFREG, 0750, 0, 0);
        assert_mode("sgid-dir", S_IFDIR, 0775, 0, 0);
        assert_mode("sgid-dir/f", S_IFREG, 0711, 0, 0);
}

static void test_extract_specials_skipped(void **state)
{
        struct extract_result res;

        (void)state;
        prepare(false);
        res = extract_ok("specials.tar", NULL);
        assert_int_equal(res.skipped_devices, 3);
        assert_int_equal(res.dir_count, 1);
        assert_int_equal(res.file_count, 0);
        assert_true(exists_root("dev"));
        assert_false(exists_root("dev/null"));
        assert_false(exists_root("dev/sda"));
        assert_false(exists_root("dev/fifo"));
}

static void test_extract_sparse(void **state)
{
        const char *file = *state;
        struct extract_result res;
        char path[PATH_MAX];
        struct stat st;
        size_t len;
        char *data;

        prepare(false);
        res = extract_ok(file, NULL);
        assert_int_equal(res.size_bytes, 8192);
        st = lstat_root("sparse");
        assert_int_equal(st.st_size, 4 << 20);
        if ((uint64_t)st.st_blocks * 512 >= (1u << 20))
                fail_msg("%s: %lld blocks allocated, the holes were filled", file,
                         (long long)st.st_blocks);
        rootpath(path, sizeof(path), "sparse");
        data = read_file(path, &len);
        for (size_t i = 0; i < len; i++) {
                char want = 0;

                if (i >= (1u << 20) && i < (1u << 20) + 4096)
                        want = 'D';
                else if (i >= (3u << 20) && i < (3u << 20) + 4096)
                        want = 'E';
                if (data[i] != want)
                        fail_msg("%s: byte %zu is %d, want %d", file, i, data[i], want);
        }
        free(data);
        assert_mtime("sparse", T0, 0);
}

/* A sparse map of one segment covering the whole file is a plain file to libarchive. */
static void test_extract_sparse_whole_file(void **state)
{
        static const char *const files[] = {"sparse_whole_00.tar", "sparse_whole_01.tar"};

        (void)state;
        for (size_t f = 0; f < ARRAY_SIZE(files); f++) {
                struct extract_result res;
                char path[PATH_MAX];
                size_t len;
                char *data;

                prepare(false);
                res = extract_ok(files[f], NULL);
                assert_int_equal(res.size_bytes, 5);
                rootpath(path, sizeof(path), "sp");
                data = read_file(path, &len);
                assert_int_equal(len, 5);
                assert_memory_equal(data, "hello", 5);
                free(data);
        }
}

/* GNU tar's sparse maps of 150 segments, in all four formats: within the default limit. */
static void test_extract_sparse150(void **state)
{
        static const char *const files[] = {"sparse150_gnu.tar", "sparse150_pax00.tar",
                                            "sparse150_pax01.tar", "sparse150_pax10.tar"};
        struct extract_options opts;

        (void)state;
        extract_options_init(&opts);
        opts.max_sparse_entries = 160;
        for (size_t f = 0; f < ARRAY_SIZE(files); f++) {
                struct extract_result res;
                char path[PATH_MAX];
                size_t len;
                char *data;

                prepare(false);
                res = extract_ok(files[f], f % 2 ? &opts : NULL);
                assert_int_equal(res.size_bytes, 150 * 4096);
                rootpath(path, sizeof(path), "sparse");
                data = read_file(path, &len);
                assert_int_equal(len, 150u << 16);
                for (size_t i = 0; i < len; i++) {
                        size_t seg = i >> 16;
                        size_t in = i & 0xffff;
                        char want = in >= 8192 && in < 8192 + 4096 ? (char)('A' + seg % 26) : 0;

                        if (data[i] != want)
                                fail_msg("%s: byte %zu is %d, want %d", files[f], i, data[i], want);
                }
                free(data);
        }
}

/*
 * Image layers stored as tars inside the image (thousands of GNU long names, pax headers) are
 * file data: they extract byte for byte, however many header-like blocks they hold, whatever
 * the chunking of the stream.
 */
static void test_extract_nested_tar(void **state)
{
        static const struct {
                const char *member;
                const char *source;
        } layers[] = {{"usr/share/layer.tar", "nested_layer.gnu"},
                      {"usr/share/layer-pax.tar", "nested_layer.pax"}};
        static const size_t chunks[] = {0, 777, 65536 + 512};

        (void)state;
        for (size_t k = 0; k < ARRAY_SIZE(chunks); k++) {
                struct extract_result res;

                prepare(false);
                extract_chunk_size = chunks[k];
                res = extract_ok("nested_layer.tar", NULL);
                extract_chunk_size = 0;
                assert_int_equal(res.file_count, 3);
                for (size_t i = 0; i < ARRAY_SIZE(layers); i++) {
                        char path[PATH_MAX];
                        size_t want_len;
                        size_t got_len;
                        char *want;
                        char *got;

                        xsnprintf(path, sizeof(path), "%s/%s", corpus, layers[i].source);
                        want = read_file(path, &want_len);
                        rootpath(path, sizeof(path), layers[i].member);
                        got = read_file(path, &got_len);
                        assert_true(want_len > (1u << 20));
                        assert_int_equal(got_len, want_len);
                        assert_int_equal(memcmp(got, want, want_len), 0);
                        free(want);
                        free(got);
                }
                assert_root_content("after", "after the layers");
        }
}

static void test_extract_lone_zero_at_end(void **state)
{
        (void)state;
        prepare(false);
        (void)extract_ok("lone_zero_at_end.tar", NULL);
        assert_root_content("a", "A");
}

/*
 * A device or FIFO (or a hardlink to one) replaces what an earlier member put at its name, so
 * that later hardlinks to the name are skipped too rather than linking the stale entry; a
 * symlink replaced that way is removed, not followed.
 */
static void test_extract_duplicates_special(void **state)
{
        static const char *const gone[] = {"x", "h1", "f", "h2", "d", "s"};
        struct extract_result res;
        char *before;
        char *after;

        (void)state;
        prepare(false);
        before = snapshot();
        res = extract_ok("duplicates_special.tar", NULL);
        after = snapshot();
        assert_string_equal(before, after);
        free(before);
        free(after);
        /* x (device), h1 -> x, f -> x, h2 -> f, d (FIFO), s (FIFO) */
        assert_int_equal(res.skipped_devices, 6);
        assert_int_equal(res.hardlink_count, 0);
        for (size_t i = 0; i < ARRAY_SIZE(gone); i++) {
                if (exists_root(gone[i]))
                        fail_msg("'%s' is still there", gone[i]);
        }
}

/* Whether @path is on ext2/3/4 (one magic number for all three). */
static bool is_ext4(const char *path)
{
        struct statfs sf;

        return statfs(path, &sf) == 0 && sf.f_type == 0xEF53;
}

/* Mount a fresh ext4 image at @dir; false when this machine cannot (no loop devices). */
static bool mount_ext4(const char *dir)
{
        char image[PATH_MAX];
        char opts[PATH_MAX + 16];
        int fd;

        xsnprintf(image, sizeof(image), "%s/ext4.img", base);
        fd = open(image, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
        assert_true(fd >= 0);
        assert_int_equal(ftruncate(fd, 32 << 20), 0);
        (void)close(fd);

        const char *const mkfs[] = {"mkfs.ext4", "-q", "-F", image, NULL};

        if (run_argv(mkfs) != 0)
                return false;
        xsnprintf(opts, sizeof(opts), "loop");

        const char *const mnt[] = {"mount", "-o", opts, image, dir, NULL};

        return run_argv(mnt) == 0;
}

/*
 * Extended attributes that do not fit on ext4 (ENOSPC from fsetxattr) are skipped and counted,
 * as GNU tar does, not reported as a full filesystem.
 */
static void test_extract_xattr_enospc(void **state)
{
        char dir[PATH_MAX];
        char path[PATH_MAX];
        struct extract_result res;
        bool mounted = false;
        ssize_t n;
        int root_fd;
        int r;

        (void)state;
        prepare(false);
        xsnprintf(dir, sizeof(dir), "%s/ext4", work);
        assert_int_equal(mkdir(dir, 0755), 0);
        if (!is_ext4(dir)) {
                mounted = mount_ext4(dir);
                if (!mounted) {
                        fprintf(stderr, "no ext4 here (and no loop mount): skipping\n");
                        skip();
                }
        }
        root_fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        assert_true(root_fd >= 0);
        xsnprintf(path, sizeof(path), "%s/xattr_too_big.tar", corpus);
        r = extract_file(root_fd, path, NULL, &res);
        (void)close(root_fd);
        xsnprintf(path, sizeof(path), "%s/f", dir);
        n = listxattr(path, NULL, 0);
        if (r == 0) {
                char *data = read_file(path, NULL);

                assert_string_equal(data, "data");
                free(data);
                xsnprintf(path, sizeof(path), "%s/g", dir);
                data = read_file(path, NULL);
                assert_string_equal(data, "after");
                free(data);
        }
        if (mounted)
                (void)umount(dir);
        if (r < 0)
                fail_msg("extraction failed: %s (%s)", err_last(), err_name(r));
        /* Not all three fit, and the ones that did not are counted (names are 7 bytes). */
        assert_true(res.skipped_xattrs >= 1 && res.skipped_xattrs <= 3);
        assert_int_equal(n, (ssize_t)(3 - res.skipped_xattrs) * 7);
}

/* A root with a mount point below it: nothing is written into the mounted filesystem. */
static void test_extract_mount_point(void **state)
{
        static const char *const files[] = {"into_mount.tar", "into_mount_dir.tar",
                                            "into_mount_deep.tar"};
        char mnt[PATH_MAX];

        (void)state;
        for (size_t walk = 0; walk < 2; walk++) {
                for (size_t i = 0; i < ARRAY_SIZE(files); i++) {
                        struct stat st;
                        int r;

                        prepare(false);
                        rootpath(mnt, sizeof(mnt), "mnt");
                        assert_int_equal(mkdir(mnt, 0755), 0);
                        if (mount("tmpfs", mnt, "tmpfs", 0, "size=1m,mode=0755") < 0)
                                skip();
                        extract_disable_openat2 = walk;
                        r = extract_corpus(files[i], NULL, NULL);
                        extract_disable_openat2 = false;
                        assert_int_equal(lstat(mnt, &st), 0);
                        {
                                char f[PATH_MAX];
                                struct stat fst;

                                xsnprintf(f, sizeof(f), "%s/f", mnt);
                                assert_int_not_equal(lstat(f, &fst), 0);
                                xsnprintf(f, sizeof(f), "%s/sub", mnt);
                                assert_int_not_equal(lstat(f, &fst), 0);
                        }
                        (void)umount(mnt);
                        if (r != -EXDEV || !strstr(err_last(), "'mnt' is a mount point"))
                                fail_msg("%s (walk %zu): got %s '%s'", files[i], walk, err_name(r),
                                         err_last());
                        /* The mounted root kept its mode and owner. */
                        assert_int_equal(st.st_mode & 07777, 0755);
                        assert_int_equal(st.st_uid, 0);
                }
        }
}

static long rss_kib(void)
{
        FILE *f = fopen("/proc/self/status", "re");
        char line[256];
        long kib = -1;

        assert_non_null(f);
        while (fgets(line, sizeof(line), f)) {
                if (sscanf(line, "VmRSS: %ld kB", &kib) == 1)
                        break;
        }
        (void)fclose(f);
        assert_true(kib >= 0);
        return kib;
}

/*
 * Sparse maps of millions of entries in small archives are refused before libarchive has
 * kept more than a few MiB of them: run in a child, whose peak memory we can read.
 */
static void test_extract_sparse_memory_bounded(void **state)
{
        static const char *const files[] = {"sparse_old_huge.tar.gz", "sparse_10_huge.tar.gz"};
        const long limit_kib = 48 << 10;

        (void)state;
        for (size_t i = 0; i < ARRAY_SIZE(files); i++) {
                char path[PATH_MAX];
                struct rusage ru;
                long before;
                int status;
                pid_t pid;

                prepare(false);
                xsnprintf(path, sizeof(path), "%s/%s", corpus, files[i]);
                before = rss_kib();
                pid = fork();
                assert_true(pid >= 0);
                if (pid == 0) {
                        int r = extract_path(rootdir, path, NULL, NULL);

                        _exit(r == -E2BIG && strstr(err_last(), "more than 65536 entries") ? 0 : 1);
                }
                assert_int_equal(wait4(pid, &status, 0, &ru), pid);
                assert_true(WIFEXITED(status));
                if (WEXITSTATUS(status) != 0)
                        fail_msg("%s: not refused for its sparse map", files[i]);
                if (ru.ru_maxrss - before > limit_kib)
                        fail_msg("%s: peak memory grew by %ld KiB, more than %ld", files[i],
                                 ru.ru_maxrss - before, limit_kib);
        }
}

static void test_extract_long_names(void **state)
{
        const char *file = *state;
        char dir[512];
        char name[512];
        char link[512];
        char target[256];
        struct extract_result res;

        prepare(false);
        res = extract_ok(file, NULL);
        assert_int_equal(res.file_count, 3);
        memset(target, 't', 180);
        target[180] = '\0';
        xsnprintf(dir, sizeof(dir), "long/%0150d", 0);
        memset(dir + 5, 'd', 150);
        xsnprintf(name, sizeof(name), "%s/%0200d", dir, 0);
        memset(name + strlen(dir) + 1, 'f', 200);
        assert_root_content(name, "long");
        xsnprintf(link, sizeof(link), "%s/s", dir);
        assert_root_link(link, target);
        xsnprintf(link, sizeof(link), "%s/h", dir);
        assert_int_equal(lstat_root(link).st_ino, lstat_root(name).st_ino);
}

static void test_extract_ustar_prefix(void **state)
{
        char name[256];

        (void)state;
        prepare(false);
        (void)extract_ok("ustar_prefix.tar", NULL);
        memset(name, 'p', 90);
        name[90] = '/';
        memset(name + 91, 'q', 90);
        xsnprintf(name + 181, sizeof(name) - 181, "/file");
        assert_root_content(name, "prefix");
}

static void test_extract_xattrs(void **state)
{
        static const unsigned char cap[] = {1, 0, 0, 2, 0, 4, 0, 0, 0, 0,
                                            0, 0, 0, 0, 0, 0, 0, 0, 0, 0};
        char path[PATH_MAX];
        char value[64];
        struct extract_result res;
        ssize_t n;

        (void)state;
        prepare(false);
        res = extract_ok("xattrs.tar", NULL);
        /* trusted.x, user.overlay.opaque, security.selinux and the symlink's user.s */
        assert_int_equal(res.skipped_xattrs, 4);
        rootpath(path, sizeof(path), "f");
        n = getxattr(path, "user.x", value, sizeof(value));
        assert_int_equal(n, 5);
        assert_memory_equal(value, "hello", 5);
        n = getxattr(path, "user.y", value, sizeof(value));
        assert_int_equal(n, 5);
        assert_memory_equal(value, "world", 5);
        n = getxattr(path, "security.capability", value, sizeof(value));
        assert_int_equal(n, sizeof(cap));
        assert_memory_equal(value, cap, sizeof(cap));
        assert_int_equal(getxattr(path, "trusted.x", value, sizeof(value)), -1);
        assert_int_equal(errno, ENODATA);
        assert_int_equal(getxattr(path, "security.selinux", value, sizeof(value)), -1);
        assert_int_equal(getxattr(path, "user.overlay.opaque", value, sizeof(value)), -1);
        rootpath(path, sizeof(path), "d");
        n = getxattr(path, "user.d", value, sizeof(value));
        assert_int_equal(n, 3);
        assert_memory_equal(value, "dir", 3);
}

/*
 * POSIX ACLs are skipped and counted, whether they come as system.posix_acl_* xattrs or as
 * SCHILY.acl.* records: they would grant host uids access the image's modes do not. The
 * member's other xattrs and its mode are kept.
 */
static void test_extract_acls_skipped(void **state)
{
        static const char *const names[] = {"system.posix_acl_access", "system.posix_acl_default"};
        static const char *const paths[] = {"xattr-acl", "schily-acl", "dir-acl"};
        char path[PATH_MAX];
        char value[64];
        struct extract_result res;
        ssize_t n;

        (void)state;
        prepare(false);
        res = extract_ok("acls.tar", NULL);
        /*
         * Two system.posix_acl_* xattrs, and the SCHILY.acl.* records of two members, which
         * libarchive parses into one ACL per member (access and default together).
         */
        assert_int_equal(res.skipped_xattrs, 4);
        assert_int_equal(res.file_count, 2);
        assert_int_equal(res.dir_count, 1);
        for (size_t i = 0; i < ARRAY_SIZE(paths); i++) {
                rootpath(path, sizeof(path), paths[i]);
                for (size_t k = 0; k < ARRAY_SIZE(names); k++) {
                        errno = 0;
                        n = lgetxattr(path, names[k], value, sizeof(value));
                        /* ENODATA, or EOPNOTSUPP on a filesystem without ACLs. */
                        if (n >= 0 || (errno != ENODATA && errno != EOPNOTSUPP))
                                fail_msg("'%s' has %s (%zd, %s)", paths[i], names[k], n,
                                         strerror(errno));
                }
        }
        rootpath(path, sizeof(path), "xattr-acl");
        n = getxattr(path, "user.kept", value, sizeof(value));
        assert_int_equal(n, 3);
        assert_memory_equal(value, "yes", 3);
        assert_mode("xattr-acl", S_IFREG, 0640, 0, 0);
        assert_mode("schily-acl", S_IFREG, 0750, 0, 0);
        assert_mode("dir-acl", S_IFDIR, 0750, 0, 0);
        assert_root_content("schily-acl", "s");
}

static void test_extract_names_kept_as_bytes(void **state)
{
        (void)state;
        prepare(false);
        (void)extract_ok("utf8.tar", NULL);
        assert_root_content("caf\xc3\xa9/na\xc3\xafve.txt", "utf8");
        prepare(false);
        (void)extract_ok("latin1_gnu.tar", NULL);
        assert_root_content("latin\xe9", "latin1");
        /* Not UTF-8 in a pax path without hdrcharset: libarchive warns, the bytes stay. */
        prepare(false);
        (void)extract_ok("latin1_pax_raw.tar", NULL);
        assert_root_content("raw\xe9", "raw");
}

static void test_extract_duplicates_later_wins(void **state)
{
        char *before;
        char *after;
        char target[PATH_MAX];

        (void)state;
        prepare(false);
        before = snapshot();
        (void)extract_ok("duplicates.tar", NULL);
        after = snapshot();
        assert_string_equal(before, after);
        free(before);
        free(after);
        assert_mode("f", S_IFREG, 0644, 0, 0);
        assert_root_content("f", "two");
        assert_int_equal(lstat_root("f").st_nlink, 2); /* f and g */
        assert_int_equal(lstat_root("g").st_ino, lstat_root("f").st_ino);
        assert_mode("d", S_IFREG, 0644, 0, 0);
        assert_root_content("d", "file-now");
        assert_root_content("h", "three");
        assert_mode("x", S_IFDIR, 0755, 0, 0);
        assert_mode("e", S_IFDIR, 0751, 0, 0);
        xsnprintf(target, sizeof(target), "%s/etc/passwd", sentinel);
        assert_root_link("s", target);
}

static void test_extract_replaces_preexisting_symlink(void **state)
{
        char *before;
        char *after;

        (void)state;
        prepare(true);
        before = snapshot();
        (void)extract_ok("preexisting_replace.tar", NULL);
        after = snapshot();
        assert_string_equal(before, after);
        free(before);
        free(after);
        assert_mode("s", S_IFREG, 0644, 0, 0);
        assert_root_content("s", "mine");
}

static void test_extract_hardlink_to_itself(void **state)
{
        struct extract_result res;

        (void)state;
        prepare(false);
        res = extract_ok("hardlink_self.tar", NULL);
        assert_int_equal(res.skipped_other, 1);
        assert_int_equal(res.file_count, 1);
        assert_root_content("f", "x");
}

static void test_extract_embedded_tar_is_data(void **state)
{
        char path[PATH_MAX];
        char inner[PATH_MAX];
        size_t want_len;
        size_t got_len;
        char *want;
        char *got;

        (void)state;
        prepare(false);
        (void)extract_ok("embedded_tar.tar", NULL);
        assert_root_content("after", "y");
        xsnprintf(path, sizeof(path), "%s/embedded_tar.tar", corpus);
        want = read_file(path, &want_len);
        rootpath(inner, sizeof(inner), "inner.tar");
        got = read_file(inner, &got_len);
        assert_true(got_len > 1024 && got_len < want_len);
        assert_int_equal(memcmp(got, want + 512, got_len), 0); /* right after its header */
        free(want);
        free(got);
}

static void test_extract_empty_archive(void **state)
{
        struct extract_result res;

        (void)state;
        prepare(false);
        res = extract_ok("empty_archive.tar", NULL);
        assert_int_equal(res.file_count + res.dir_count + res.size_bytes, 0);
        prepare(false);
        res = extract_ok("global_header_only.tar", NULL);
        assert_int_equal(res.file_count + res.dir_count + res.size_bytes, 0);
}

/* Absurd timestamps are clamped, not errors, and never touch anything outside the root. */
static void test_extract_odd_timestamps(void **state)
{
        char *before;
        char *after;

        (void)state;
        prepare(false);
        before = snapshot();
        (void)extract_ok("odd_timestamps.tar", NULL);
        after = snapshot();
        assert_string_equal(before, after);
        free(before);
        free(after);
        assert_true(lstat_root("future").st_mtim.tv_sec > INT64_C(4000000000));
        assert_true(lstat_root("past").st_mtim.tv_sec < INT64_C(-2000000000));
        assert_mtime("junk", 0, 0);
        assert_true(lstat_root("junk").st_atim.tv_sec < 0);
        assert_true(lstat_root("d").st_mtim.tv_sec > INT64_C(4000000000));
        assert_root_content("junk", "j");
}

static void test_extract_many_hardlinks(void **state)
{
        struct extract_result res;

        (void)state;
        prepare(false);
        res = extract_ok("many_hardlinks.tar", NULL);
        assert_int_equal(res.hardlink_count, 429);
        assert_int_equal(res.file_count, 3000 + 429);
        assert_int_equal(lstat_root("f2996").st_ino, lstat_root("h2996").st_ino);
        assert_int_equal(lstat_root("f0000").st_ino, lstat_root("h0000").st_ino);
        assert_root_content("h1001", "1001");
}

static void test_extract_gnu_format(void **state)
{
        (void)state;
        prepare(false);
        (void)extract_ok("gnu_format.tar", NULL);
        assert_root_content("d/f", "gnu");
        assert_root_link("d/s", "f");
}

static void test_extract_hardlink_to_symlink(void **state)
{
        char target[PATH_MAX];
        struct extract_result res;
        char *before;
        char *after;

        (void)state;
        prepare(false);
        before = snapshot();
        res = extract_ok("hardlink_to_symlink.tar", NULL);
        after = snapshot();
        assert_string_equal(before, after);
        free(before);
        free(after);
        assert_int_equal(res.symlink_count, 1);
        assert_int_equal(res.hardlink_count, 1);
        xsnprintf(target, sizeof(target), "%s/etc/passwd", sentinel);
        assert_root_link("h", target);
        assert_mode("h", S_IFLNK, 0777, 1234, 0);
        assert_int_equal(lstat_root("h").st_ino, lstat_root("s").st_ino);
        assert_int_equal(lstat_root("s").st_nlink, 2);
}

static void test_extract_hardlink_to_device_skipped(void **state)
{
        struct extract_result res;

        (void)state;
        prepare(false);
        res = extract_ok("hardlink_to_device.tar", NULL);
        /* dev/null, dev/fifo, nodir/sda and a link to each */
        assert_int_equal(res.skipped_devices, 6);
        assert_int_equal(res.hardlink_count, 0);
        assert_int_equal(res.file_count, 0);
        assert_false(exists_root("dev/null2"));
        assert_false(exists_root("fifo2"));
        assert_false(exists_root("sda2"));
        assert_false(exists_root("nodir"));
}

/* The deferred metadata of a directory that a symlink replaced is dropped, not followed. */
static void test_extract_dir_swapped_for_symlink(void **state)
{
        char *before;
        char *after;

        (void)state;
        prepare(false);
        before = snapshot();
        (void)extract_ok("dir_swapped_for_symlink.tar", NULL);
        after = snapshot();
        assert_string_equal(before, after);
        free(before);
        free(after);
        assert_root_link("d", sentinel);
        assert_root_content("f", "x");
}

/* 2000 copies of one 3.7 KiB directory path fit in a 1 MiB tree: they are stored once. */
static void test_extract_dirs_duplicates_merged(void **state)
{
        char path[4096];
        struct extract_result res;

        (void)state;
        prepare(false);
        extract_tree_memory_max = 1 << 20;
        res = extract_ok("dirs_duplicates.tar.gz", NULL);
        extract_tree_memory_max = default_tree_memory_max;
        assert_int_equal(res.dir_count, 2000);
        path[0] = '\0';
        for (int i = 0; i < 15; i++) {
                size_t len = strlen(path);

                if (i > 0)
                        path[len++] = '/';
                memset(path + len, 'r', 250);
                path[len + 250] = '\0';
                assert_mode(path, S_IFDIR, i == 14 ? 0751 : 0755, 0, 0);
        }
}

static int count_fds(void)
{
        DIR *d = opendir("/proc/self/fd");
        int n = 0;

        assert_non_null(d);
        while (readdir(d))
                n++;
        (void)closedir(d);
        return n;
}

/* No file descriptor survives an extraction, whichever way it fails. */
static void test_extract_no_fd_leak(void **state)
{
        int before;

        (void)state;
        before = count_fds();
        for (size_t i = 0; i < ARRAY_SIZE(hostile_cases); i++) {
                const struct hostile_case *tc = &hostile_cases[i];
                struct extract_options opts;

                hostile_options(tc, &opts);
                if (tc->flags & CASE_SMALL_TREE)
                        extract_tree_memory_max = 1 << 20;
                prepare(tc->flags & CASE_PREEXISTING);
                if (extract_corpus(tc->file, &opts, NULL) != tc->err)
                        fail_msg("%s: %s", tc->file, err_last());
                extract_tree_memory_max = default_tree_memory_max;
                if (count_fds() != before)
                        fail_msg("%s: %d fds open, %d before", tc->file, count_fds(), before);
        }
        prepare(false);
        (void)extract_ok("basic.tar.xz", NULL);
        assert_int_equal(count_fds(), before);
}

struct progress_log {
        unsigned calls;
        uint64_t entries;
        uint64_t bytes;
        int stop_with;
};

static int progress_cb(uint64_t entries, uint64_t bytes, void *userdata)
{
        struct progress_log *log = userdata;

        log->calls++;
        assert_true(entries >= log->entries);
        assert_true(bytes >= log->bytes);
        log->entries = entries;
        log->bytes = bytes;
        return log->stop_with;
}

static void test_extract_progress(void **state)
{
        struct progress_log log = {0};
        struct extract_options opts;
        struct extract_result res;

        (void)state;
        extract_options_init(&opts);
        opts.progress = progress_cb;
        opts.userdata = &log;
        opts.progress_interval_ms = 0;
        prepare(false);
        res = extract_ok("basic.tar", &opts);
        assert_true(log.calls >= 24);
        assert_int_equal(log.entries, 24);
        assert_int_equal(log.bytes, res.size_bytes);

        log = (struct progress_log){.stop_with = -ECANCELED};
        prepare(false);
        assert_int_equal(extract_corpus("basic.tar", &opts, &res), -ECANCELED);
        assert_int_equal(log.calls, 1);
        assert_non_null(strstr(err_last(), "stopped"));
}

static void test_extract_disk_full(void **state)
{
        char mnt[PATH_MAX];
        char path[PATH_MAX];
        int root_fd;
        int r;

        (void)state;
        prepare(false);
        xsnprintf(mnt, sizeof(mnt), "%s/small", work);
        assert_int_equal(mkdir(mnt, 0755), 0);
        if (mount("tmpfs", mnt, "tmpfs", 0, "size=1m") < 0)
                skip();
        root_fd = open(mnt, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        assert_true(root_fd >= 0);
        xsnprintf(path, sizeof(path), "%s/basic.tar", corpus);
        r = extract_file(root_fd, path, NULL, NULL);
        (void)close(root_fd);
        (void)umount(mnt);
        assert_int_equal(r, -ENOSPC);
        assert_non_null(strstr(err_last(), "'./big'"));
        assert_non_null(strstr(err_last(), "target filesystem is full"));
        assert_non_null(strstr(err_last(), "after writing"));
}

static void test_extract_bad_arguments(void **state)
{
        char path[PATH_MAX];
        struct extract_options opts;
        int fd;

        (void)state;
        prepare(false);
        xsnprintf(path, sizeof(path), "%s/basic.tar", corpus);
        assert_int_equal(extract_path(rootdir, "/nonexistent/x.tar", NULL, NULL), -ENOENT);
        assert_non_null(strstr(err_last(), "'/nonexistent/x.tar'"));
        assert_int_equal(extract_path("/nonexistent/root", path, NULL, NULL), -ENOENT);
        fd = open(path, O_RDONLY | O_CLOEXEC);
        assert_true(fd >= 0);
        assert_int_equal(extract_file(fd, path, NULL, NULL), -ENOTDIR);
        (void)close(fd);
        extract_options_init(&opts);
        opts.max_path_length = 0;
        assert_int_equal(extract_path(rootdir, path, &opts, NULL), -EINVAL);
        assert_int_equal(extract_path(rootdir, path, NULL, NULL), 0);
}

/* --- internals --- */

static void test_extract_normalize(void **state)
{
        static const struct {
                const char *in;
                int r;
                const char *out;
                unsigned depth;
        } cases[] = {
                {"a", 0, "a", 1},
                {"./a/b/", 0, "a/b", 2},
                {"././a//b/./c", 0, "a/b/c", 3},
                {".", 0, "", 0},
                {"./", 0, "", 0},
                {".//.", 0, "", 0},
                {"...", 0, "...", 1},
                {"a/..b", 0, "a/..b", 2},
                {"", -EBADMSG, NULL, 0},
                {"/etc", -EPERM, NULL, 0},
                {"..", -EPERM, NULL, 0},
                {"a/../b", -EPERM, NULL, 0},
                {"a/..", -EPERM, NULL, 0},
                {"./../x", -EPERM, NULL, 0},
        };
        char out[64];
        char big[300];
        unsigned depth;

        (void)state;
        for (size_t i = 0; i < ARRAY_SIZE(cases); i++) {
                int r = extract_normalize(cases[i].in, out, sizeof(out), &depth);

                if (r != cases[i].r)
                        fail_msg("'%s': %d, want %d", cases[i].in, r, cases[i].r);
                if (r == 0) {
                        assert_string_equal(out, cases[i].out);
                        assert_int_equal(depth, cases[i].depth);
                }
        }
        memset(big, 'x', 256);
        big[256] = '\0';
        assert_int_equal(extract_normalize(big, out, sizeof(out), &depth), -ENAMETOOLONG);
        big[40] = '\0';
        assert_int_equal(extract_normalize(big, out, 40, &depth), -ENAMETOOLONG);
        assert_int_equal(extract_normalize(big, out, 42, &depth), 0);
}

static void test_extract_quote(void **state)
{
        char out[EXTRACT_DEFAULT_MAX_PATH_LENGTH];
        char big[400];

        (void)state;
        extract_quote("a'b\\c\n\x7f", out, sizeof(out));
        assert_string_equal(out, "a\\x27b\\x5cc\\x0a\\x7f");
        /* No quote of either kind survives, so a name cannot end a quoted log value. */
        extract_quote("x\" k=v\r", out, sizeof(out));
        assert_string_equal(out, "x\\x22 k=v\\x0d");
        memset(big, 'y', sizeof(big) - 1);
        big[sizeof(big) - 1] = '\0';
        extract_quote(big, out, sizeof(out));
        assert_true(strlen(out) < 200);
        assert_non_null(strstr(out, "..."));
}

static void test_extract_pax_nul_field(void **state)
{
        static const char ok[] = "18 path=some/name\n19 linkpath=target\n";
        static const char bad_path[] = "11 mtime=1\n17 path=ab\0cdefg\n";
        static const char bad_link[] = "16 linkpath=a\0b\n";
        static const char bad_sparse[] = "24 GNU.sparse.name=a\0bc\n";
        static const char other[] = "24 SCHILY.xattr.user=\0\1\n";
        static const char malformed[] = "99 path=a\0b\n";
        size_t off = 0;

        (void)state;
        assert_int_equal(extract_pax_nul_field((const unsigned char *)ok, sizeof(ok) - 1, &off), 0);
        assert_int_equal(
                extract_pax_nul_field((const unsigned char *)bad_path, sizeof(bad_path) - 1, &off),
                1);
        assert_int_equal(off, 11 + 8);
        assert_int_equal(
                extract_pax_nul_field((const unsigned char *)bad_link, sizeof(bad_link) - 1, &off),
                2);
        assert_int_equal(extract_pax_nul_field((const unsigned char *)bad_sparse,
                                               sizeof(bad_sparse) - 1, &off),
                         1);
        assert_int_equal(
                extract_pax_nul_field((const unsigned char *)other, sizeof(other) - 1, &off), 0);
        assert_int_equal(extract_pax_nul_field((const unsigned char *)malformed,
                                               sizeof(malformed) - 1, &off),
                         0);
}

static void test_extract_pax_sparse(void **state)
{
        static const struct {
                const char *body;
                uint64_t entries;
                bool map10;
                const char *name;
        } cases[] = {
                {"18 path=some/name\n", 0, false, "some/name"},
                {"30 GNU.sparse.map=0,1,2,3,4,5\n22 GNU.sparse.name=nm\n", 3, false, "nm"},
                {"20 GNU.sparse.map=7\n", 0, false, NULL},
                {"23 GNU.sparse.offset=0\n25 GNU.sparse.numbytes=1\n"
                 "23 GNU.sparse.offset=2\n25 GNU.sparse.numbytes=3\n",
                 3, false, NULL},
                {"24 SUN.holesdata= 0 2 4\n", 3, false, NULL},
                {"22 GNU.sparse.major=1\n22 GNU.sparse.minor=0\n", 0, true, NULL},
                {"22 GNU.sparse.major=1\n", 0, true, NULL},
                {"22 GNU.sparse.minor=0\n", 0, true, NULL},
                {"22 GNU.sparse.major=0\n22 GNU.sparse.minor=1\n", 0, false, NULL},
                {"22 GNU.sparse.major=2\n", 0, false, NULL},
                /* Records after a malformed one are not applied. */
                {"99 GNU.sparse.major=1\n", 0, false, NULL},
                {"21 GNU.sparse.major=1\n", 0, false, NULL}, /* no newline where it ends */
                {"26 GNU.sparse.map=0,1,2,3\nxx junk\n22 GNU.sparse.map=0,1\n", 2, false, NULL},
        };

        (void)state;
        for (size_t i = 0; i < ARRAY_SIZE(cases); i++) {
                const unsigned char *name = NULL;
                size_t name_len = 0;
                bool map10 = false;
                uint64_t got = extract_pax_sparse((const unsigned char *)cases[i].body,
                                                  strlen(cases[i].body), &map10, &name, &name_len);

                if (got != cases[i].entries || map10 != cases[i].map10)
                        fail_msg("case %zu: %llu entries, map10 %d", i, (unsigned long long)got,
                                 map10);
                if (!cases[i].name) {
                        assert_null(name);
                        continue;
                }
                assert_non_null(name);
                assert_int_equal(name_len, strlen(cases[i].name));
                assert_memory_equal(name, cases[i].name, name_len);
        }
}

static void test_extract_tar_number(void **state)
{
        static const struct {
                const char *field;
                size_t n;
                int64_t want;
        } cases[] = {
                {"0000644\0", 8, 0644},
                {"    644 ", 8, 0644},
                {"\t\t0017\0", 8, 017},
                {" \t-12\0\0\0", 8, -10},
                {"\0\0000644", 8, 0}, /* a NUL stops the number, it is not skipped */
                {"0008", 4, 0},
                {"77777777777\0", 12, 077777777777},
                {"\x80\0\0\0\0\0\0\0\0\0\x10\0", 12, 4096},
                {"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff", 12, -1},
                {"\x81\0\0\0\0\0\0\0\0\0\0\0", 12, INT64_MAX}, /* does not fit */
                {"\xc0\0\0\0\0\0\0\0\0\0\0\0", 12, INT64_MIN},
        };

        (void)state;
        for (size_t i = 0; i < ARRAY_SIZE(cases); i++) {
                int64_t got = extract_tar_number((const unsigned char *)cases[i].field, cases[i].n);

                if (got != cases[i].want)
                        fail_msg("case %zu: %lld, want %lld", i, (long long)got,
                                 (long long)cases[i].want);
        }
}

static void test_extract_pax_risky(void **state)
{
        static const struct {
                const char *body;
                bool risky;
        } cases[] = {
                {"18 path=some/name\n19 linkpath=target\n", false},
                {"11 mtime=1\n", false},
                {"12 mtime=1\n", true},  /* length past the body */
                {"10 mtime=1\n", true},  /* record does not end in '\n' */
                {"x1 mtime=1\n", true},  /* length not decimal */
                {"11 mtime 1\n", true},  /* no '=' */
                {"11 =mtime1\n", true},  /* no key */
                {"9 a\0b=cd\n", true},   /* NUL in the key */
                {"1234567 k=v\n", true}, /* more than 999999 */
                {"22 GNU.sparse.map=0,1\n", true},
                {"19 SUN.holesdata=x\n", true},
                {"21 GNU.sparse.name=x\n", false},
        };

        (void)state;
        for (size_t i = 0; i < ARRAY_SIZE(cases); i++) {
                const char *b = cases[i].body;
                size_t n = strlen(b) + (b[0] == '9' ? strlen(b + strlen(b) + 1) + 1 : 0);

                if (extract_pax_risky((const unsigned char *)b, n) != cases[i].risky)
                        fail_msg("case %zu: want %d", i, cases[i].risky);
        }
}

static void test_extract_warning_is_charset(void **state)
{
        (void)state;
        assert_true(extract_warning_is_charset(
                "Pathname can't be converted from UTF-8 to current locale."));
        assert_true(extract_warning_is_charset(
                "Linkname can't be converted from ISO-8859-1 to current locale."));
        assert_true(extract_warning_is_charset(
                "Gname can't be converted from UTF-8 to current locale."));
        assert_false(extract_warning_is_charset(NULL));
        assert_false(extract_warning_is_charset("Ignoring malformed pax extended attributes"));
        assert_false(extract_warning_is_charset(
                "Ignoring malformed pax extended attribute; Pathname can't be converted"));
        assert_false(extract_warning_is_charset(
                "Pathname can't be converted from UTF-8 to current locale. And more"));
        assert_false(extract_warning_is_charset(
                "Comment can't be converted from UTF-8 to current locale."));
        assert_false(
                extract_warning_is_charset("Pathname can't be converted from  to current locale."));
}

static void test_extract_block_is_header(void **state)
{
        unsigned char b[512] = {0};
        unsigned sum = 0;

        (void)state;
        assert_false(extract_block_is_header(b));
        memcpy(b, "name", 4);
        memcpy(b + 257, "ustar", 6);
        memcpy(b + 263, "00", 2);
        b[156] = '0';
        memset(b + 148, ' ', 8);
        for (size_t i = 0; i < sizeof(b); i++)
                sum += b[i];
        (void)snprintf((char *)b + 148, 8, "%06o", sum);
        assert_true(extract_block_is_header(b));
        b[0] = 'N';
        assert_false(extract_block_is_header(b));
}

#define HOSTILE_MAX (ARRAY_SIZE(hostile_cases) * 3)

int main(void)
{
        static struct hostile_case variants[ARRAY_SIZE(hostile_cases)][2];
        static const char *const suffixes[] = {"", "_walk", "_chunked"};
        static char names[HOSTILE_MAX + 16][96];
        static const char *const basic_files[] = {"basic.tar", "basic.tar.gz", "basic.tar.zst",
                                                  "basic.tar.xz"};
        static const char *const sparse_files[] = {"sparse_gnu.tar", "sparse_pax.tar"};
        static const char *const long_files[] = {"longname_gnu.tar", "longname_pax.tar"};
        static const struct CMUnitTest fixed[] = {
                cmocka_unit_test(test_extract_basic_walk),
                cmocka_unit_test(test_extract_basic_chunked),
                cmocka_unit_test(test_extract_basic_from_memory),
                cmocka_unit_test(test_extract_no_same_owner),
                cmocka_unit_test(test_extract_setuid),
                cmocka_unit_test(test_extract_specials_skipped),
                cmocka_unit_test(test_extract_ustar_prefix),
                cmocka_unit_test(test_extract_xattrs),
                cmocka_unit_test(test_extract_acls_skipped),
                cmocka_unit_test(test_extract_names_kept_as_bytes),
                cmocka_unit_test(test_extract_duplicates_later_wins),
                cmocka_unit_test(test_extract_replaces_preexisting_symlink),
                cmocka_unit_test(test_extract_hardlink_to_itself),
                cmocka_unit_test(test_extract_empty_archive),
                cmocka_unit_test(test_extract_embedded_tar_is_data),
                cmocka_unit_test(test_extract_many_hardlinks),
                cmocka_unit_test(test_extract_gnu_format),
                cmocka_unit_test(test_extract_progress),
                cmocka_unit_test(test_extract_disk_full),
                cmocka_unit_test(test_extract_bad_arguments),
                cmocka_unit_test(test_extract_normalize),
                cmocka_unit_test(test_extract_quote),
                cmocka_unit_test(test_extract_pax_nul_field),
                cmocka_unit_test(test_extract_block_is_header),
                cmocka_unit_test(test_extract_tar_number),
                cmocka_unit_test(test_extract_pax_risky),
                cmocka_unit_test(test_extract_warning_is_charset),
                cmocka_unit_test(test_extract_hardlink_to_symlink),
                cmocka_unit_test(test_extract_hardlink_to_device_skipped),
                cmocka_unit_test(test_extract_dir_swapped_for_symlink),
                cmocka_unit_test(test_extract_dirs_duplicates_merged),
                cmocka_unit_test(test_extract_no_fd_leak),
                cmocka_unit_test(test_extract_odd_timestamps),
                cmocka_unit_test(test_extract_pax_sparse),
                cmocka_unit_test(test_extract_sparse150),
                cmocka_unit_test(test_extract_sparse_whole_file),
                cmocka_unit_test(test_extract_sparse_memory_bounded),
                cmocka_unit_test(test_extract_nested_tar),
                cmocka_unit_test(test_extract_lone_zero_at_end),
                cmocka_unit_test(test_extract_duplicates_special),
                cmocka_unit_test(test_extract_xattr_enospc),
                cmocka_unit_test(test_extract_mount_point),
        };
        static struct CMUnitTest tests[HOSTILE_MAX + ARRAY_SIZE(fixed) + 8];
        size_t n = 0;

        for (size_t i = 0; i < ARRAY_SIZE(hostile_cases); i++) {
                for (size_t v = 0; v < 3; v++) {
                        const struct hostile_case *tc = &hostile_cases[i];
                        char *name = names[3 * i + v];

                        if (v > 0) {
                                variants[i][v - 1] = *tc;
                                variants[i][v - 1].flags |= v == 1 ? CASE_WALK : CASE_CHUNKED;
                                tc = &variants[i][v - 1];
                        }
                        (void)snprintf(name, sizeof(names[0]), "test_extract_refuses_%s%s",
                                       hostile_cases[i].file, suffixes[v]);
                        tests[n++] = (struct CMUnitTest){
                                .name = name,
                                .test_func = test_extract_hostile,
                                .initial_state = (void *)tc,
                        };
                }
        }
        for (size_t i = 0;
             i < ARRAY_SIZE(basic_files) + ARRAY_SIZE(sparse_files) + ARRAY_SIZE(long_files); i++) {
                size_t j = i;
                const char *file;
                void (*fn)(void **);
                char *name = names[HOSTILE_MAX + i];

                if (j < ARRAY_SIZE(basic_files)) {
                        file = basic_files[j];
                        fn = test_extract_basic;
                } else if ((j -= ARRAY_SIZE(basic_files)) < ARRAY_SIZE(sparse_files)) {
                        file = sparse_files[j];
                        fn = test_extract_sparse;
                } else {
                        file = long_files[j - ARRAY_SIZE(sparse_files)];
                        fn = test_extract_long_names;
                }
                (void)snprintf(name, sizeof(names[0]), "test_extract_valid_%s", file);
                tests[n++] = (struct CMUnitTest){
                        .name = name, .test_func = fn, .initial_state = (void *)file};
        }
        for (size_t i = 0; i < ARRAY_SIZE(fixed); i++)
                tests[n++] = fixed[i];
        return _cmocka_run_group_tests("extract", tests, n, group_setup, group_teardown);
}
