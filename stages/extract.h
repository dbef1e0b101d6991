#pragma once

/*
 * Safe extraction of an image tarball into a root directory.
 *
 * The tarball is hostile until proven otherwise: nothing is ever created, changed or
 * followed outside the root, whatever the archive says. Plain, gzip, zstd and xz tar
 * streams (ustar, pax, GNU) are accepted; the compression is detected from the content.
 *
 * The root must be private to the extractor for the duration of the call: a directory
 * nobody else can write to (a freshly made filesystem mounted for this purpose, as the
 * unpack stage does). Every path is resolved without following symlinks, but between two
 * of our system calls another process that can write inside the root could swap a
 * directory for a symlink, and then a later step (a chown, a chmod, a hardlink) would act
 * on whatever the symlink points at. The guarantees below hold against the archive, not
 * against concurrent writers.
 *
 * Every function here returns 0 on success or a negative errno, with a message naming the
 * member in single quotes in the thread's last error (common/err.h). The classes are:
 *
 *   -EPERM         the archive tries to leave the root: a '..' component, an absolute
 *                  member path, a parent path through a symlink, a hardlink whose target is
 *                  absolute, outside, through a symlink, not a regular file or symlink, or
 *                  not created by this extraction
 *   -ENOENT        a hardlink whose target has not been extracted (yet); hardlinks to
 *                  skipped entries (devices, FIFOs, sockets) are skipped and counted instead
 *   -EEXIST        a member would replace a non-empty directory
 *   -ENOTDIR       a member's parent path goes through a non-directory
 *   -EBADMSG       corrupt, truncated or non-tar input, empty names, names with an
 *                  embedded NUL byte, invalid owners or sparse maps, member data shorter
 *                  than its header says, an end-of-archive marker of one zero block with
 *                  more data after it
 *   -E2BIG         more entries than max_entries; a sparse map with more entries than
 *                  max_sparse_entries; more distinct directories (and skipped entries) than
 *                  64 MiB of memory can remember; an xz stream that needs more than 128 MiB
 *                  of memory to decompress
 *   -EFBIG         more file data than max_total_bytes, or a sparse file whose size (or
 *                  data offset) is past max_total_bytes
 *   -ENAMETOOLONG  a path longer than max_path_length or deeper than max_path_depth
 *   -EXDEV         a member's path crosses a mount point inside the root (only possible
 *                  with a root that has mounts below it, e.g. the CLI's --root)
 *   -ENOSPC        the target filesystem is full (an extended attribute that does not fit
 *                  on the filesystem is skipped and counted instead, as GNU tar does)
 *   -ECANCELED     (or whatever it returned) the progress callback asked to stop
 *   other          an I/O error from the target filesystem (-EIO, ...)
 *
 * All of them except the I/O errors are permanent: retrying the same tarball fails again.
 * On failure the root holds a partial tree; the caller throws the device away.
 *
 * Nothing is synced: the caller syncs the filesystem once at the end.
 */

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define EXTRACT_DEFAULT_MAX_TOTAL_BYTES (UINT64_C(64) << 30)
#define EXTRACT_DEFAULT_MAX_ENTRIES UINT64_C(1000000)
#define EXTRACT_DEFAULT_MAX_PATH_DEPTH 64u
#define EXTRACT_DEFAULT_MAX_PATH_LENGTH 4096u
#define EXTRACT_DEFAULT_MAX_SPARSE_ENTRIES UINT64_C(65536)
#define EXTRACT_DEFAULT_PROGRESS_INTERVAL_MS 250u

/*
 * Progress report: @entries archive members seen so far, @bytes of file data written so
 * far. Return 0 to continue; a negative errno (e.g. -ECANCELED on shutdown) stops the
 * extraction, which then fails with that value.
 */
typedef int (*extract_progress_fn)(uint64_t entries, uint64_t bytes, void *userdata);

struct extract_options {
        /*
         * Limit on file data written (sparse holes are free), and on the size of any one
         * sparse file. The unpack stage sets it to the device size.
         */
        uint64_t max_total_bytes;
        /* Limit on archive members of any kind, skipped ones included. */
        uint64_t max_entries;
        /* Limit on path components of a member name, after "." components are dropped. */
        unsigned max_path_depth;
        /* Limit on the length in bytes of member names and link targets. */
        unsigned max_path_length;
        /*
         * Limit on the entries of one member's sparse map (data segments and holes), in any
         * of the GNU formats. libarchive keeps every entry in memory, and a map costs a few
         * bytes of archive per entry, so this bounds the memory a small archive can claim.
         * GNU tar writes one entry per data segment: 65536 is far more than real files have.
         */
        uint64_t max_sparse_entries;
        /*
         * Apply the archive's numeric uid/gid (needs root). When false, files belong to the
         * caller and setuid/setgid bits and security.capability are dropped, because they
         * would otherwise grant the caller's identity to image-chosen programs.
         */
        bool preserve_owner;
        /* Optional; called at most every progress_interval_ms, and once at the end. */
        extract_progress_fn progress;
        void *userdata;
        unsigned progress_interval_ms;
};

struct extract_result {
        /* Extracted non-directory members: regular files + symlinks + hardlinks. */
        uint64_t file_count;
        /* File data written, in bytes: the sum of regular file sizes, minus sparse holes. */
        uint64_t size_bytes;
        /* Directory members, "." included; directories created implicitly are not counted. */
        uint64_t dir_count;
        uint64_t symlink_count;
        uint64_t hardlink_count;
        /* Character and block devices and FIFOs, and hardlinks to them: never created. */
        uint64_t skipped_devices;
        /*
         * Extended attributes outside user.* and security.capability, user.overlay.*, POSIX
         * ACLs, and allowed ones the target filesystem refused (too large, unsupported).
         */
        uint64_t skipped_xattrs;
        /* Sockets, unknown types, hardlinks to those, and hardlinks to themselves. */
        uint64_t skipped_other;
};

/* Fill @opts with the defaults above: preserve_owner true, no progress callback. */
void extract_options_init(struct extract_options *opts);

/*
 * Extract the tarball at @tar_path into the directory @root_fd (not consumed; it must be
 * opened with O_DIRECTORY). @opts may be NULL for the defaults. @ret_result, when not NULL,
 * gets the counts; after a failure, those of what was created before it (all 0 when the
 * failure came first), which stays in the root: removing it is the caller's business.
 */
int extract_file(int root_fd, const char *tar_path, const struct extract_options *opts,
                 struct extract_result *ret_result);

/* Like extract_file(), reading the tarball from @tar_fd (not consumed) to its end. */
int extract_fd(int root_fd, int tar_fd, const struct extract_options *opts,
               struct extract_result *ret_result);

/* Like extract_file(), reading the tarball from @size bytes at @data (borrowed). */
int extract_memory(int root_fd, const void *data, size_t size, const struct extract_options *opts,
                   struct extract_result *ret_result);

/*
 * Convenience for the CLI: open the directory @root_path (which must exist) and extract
 * the tarball at @tar_path into it.
 */
int extract_path(const char *root_path, const char *tar_path, const struct extract_options *opts,
                 struct extract_result *ret_result);

#ifdef FIM_UNIT_TEST
/* Internals exposed to tests/unit/test_extract.c. */

/* Resolve paths component by component even where openat2() exists. */
extern bool extract_disable_openat2;

/* Hand libarchive the decompressed stream in chunks of this size (0: the default 1 MiB). */
extern size_t extract_chunk_size;

/* Cap on the memory of the remembered directories and skipped entries (default 64 MiB). */
extern size_t extract_tree_memory_max;

/*
 * Normalise a member name into @out: "." and empty components dropped, the root is "".
 * Returns 0 with the component count in @ret_depth, -EPERM for absolute names and ".."
 * components, -EBADMSG for "", -ENAMETOOLONG when a component or @out is too small.
 */
int extract_normalize(const char *name, char *out, size_t out_size, unsigned *ret_depth);

/* Quote a name for a message: control bytes, quotes and backslashes as \xNN, cut long. */
void extract_quote(const char *s, char *out, size_t size);

/* A tar numeric field parsed as libarchive parses it (base 8 or base 256). */
int64_t extract_tar_number(const unsigned char *p, size_t n);

/* Whether libarchive would apply only part of a pax header body (and warn). */
bool extract_pax_risky(const unsigned char *d, size_t n);

/* Whether @msg is libarchive's "<field> can't be converted ..." warning, exactly. */
bool extract_warning_is_charset(const char *msg);

/* Whether a 512-byte block carries a valid tar header checksum. */
bool extract_block_is_header(const unsigned char *b);

/*
 * What a pax header body says about sparse files: the sparse map entries its GNU 0.0/0.1 and
 * Solaris records add at most (returned), whether it announces a GNU 1.0 map in the member's
 * data (@ret_map10), and GNU.sparse.name or else path (@ret_name, not NUL-terminated, NULL when
 * there is none; @ret_name_len bytes).
 */
uint64_t extract_pax_sparse(const unsigned char *d, size_t n, bool *ret_map10,
                            const unsigned char **ret_name, size_t *ret_name_len);

/*
 * Find a record with a NUL byte in its value in a pax header body: 1 for path or
 * GNU.sparse.name, 2 for linkpath, 0 when there is none. @ret_value: the value's offset.
 */
int extract_pax_nul_field(const unsigned char *d, size_t n, size_t *ret_value);
#endif
