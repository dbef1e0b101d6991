#include "stages/extract.h"

/*
 * Safe extraction of image tarballs.
 *
 * THREAT MODEL
 *
 * We run as root and the tarball comes from whoever pushed the image: every byte is chosen
 * by an attacker (names, link targets, types, owners, modes, sizes, sparse maps, pax
 * records, the compression). What we defend:
 *   1. nothing outside the root is created, modified or followed: no write through a
 *      symlink, no hardlink to an inode outside the tree, no '..' walk, no absolute path;
 *   2. resources stay bounded: entries, file bytes, path length and depth, the size of the
 *      decompressed stream, and memory;
 *   3. corrupt or ambiguous input fails with a permanent error that names the member;
 *   4. nothing the host itself would honour is created: no device nodes, and setuid bits
 *      and file capabilities only when ownership is preserved too.
 * What the image does when it runs is not our business: its setuid programs are its own.
 *
 * READING
 *
 * Two libarchive readers are chained. The outer one only decompresses (gzip, zstd or none,
 * detected from the content; "raw" format). xz is detected from its magic bytes and decoded
 * here with liblzma instead, because libarchive 3.6 sets no memory limit on the xz decoder
 * and a 100-byte file can declare a 4 GiB dictionary; ours refuses streams that need more
 * than EXTRACT_XZ_MEMLIMIT (the same bound libarchive's zstd reader has on its window, and
 * gzip needs 32 KiB). The inner reader parses tar (ustar, pax, GNU) from the decompressed
 * stream through extract_stream_read(), which therefore sees every decompressed byte. That lets it
 * cap the stream size (a bomb made of data that is skipped rather than written), report progress
 * during long skips, and scan the stream for names that libarchive would silently cut at an
 * embedded NUL byte: "a\0../../x" in a ustar name field, a GNU long name or a pax path/linkpath
 * record. Other tar readers see the whole name, so such an archive means different things to
 * different tools; we refuse it. The scan looks at every 512-byte block with a valid header
 * checksum, so no framing trick can hide a header from it, and remembers suspects by offset; once
 * libarchive has parsed a member, the suspects inside that member's header blocks (from the header
 * position to the start of its data) are fatal and the ones inside file data are dropped.
 * Numeric fields (the size of a header body) are parsed exactly as libarchive parses them,
 * tabs and signs included, or a body it reads could escape the scan.
 *
 * The one framing the scan does trust is libarchive's own, after the fact: once it has accepted
 * a member, the member's data (the size of a regular file, or the segments of a sparse one) is
 * skipped. Otherwise a tar inside an image (a preloaded image layer, say) is thousands of
 * header-looking blocks that would all wait as suspects until libarchive is past them. When the
 * member is done, libarchive must have read at least that much data: had it read less, the scan
 * would have skipped blocks it then read as headers, and the archive is refused.
 *
 * The scan also remembers which blocks were all zeros, to insist on the end-of-archive
 * marker right after the last member: libarchive takes a stream that stops between two
 * members for a complete archive, and that is what a truncated download looks like. It also
 * takes a single zero block for the end, and silently drops whatever follows (GNU tar only
 * warns and drops it too, other readers go on): data after a lone zero block is refused.
 * libarchive warnings are errors (they mean it ignored part of a header) except its exact
 * "name can't be converted to the locale"; and since only the last warning's message
 * survives, that one is accepted only when the scan saw nothing in the member's headers
 * that could have raised another (a malformed or unusual pax body, many extension headers).
 *
 * SPARSE MAPS
 *
 * libarchive keeps a sparse file's whole map in memory, some 64 bytes per entry, and an entry
 * costs the archive as little as 4 bytes of well-compressible text: a 25 KB download could claim
 * gigabytes before libarchive hands us the member. So the scan counts map entries the way
 * libarchive reads them, and refuses a member whose map has more than max_sparse_entries:
 *   - old GNU 'S' headers: 4 entries in the header, 21 in each extension block after it for
 *     as long as each says another follows. Header-looking blocks among another header's
 *     extension blocks are counted too, as a group that ends at the same block;
 *   - pax records (GNU 0.0 and 0.1, Solaris): counted when the body is complete;
 *   - GNU 1.0 maps, announced by pax records and stored at the start of the member's data:
 *     the scan reads the entry count on the map's first line.
 * A finding is a suspect like the others, fatal when it lies in the member's headers. That is
 * too late for a map that spans many chunks of the stream, which libarchive reads whole before
 * it returns the member; so the read callback also refuses while libarchive is reading headers
 * (inside archive_read_next_header()) and asks for bytes past a map's "mark", the point where it
 * has read more entries than the limit. While reading headers libarchive needs nothing beyond
 * the member's headers and sparse map plus one block; a map found in file data lies further out,
 * its mark more so, and one found in an earlier member is below where these headers start. So
 * the refusal only happens when libarchive is reading that map, after at most one chunk too
 * many: memory stays within the limit plus a chunk's worth of entries.
 *
 * NAMES
 *
 * Member names and hardlink targets are normalised: empty and "." components are dropped
 * ("./etc/passwd" is "etc/passwd"; "./" and "." are the root itself), absolute names are
 * refused (nothing is stripped silently), and so is every ".." component, even in "a/../b"
 * which would stay inside: GNU tar and bsdtar refuse those too, and a lexical reading could
 * disagree with the kernel's once symlinks exist. A "." directory entry applies its owner,
 * mode and times to the root; any other type named "." is refused.
 *
 * RESOLUTION
 *
 * Every path is resolved from the root fd. The parent directory of a member is opened with
 * openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS): one syscall, and the kernel refuses any
 * symlink and any escape. When that fails (a component is missing, a symlink or not a
 * directory) or openat2 is unavailable (ENOSYS, seccomp), we walk component by component
 * with openat(O_NOFOLLOW | O_DIRECTORY), creating missing directories (mode 0755) and
 * naming the offending component in the error. Either way a symlink anywhere in a parent
 * path is an error, even one that points inside the root ("a -> ." then "a/x"), and even
 * one an earlier member planted. The last parent opened stays cached, because members
 * usually come grouped by directory; nothing we do can change what a cached path means,
 * since a directory is only ever removed when a member replaces it, and the cache then
 * holds that member's parent.
 *
 * The last component is never followed either. Files are created with O_CREAT | O_EXCL |
 * O_NOFOLLOW after unlinking any non-directory in the way (duplicate members: the later
 * wins, and writing "f" after "f -> /etc/passwd" replaces the symlink); an empty directory
 * is removed to make room, a non-empty one is an error. Symlink targets are stored
 * verbatim and never followed while extracting (absolute targets are relative to the
 * image root at run time); their owner and times are set with AT_SYMLINK_NOFOLLOW.
 * Hardlink targets are normalised and resolved the same way (and held to the same depth and
 * length limits), must be regular files or symlinks, and must have been created by this
 * extraction, which keeps a set of the inodes it created: a hardlink cannot reach a file
 * that was in the root before, nor a later member. linkat() gets no AT_SYMLINK_FOLLOW, so
 * a hardlink to a symlink (which GNU tar archives as such) links the symlink itself. A
 * hardlink to an entry we skipped (a device node, say) is skipped and counted the same way.
 *
 * METADATA
 *
 * Regular files get their data, then chown (which clears setuid bits and capabilities),
 * then xattrs, then chmod, then times. Kept xattrs: user.* and security.capability.
 * trusted.*, security.selinux and everything else would change how the host, not the
 * image, treats the files; they are counted and skipped, as are POSIX ACLs and xattrs on
 * symlinks (see extract_xattr_allowed() for user.overlay.*). Numeric uid/gid are used,
 * never names. Directories are created 0700 and get their owner, mode and times at the end,
 * each after all of its descendants, from the tree of remembered paths (creating their
 * contents would change their mtime, and a 0555 directory could not be filled by a caller
 * without CAP_DAC_OVERRIDE); each is re-resolved safely, and one that a later member
 * replaced (by a symlink, say) is dropped.
 *
 * SKIPPED
 *
 * Character and block devices and FIFOs are counted and never created: a device node in
 * the image would hand host devices to whoever can read the mounted tree, and the VM makes
 * its own /dev. Sockets and unknown types are counted as "other".
 *
 * MEMORY AND SPEED
 *
 * Data is streamed: memory does not grow with file sizes. What grows with the archive is
 * the tree of remembered paths and the inode set (and, inside libarchive, the sparse map of the
 * current member: see SPARSE MAPS). The tree holds every directory member
 * (for its deferred metadata) and every skipped entry (so that hardlinks to it can be
 * skipped), as (parent, component) nodes of some 80 bytes plus the component, each stored
 * once however often the archive repeats it; a hash with a random key finds them. It is
 * capped at EXTRACT_TREE_MEMORY_MAX (-E2BIG naming the member), which is hundreds of
 * thousands of directories, far more than real images have; a tiny archive naming one
 * long directory a million times costs one path. The inode set takes 16 bytes per
 * regular file and symlink at worst, bounded through max_entries. Reads use 1 MiB
 * blocks; data goes from libarchive's buffer to pwrite() with no copy; sparse holes are
 * pwrite() offsets plus a final ftruncate(); nothing is fsynced; chown and chmod are
 * skipped when a new file already has the wanted owner and mode.
 */

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <locale.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/random.h>
#include <sys/syscall.h>
#include <sys/xattr.h>
#include <unistd.h>

#include <linux/openat2.h>

#include <archive.h>
#include <archive_entry.h>
#include <lzma.h>

#include "common/err.h"
#include "common/log.h"
#include "common/util.h"

#define EXTRACT_READ_BLOCK ((size_t)1 << 20)
#define EXTRACT_TAR_BLOCK 512u
/* libarchive refuses GNU long names and pax headers larger than this. */
#define EXTRACT_META_MAX ((size_t)1 << 20)
/* Header bodies being collected at the same time by the NUL scan (see extract_scan_block). */
#define EXTRACT_SCAN_SLOTS 16
/*
 * Suspect header blocks remembered at once, and the bytes of each name kept for messages. The
 * scan skips the data of members libarchive has accepted, so only what it saw of the data before
 * (at most two handed-out chunks, 4096 blocks) and the header blocks themselves count here.
 */
#define EXTRACT_MAX_SUSPECTS 16384u
#define EXTRACT_SUSPECT_NAME 100
/* Longest member name shown in a message, in bytes of the original. */
#define EXTRACT_NAME_SHOWN 160
/* Slack on the decompressed stream for headers and padding, per entry and in total. */
#define EXTRACT_STREAM_SLACK_PER_ENTRY UINT64_C(4096)
#define EXTRACT_STREAM_SLACK (UINT64_C(64) << 20)
#define EXTRACT_MAX_PATH_LENGTH_LIMIT (1u << 20)
/*
 * Cap on the memory of the tree of remembered paths. A node costs about 80 bytes plus its
 * component, so this holds some 500000 distinct directories: far more than real images
 * have (a full Debian has some 10000).
 */
#define EXTRACT_TREE_MEMORY_MAX ((size_t)64 << 20)
/*
 * Memory the xz decoder may use: every xz preset needs at most 65 MiB, and libarchive's
 * zstd reader has the same 128 MiB bound on its window. An xz header can ask for 4 GiB.
 */
#define EXTRACT_XZ_MEMLIMIT (UINT64_C(128) << 20)
/*
 * Blocks remembered for the end-of-archive check: more than the scan can run ahead of
 * libarchive (one handed-out chunk plus one special header).
 */
#define EXTRACT_ZERO_RING 16384u
/* Kinds of suspect: what extract_pax_nul_field() found, and the two non-fatal kinds. */
#define EXTRACT_NUL_NAME 1
#define EXTRACT_NUL_LINK 2
/* A pax body libarchive would only partly apply (extract_pax_risky()). */
#define EXTRACT_PAX_RISKY 3
/* A header block of an extension type (x, X, g, L, K, A, V). */
#define EXTRACT_SPECIAL 4
/* A sparse map with more entries than max_sparse_entries (see SPARSE MAPS below). */
#define EXTRACT_SPARSE_MANY 5
/*
 * Old GNU sparse headers whose extension blocks overlap, and GNU 1.0 sparse maps expected or
 * being read at once: one of each in real archives, a few more only in crafted ones.
 */
#define EXTRACT_SCAN_CHAINS 16
#define EXTRACT_SCAN_MAPS 8
/* Longest line libarchive reads in a GNU 1.0 sparse map (gnu_sparse_10_atol()). */
#define EXTRACT_SPARSE_LINE_MAX 100u
/*
 * Offsets of the old GNU sparse header fields: 4 map entries, "isextended", and in each
 * extension block 21 entries and its own "isextended". An entry is 24 bytes (offset, size).
 */
#define EXTRACT_GNU_SPARSE 386u
#define EXTRACT_GNU_ISEXTENDED 482u
#define EXTRACT_GNU_EXT_ISEXTENDED 504u
#define EXTRACT_GNU_SPARSE_ENTRY 24u
/*
 * More extension headers than this in front of one member is suspicious: libarchive gives up
 * after 32 with a warning that a later charset warning could hide. GNU tar writes at most 3.
 */
#define EXTRACT_MAX_SPECIAL 16

/* Owner, mode and times of a directory member, applied at the end. */
struct extract_dirmeta {
        mode_t mode;
        uid_t uid;
        gid_t gid;
        struct timespec times[2];
};

/* What a tree node stands for besides being a path prefix (flags). */
#define EXTRACT_NODE_DIR 1u    /* a directory member: meta is set */
#define EXTRACT_NODE_DEVICE 2u /* a skipped device node or FIFO */
#define EXTRACT_NODE_OTHER 4u  /* a skipped socket or unknown type */

/*
 * One path component of the tree of remembered paths (see MEMORY AND SPEED). Links are
 * node numbers: index + 1, 0 for none (the parent of a top-level node is the root).
 */
struct extract_node {
        uint32_t parent;
        uint32_t first_child;
        uint32_t next_sibling;
        uint32_t name; /* offset of the component in names */
        uint8_t name_len;
        uint8_t flags;
        struct extract_dirmeta meta;
};

/*
 * The remembered paths: directory members and skipped entries, each stored once however
 * often the archive names it, as a (parent, component) tree. A hash of (parent, component)
 * finds nodes; its key is random per extraction, so that an archive cannot be built to make
 * every name collide.
 */
struct extract_tree {
        struct extract_node *nodes;
        uint32_t n_nodes;
        uint32_t cap_nodes;
        char *names;
        size_t names_len;
        size_t names_cap;
        uint32_t *slots;  /* node numbers; 0 is free */
        size_t cap_slots; /* a power of two, or 0 */
        uint64_t key[2];
        uint32_t first_top; /* first top-level node */
        bool have_root;
        struct extract_dirmeta root;
};

/* Open-addressing set of inode numbers; 0 marks a free slot, so inode 0 is kept aside. */
struct extract_inodes {
        uint64_t *slots;
        size_t cap; /* a power of two, or 0 */
        size_t len;
        bool has_zero;
};

/* A GNU long name or pax header body being collected by the NUL scan. */
struct extract_scan_slot {
        unsigned char *buf; /* NULL when the slot is free */
        size_t len;
        size_t want;
        char type;
        uint64_t offset; /* of its header block */
};

/*
 * A header-looking block whose name field or body holds a name cut at a NUL byte, or that is
 * otherwise fatal or notable if libarchive uses it as a header.
 */
struct extract_suspect {
        uint64_t offset; /* of the header block */
        int kind;        /* EXTRACT_NUL_NAME, _NUL_LINK, _PAX_RISKY, _SPECIAL or _SPARSE_MANY */
        const char *where;
        /*
         * _SPARSE_MANY: the declared or counted entries, and the stream offset past which a
         * header read means libarchive is reading this map (see SPARSE MAPS).
         */
        uint64_t count;
        uint64_t mark;
        /* Where the member header is that will name it, when @name is still empty, or 0. */
        uint64_t name_at;
        char name[EXTRACT_SUSPECT_NAME + 1]; /* up to the NUL */
};

/* An old GNU sparse header whose extension blocks are being counted. */
struct extract_scan_chain {
        uint64_t offset;  /* of the header block */
        uint64_t entries; /* in the header block */
        uint64_t base;    /* the group's extension entries when it started */
        bool flagged;     /* already a suspect */
        bool map_after;   /* a GNU 1.0 map was announced for it: it follows the chain */
        char name[EXTRACT_SUSPECT_NAME + 1];
};

/* A GNU 1.0 sparse map: expected after a member header at @at, or being read from @at on. */
struct extract_scan_map {
        bool open;       /* being read; else its member header is expected at @at */
        uint64_t at;     /* the next block it needs */
        uint64_t start;  /* of the map (when open) */
        uint64_t header; /* of the member header (when open) */
        size_t line_len; /* of the line being read */
        bool comment;    /* the line starts with '#' */
        bool digits;     /* the line has digits */
        uint64_t value;  /* saturated */
        char name[EXTRACT_SUSPECT_NAME + 1];
};

struct extract_scan {
        unsigned char carry[EXTRACT_TAR_BLOCK];
        size_t carry_len;
        uint64_t offset; /* stream offset of the next whole block */
        struct extract_scan_slot slots[EXTRACT_SCAN_SLOTS];
        /* Which of the last EXTRACT_ZERO_RING blocks were all zeros, by block number. */
        uint64_t zero_bits[EXTRACT_ZERO_RING / 64];
        /*
         * Old GNU sparse headers whose extension blocks are being counted. They overlap when a
         * header-looking block sits among another's extension blocks, and then end together,
         * since each block says whether one more follows: one group, @chain_total entries.
         */
        struct extract_scan_chain chains[EXTRACT_SCAN_CHAINS];
        size_t n_chains;
        uint64_t chain_total;
        struct extract_scan_map maps[EXTRACT_SCAN_MAPS];
        size_t n_maps;
        /* The data of the member libarchive accepted last, which the scan need not read. */
        uint64_t skip_start;
        uint64_t skip_end;
        bool skipping; /* in it, and what the scan followed is forgotten */
};

struct extract_ctx {
        int root_fd;
        dev_t root_dev;
        struct extract_options opts;
        struct extract_result res;

        /* The input: a file descriptor, or a buffer when in_fd < 0. */
        int in_fd;
        const unsigned char *in_mem;
        size_t in_mem_len;
        unsigned char *in_buf; /* EXTRACT_READ_BLOCK bytes read from in_fd */
        size_t in_peek;        /* bytes read into in_buf to detect xz, not handed out yet */
        bool in_eof;
        /* xz is decoded here with a memory limit, which libarchive 3.6 does not set. */
        bool xz;
        bool xz_end;
        lzma_stream xz_strm;
        unsigned char *xz_out;

        struct archive *outer; /* decompression of gzip and zstd (or none) */
        struct archive *inner; /* tar parsing, fed by extract_stream_read() */
        int stream_r;          /* error raised inside the read callback */
        uint64_t stream_bytes;
        uint64_t stream_limit;
        const unsigned char *pending; /* rest of the outer reader's block, not handed out */
        size_t pending_len;
        size_t scan_ahead; /* bytes at pending already scanned */
        struct extract_scan scan;
        struct extract_suspect *suspects;
        size_t n_suspects;
        size_t cap_suspects;
        size_t n_sparse_suspects; /* of kind EXTRACT_SPARSE_MANY */
        size_t n_unnamed;         /* of those, waiting for a name from a later header */
        /* Inside archive_read_next_header(): libarchive is reading headers, not file data. */
        bool in_header;
        /* c->stream_r's message names the member already. */
        bool stream_named;
        /* The current member's headers hold a risky pax body or many extension headers. */
        bool member_risky;
        /* Stream offset just past the previous member's data and padding. */
        uint64_t member_end;

        bool have_openat2;
        int cache_fd; /* parent directory of the previous member, or -1 */
        char *cache_path;
        size_t cache_len;

        char *path;      /* normalised name of the current member */
        char *link_path; /* normalised hardlink target */
        char *scratch;   /* NUL-terminated prefixes of the above */
        size_t path_size;

        struct extract_tree tree;
        struct extract_inodes inodes;

        /* Quoted name of the current (or, between headers, the previous) member. */
        char last_member[EXTRACT_NAME_SHOWN * 4 + 8];
        uint64_t entries;
        uint64_t bytes; /* file data written */
        int64_t next_progress_ms;
};

/* Tests set this to exercise the component-by-component walk on kernels with openat2. */
FIM_TESTABLE bool extract_disable_openat2;
/*
 * Tests and the fuzzer set this to hand libarchive the decompressed stream in chunks of
 * this many bytes (0: EXTRACT_READ_BLOCK), to exercise the scan across odd boundaries.
 */
FIM_TESTABLE size_t extract_chunk_size;
/* Tests lower this to reach the cap on the tree of remembered paths with small archives. */
FIM_TESTABLE size_t extract_tree_memory_max = EXTRACT_TREE_MEMORY_MAX;

void extract_options_init(struct extract_options *opts)
{
        *opts = (struct extract_options){
                .max_total_bytes = EXTRACT_DEFAULT_MAX_TOTAL_BYTES,
                .max_entries = EXTRACT_DEFAULT_MAX_ENTRIES,
                .max_path_depth = EXTRACT_DEFAULT_MAX_PATH_DEPTH,
                .max_path_length = EXTRACT_DEFAULT_MAX_PATH_LENGTH,
                .max_sparse_entries = EXTRACT_DEFAULT_MAX_SPARSE_ENTRIES,
                .preserve_owner = true,
                .progress_interval_ms = EXTRACT_DEFAULT_PROGRESS_INTERVAL_MS,
        };
}

/*
 * Copy @s for a message: control bytes, single and double quotes and backslashes become \xNN,
 * and names longer than EXTRACT_NAME_SHOWN are cut with "...". @out holds at least
 * EXTRACT_NAME_SHOWN*4+8. Member names are the archive's choice: escaped this way they cannot
 * end the quotes around them, nor start a new line or a fake key=value field in a log record.
 */
FIM_TESTABLE void extract_quote(const char *s, char *out, size_t size)
{
        static const char hex[] = "0123456789abcdef";
        size_t o = 0;

        for (size_t i = 0; s[i] != '\0'; i++) {
                unsigned char ch = (unsigned char)s[i];

                if (i == EXTRACT_NAME_SHOWN || o + 8 >= size) {
                        memcpy(out + o, "...", 3);
                        o += 3;
                        break;
                }
                if (ch < 0x20 || ch == 0x7f || ch == '\'' || ch == '"' || ch == '\\') {
                        out[o++] = '\\';
                        out[o++] = 'x';
                        out[o++] = hex[ch >> 4];
                        out[o++] = hex[ch & 0xf];
                } else {
                        out[o++] = (char)ch;
                }
        }
        out[o] = '\0';
}

/* Set the last error to "failed to extract '<member>': <what>" and return @r. */
static int extract_fail(struct extract_ctx *c, int r, const char *fmt, ...)
        __attribute__((format(printf, 3, 4)));

static int extract_fail(struct extract_ctx *c, int r, const char *fmt, ...)
{
        char what[ERR_MSG_MAX];
        va_list ap;

        va_start(ap, fmt);
        (void)vsnprintf(what, sizeof(what), fmt, ap);
        va_end(ap);
        return err_set(r, "failed to extract '%s': %s", c->last_member, what);
}

/* Like extract_fail() for a failed syscall: ENOSPC and EDQUOT say the filesystem is full. */
static int extract_fail_errno(struct extract_ctx *c, int errnum, const char *what)
{
        if (errnum == ENOSPC || errnum == EDQUOT)
                return extract_fail(c, -ENOSPC,
                                    "target filesystem is full (%s) after writing %llu bytes",
                                    errnum == EDQUOT ? "quota exceeded" : "no space left",
                                    (unsigned long long)c->bytes);
        return extract_fail(c, -errnum, "failed to %s: %s", what, strerror(errnum));
}

/*
 * Normalise a member name or link target into @out: drop empty and "." components, refuse
 * absolute names (-EPERM), ".." components (-EPERM), empty names (-EBADMSG) and components
 * longer than NAME_MAX (-ENAMETOOLONG). The root itself comes out as "" with depth 0.
 */
FIM_TESTABLE int extract_normalize(const char *name, char *out, size_t out_size,
                                   unsigned *ret_depth)
{
        const char *p = name;
        unsigned depth = 0;
        size_t o = 0;

        if (name[0] == '\0')
                return -EBADMSG;
        if (name[0] == '/')
                return -EPERM;
        while (*p != '\0') {
                const char *start = p;
                size_t n;

                while (*p != '\0' && *p != '/')
                        p++;
                n = (size_t)(p - start);
                while (*p == '/')
                        p++;
                if (n == 0 || (n == 1 && start[0] == '.'))
                        continue;
                if (n == 2 && start[0] == '.' && start[1] == '.')
                        return -EPERM;
                if (n > NAME_MAX)
                        return -ENAMETOOLONG;
                if (o + n + 2 > out_size)
                        return -ENAMETOOLONG;
                if (o > 0)
                        out[o++] = '/';
                memcpy(out + o, start, n);
                o += n;
                depth++;
        }
        out[o] = '\0';
        *ret_depth = depth;
        return 0;
}

/* Check and normalise the current member's name into c->path. */
static int extract_check_name(struct extract_ctx *c, const char *name, unsigned *ret_depth)
{
        size_t len = name ? strlen(name) : 0;
        unsigned depth;
        int r;

        if (len == 0)
                return extract_fail(c, -EBADMSG, "empty member name");
        if (len > c->opts.max_path_length)
                return extract_fail(c, -ENAMETOOLONG,
                                    "name is %zu bytes long, more than the limit of %u", len,
                                    c->opts.max_path_length);
        r = extract_normalize(name, c->path, c->path_size, &depth);
        if (r == -EPERM && name[0] == '/')
                return extract_fail(c, r, "absolute member path");
        if (r == -EPERM)
                return extract_fail(c, r, "path has a '..' component");
        if (r == -ENAMETOOLONG)
                return extract_fail(c, r, "a path component is longer than %d bytes", NAME_MAX);
        if (r < 0)
                return extract_fail(c, r, "invalid member name");
        if (depth > c->opts.max_path_depth)
                return extract_fail(c, -ENAMETOOLONG,
                                    "path is %u levels deep, more than the limit of %u", depth,
                                    c->opts.max_path_depth);
        *ret_depth = depth;
        return 0;
}

static uint64_t extract_inode_hash(uint64_t ino, size_t cap)
{
        return (ino * UINT64_C(0x9e3779b97f4a7c15)) & (cap - 1);
}

static bool extract_inodes_has(const struct extract_inodes *s, uint64_t ino)
{
        if (ino == 0)
                return s->has_zero;
        if (s->cap == 0)
                return false;
        for (uint64_t i = extract_inode_hash(ino, s->cap);; i = (i + 1) & (s->cap - 1)) {
                if (s->slots[i] == ino)
                        return true;
                if (s->slots[i] == 0)
                        return false;
        }
}

static int extract_inodes_add(struct extract_inodes *s, uint64_t ino)
{
        if (ino == 0) {
                s->has_zero = true;
                return 0;
        }
        if ((s->len + 1) * 2 > s->cap) {
                size_t cap = s->cap ? s->cap * 2 : 1024;
                uint64_t *slots = calloc(cap, sizeof(*slots));

                if (!slots)
                        return -ENOMEM;
                for (size_t j = 0; j < s->cap; j++) {
                        uint64_t v = s->slots[j];
                        uint64_t i;

                        if (v == 0)
                                continue;
                        for (i = extract_inode_hash(v, cap); slots[i] != 0; i = (i + 1) & (cap - 1))
                                ;
                        slots[i] = v;
                }
                free(s->slots);
                s->slots = slots;
                s->cap = cap;
        }
        for (uint64_t i = extract_inode_hash(ino, s->cap);; i = (i + 1) & (s->cap - 1)) {
                if (s->slots[i] == ino)
                        return 0;
                if (s->slots[i] == 0) {
                        s->slots[i] = ino;
                        s->len++;
                        return 0;
                }
        }
}

/* --- The tree of remembered paths (see MEMORY AND SPEED) --- */

static uint64_t extract_rotl(uint64_t x, int b)
{
        return (x << b) | (x >> (64 - b));
}

static void extract_sipround(uint64_t v[4])
{
        v[0] += v[1];
        v[1] = extract_rotl(v[1], 13) ^ v[0];
        v[0] = extract_rotl(v[0], 32);
        v[2] += v[3];
        v[3] = extract_rotl(v[3], 16) ^ v[2];
        v[0] += v[3];
        v[3] = extract_rotl(v[3], 21) ^ v[0];
        v[2] += v[1];
        v[1] = extract_rotl(v[1], 17) ^ v[2];
        v[2] = extract_rotl(v[2], 32);
}

/* Byte @i of the hashed message: @parent in 4 little-endian bytes, then @name. */
static uint64_t extract_tree_byte(uint32_t parent, const char *name, size_t i)
{
        return i < 4 ? (parent >> (8 * i)) & 0xff : (unsigned char)name[i - 4];
}

/* SipHash-1-3 of (@parent, @name) under the tree's random key. */
static uint64_t extract_tree_hash(const struct extract_tree *t, uint32_t parent, const char *name,
                                  size_t len)
{
        uint64_t v[4] = {
                t->key[0] ^ UINT64_C(0x736f6d6570736575),
                t->key[1] ^ UINT64_C(0x646f72616e646f6d),
                t->key[0] ^ UINT64_C(0x6c7967656e657261),
                t->key[1] ^ UINT64_C(0x7465646279746573),
        };
        size_t total = len + 4;
        size_t whole = total - total % 8;
        uint64_t m;

        for (size_t off = 0; off < whole; off += 8) {
                m = 0;
                for (size_t b = 0; b < 8; b++)
                        m |= extract_tree_byte(parent, name, off + b) << (8 * b);
                v[3] ^= m;
                extract_sipround(v);
                v[0] ^= m;
        }
        m = (uint64_t)(total & 0xff) << 56;
        for (size_t b = 0; b < total % 8; b++)
                m |= extract_tree_byte(parent, name, whole + b) << (8 * b);
        v[3] ^= m;
        extract_sipround(v);
        v[0] ^= m;
        v[2] ^= 0xff;
        for (int i = 0; i < 3; i++)
                extract_sipround(v);
        return v[0] ^ v[1] ^ v[2] ^ v[3];
}

static size_t extract_tree_memory(size_t cap_nodes, size_t names_cap, size_t cap_slots)
{
        return cap_nodes * sizeof(struct extract_node) + names_cap + cap_slots * sizeof(uint32_t);
}

/* Put node number @num into @slots (@cap of them). */
static void extract_tree_slot(const struct extract_tree *t, uint32_t *slots, size_t cap,
                              uint32_t num)
{
        const struct extract_node *d = &t->nodes[num - 1];
        size_t i = extract_tree_hash(t, d->parent, t->names + d->name, d->name_len) & (cap - 1);

        while (slots[i] != 0)
                i = (i + 1) & (cap - 1);
        slots[i] = num;
}

/* Make room for one more node with a @len-byte name. -E2BIG past EXTRACT_TREE_MEMORY_MAX. */
static int extract_tree_reserve(struct extract_tree *t, size_t len)
{
        size_t cap_nodes = t->cap_nodes;
        size_t names_cap = t->names_cap;
        size_t cap_slots = t->cap_slots;

        if (t->n_nodes == cap_nodes)
                cap_nodes = cap_nodes ? cap_nodes * 2 : 256;
        while (t->names_len + len > names_cap)
                names_cap = names_cap ? names_cap * 2 : 4096;
        if (((size_t)t->n_nodes + 1) * 2 > cap_slots)
                cap_slots = cap_slots ? cap_slots * 2 : 512;
        if (extract_tree_memory(cap_nodes, names_cap, cap_slots) > extract_tree_memory_max)
                return -E2BIG;

        if (cap_nodes != t->cap_nodes) {
                struct extract_node *v = realloc(t->nodes, cap_nodes * sizeof(*v));

                if (!v)
                        return -ENOMEM;
                t->nodes = v;
                t->cap_nodes = (uint32_t)cap_nodes;
        }
        if (names_cap != t->names_cap) {
                char *v = realloc(t->names, names_cap);

                if (!v)
                        return -ENOMEM;
                t->names = v;
                t->names_cap = names_cap;
        }
        if (cap_slots != t->cap_slots) {
                uint32_t *v = calloc(cap_slots, sizeof(*v));

                if (!v)
                        return -ENOMEM;
                for (uint32_t num = 1; num <= t->n_nodes; num++)
                        extract_tree_slot(t, v, cap_slots, num);
                free(t->slots);
                t->slots = v;
                t->cap_slots = cap_slots;
        }
        return 0;
}

/*
 * The number of the node for component @name (@len bytes) below node @parent (0: the root),
 * added when missing and @add. Returns 0 when missing, or a negative errno.
 */
static int64_t extract_tree_child(struct extract_tree *t, uint32_t parent, const char *name,
                                  size_t len, bool add)
{
        struct extract_node *d;
        uint32_t num;
        size_t i;
        int r;

        if (t->cap_slots > 0) {
                i = extract_tree_hash(t, parent, name, len) & (t->cap_slots - 1);
                for (; t->slots[i] != 0; i = (i + 1) & (t->cap_slots - 1)) {
                        d = &t->nodes[t->slots[i] - 1];
                        if (d->parent == parent && d->name_len == len &&
                            memcmp(t->names + d->name, name, len) == 0)
                                return t->slots[i];
                }
        }
        if (!add)
                return 0;
        FIM_ASSERT(len > 0 && len <= NAME_MAX);
        r = extract_tree_reserve(t, len);
        if (r < 0)
                return r;
        num = ++t->n_nodes;
        d = &t->nodes[num - 1];
        *d = (struct extract_node){
                .parent = parent,
                .name = (uint32_t)t->names_len,
                .name_len = (uint8_t)len,
        };
        memcpy(t->names + t->names_len, name, len);
        t->names_len += len;
        if (parent == 0) {
                d->next_sibling = t->first_top;
                t->first_top = num;
        } else {
                d->next_sibling = t->nodes[parent - 1].first_child;
                t->nodes[parent - 1].first_child = num;
        }
        extract_tree_slot(t, t->slots, t->cap_slots, num);
        return num;
}

/* The node for the normalised path @path (not ""), added with its parents when @add. */
static int64_t extract_tree_path(struct extract_tree *t, const char *path, bool add)
{
        uint32_t num = 0;

        for (const char *p = path; *p != '\0';) {
                size_t len = strcspn(p, "/");
                int64_t r = extract_tree_child(t, num, p, len, add);

                if (r <= 0)
                        return r;
                num = (uint32_t)r;
                p += len;
                if (*p == '/')
                        p++;
        }
        return num;
}

/*
 * Remember the current member (c->path) with @flags, and with @meta for a directory. A
 * directory named again gets the later member's metadata.
 */
static int extract_remember(struct extract_ctx *c, unsigned flags,
                            const struct extract_dirmeta *meta)
{
        struct extract_tree *t = &c->tree;
        struct extract_node *d;
        int64_t num;

        if (c->path[0] == '\0') {
                FIM_ASSERT(meta);
                t->root = *meta;
                t->have_root = true;
                return 0;
        }
        num = extract_tree_path(t, c->path, true);
        if (num == -E2BIG)
                return extract_fail(
                        c, -E2BIG,
                        "archive names too many distinct directories and skipped entries: remembering them would take more than %zu MiB",
                        extract_tree_memory_max >> 20);
        if (num < 0)
                return extract_fail(c, (int)num, "out of memory");
        d = &t->nodes[num - 1];
        d->flags |= (uint8_t)flags;
        if (meta)
                d->meta = *meta;
        return 0;
}

/* The flags of the remembered path @path, 0 when it is not remembered. */
static unsigned extract_remembered(struct extract_ctx *c, const char *path)
{
        int64_t num = extract_tree_path(&c->tree, path, false);

        return num > 0 ? c->tree.nodes[num - 1].flags : 0;
}

static void extract_tree_done(struct extract_tree *t)
{
        free(t->nodes);
        free(t->names);
        free(t->slots);
        *t = (struct extract_tree){0};
}

static int extract_progress(struct extract_ctx *c, bool force)
{
        int64_t now;
        int r;

        if (!c->opts.progress)
                return 0;
        now = util_now_monotonic_ms();
        if (!force && now < c->next_progress_ms)
                return 0;
        c->next_progress_ms = now + (int64_t)c->opts.progress_interval_ms;
        r = c->opts.progress(c->entries, c->bytes, c->opts.userdata);
        if (r < 0)
                return err_set(r, "extraction stopped by the caller after %llu entries",
                               (unsigned long long)c->entries);
        return 0;
}

/* --- The NUL scan over the decompressed stream (see READING above) --- */

/*
 * Parse a tar numeric field exactly as libarchive does (tar_atol() in its tar reader), since
 * the scan must find the same header bodies that libarchive reads: base-256 two's
 * complement when the top bit of the first byte is set; otherwise leading spaces and tabs
 * (not NULs) are skipped, a '-' makes the value negative, and octal digits are taken up to
 * the first other byte. Out-of-range values come out as INT64_MAX or INT64_MIN.
 */
FIM_TESTABLE int64_t extract_tar_number(const unsigned char *p, size_t n)
{
        uint64_t v = 0;
        bool neg = false;
        size_t i = 0;

        if (n == 0)
                return 0;
        if (p[0] & 0x80) {
                unsigned char fill = (p[0] & 0x40) ? 0xff : 0x00;
                unsigned char first = (unsigned char)((p[0] & 0x7f) | (fill & 0x80));

                /* Bytes beyond the last 8 must only repeat the sign. */
                for (; n - i > 8; i++) {
                        if ((i == 0 ? first : p[i]) != fill)
                                return fill ? INT64_MIN : INT64_MAX;
                }
                if (((i == 0 ? first : p[i]) ^ fill) & 0x80)
                        return fill ? INT64_MIN : INT64_MAX;
                v = fill ? UINT64_MAX : 0;
                for (; i < n; i++)
                        v = (v << 8) | (i == 0 ? first : p[i]);
                return (int64_t)v;
        }
        while (i < n && (p[i] == ' ' || p[i] == '\t'))
                i++;
        if (i < n && p[i] == '-') {
                neg = true;
                i++;
        }
        for (; i < n && p[i] >= '0' && p[i] <= '7'; i++) {
                if (v > (uint64_t)INT64_MAX / 8)
                        return neg ? INT64_MIN : INT64_MAX;
                v = v * 8 + (uint64_t)(p[i] - '0');
        }
        if (v > (uint64_t)INT64_MAX)
                return neg ? INT64_MIN : INT64_MAX;
        return neg ? -(int64_t)v : (int64_t)v;
}

/* Whether a 512-byte block has a valid tar header checksum (as libarchive judges it). */
FIM_TESTABLE bool extract_block_is_header(const unsigned char *b)
{
        long want;
        long usum = 0;
        long ssum = 0;

        for (size_t i = 148; i < 156; i++) {
                if (b[i] != ' ' && b[i] != '\0' && (b[i] < '0' || b[i] > '7'))
                        return false;
        }
        /* libarchive keeps the low 32 bits of the field (an int). */
        want = (int32_t)(uint32_t)(uint64_t)extract_tar_number(b + 148, 8);
        for (size_t i = 0; i < EXTRACT_TAR_BLOCK; i++) {
                unsigned char ch = (i >= 148 && i < 156) ? ' ' : b[i];

                usum += ch;
                ssum += (signed char)ch;
        }
        return want == usum || want == ssum;
}

/* Whether a NUL-padded field has anything but NULs after its first NUL. */
static bool extract_field_has_nul(const unsigned char *f, size_t n)
{
        const unsigned char *nul = memchr(f, '\0', n);

        if (!nul)
                return false;
        for (const unsigned char *p = nul; p < f + n; p++) {
                if (*p != '\0')
                        return true;
        }
        return false;
}

/*
 * Find a path, linkpath or GNU.sparse.name record whose value holds a NUL byte in a pax
 * header body. Returns 0 when there is none, else EXTRACT_NUL_NAME or EXTRACT_NUL_LINK with
 * the value's offset in @ret_value. Malformed bodies are left to libarchive, which refuses
 * them.
 */
FIM_TESTABLE int extract_pax_nul_field(const unsigned char *d, size_t n, size_t *ret_value)
{
        static const struct {
                const char *key;
                int kind;
        } keys[] = {
                {"path", EXTRACT_NUL_NAME},
                {"GNU.sparse.name", EXTRACT_NUL_NAME},
                {"linkpath", EXTRACT_NUL_LINK},
        };
        size_t pos = 0;

        while (pos < n) {
                size_t len = 0;
                size_t i = pos;
                const unsigned char *key;
                const unsigned char *eq;
                const unsigned char *end;

                while (i < n && d[i] >= '0' && d[i] <= '9' && len <= n) {
                        len = len * 10 + (size_t)(d[i] - '0');
                        i++;
                }
                if (i >= n || d[i] != ' ' || len == 0 || len > n - pos || pos + len <= i + 1)
                        return 0;
                key = d + i + 1;
                end = d + pos + len - 1; /* the record's '\n' */
                eq = memchr(key, '=', (size_t)(end - key));
                for (size_t k = 0; eq && k < ARRAY_SIZE(keys); k++) {
                        size_t kl = strlen(keys[k].key);

                        if ((size_t)(eq - key) == kl && memcmp(key, keys[k].key, kl) == 0 &&
                            memchr(eq + 1, '\0', (size_t)(end - eq - 1))) {
                                *ret_value = (size_t)(eq + 1 - d);
                                return keys[k].kind;
                        }
                }
                pos += len;
        }
        return 0;
}

/*
 * Whether libarchive would apply only part of a pax header body, returning a warning (see
 * pax_header() and pax_attribute() in its tar reader): a record whose framing is broken
 * (length not decimal, above 999999, past the body or not ending in '\n'; no key or no '='),
 * or a GNU.sparse.map or SUN.holesdata record, whose values it may fail to parse. Such a
 * warning is normally fatal to us, but a later "can't be converted" warning on the same
 * member replaces its message, so the body is judged here instead.
 */
FIM_TESTABLE bool extract_pax_risky(const unsigned char *d, size_t n)
{
        static const char *const risky_keys[] = {"GNU.sparse.map", "SUN.holesdata"};
        size_t pos = 0;

        while (pos < n) {
                size_t len = 0;
                size_t i = pos;
                size_t end;
                size_t eq;

                for (; i < n && d[i] != ' '; i++) {
                        if (d[i] < '0' || d[i] > '9')
                                return true;
                        len = len * 10 + (size_t)(d[i] - '0');
                        if (len > 999999)
                                return true;
                }
                if (i >= n || len == 0 || len > n - pos || d[pos + len - 1] != '\n')
                        return true;
                end = pos + len - 1;
                /* The newline comes after the space, so the key starts inside the record. */
                if (d[i + 1] == '=' || i + 1 >= end)
                        return true;
                for (eq = i + 1; eq < end && d[eq] != '='; eq++) {
                        if (d[eq] == '\0')
                                return true;
                }
                if (eq == end)
                        return true;
                for (size_t k = 0; k < ARRAY_SIZE(risky_keys); k++) {
                        size_t kl = strlen(risky_keys[k]);

                        if (eq - (i + 1) == kl && memcmp(d + i + 1, risky_keys[k], kl) == 0)
                                return true;
                }
                pos += len;
        }
        return false;
}

/* @n rounded up to whole tar blocks; @n is far below UINT64_MAX. */
static uint64_t extract_round_block(uint64_t n)
{
        return (n + EXTRACT_TAR_BLOCK - 1) / EXTRACT_TAR_BLOCK * EXTRACT_TAR_BLOCK;
}

/* A decimal pax value as libarchive reads it (tar_atol10()): blanks, a sign, digits. */
static int64_t extract_pax_decimal(const unsigned char *p, size_t n)
{
        uint64_t v = 0;
        bool neg = false;
        size_t i = 0;

        while (i < n && (p[i] == ' ' || p[i] == '\t'))
                i++;
        if (i < n && p[i] == '-') {
                neg = true;
                i++;
        }
        for (; i < n && p[i] >= '0' && p[i] <= '9'; i++) {
                if (v > (uint64_t)INT64_MAX / 10)
                        return neg ? INT64_MIN : INT64_MAX;
                v = v * 10 + (uint64_t)(p[i] - '0');
        }
        if (v > (uint64_t)INT64_MAX)
                return neg ? INT64_MIN : INT64_MAX;
        return neg ? -(int64_t)v : (int64_t)v;
}

static size_t extract_count_byte(const unsigned char *p, size_t n, unsigned char ch)
{
        size_t count = 0;

        for (size_t i = 0; i < n; i++)
                count += p[i] == ch;
        return count;
}

/*
 * What a pax header body says about sparse files, read the way pax_attribute() in libarchive's
 * tar reader applies it, as an upper bound: the sparse map entries its records add (a
 * GNU.sparse.map pair, a GNU.sparse.numbytes record, and the first GNU.sparse.offset when no
 * numbytes came before it in the archive; a SUN.holesdata number), whether it announces a GNU
 * 1.0 map in the member's data (GNU.sparse.major 1 and minor 0; either may come from an
 * earlier member, so one of them is enough), and the member's name for messages. Records
 * after a malformed one are not applied, nor counted.
 */
FIM_TESTABLE uint64_t extract_pax_sparse(const unsigned char *d, size_t n, bool *ret_map10,
                                         const unsigned char **ret_name, size_t *ret_name_len)
{
        const unsigned char *name = NULL;
        const unsigned char *path = NULL;
        size_t name_len = 0;
        size_t path_len = 0;
        bool major_seen = false;
        bool minor_seen = false;
        bool offset_seen = false;
        int64_t major = 0;
        int64_t minor = 0;
        uint64_t entries = 0;
        size_t pos = 0;

        while (pos < n) {
                const unsigned char *key;
                const unsigned char *eq;
                const unsigned char *end;
                const unsigned char *v;
                size_t len = 0;
                size_t i = pos;
                size_t kl;
                size_t vl;

                while (i < n && d[i] >= '0' && d[i] <= '9' && len <= n) {
                        len = len * 10 + (size_t)(d[i] - '0');
                        i++;
                }
                if (i >= n || d[i] != ' ' || len == 0 || len > n - pos || pos + len <= i + 1 ||
                    d[pos + len - 1] != '\n')
                        break;
                key = d + i + 1;
                end = d + pos + len - 1;
                eq = memchr(key, '=', (size_t)(end - key));
                pos += len;
                if (!eq)
                        break;
                kl = (size_t)(eq - key);
                v = eq + 1;
                vl = (size_t)(end - v);
#define EXTRACT_KEY_IS(k) (kl == sizeof(k) - 1 && memcmp(key, k, kl) == 0)
                if (EXTRACT_KEY_IS("GNU.sparse.map")) {
                        entries += (extract_count_byte(v, vl, ',') + 1) / 2;
                } else if (EXTRACT_KEY_IS("GNU.sparse.numbytes")) {
                        entries++;
                } else if (EXTRACT_KEY_IS("GNU.sparse.offset")) {
                        entries += !offset_seen;
                        offset_seen = true;
                } else if (EXTRACT_KEY_IS("SUN.holesdata")) {
                        entries += extract_count_byte(v, vl, ' ');
                } else if (EXTRACT_KEY_IS("GNU.sparse.major")) {
                        major_seen = true;
                        major = extract_pax_decimal(v, vl);
                } else if (EXTRACT_KEY_IS("GNU.sparse.minor")) {
                        minor_seen = true;
                        minor = extract_pax_decimal(v, vl);
                } else if (EXTRACT_KEY_IS("GNU.sparse.name")) {
                        name = v;
                        name_len = vl;
                } else if (EXTRACT_KEY_IS("path")) {
                        path = v;
                        path_len = vl;
                }
#undef EXTRACT_KEY_IS
        }
        *ret_map10 = (major_seen || minor_seen) && (!major_seen || major == 1) &&
                     (!minor_seen || minor == 0);
        *ret_name = name ? name : path;
        *ret_name_len = name ? name_len : path_len;
        return entries;
}

/*
 * Remember that the header block at @offset holds a name cut at a NUL byte; @name (up to @n
 * bytes) is the field. Whether the block is a header libarchive uses, rather than file data
 * that happens to look like one, is only known later (extract_check_suspects).
 */
static int extract_scan_suspect(struct extract_ctx *c, const unsigned char *name, size_t n,
                                int kind, const char *where, uint64_t offset)
{
        struct extract_suspect *s;

        if (c->n_suspects == c->cap_suspects) {
                size_t cap = c->cap_suspects ? c->cap_suspects * 2 : 16;
                struct extract_suspect *v;

                if (cap > EXTRACT_MAX_SUSPECTS)
                        return err_set(
                                -EBADMSG,
                                "too many header-like blocks ahead of the parser near offset %llu",
                                (unsigned long long)offset);
                v = realloc(c->suspects, cap * sizeof(*v));
                if (!v)
                        return err_set(-ENOMEM, "out of memory");
                c->suspects = v;
                c->cap_suspects = cap;
        }
        s = &c->suspects[c->n_suspects++];
        *s = (struct extract_suspect){.offset = offset, .kind = kind, .where = where};
        n = strnlen((const char *)name, n < EXTRACT_SUSPECT_NAME ? n : EXTRACT_SUSPECT_NAME);
        memcpy(s->name, name, n);
        s->name[n] = '\0';
        return 0;
}

/*
 * Remember a sparse map of @count entries, more than the limit, in the member whose header
 * block (or, for pax records, extension header) is at @offset; libarchive reading headers
 * past @mark means it is reading this map (see SPARSE MAPS).
 */
static int extract_scan_sparse(struct extract_ctx *c, uint64_t offset, uint64_t mark,
                               uint64_t count, const unsigned char *name, size_t n,
                               const char *where)
{
        int r = extract_scan_suspect(c, name, n, EXTRACT_SPARSE_MANY, where, offset);

        if (r < 0)
                return r;
        c->suspects[c->n_suspects - 1].count = count;
        c->suspects[c->n_suspects - 1].mark = mark;
        c->n_sparse_suspects++;
        return 0;
}

static void extract_copy_name(char *out, const unsigned char *name, size_t n)
{
        n = strnlen((const char *)name, n < EXTRACT_SUSPECT_NAME ? n : EXTRACT_SUSPECT_NAME);
        memcpy(out, name, n);
        out[n] = '\0';
}

/* Expect the member header of an announced GNU 1.0 sparse map at @at. */
static int extract_scan_expect_map(struct extract_ctx *c, uint64_t at, const unsigned char *name,
                                   size_t n)
{
        struct extract_scan *scan = &c->scan;
        struct extract_scan_map *m;

        if (scan->n_maps == EXTRACT_SCAN_MAPS)
                return err_set(-EBADMSG, "too many overlapping sparse headers near offset %llu",
                               (unsigned long long)at);
        m = &scan->maps[scan->n_maps++];
        *m = (struct extract_scan_map){.at = at};
        extract_copy_name(m->name, name, n);
        return 0;
}

/* Sparse map facts from a finished pax body @s (x, X or g). */
static int extract_scan_pax_sparse(struct extract_ctx *c, const struct extract_scan_slot *s)
{
        uint64_t next = s->offset + EXTRACT_TAR_BLOCK + extract_round_block(s->want);
        const unsigned char *name = NULL;
        size_t name_len = 0;
        bool map10 = false;
        uint64_t entries = extract_pax_sparse(s->buf, s->len, &map10, &name, &name_len);
        int r;

        if (!name) {
                name = (const unsigned char *)"";
                name_len = 0;
        }
        /* libarchive applies the records once it has read the header after the body. */
        if (entries > c->opts.max_sparse_entries) {
                r = extract_scan_sparse(c, s->offset, next, entries, name, name_len, "pax header");
                if (r < 0)
                        return r;
                if (c->suspects[c->n_suspects - 1].name[0] == '\0') {
                        c->suspects[c->n_suspects - 1].name_at = next;
                        c->n_unnamed++;
                }
        }
        if (map10)
                return extract_scan_expect_map(c, next, name, name_len);
        return 0;
}

static int extract_scan_finish_slot(struct extract_ctx *c, struct extract_scan_slot *s)
{
        size_t value = 0;
        int kind;
        int r = 0;

        if (s->type == 'L' || s->type == 'K') {
                if (extract_field_has_nul(s->buf, s->len))
                        r = extract_scan_suspect(c, s->buf, s->len,
                                                 s->type == 'L' ? EXTRACT_NUL_NAME
                                                                : EXTRACT_NUL_LINK,
                                                 "GNU long name header", s->offset);
        } else {
                kind = extract_pax_nul_field(s->buf, s->len, &value);
                if (kind != 0)
                        r = extract_scan_suspect(c, s->buf + value, s->len - value, kind,
                                                 "pax header", s->offset);
                else if (extract_pax_risky(s->buf, s->len))
                        r = extract_scan_suspect(c, s->buf, 0, EXTRACT_PAX_RISKY, "pax header",
                                                 s->offset);
                if (r == 0)
                        r = extract_scan_pax_sparse(c, s);
        }
        free(s->buf);
        *s = (struct extract_scan_slot){0};
        return r;
}

/*
 * After libarchive parsed a member's headers: refuse the archive when one of the blocks it
 * used (from the header position to the start of the data) was a NUL suspect, and note in
 * c->member_risky whether they held a risky pax body or many extension headers. Suspects
 * found in file data are dropped; those past the data wait for a later member. (They are
 * not in offset order: a header body's findings are added when the body is complete.)
 */
static int extract_check_suspects(struct extract_ctx *c, struct archive_entry *e)
{
        uint64_t start = (uint64_t)archive_read_header_position(c->inner);
        uint64_t end = (uint64_t)archive_filter_bytes(c->inner, 0);
        unsigned specials = 0;
        size_t keep = 0;

        c->member_risky = false;
        c->n_sparse_suspects = 0;
        c->n_unnamed = 0;
        for (size_t i = 0; i < c->n_suspects; i++) {
                const struct extract_suspect *s = &c->suspects[i];
                char shown[EXTRACT_NAME_SHOWN * 4 + 8];

                if (s->offset >= end) {
                        c->n_sparse_suspects += s->kind == EXTRACT_SPARSE_MANY;
                        c->n_unnamed += s->kind == EXTRACT_SPARSE_MANY && s->name_at != 0;
                        c->suspects[keep++] = *s;
                        continue;
                }
                if (s->offset < start)
                        continue;
                if (s->kind == EXTRACT_SPARSE_MANY) {
                        const char *name = archive_entry_pathname(e);

                        extract_quote(name ? name : "", c->last_member, sizeof(c->last_member));
                        return err_set(
                                -E2BIG,
                                "failed to extract '%s': sparse map has more than %llu entries, the limit (%s at offset %llu)",
                                c->last_member, (unsigned long long)c->opts.max_sparse_entries,
                                s->where, (unsigned long long)s->offset);
                }
                if (s->kind == EXTRACT_PAX_RISKY) {
                        c->member_risky = true;
                        continue;
                }
                if (s->kind == EXTRACT_SPECIAL) {
                        if (++specials > EXTRACT_MAX_SPECIAL)
                                c->member_risky = true;
                        continue;
                }
                extract_quote(s->name, shown, sizeof(shown));
                if (s->kind == EXTRACT_NUL_LINK) {
                        const char *name = archive_entry_pathname(e);

                        extract_quote(name ? name : "", c->last_member, sizeof(c->last_member));
                        return err_set(
                                -EBADMSG,
                                "failed to extract '%s': link target '%s' has an embedded NUL byte (%s at offset %llu)",
                                c->last_member, shown, s->where, (unsigned long long)s->offset);
                }
                return err_set(
                        -EBADMSG,
                        "failed to extract '%s': name has an embedded NUL byte (%s at offset %llu)",
                        shown, s->where, (unsigned long long)s->offset);
        }
        c->n_suspects = keep;
        return 0;
}

static void extract_scan_mark_zero(struct extract_scan *scan, uint64_t offset, bool zero)
{
        uint64_t bit = (offset / EXTRACT_TAR_BLOCK) % EXTRACT_ZERO_RING;

        if (zero)
                scan->zero_bits[bit / 64] |= UINT64_C(1) << (bit % 64);
        else
                scan->zero_bits[bit / 64] &= ~(UINT64_C(1) << (bit % 64));
}

/*
 * Whether the block at @offset was all zeros: 1 yes, 0 no, -1 when it is no longer (or not
 * yet) remembered.
 */
static int extract_scan_was_zero(const struct extract_scan *scan, uint64_t offset)
{
        uint64_t bit = (offset / EXTRACT_TAR_BLOCK) % EXTRACT_ZERO_RING;

        if (offset % EXTRACT_TAR_BLOCK != 0 || offset >= scan->offset ||
            scan->offset - offset > (uint64_t)EXTRACT_ZERO_RING * EXTRACT_TAR_BLOCK)
                return -1;
        return (scan->zero_bits[bit / 64] >> (bit % 64)) & 1;
}

/*
 * Read one block of the GNU 1.0 sparse map @m: its first line that is not a '#' comment holds
 * the number of entries, as gnu_sparse_10_read() in libarchive reads it (lines of at most
 * EXTRACT_SPARSE_LINE_MAX bytes, decimal digits only). Returns 1 once the map is done with:
 * the number is known (and a suspect when above the limit) or libarchive would refuse the line.
 */
static int extract_scan_map_block(struct extract_ctx *c, struct extract_scan_map *m,
                                  const unsigned char *b)
{
        for (size_t i = 0; i < EXTRACT_TAR_BLOCK; i++) {
                unsigned char ch = b[i];

                if (m->line_len == 0)
                        m->comment = ch == '#';
                if (++m->line_len > EXTRACT_SPARSE_LINE_MAX)
                        return 1;
                if (ch == '\n' && m->comment) {
                        m->line_len = 0;
                        continue;
                }
                if (ch == '\n') {
                        if (m->value <= c->opts.max_sparse_entries)
                                return 1;
                        if (extract_scan_sparse(c, m->header, m->start, m->value,
                                                (const unsigned char *)m->name, sizeof(m->name),
                                                "GNU 1.0 sparse map") < 0)
                                return -1;
                        return 1;
                }
                if (m->comment)
                        continue;
                if (ch < '0' || ch > '9')
                        return 1;
                m->digits = true;
                m->value = m->value > UINT64_MAX / 16 ? UINT64_MAX / 16
                                                      : m->value * 10 + (uint64_t)(ch - '0');
        }
        return 0;
}

/*
 * The GNU 1.0 maps: read the open ones that need this block (a map lies in consecutive
 * blocks), forget those the stream has passed, and see whether a header is expected here.
 * Returns the index of an expectation at @offset in @ret_expect (or -1).
 */
static int extract_scan_maps(struct extract_ctx *c, const unsigned char *b, uint64_t offset,
                             ssize_t *ret_expect)
{
        struct extract_scan *scan = &c->scan;
        size_t keep = 0;
        int r;

        *ret_expect = -1;
        for (size_t i = 0; i < scan->n_maps; i++) {
                struct extract_scan_map *m = &scan->maps[i];

                if (m->at < offset)
                        continue;
                if (m->open && m->at == offset) {
                        r = extract_scan_map_block(c, m, b);
                        if (r < 0)
                                return r;
                        if (r > 0)
                                continue;
                        m->at += EXTRACT_TAR_BLOCK;
                }
                if (!m->open && m->at == offset) {
                        /* Expectations at one offset are the same expectation. */
                        if (*ret_expect >= 0)
                                continue;
                        *ret_expect = (ssize_t)keep;
                }
                scan->maps[keep++] = *m;
        }
        scan->n_maps = keep;
        return 0;
}

/*
 * The block at @offset continues the open group of old GNU sparse headers as an extension
 * block: count its entries (up to 21, until one whose offset field starts with a NUL, as
 * gnu_sparse_old_parse() reads them) for each header of the group, and end the group when
 * the block says no other follows. Announced GNU 1.0 maps start after it.
 */
static int extract_scan_chain_block(struct extract_ctx *c, const unsigned char *b, uint64_t offset)
{
        struct extract_scan *scan = &c->scan;
        struct extract_scan_map *m;
        uint64_t n = 0;
        int r;

        if (scan->n_chains == 0)
                return 0;
        while (n < 21 && b[n * EXTRACT_GNU_SPARSE_ENTRY] != 0)
                n++;
        scan->chain_total += n;
        for (size_t i = 0; i < scan->n_chains; i++) {
                struct extract_scan_chain *ch = &scan->chains[i];
                uint64_t count = ch->entries + scan->chain_total - ch->base;

                if (ch->flagged || count <= c->opts.max_sparse_entries)
                        continue;
                ch->flagged = true;
                r = extract_scan_sparse(c, ch->offset, offset + EXTRACT_TAR_BLOCK, count,
                                        (const unsigned char *)ch->name, sizeof(ch->name),
                                        "old GNU sparse header");
                if (r < 0)
                        return r;
        }
        if (b[EXTRACT_GNU_EXT_ISEXTENDED] != 0)
                return 0;
        for (size_t i = 0; i < scan->n_chains; i++) {
                const struct extract_scan_chain *ch = &scan->chains[i];

                if (!ch->map_after)
                        continue;
                r = extract_scan_expect_map(c, offset + EXTRACT_TAR_BLOCK,
                                            (const unsigned char *)ch->name, sizeof(ch->name));
                if (r < 0)
                        return r;
                m = &scan->maps[scan->n_maps - 1];
                m->open = true;
                m->start = m->at;
                m->header = ch->offset;
        }
        scan->n_chains = 0;
        scan->chain_total = 0;
        return 0;
}

/*
 * A member header block at @offset (not an extension header): with the GNU magic and a first
 * sparse map entry, libarchive reads up to 4 entries from it and, when its "isextended" byte
 * is set, the extension blocks after it (gnu_sparse_old_read()). Start counting them. Returns
 * the new chain in @ret_chain, or NULL when there is no extension block to count.
 */
static int extract_scan_chain_start(struct extract_ctx *c, const unsigned char *b, uint64_t offset,
                                    struct extract_scan_chain **ret_chain)
{
        struct extract_scan *scan = &c->scan;
        struct extract_scan_chain *ch;
        uint64_t n = 0;
        int r;

        *ret_chain = NULL;
        if (memcmp(b + 257, "ustar  \0", 8) != 0 || b[EXTRACT_GNU_SPARSE] == 0)
                return 0;
        while (n < 4 && b[EXTRACT_GNU_SPARSE + n * EXTRACT_GNU_SPARSE_ENTRY] != 0)
                n++;
        if (n > c->opts.max_sparse_entries) {
                r = extract_scan_sparse(c, offset, offset + EXTRACT_TAR_BLOCK, n, b, 100,
                                        "old GNU sparse header");
                if (r < 0)
                        return r;
        }
        if (b[EXTRACT_GNU_ISEXTENDED] == 0)
                return 0;
        /* An open group goes on past this block (it would have ended above): join it. */
        if (scan->n_chains == EXTRACT_SCAN_CHAINS)
                return err_set(-EBADMSG, "too many overlapping sparse headers near offset %llu",
                               (unsigned long long)offset);
        if (scan->n_chains == 0)
                scan->chain_total = 0;
        ch = &scan->chains[scan->n_chains++];
        *ch = (struct extract_scan_chain){
                .offset = offset,
                .entries = n,
                .base = scan->chain_total,
                .flagged = n > c->opts.max_sparse_entries,
        };
        extract_copy_name(ch->name, b, 100);
        *ret_chain = ch;
        return 0;
}

/*
 * A header block at @offset where the member header of an announced GNU 1.0 map (@m) was
 * expected: an extension header moves the expectation to the header after it; a member
 * header starts the map after itself (or after its old GNU extension blocks, @chain).
 */
static void extract_scan_map_header(struct extract_scan_map *m, const unsigned char *b,
                                    uint64_t offset, struct extract_scan_chain *chain)
{
        char type = (char)b[156];
        int64_t size = extract_tar_number(b + 124, 12);

        if (type == 'V') {
                m->at = offset + EXTRACT_TAR_BLOCK;
                return;
        }
        if (strchr("xXgLKA", type) && type != '\0') {
                /* libarchive refuses bodies of other sizes: the expectation is then dropped. */
                m->at = size >= 0 && (uint64_t)size <= EXTRACT_META_MAX
                                ? offset + EXTRACT_TAR_BLOCK + extract_round_block((uint64_t)size)
                                : 0;
                return;
        }
        if (m->name[0] == '\0')
                extract_copy_name(m->name, b, 100);
        if (chain) {
                chain->map_after = true;
                memcpy(chain->name, m->name, sizeof(m->name));
                m->at = 0;
                return;
        }
        m->open = true;
        m->at = offset + EXTRACT_TAR_BLOCK;
        m->start = offset + EXTRACT_TAR_BLOCK;
        m->header = offset;
}

/*
 * The header block at @offset names the sparse suspects from pax records without a name that
 * wait for it, or, when it is an extension header, passes them on to the header after it.
 */
static void extract_scan_name_suspects(struct extract_ctx *c, const unsigned char *b,
                                       uint64_t offset)
{
        char type = (char)b[156];
        int64_t size = extract_tar_number(b + 124, 12);
        uint64_t next = 0;

        if (type == 'V')
                next = offset + EXTRACT_TAR_BLOCK;
        else if (type != '\0' && strchr("xXgLKA", type) && size >= 0 &&
                 (uint64_t)size <= EXTRACT_META_MAX)
                next = offset + EXTRACT_TAR_BLOCK + extract_round_block((uint64_t)size);
        else if (type != '\0' && strchr("xXgLKA", type))
                return;
        for (size_t i = 0; i < c->n_suspects; i++) {
                struct extract_suspect *s = &c->suspects[i];

                if (s->kind != EXTRACT_SPARSE_MANY || s->name_at != offset)
                        continue;
                if (next != 0) {
                        s->name_at = next;
                        continue;
                }
                extract_copy_name(s->name, b, 100);
                s->name_at = 0;
                c->n_unnamed--;
        }
}

/* Forget what the scan follows across blocks: the file data it skips cannot hold headers. */
static void extract_scan_forget(struct extract_scan *scan)
{
        for (size_t i = 0; i < EXTRACT_SCAN_SLOTS; i++) {
                free(scan->slots[i].buf);
                scan->slots[i] = (struct extract_scan_slot){0};
        }
        scan->n_chains = 0;
        scan->chain_total = 0;
        scan->n_maps = 0;
}

/*
 * Look at one aligned block: feed it to the header bodies, old GNU sparse extension blocks
 * and GNU 1.0 sparse maps being followed, then, if it has a valid header checksum, check its
 * name fields, start collecting its body when it is a GNU long name or pax header, and start
 * following its sparse map. Every such block counts, not only those libarchive will use, so
 * no framing trick can hide a header from the scan; extract_check_suspects() later keeps only
 * the findings in blocks libarchive did use. Bodies are collected in parallel because a block
 * that merely looks like a header must not hide a real one behind it; more than
 * EXTRACT_SCAN_SLOTS overlapping bodies only happen in crafted input, which is refused. The
 * exception is the data of the member libarchive accepted last (skip_start to skip_end): that
 * is file data, whatever it looks like, and extract_loop() checks that libarchive agreed.
 */
static int extract_scan_block(struct extract_ctx *c, const unsigned char *b)
{
        struct extract_scan *scan = &c->scan;
        struct extract_scan_chain *chain = NULL;
        uint64_t offset = scan->offset;
        ssize_t expect;
        int64_t size;
        char type;
        int r;

        scan->offset += EXTRACT_TAR_BLOCK;
        extract_scan_mark_zero(scan, offset,
                               b[0] == 0 && memcmp(b, b + 1, EXTRACT_TAR_BLOCK - 1) == 0);
        if (offset >= scan->skip_start && offset < scan->skip_end) {
                if (!scan->skipping)
                        extract_scan_forget(scan);
                scan->skipping = true;
                return 0;
        }
        for (size_t i = 0; i < EXTRACT_SCAN_SLOTS; i++) {
                struct extract_scan_slot *s = &scan->slots[i];
                size_t n;

                if (!s->buf)
                        continue;
                n = s->want - s->len < EXTRACT_TAR_BLOCK ? s->want - s->len : EXTRACT_TAR_BLOCK;
                memcpy(s->buf + s->len, b, n);
                s->len += n;
                if (s->len == s->want) {
                        r = extract_scan_finish_slot(c, s);
                        if (r < 0)
                                return r;
                }
        }
        r = extract_scan_chain_block(c, b, offset);
        if (r < 0)
                return r;
        r = extract_scan_maps(c, b, offset, &expect);
        if (r < 0)
                return r;
        if (!extract_block_is_header(b)) {
                if (expect >= 0)
                        scan->maps[expect].at = 0; /* dropped at the next block */
                return 0;
        }
        type = (char)b[156];
        r = 0;
        if (extract_field_has_nul(b, 100))
                r = extract_scan_suspect(c, b, 100, EXTRACT_NUL_NAME, "ustar name field", offset);
        else if ((type == '1' || type == '2') && extract_field_has_nul(b + 157, 100))
                r = extract_scan_suspect(c, b + 157, 100, EXTRACT_NUL_LINK, "ustar link field",
                                         offset);
        else if (memcmp(b + 257, "ustar\0", 6) == 0 && extract_field_has_nul(b + 345, 155))
                r = extract_scan_suspect(c, b + 345, 155, EXTRACT_NUL_NAME, "ustar prefix field",
                                         offset);
        if (r < 0)
                return r;

        if (type != 'x' && type != 'X' && type != 'g' && type != 'L' && type != 'K' &&
            type != 'A' && type != 'V') {
                r = extract_scan_chain_start(c, b, offset, &chain);
                if (r < 0)
                        return r;
        }
        if (expect >= 0)
                extract_scan_map_header(&scan->maps[expect], b, offset, chain);
        if (c->n_unnamed > 0)
                extract_scan_name_suspects(c, b, offset);
        if (type == 'A' || type == 'V') /* extension headers whose bodies hold no names */
                return extract_scan_suspect(c, b, 0, EXTRACT_SPECIAL, "extension header", offset);
        if (type != 'x' && type != 'X' && type != 'g' && type != 'L' && type != 'K')
                return 0;
        r = extract_scan_suspect(c, b, 0, EXTRACT_SPECIAL, "extension header", offset);
        if (r < 0)
                return r;
        size = extract_tar_number(b + 124, 12);
        if (size <= 0 || (uint64_t)size > EXTRACT_META_MAX)
                return 0; /* libarchive refuses these itself */
        for (size_t i = 0; i < EXTRACT_SCAN_SLOTS; i++) {
                struct extract_scan_slot *s = &scan->slots[i];

                if (s->buf)
                        continue;
                s->buf = malloc((size_t)size);
                if (!s->buf)
                        return err_set(-ENOMEM, "failed to allocate %lld bytes", (long long)size);
                s->want = (size_t)size;
                s->len = 0;
                s->type = type;
                s->offset = offset;
                return 0;
        }
        return err_set(-EBADMSG, "too many overlapping extension headers at offset %llu",
                       (unsigned long long)offset);
}

static int extract_scan_feed(struct extract_ctx *c, const unsigned char *p, size_t len)
{
        struct extract_scan *scan = &c->scan;
        int r;

        if (scan->carry_len > 0) {
                size_t n = EXTRACT_TAR_BLOCK - scan->carry_len;

                if (n > len)
                        n = len;
                memcpy(scan->carry + scan->carry_len, p, n);
                scan->carry_len += n;
                p += n;
                len -= n;
                if (scan->carry_len < EXTRACT_TAR_BLOCK)
                        return 0;
                scan->carry_len = 0;
                r = extract_scan_block(c, scan->carry);
                if (r < 0)
                        return r;
        }
        for (; len >= EXTRACT_TAR_BLOCK; p += EXTRACT_TAR_BLOCK, len -= EXTRACT_TAR_BLOCK) {
                r = extract_scan_block(c, p);
                if (r < 0)
                        return r;
        }
        memcpy(scan->carry, p, len);
        scan->carry_len = len;
        return 0;
}

static void extract_scan_done(struct extract_scan *scan)
{
        for (size_t i = 0; i < EXTRACT_SCAN_SLOTS; i++) {
                free(scan->slots[i].buf);
                scan->slots[i] = (struct extract_scan_slot){0};
        }
}

/* --- Input and xz decoding --- */

/* The next raw input bytes: 1 with data, 0 at the end, or a negative errno. */
static int extract_input_next(struct extract_ctx *c, const unsigned char **ret_buf, size_t *ret_len)
{
        ssize_t n;

        if (c->in_fd < 0) {
                if (c->in_eof || c->in_mem_len == 0)
                        return 0;
                c->in_eof = true;
                *ret_buf = c->in_mem;
                *ret_len = c->in_mem_len;
                return 1;
        }
        if (c->in_peek > 0) {
                *ret_buf = c->in_buf;
                *ret_len = c->in_peek;
                c->in_peek = 0;
                return 1;
        }
        do {
                n = read(c->in_fd, c->in_buf, EXTRACT_READ_BLOCK);
        } while (n < 0 && errno == EINTR);
        if (n < 0)
                return err_set(-errno, "failed to read the archive: %s", strerror(errno));
        if (n == 0)
                return 0;
        *ret_buf = c->in_buf;
        *ret_len = (size_t)n;
        return 1;
}

/* libarchive's read callback for the outer reader on a file descriptor. */
static la_ssize_t extract_input_read(struct archive *a, void *userdata, const void **ret_buf)
{
        struct extract_ctx *c = userdata;
        const unsigned char *buf = NULL;
        size_t len = 0;
        int r = extract_input_next(c, &buf, &len);

        if (r < 0) {
                archive_set_error(a, -r, "%s", err_last());
                return -1;
        }
        *ret_buf = buf;
        return (la_ssize_t)len;
}

/* Read the first bytes of a file descriptor input and tell whether it is xz. */
static int extract_detect(struct extract_ctx *c)
{
        static const unsigned char xz_magic[6] = {0xfd, '7', 'z', 'X', 'Z', 0x00};

        if (c->in_fd < 0) {
                c->xz = c->in_mem_len >= sizeof(xz_magic) &&
                        memcmp(c->in_mem, xz_magic, sizeof(xz_magic)) == 0;
                return 0;
        }
        while (c->in_peek < sizeof(xz_magic)) {
                ssize_t n = read(c->in_fd, c->in_buf + c->in_peek, EXTRACT_READ_BLOCK - c->in_peek);

                if (n < 0 && errno == EINTR)
                        continue;
                if (n < 0)
                        return err_set(-errno, "failed to read the archive: %s", strerror(errno));
                if (n == 0)
                        break;
                c->in_peek += (size_t)n;
        }
        c->xz = c->in_peek >= sizeof(xz_magic) &&
                memcmp(c->in_buf, xz_magic, sizeof(xz_magic)) == 0;
        return 0;
}

static const char *extract_xz_strerror(lzma_ret ret)
{
        switch (ret) {
        case LZMA_FORMAT_ERROR:
                return "not in the xz format";
        case LZMA_OPTIONS_ERROR:
                return "unsupported compression options";
        case LZMA_DATA_ERROR:
                return "corrupt compressed data";
        case LZMA_BUF_ERROR:
                return "compressed data is truncated";
        case LZMA_MEM_ERROR:
                return "out of memory";
        default:
                return "internal error";
        }
}

/* Start the xz decoder: concatenated streams, as libarchive and xz(1) accept them. */
static int extract_xz_start(struct extract_ctx *c)
{
        lzma_ret ret;

        c->xz_out = malloc(EXTRACT_READ_BLOCK);
        if (!c->xz_out)
                return err_set(-ENOMEM, "out of memory");
        ret = lzma_stream_decoder(&c->xz_strm, EXTRACT_XZ_MEMLIMIT, LZMA_CONCATENATED);
        if (ret != LZMA_OK)
                return err_set(ret == LZMA_MEM_ERROR ? -ENOMEM : -EINVAL,
                               "failed to set up the xz decoder: %s", extract_xz_strerror(ret));
        return 0;
}

/*
 * The next block of decompressed xz data, in the convention of archive_read_data_block():
 * ARCHIVE_OK with data, ARCHIVE_EOF at the end, or a negative errno with the error set.
 */
static int extract_xz_next(struct extract_ctx *c, const void **ret_buf, size_t *ret_len)
{
        lzma_stream *z = &c->xz_strm;

        if (c->xz_end)
                return ARCHIVE_EOF;
        z->next_out = c->xz_out;
        z->avail_out = EXTRACT_READ_BLOCK;
        while (z->avail_out > 0) {
                lzma_ret ret;

                if (z->avail_in == 0 && !c->in_eof) {
                        const unsigned char *buf = NULL;
                        size_t len = 0;
                        int r = extract_input_next(c, &buf, &len);

                        if (r < 0)
                                return r;
                        if (r == 0)
                                c->in_eof = true;
                        z->next_in = buf;
                        z->avail_in = len;
                }
                ret = lzma_code(z, c->in_eof && z->avail_in == 0 ? LZMA_FINISH : LZMA_RUN);
                if (ret == LZMA_STREAM_END) {
                        c->xz_end = true;
                        break;
                }
                if (ret == LZMA_MEMLIMIT_ERROR)
                        return err_set(
                                -E2BIG,
                                "xz stream needs %llu MiB of memory to decompress, more than the limit of %llu MiB",
                                (unsigned long long)(lzma_memusage(z) >> 20),
                                (unsigned long long)(EXTRACT_XZ_MEMLIMIT >> 20));
                if (ret != LZMA_OK)
                        return err_set(ret == LZMA_MEM_ERROR ? -ENOMEM : -EBADMSG,
                                       "decompression failed: xz: %s", extract_xz_strerror(ret));
        }
        *ret_buf = c->xz_out;
        *ret_len = EXTRACT_READ_BLOCK - z->avail_out;
        return *ret_len > 0 ? ARCHIVE_OK : ARCHIVE_EOF;
}

/*
 * While libarchive reads a member's headers it needs nothing past them but one block (see
 * SPARSE MAPS): when it asks for the bytes at or past the mark of a sparse map found at or after
 * the end of the previous member, it is reading that map. Refuse before it keeps more of it.
 */
static int extract_check_sparse_reading(struct extract_ctx *c)
{
        for (size_t i = 0; i < c->n_suspects; i++) {
                const struct extract_suspect *s = &c->suspects[i];
                char shown[EXTRACT_NAME_SHOWN * 4 + 8];

                if (s->kind != EXTRACT_SPARSE_MANY || s->offset < c->member_end ||
                    c->stream_bytes < s->mark)
                        continue;
                /*
                 * The member header that names it is not complete yet: libarchive cannot
                 * apply the records without it, and asks for it first.
                 */
                if (s->name_at != 0 && c->scan.offset < s->name_at + EXTRACT_TAR_BLOCK)
                        continue;
                extract_quote(s->name, shown, sizeof(shown));
                c->stream_named = true;
                return err_set(
                        -E2BIG,
                        "failed to extract '%s': sparse map has more than %llu entries, the limit (%s at offset %llu)",
                        shown, (unsigned long long)c->opts.max_sparse_entries, s->where,
                        (unsigned long long)s->offset);
        }
        return 0;
}

/* How many of the next @len bytes to hand out: none past the next sparse map's mark. */
static size_t extract_sparse_cut(const struct extract_ctx *c, size_t len)
{
        for (size_t i = 0; i < c->n_suspects; i++) {
                const struct extract_suspect *s = &c->suspects[i];

                if (s->kind == EXTRACT_SPARSE_MANY && s->mark > c->stream_bytes &&
                    s->mark - c->stream_bytes < len)
                        len = (size_t)(s->mark - c->stream_bytes);
        }
        return len;
}

/*
 * The inner reader's read callback: decompressed bytes from the outer reader. Each piece is
 * scanned before any of it is handed out; a piece is handed out in parts when a sparse map's
 * mark lies inside it, so that libarchive has to ask again before it reads past the mark.
 */
static la_ssize_t extract_stream_read(struct archive *a, void *userdata, const void **ret_buf)
{
        struct extract_ctx *c = userdata;
        const unsigned char *buf;
        size_t len;
        la_int64_t offset;
        int r;

        if (c->stream_r < 0)
                return -1;
        while (c->pending_len == 0) {
                const void *block = NULL;
                size_t size = 0;

                r = c->xz ? extract_xz_next(c, &block, &size)
                          : archive_read_data_block(c->outer, &block, &size, &offset);
                if (r == ARCHIVE_EOF)
                        return 0;
                if (c->xz && r < 0) {
                        c->stream_r = r;
                        goto fail;
                }
                if (r != ARCHIVE_OK) {
                        r = archive_errno(c->outer) == ENOMEM ? -ENOMEM : -EBADMSG;
                        c->stream_r = err_set(r, "decompression failed: %s",
                                              archive_error_string(c->outer));
                        goto fail;
                }
                c->pending = block;
                c->pending_len = size;
        }
        /* Hand out bounded chunks so that the scan stays close to what libarchive parses. */
        if (c->scan_ahead == 0) {
                len = extract_chunk_size ? extract_chunk_size : EXTRACT_READ_BLOCK;
                if (len > c->pending_len)
                        len = c->pending_len;
                if (c->stream_bytes + len > c->stream_limit) {
                        c->stream_r = err_set(-EFBIG, "more than %llu bytes after decompression",
                                              (unsigned long long)c->stream_limit);
                        goto fail;
                }
                r = extract_scan_feed(c, c->pending, len);
                if (r == 0)
                        r = extract_progress(c, false);
                if (r < 0) {
                        c->stream_r = r;
                        goto fail;
                }
                c->scan_ahead = len;
        }
        if (c->n_sparse_suspects > 0) {
                if (c->in_header) {
                        r = extract_check_sparse_reading(c);
                        if (r < 0) {
                                c->stream_r = r;
                                goto fail;
                        }
                }
                len = extract_sparse_cut(c, c->scan_ahead);
        } else {
                len = c->scan_ahead;
        }
        buf = c->pending;
        c->pending += len;
        c->pending_len -= len;
        c->scan_ahead -= len;
        c->stream_bytes += len;
        *ret_buf = buf;
        return (la_ssize_t)len;
fail:
        archive_set_error(a, EIO, "%s", err_last());
        return -1;
}

/* Report an error raised in the read callback (c->stream_r), with the member it hit. */
static int extract_stream_error(struct extract_ctx *c)
{
        if (c->stream_named)
                return c->stream_r;
        if (c->entries == 0)
                return err_wrap(c->stream_r, "failed to read archive");
        return err_wrap(c->stream_r, "failed to read archive at or after member '%s'",
                        c->last_member);
}

/*
 * Turn a libarchive failure on the inner reader into an errno. Errors raised by our read
 * callback win; anything else means corrupt or truncated input. The message names the
 * member being read, or the last one read when the next header is broken.
 */
static int extract_archive_error(struct extract_ctx *c, const char *what)
{
        const char *msg = archive_error_string(c->inner);

        if (c->stream_r < 0)
                return extract_stream_error(c);
        if (!msg)
                msg = "unknown error";
        if (archive_errno(c->inner) == ENOMEM)
                return err_set(-ENOMEM, "failed to read archive: %s", msg);
        if (c->entries == 0)
                return err_set(-EBADMSG, "failed to read archive: %s", msg);
        return err_set(-EBADMSG, "failed to read archive at or after member '%s': %s: %s",
                       c->last_member, what, msg);
}

/*
 * Whether @msg is exactly libarchive's warning that a name cannot be converted to the
 * locale ("Pathname can't be converted from UTF-8 to current locale."): it then keeps the
 * original bytes, which is what we want. Only the last warning's message survives, so
 * the caller also checks that the member's headers could not have raised another
 * (c->member_risky).
 */
FIM_TESTABLE bool extract_warning_is_charset(const char *msg)
{
        static const char *const fields[] = {"Pathname", "Linkname", "Uname", "Gname"};
        static const char middle[] = " can't be converted from ";
        static const char tail[] = " to current locale.";
        const char *p = NULL;
        size_t n;

        if (!msg)
                return false;
        for (size_t i = 0; i < ARRAY_SIZE(fields) && !p; i++) {
                n = strlen(fields[i]);
                if (strncmp(msg, fields[i], n) == 0 &&
                    strncmp(msg + n, middle, sizeof(middle) - 1) == 0)
                        p = msg + n + sizeof(middle) - 1;
        }
        if (!p)
                return false;
        /* A charset name: one word, then the fixed tail and nothing after it. */
        n = strcspn(p, " ");
        return n > 0 && strcmp(p + n, tail) == 0;
}

/* --- Safe path resolution (see RESOLUTION above) --- */

/*
 * openat2() beneath the root with no symlinks and no mount point crossed; -ENOSYS when the
 * kernel has none.
 */
static int extract_openat2_dir(struct extract_ctx *c, const char *path)
{
        struct open_how how = {
                .flags = O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC,
                .resolve = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS |
                           RESOLVE_NO_XDEV,
        };
        long fd = syscall(SYS_openat2, c->root_fd, path, &how, sizeof(how));

        if (fd < 0)
                return -errno;
        return (int)fd;
}

/*
 * Open the directory @name in @dirfd without following it, creating it (mode 0755, whatever
 * the umask) when missing and @create. -ELOOP when it is a symlink, -ENOTDIR when it is
 * something else that is not a directory, -EXDEV when it is on another device than @dev (a
 * mount point; bind mounts of the same filesystem are caught by openat2() only).
 */
static int extract_open_component(int dirfd, const char *name, bool create, dev_t dev, int *ret_fd)
{
        const int flags = O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC;
        bool made = false;
        struct stat st;
        int fd;
        int r;

        fd = openat(dirfd, name, flags);
        if (fd < 0 && errno == ENOENT && create) {
                made = mkdirat(dirfd, name, 0755) == 0;
                if (!made && errno != EEXIST)
                        return errno == ELOOP ? -EIO : -errno;
                fd = openat(dirfd, name, flags);
        }
        if (fd < 0) {
                r = -errno;
                if ((r == -ELOOP || r == -ENOTDIR) &&
                    fstatat(dirfd, name, &st, AT_SYMLINK_NOFOLLOW) == 0)
                        r = S_ISLNK(st.st_mode) ? -ELOOP : -ENOTDIR;
                return r;
        }
        if (made && fchmod(fd, 0755) < 0) {
                r = -errno;
                (void)close(fd);
                return r;
        }
        if (fstat(fd, &st) < 0) {
                r = -errno;
                (void)close(fd);
                return r;
        }
        if (st.st_dev != dev) {
                (void)close(fd);
                return -EXDEV;
        }
        *ret_fd = fd;
        return 0;
}

/* The message for a failed extract_open_component() on the path prefix @prefix. */
static int extract_component_error(struct extract_ctx *c, int r, const char *prefix)
{
        char shown[EXTRACT_NAME_SHOWN * 4 + 8];

        extract_quote(prefix, shown, sizeof(shown));
        switch (r) {
        case -ELOOP:
                return err_set(-EPERM, "parent '%s' is a symlink", shown);
        case -ENOTDIR:
                return err_set(r, "parent '%s' is not a directory", shown);
        case -ENOENT:
                return err_set(r, "parent '%s' does not exist", shown);
        case -EXDEV:
                return err_set(r, "'%s' is a mount point", shown);
        case -ENOSPC:
        case -EDQUOT:
                return err_set(-ENOSPC, "target filesystem is full after writing %llu bytes",
                               (unsigned long long)c->bytes);
        default:
                return err_set(r, "failed to open parent '%s': %s", shown, strerror(-r));
        }
}

/*
 * Open the directory at the normalised path @dir (@len bytes, "" for the root) beneath the
 * root, never following symlinks, creating missing components when @create. Errors set a
 * message that names the component ("parent 'a' is a symlink"), for the caller to wrap.
 */
static int extract_open_dir(struct extract_ctx *c, const char *dir, size_t len, bool create,
                            int *ret_fd)
{
        char *buf = c->scratch;
        int fd = -1;
        int r;

        memcpy(buf, dir, len);
        buf[len] = '\0';
        if (len > 0 && c->have_openat2) {
                r = extract_openat2_dir(c, buf);
                if (r >= 0) {
                        *ret_fd = r;
                        return 0;
                }
                if (r == -ENOSYS || r == -EPERM) {
                        log_debug("openat2 unavailable, walking paths instead", "errno=%s",
                                  err_name(r));
                        c->have_openat2 = false;
                }
                /* Anything else: walk to create what is missing or to name the culprit. */
        }

        fd = fcntl(c->root_fd, F_DUPFD_CLOEXEC, 3);
        if (fd < 0)
                return err_set(-errno, "failed to duplicate the root fd: %s", strerror(errno));
        for (size_t pos = 0; pos < len;) {
                size_t end = pos;
                int next = -1;

                while (end < len && buf[end] != '/')
                        end++;
                buf[end] = '\0';
                r = extract_open_component(fd, buf + pos, create, c->root_dev, &next);
                (void)close(fd);
                if (r < 0)
                        return extract_component_error(c, r, buf);
                fd = next;
                if (end < len)
                        buf[end] = '/';
                pos = end + 1;
        }
        *ret_fd = fd;
        return 0;
}

/* Forget the cached parent directory. */
static void extract_cache_drop(struct extract_ctx *c)
{
        if (c->cache_fd >= 0)
                (void)close(c->cache_fd);
        c->cache_fd = -1;
        c->cache_len = 0;
}

/*
 * Find the parent directory of the normalised path @path (depth >= 1), creating missing
 * directories when @create. Returns a borrowed fd (the root or the cached parent) and the last
 * component in @ret_leaf.
 */
static int extract_parent(struct extract_ctx *c, const char *path, bool create, int *ret_dirfd,
                          const char **ret_leaf)
{
        const char *slash = strrchr(path, '/');
        size_t len;
        int fd;
        int r;

        if (!slash) {
                *ret_dirfd = c->root_fd;
                *ret_leaf = path;
                return 0;
        }
        len = (size_t)(slash - path);
        if (c->cache_fd >= 0 && c->cache_len == len && memcmp(c->cache_path, path, len) == 0) {
                *ret_dirfd = c->cache_fd;
                *ret_leaf = slash + 1;
                return 0;
        }
        extract_cache_drop(c);
        r = extract_open_dir(c, path, len, create, &fd);
        if (r < 0)
                return r;
        memcpy(c->cache_path, path, len);
        c->cache_len = len;
        c->cache_fd = fd;
        *ret_dirfd = fd;
        *ret_leaf = slash + 1;
        return 0;
}

/*
 * Make room for a new entry named @leaf in @dirfd: unlink a non-directory, remove an empty
 * directory, refuse a non-empty one (-EEXIST).
 */
static int extract_make_room(struct extract_ctx *c, int dirfd, const char *leaf)
{
        if (unlinkat(dirfd, leaf, 0) == 0 || errno == ENOENT)
                return 0;
        if (errno != EISDIR)
                return extract_fail_errno(c, errno, "remove the existing entry");
        if (unlinkat(dirfd, leaf, AT_REMOVEDIR) == 0) {
                /*
                 * The cache holds the parent of the member being extracted (c->path), so it
                 * can never be the directory just removed, nor anything below it.
                 */
                size_t len = strlen(c->path);

                FIM_ASSERT(c->cache_fd < 0 || c->cache_len < len ||
                           memcmp(c->cache_path, c->path, len) != 0 ||
                           (c->cache_len > len && c->cache_path[len] != '/'));
                return 0;
        }
        if (errno == ENOTEMPTY || errno == EEXIST)
                return extract_fail(c, -EEXIST, "would replace a non-empty directory");
        return extract_fail_errno(c, errno, "remove the existing directory");
}

/* --- Metadata --- */

static int extract_owner(struct extract_ctx *c, struct archive_entry *e, uid_t *ret_uid,
                         gid_t *ret_gid)
{
        la_int64_t uid = archive_entry_uid(e);
        la_int64_t gid = archive_entry_gid(e);

        /* (uid_t)-1 means "unchanged" to chown(), so it is not a valid owner either. */
        if (uid < 0 || uid >= (la_int64_t)UINT32_MAX || gid < 0 || gid >= (la_int64_t)UINT32_MAX)
                return extract_fail(c, -EBADMSG, "invalid owner %lld:%lld", (long long)uid,
                                    (long long)gid);
        *ret_uid = (uid_t)uid;
        *ret_gid = (gid_t)gid;
        return 0;
}

static mode_t extract_mode(struct extract_ctx *c, struct archive_entry *e)
{
        mode_t mode = archive_entry_perm(e) & 07777;

        if (!c->opts.preserve_owner)
                mode &= (mode_t) ~(S_ISUID | S_ISGID);
        return mode;
}

/* The entry's times for futimens()/utimensat(); atime is left alone when absent. */
static int extract_times(struct extract_ctx *c, struct archive_entry *e, struct timespec ts[2])
{
        ts[0] = (struct timespec){.tv_nsec = UTIME_OMIT};
        ts[1] = (struct timespec){.tv_nsec = UTIME_OMIT};
        if (archive_entry_atime_is_set(e)) {
                ts[0].tv_sec = (time_t)archive_entry_atime(e);
                ts[0].tv_nsec = archive_entry_atime_nsec(e);
        }
        if (archive_entry_mtime_is_set(e)) {
                ts[1].tv_sec = (time_t)archive_entry_mtime(e);
                ts[1].tv_nsec = archive_entry_mtime_nsec(e);
        }
        for (size_t i = 0; i < 2; i++) {
                if (ts[i].tv_nsec != UTIME_OMIT && (ts[i].tv_nsec < 0 || ts[i].tv_nsec > 999999999))
                        return extract_fail(c, -EBADMSG, "invalid timestamp");
        }
        return 0;
}

/*
 * Whether to set the xattr @name. Only user.* (the image's own business) and, when owners
 * are kept, security.capability (what setcap wrote: it only grants what a setuid-root
 * program could, and only inside the image). Refused: trusted.* and security.* otherwise,
 * which the kernel and the host's security modules act on; and user.overlay.*, which
 * overlayfs mounted with "userxattr" reads as its own metadata (opaque directories,
 * whiteouts, redirects to other paths, metacopy), so an image could change what an
 * overlay built on top of the extracted tree shows, including paths outside its layer.
 */
static bool extract_xattr_allowed(struct extract_ctx *c, const char *name)
{
        if (strncmp(name, "user.overlay.", 13) == 0)
                return false;
        if (strncmp(name, "user.", 5) == 0 && name[5] != '\0')
                return true;
        return c->opts.preserve_owner && strcmp(name, "security.capability") == 0;
}

/* Apply the allowed xattrs to @fd (or count them all as skipped when @fd < 0). */
static int extract_xattrs(struct extract_ctx *c, struct archive_entry *entry, int fd)
{
        const char *name;
        const void *value;
        size_t size;
        int e;

        if (archive_entry_acl_types(entry) != 0)
                c->res.skipped_xattrs++;
        if (archive_entry_xattr_reset(entry) == 0)
                return 0;
        while (archive_entry_xattr_next(entry, &name, &value, &size) == ARCHIVE_OK) {
                if (fd < 0 || !name || !extract_xattr_allowed(c, name)) {
                        c->res.skipped_xattrs++;
                        continue;
                }
                if (fsetxattr(fd, name, value, size, 0) == 0)
                        continue;
                e = errno;
                /*
                 * Values the filesystem or kernel refuse are the image's problem, not ours, and
                 * GNU tar only warns about them too. ENOSPC here means the attribute does not
                 * fit beside the file's others (ext4 gives them one block), not that the
                 * filesystem is full: that fails the next write.
                 */
                if (e == ENOTSUP || e == EINVAL || e == ERANGE || e == E2BIG || e == EPERM ||
                    e == ENOSPC) {
                        log_debug("skipping an extended attribute the filesystem refused",
                                  "member=%s xattr=%s size=%zu errno=%s", log_quote(c->last_member),
                                  log_quote(name), size, err_name(-e));
                        c->res.skipped_xattrs++;
                        continue;
                }
                return extract_fail_errno(c, e, "set an extended attribute");
        }
        return 0;
}

/*
 * Owner, xattrs, mode and times of a regular file we just created and filled, in that
 * order: chown clears setuid bits and capabilities. @st is the new file's fstat().
 */
static int extract_file_meta(struct extract_ctx *c, struct archive_entry *e, int fd,
                             const struct stat *st)
{
        struct timespec ts[2];
        mode_t mode = extract_mode(c, e);
        bool chowned = false;
        uid_t uid = 0;
        gid_t gid = 0;
        int r;

        r = extract_owner(c, e, &uid, &gid);
        if (r < 0)
                return r;
        r = extract_times(c, e, ts);
        if (r < 0)
                return r;
        if (c->opts.preserve_owner && (st->st_uid != uid || st->st_gid != gid)) {
                if (fchown(fd, uid, gid) < 0)
                        return extract_fail_errno(c, errno, "set the owner");
                chowned = true;
        }
        r = extract_xattrs(c, e, fd);
        if (r < 0)
                return r;
        if ((st->st_mode & 07777) != mode || (chowned && (mode & (S_ISUID | S_ISGID)))) {
                if (fchmod(fd, mode) < 0)
                        return extract_fail_errno(c, errno, "set the mode");
        }
        if (futimens(fd, ts) < 0)
                return extract_fail_errno(c, errno, "set the times");
        return 0;
}

/* --- Members --- */

/* Write all of @buf at @offset; @ret_done counts what was written, also on failure. */
static int extract_pwrite_all(int fd, const unsigned char *buf, size_t len, off_t offset,
                              size_t *ret_done)
{
        *ret_done = 0;
        while (len > 0) {
                ssize_t n = pwrite(fd, buf, len, offset);

                if (n < 0 && errno == EINTR)
                        continue;
                if (n < 0)
                        return -errno;
                if (n == 0)
                        return -EIO;
                buf += n;
                len -= (size_t)n;
                offset += n;
                *ret_done += (size_t)n;
        }
        return 0;
}

/* Copy the current member's data into @fd, leaving holes where the sparse map says so. */
static int extract_file_data(struct extract_ctx *c, int fd, int64_t size, uint64_t *ret_written)
{
        uint64_t written = 0;
        int64_t end = 0;
        int r;

        for (;;) {
                const void *buf;
                size_t len;
                size_t done;
                la_int64_t offset;

                r = archive_read_data_block(c->inner, &buf, &len, &offset);
                if (r == ARCHIVE_EOF)
                        break;
                if (r != ARCHIVE_OK)
                        return extract_archive_error(c, "bad file data");
                if (offset < 0 || len > (uint64_t)INT64_MAX || offset > INT64_MAX - (int64_t)len)
                        return extract_fail(c, -EBADMSG, "invalid sparse map");
                if (len > c->opts.max_total_bytes - c->bytes)
                        return extract_fail(c, -EFBIG,
                                            "archive holds more than %llu bytes of file data",
                                            (unsigned long long)c->opts.max_total_bytes);
                if ((uint64_t)offset + len > c->opts.max_total_bytes)
                        return extract_fail(
                                c, -EFBIG,
                                "sparse map puts data at offset %lld, past the limit of %llu bytes",
                                (long long)offset, (unsigned long long)c->opts.max_total_bytes);
                r = extract_pwrite_all(fd, buf, len, (off_t)offset, &done);
                c->bytes += done;
                written += done;
                if (r < 0)
                        return extract_fail_errno(c, -r, "write");
                if ((int64_t)(offset + (la_int64_t)len) > end)
                        end = (int64_t)offset + (int64_t)len;
                r = extract_progress(c, false);
                if (r < 0)
                        return r;
        }
        if (size > end && ftruncate(fd, (off_t)size) < 0)
                return extract_fail_errno(c, errno, "set the file size");
        *ret_written = written;
        return 0;
}

static int extract_regular(struct extract_ctx *c, struct archive_entry *e, int dirfd,
                           const char *leaf)
{
        int64_t size = archive_entry_size(e);
        mode_t create_mode = extract_mode(c, e) & 0777;
        uint64_t written = 0;
        struct stat st;
        int fd = -1;
        int r;

        if (size < 0)
                return extract_fail(c, -EBADMSG, "negative file size");
        if (archive_entry_sparse_count(e) == 0 &&
            (uint64_t)size > c->opts.max_total_bytes - c->bytes)
                return extract_fail(c, -EFBIG, "archive holds more than %llu bytes of file data",
                                    (unsigned long long)c->opts.max_total_bytes);
        /*
         * A sparse file costs only its data, but its apparent size is not free either: every
         * reader of the image (a checksum, a copy) reads the holes. Cap it like the data.
         */
        if ((uint64_t)size > c->opts.max_total_bytes)
                return extract_fail(
                        c, -EFBIG,
                        "sparse file is %lld bytes long, more than the limit of %llu bytes",
                        (long long)size, (unsigned long long)c->opts.max_total_bytes);

        for (int attempt = 0; fd < 0; attempt++) {
                fd = openat(dirfd, leaf, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC,
                            create_mode);
                if (fd >= 0)
                        break;
                if (errno != EEXIST || attempt > 0)
                        return extract_fail_errno(c, errno, "create the file");
                r = extract_make_room(c, dirfd, leaf);
                if (r < 0)
                        return r;
        }

        r = extract_file_data(c, fd, size, &written);
        if (r < 0)
                goto out;
        if (fstat(fd, &st) < 0) {
                r = extract_fail_errno(c, errno, "stat the new file");
                goto out;
        }
        if (st.st_dev == c->root_dev) {
                r = extract_inodes_add(&c->inodes, (uint64_t)st.st_ino);
                if (r < 0) {
                        r = extract_fail(c, r, "out of memory");
                        goto out;
                }
        }
        r = extract_file_meta(c, e, fd, &st);
        if (r < 0)
                goto out;
        r = close(fd);
        fd = -1;
        if (r < 0) {
                r = extract_fail_errno(c, errno, "close the file");
                goto out;
        }
        c->res.file_count++;
        c->res.size_bytes += written;
out:
        if (fd >= 0)
                (void)close(fd);
        return r;
}

static int extract_symlink(struct extract_ctx *c, struct archive_entry *e, int dirfd,
                           const char *leaf)
{
        const char *target = archive_entry_symlink(e);
        struct timespec ts[2];
        struct stat st;
        uid_t uid = 0;
        gid_t gid = 0;
        int r;

        if (!target || target[0] == '\0')
                return extract_fail(c, -EBADMSG, "symlink has an empty target");
        if (strlen(target) > c->opts.max_path_length)
                return extract_fail(c, -ENAMETOOLONG,
                                    "symlink target is longer than the limit of %u bytes",
                                    c->opts.max_path_length);
        r = extract_owner(c, e, &uid, &gid);
        if (r < 0)
                return r;
        r = extract_times(c, e, ts);
        if (r < 0)
                return r;

        if (symlinkat(target, dirfd, leaf) < 0) {
                if (errno != EEXIST)
                        return extract_fail_errno(c, errno, "create the symlink");
                r = extract_make_room(c, dirfd, leaf);
                if (r < 0)
                        return r;
                if (symlinkat(target, dirfd, leaf) < 0)
                        return extract_fail_errno(c, errno, "create the symlink");
        }
        /* Hardlinks may point at symlinks we created (linkat() does not follow them). */
        if (fstatat(dirfd, leaf, &st, AT_SYMLINK_NOFOLLOW) < 0)
                return extract_fail_errno(c, errno, "stat the new symlink");
        if (st.st_dev == c->root_dev) {
                r = extract_inodes_add(&c->inodes, (uint64_t)st.st_ino);
                if (r < 0)
                        return extract_fail(c, r, "out of memory");
        }
        if (c->opts.preserve_owner && fchownat(dirfd, leaf, uid, gid, AT_SYMLINK_NOFOLLOW) < 0)
                return extract_fail_errno(c, errno, "set the owner of the symlink");
        if (utimensat(dirfd, leaf, ts, AT_SYMLINK_NOFOLLOW) < 0)
                return extract_fail_errno(c, errno, "set the times of the symlink");
        r = extract_xattrs(c, e, -1);
        if (r < 0)
                return r;
        c->res.symlink_count++;
        c->res.file_count++;
        return 0;
}

/* Remember a directory's owner, mode and times for the end. */
static int extract_defer_dir(struct extract_ctx *c, struct archive_entry *e)
{
        struct extract_dirmeta meta = {.mode = extract_mode(c, e)};
        int r;

        r = extract_owner(c, e, &meta.uid, &meta.gid);
        if (r < 0)
                return r;
        r = extract_times(c, e, meta.times);
        if (r < 0)
                return r;
        return extract_remember(c, EXTRACT_NODE_DIR, &meta);
}

static int extract_directory(struct extract_ctx *c, struct archive_entry *e, unsigned depth)
{
        const char *leaf = "";
        int dirfd = c->root_fd;
        int fd = -1;
        int r;

        if (depth > 0) {
                r = extract_parent(c, c->path, true, &dirfd, &leaf);
                if (r < 0)
                        return err_wrap(r, "failed to extract '%s'", c->last_member);
                if (mkdirat(dirfd, leaf, 0700) < 0) {
                        struct stat st;

                        if (errno != EEXIST)
                                return extract_fail_errno(c, errno, "create the directory");
                        if (fstatat(dirfd, leaf, &st, AT_SYMLINK_NOFOLLOW) < 0)
                                return extract_fail_errno(c, errno, "stat the existing entry");
                        if (!S_ISDIR(st.st_mode)) {
                                r = extract_make_room(c, dirfd, leaf);
                                if (r < 0)
                                        return r;
                                if (mkdirat(dirfd, leaf, 0700) < 0)
                                        return extract_fail_errno(c, errno, "create the directory");
                        }
                }
        }

        if (archive_entry_xattr_count(e) > 0) {
                struct stat st;

                fd = depth > 0
                             ? openat(dirfd, leaf, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
                             : fcntl(c->root_fd, F_DUPFD_CLOEXEC, 3);
                if (fd < 0)
                        return extract_fail_errno(c, errno, "open the directory");
                if (fstat(fd, &st) < 0)
                        r = extract_fail_errno(c, errno, "stat the directory");
                else if (st.st_dev != c->root_dev)
                        r = extract_fail(c, -EXDEV, "directory is a mount point");
                else
                        r = extract_xattrs(c, e, fd);
                (void)close(fd);
        } else {
                r = extract_xattrs(c, e, -1);
        }
        if (r < 0)
                return r;
        r = extract_defer_dir(c, e);
        if (r < 0)
                return r;
        c->res.dir_count++;
        return 0;
}

/*
 * Normalise a hardlink target into c->link_path and refuse the unacceptable ones. Returns 1
 * for a link to the member itself, which is a no-op.
 */
static int extract_hardlink_target(struct extract_ctx *c, const char *target, const char *shown)
{
        unsigned depth;
        int r;

        if (!target || target[0] == '\0')
                return extract_fail(c, -EBADMSG, "hardlink has an empty target");
        if (strlen(target) > c->opts.max_path_length)
                return extract_fail(c, -ENAMETOOLONG,
                                    "hardlink target is longer than the limit of %u bytes",
                                    c->opts.max_path_length);
        r = extract_normalize(target, c->link_path, c->path_size, &depth);
        if (r == -EPERM && target[0] == '/')
                return extract_fail(c, r, "hardlink target '%s' is an absolute path", shown);
        if (r == -EPERM)
                return extract_fail(c, r, "hardlink target '%s' has a '..' component", shown);
        if (r < 0)
                return extract_fail(c, r, "invalid hardlink target '%s'", shown);
        if (depth == 0)
                return extract_fail(c, -EPERM, "hardlink target '%s' is the root directory", shown);
        if (depth > c->opts.max_path_depth)
                return extract_fail(
                        c, -ENAMETOOLONG,
                        "hardlink target '%s' is %u levels deep, more than the limit of %u", shown,
                        depth, c->opts.max_path_depth);
        return strcmp(c->link_path, c->path) == 0;
}

/*
 * Whether the missing hardlink target c->link_path is an entry we skipped on purpose (a
 * device node, FIFO or socket): the link is then skipped the same way. Returns its
 * EXTRACT_NODE_DEVICE or EXTRACT_NODE_OTHER flag, or 0.
 */
static unsigned extract_hardlink_skipped(struct extract_ctx *c)
{
        unsigned flags = extract_remembered(c, c->link_path);

        if (flags & EXTRACT_NODE_DEVICE)
                return EXTRACT_NODE_DEVICE;
        return flags & EXTRACT_NODE_OTHER;
}

/*
 * A member we do not create (a device, FIFO, socket or unknown type, flagged @flag, or a
 * hardlink to one): count it and remember it, so that hardlinks to it are skipped too. Like
 * any later member it wins over what an earlier one put at its name, which is removed (never
 * followed); otherwise a later hardlink to the name would link the stale entry. Missing
 * parents are not created for it, and then there is nothing to remove.
 */
static int extract_skip_entry(struct extract_ctx *c, unsigned flag)
{
        const char *leaf;
        int dirfd;
        int r;

        r = extract_parent(c, c->path, false, &dirfd, &leaf);
        if (r == -ENOENT) {
                err_clear();
        } else if (r < 0) {
                return err_wrap(r, "failed to extract '%s'", c->last_member);
        } else {
                r = extract_make_room(c, dirfd, leaf);
                if (r < 0)
                        return r;
        }
        if (flag == EXTRACT_NODE_DEVICE)
                c->res.skipped_devices++;
        else
                c->res.skipped_other++;
        return extract_remember(c, flag, NULL);
}

/*
 * Resolve c->link_path safely: its parent directory in @ret_fd (owned) and its last
 * component in @ret_leaf. It must be a regular file or a symlink this extraction created.
 * Returns EXTRACT_NODE_DEVICE or EXTRACT_NODE_OTHER (and no fd) when it names an entry that
 * was skipped rather than created.
 */
static int extract_hardlink_source(struct extract_ctx *c, const char *shown, int *ret_fd,
                                   const char **ret_leaf)
{
        const char *slash = strrchr(c->link_path, '/');
        const char *leaf = slash ? slash + 1 : c->link_path;
        unsigned skipped;
        struct stat st;
        int fd = -1;
        int r;

        r = extract_open_dir(c, c->link_path, slash ? (size_t)(slash - c->link_path) : 0, false,
                             &fd);
        if (r == -ENOENT && (skipped = extract_hardlink_skipped(c)) != 0) {
                err_clear();
                return (int)skipped;
        }
        if (r == -ENOENT)
                return err_wrap(
                        r, "failed to extract '%s': hardlink target '%s' has not been extracted",
                        c->last_member, shown);
        if (r < 0)
                return err_wrap(r, "failed to extract '%s': hardlink target '%s'", c->last_member,
                                shown);
        if (fstatat(fd, leaf, &st, AT_SYMLINK_NOFOLLOW) < 0) {
                if (errno == ENOENT && (skipped = extract_hardlink_skipped(c)) != 0)
                        r = (int)skipped;
                else if (errno == ENOENT)
                        r = extract_fail(c, -ENOENT, "hardlink target '%s' has not been extracted",
                                         shown);
                else
                        r = extract_fail_errno(c, errno, "stat the hardlink target");
        } else if (!S_ISREG(st.st_mode) && !S_ISLNK(st.st_mode)) {
                r = extract_fail(c, -EPERM,
                                 "hardlink target '%s' is not a regular file or a symlink", shown);
        } else if (st.st_dev != c->root_dev ||
                   !extract_inodes_has(&c->inodes, (uint64_t)st.st_ino)) {
                r = extract_fail(c, -EPERM,
                                 "hardlink target '%s' was not extracted from this archive", shown);
        }
        if (r != 0) {
                (void)close(fd);
                return r;
        }
        *ret_fd = fd;
        *ret_leaf = leaf;
        return 0;
}

static int extract_hardlink(struct extract_ctx *c, const char *target)
{
        char shown[EXTRACT_NAME_SHOWN * 4 + 8];
        const char *tleaf = NULL;
        const char *leaf = NULL;
        int tfd = -1;
        int dirfd = -1;
        int r;

        extract_quote(target ? target : "", shown, sizeof(shown));
        r = extract_hardlink_target(c, target, shown);
        if (r != 0) {
                if (r > 0)
                        c->res.skipped_other++;
                return r < 0 ? r : 0;
        }
        r = extract_hardlink_source(c, shown, &tfd, &tleaf);
        if (r > 0)
                return extract_skip_entry(c, (unsigned)r);
        if (r < 0)
                return r;

        r = extract_parent(c, c->path, true, &dirfd, &leaf);
        if (r < 0) {
                r = err_wrap(r, "failed to extract '%s'", c->last_member);
                goto out;
        }
        if (linkat(tfd, tleaf, dirfd, leaf, 0) < 0) {
                if (errno != EEXIST) {
                        r = extract_fail_errno(c, errno, "create the hardlink");
                        goto out;
                }
                r = extract_make_room(c, dirfd, leaf);
                if (r < 0)
                        goto out;
                if (linkat(tfd, tleaf, dirfd, leaf, 0) < 0) {
                        r = extract_fail_errno(c, errno, "create the hardlink");
                        goto out;
                }
        }
        c->res.hardlink_count++;
        c->res.file_count++;
out:
        (void)close(tfd);
        return r;
}

static int extract_entry(struct extract_ctx *c, struct archive_entry *e)
{
        const char *name = archive_entry_pathname(e);
        const char *hardlink = archive_entry_hardlink(e);
        mode_t type = archive_entry_filetype(e);
        const char *leaf;
        unsigned depth = 0;
        int dirfd;
        int r;

        extract_quote(name ? name : "", c->last_member, sizeof(c->last_member));
        if (++c->entries > c->opts.max_entries)
                return extract_fail(c, -E2BIG, "archive has more than %llu entries",
                                    (unsigned long long)c->opts.max_entries);
        r = extract_check_name(c, name, &depth);
        if (r < 0)
                return r;
        if (depth == 0 && (hardlink || type != AE_IFDIR))
                return extract_fail(c, -EPERM, "only a directory may stand for the root");

        if (hardlink)
                return extract_hardlink(c, hardlink);
        switch (type) {
        case AE_IFDIR:
                return extract_directory(c, e, depth);
        case AE_IFREG:
        case AE_IFLNK:
                break;
        case AE_IFCHR:
        case AE_IFBLK:
        case AE_IFIFO:
                return extract_skip_entry(c, EXTRACT_NODE_DEVICE);
        default:
                return extract_skip_entry(c, EXTRACT_NODE_OTHER);
        }

        r = extract_parent(c, c->path, true, &dirfd, &leaf);
        if (r < 0)
                return err_wrap(r, "failed to extract '%s'", c->last_member);
        if (type == AE_IFLNK)
                return extract_symlink(c, e, dirfd, leaf);
        return extract_regular(c, e, dirfd, leaf);
}

/* Apply @meta to the directory at c->path (@len bytes); skip it when it is gone. */
static int extract_apply_dir(struct extract_ctx *c, size_t len, const struct extract_dirmeta *meta)
{
        int fd;
        int r;

        c->path[len] = '\0';
        extract_quote(len > 0 ? c->path : ".", c->last_member, sizeof(c->last_member));
        r = extract_open_dir(c, c->path, len, false, &fd);
        if (r == -ENOENT || r == -ENOTDIR || r == -EPERM) {
                /* A later member replaced this directory. */
                err_clear();
                return 0;
        }
        if (r < 0)
                return err_wrap(r, "failed to extract '%s'", c->last_member);
        if (c->opts.preserve_owner && fchown(fd, meta->uid, meta->gid) < 0)
                r = extract_fail_errno(c, errno, "set the owner of the directory");
        else if (fchmod(fd, meta->mode) < 0)
                r = extract_fail_errno(c, errno, "set the mode of the directory");
        else if (futimens(fd, meta->times) < 0)
                r = extract_fail_errno(c, errno, "set the times of the directory");
        (void)close(fd);
        return r;
}

/*
 * Apply the deferred directory metadata, every directory after all of its descendants (see
 * METADATA above), walking the tree depth first while building each path in c->path.
 */
static int extract_apply_dirs(struct extract_ctx *c)
{
        const struct extract_tree *t = &c->tree;
        uint32_t num = t->first_top;
        size_t len = 0;
        int r;

        while (num != 0) {
                /* Down to the first leaf below num, appending components. */
                for (;;) {
                        const struct extract_node *d = &t->nodes[num - 1];

                        if (len > 0)
                                c->path[len++] = '/';
                        memcpy(c->path + len, t->names + d->name, d->name_len);
                        len += d->name_len;
                        if (d->first_child == 0)
                                break;
                        num = d->first_child;
                }
                /* Up again: each node once its children are done, until one has a sibling. */
                for (;;) {
                        const struct extract_node *d = &t->nodes[num - 1];

                        if (d->flags & EXTRACT_NODE_DIR) {
                                r = extract_apply_dir(c, len, &d->meta);
                                if (r < 0)
                                        return r;
                        }
                        len -= d->name_len;
                        if (len > 0)
                                len--;
                        if (d->next_sibling != 0) {
                                num = d->next_sibling;
                                break;
                        }
                        num = d->parent;
                        if (num == 0)
                                break;
                }
        }
        if (t->have_root)
                return extract_apply_dir(c, 0, &t->root);
        return 0;
}

/* Refuse an archive whose end-of-archive marker is the lone zero block at @offset. */
static int extract_lone_zero(struct extract_ctx *c, uint64_t offset)
{
        if (c->entries == 0)
                return err_set(
                        -EBADMSG,
                        "failed to read archive: a lone zero block at offset %llu ends it, but more data follows (members after it would be lost)",
                        (unsigned long long)offset);
        return err_set(
                -EBADMSG,
                "failed to read archive: a lone zero block at offset %llu after member '%s' ends it, but more data follows (members after it would be lost)",
                (unsigned long long)offset, c->last_member);
}

/*
 * libarchive also reports the end of the archive when the stream simply stops between two
 * members, which is what a truncated download looks like. Insist that it read the all-zero
 * end-of-archive marker while looking for the next header: the last block it read must be
 * zeros and lie past the last member's data (which may well end in a zero block itself).
 * Extension headers with no member after them (git archive's global header) may come first.
 */
static int extract_check_end(struct extract_ctx *c)
{
        la_int64_t consumed = archive_filter_bytes(c->inner, 0);
        uint64_t end = (uint64_t)consumed;
        bool first_zero;
        bool after;

        if (consumed < (la_int64_t)EXTRACT_TAR_BLOCK)
                return err_set(-EBADMSG, "failed to read archive: it is empty");
        first_zero = end >= c->member_end + 2 * EXTRACT_TAR_BLOCK &&
                     extract_scan_was_zero(&c->scan, end - 2 * EXTRACT_TAR_BLOCK) == 1;
        if (end < c->member_end + EXTRACT_TAR_BLOCK ||
            extract_scan_was_zero(&c->scan, end - EXTRACT_TAR_BLOCK) != 1) {
                /* Some libarchive versions take the block after a lone zero block with it. */
                if (first_zero)
                        return extract_lone_zero(c, end - 2 * EXTRACT_TAR_BLOCK);
                if (c->entries == 0)
                        return err_set(-EBADMSG, "failed to read archive: it is truncated");
                return err_set(
                        -EBADMSG,
                        "failed to read archive: it is truncated after member '%s' (no end-of-archive marker)",
                        c->last_member);
        }
        if (first_zero)
                return 0;
        /*
         * One zero block: fine at the very end of the stream (GNU tar warns, nothing is lost),
         * but anything after it would be members that libarchive, GNU tar and Python's tarfile
         * all drop while other readers may not.
         */
        after = extract_scan_was_zero(&c->scan, end) == 0;
        for (size_t i = 0; !after && c->scan.offset == end && i < c->scan.carry_len; i++)
                after = c->scan.carry[i] != 0;
        if (after)
                return extract_lone_zero(c, end - EXTRACT_TAR_BLOCK);
        return 0;
}

/*
 * A warning from archive_read_next_header() means libarchive ignored part of a header, which
 * is fatal, except that a name it cannot convert to the locale keeps its raw bytes. That
 * one is accepted only when no other warning can hide behind it (see extract_pax_risky()).
 */
static int extract_check_warning(struct extract_ctx *c, struct archive_entry *e)
{
        const char *msg = archive_error_string(c->inner);
        const char *name = archive_entry_pathname(e);

        if (extract_warning_is_charset(msg) && !c->member_risky) {
                log_debug("keeping a member name as raw bytes", "warning=%s", log_quote(msg));
                return 0;
        }
        extract_quote(name ? name : "", c->last_member, sizeof(c->last_member));
        if (extract_warning_is_charset(msg))
                return extract_fail(
                        c, -EBADMSG,
                        "bad header: '%s', and its extension headers are malformed or unusual enough that this may hide another warning",
                        msg);
        return extract_fail(c, -EBADMSG, "bad header: %s", msg ? msg : "unknown warning");
}

/*
 * Where the current member's data and padding end, as far as libarchive's entry tells, for a
 * member whose data starts at @start: the size of a regular file, or the sum of the segments
 * of a sparse one. That is what libarchive reads in valid archives, never more; other types
 * have no data in valid archives, and the scan just reads what they have.
 */
static uint64_t extract_data_end(struct archive_entry *e, uint64_t start)
{
        la_int64_t offset;
        la_int64_t len;
        uint64_t size = 0;

        if (archive_entry_filetype(e) != AE_IFREG)
                return start;
        /*
         * Count before resetting: a map of one segment covering the whole file is freed by
         * archive_entry_sparse_count() (libarchive 3.6), and archive_entry_sparse_reset() counts
         * after pointing its cursor at the list, leaving the cursor on freed memory.
         */
        if (archive_entry_sparse_count(e) == 0) {
                if (archive_entry_size(e) <= 0 || (uint64_t)archive_entry_size(e) > UINT64_MAX / 4)
                        return start;
                return start + extract_round_block((uint64_t)archive_entry_size(e));
        }
        (void)archive_entry_sparse_reset(e);
        while (archive_entry_sparse_next(e, &offset, &len) == ARCHIVE_OK) {
                if (len < 0 || (uint64_t)len > UINT64_MAX / 4 - size)
                        return start;
                size += (uint64_t)len;
        }
        if (size > UINT64_MAX / 4)
                return start;
        return start + extract_round_block(size);
}

static int extract_loop(struct extract_ctx *c)
{
        struct archive_entry *e;
        int r;

        for (;;) {
                int warn;

                c->in_header = true;
                warn = r = archive_read_next_header(c->inner, &e);
                c->in_header = false;
                if (r == ARCHIVE_EOF)
                        break;
                if (r != ARCHIVE_OK && r != ARCHIVE_WARN)
                        return extract_archive_error(c, "bad header");
                r = extract_check_suspects(c, e);
                if (r < 0)
                        return r;
                if (warn == ARCHIVE_WARN) {
                        r = extract_check_warning(c, e);
                        if (r < 0)
                                return r;
                }
                c->scan.skip_start = (uint64_t)archive_filter_bytes(c->inner, 0);
                c->scan.skip_end = extract_data_end(e, c->scan.skip_start);
                c->scan.skipping = false;
                r = extract_entry(c, e);
                if (r < 0)
                        return r;
                /* Consume what is left of the data, to know where the next header starts. */
                if (archive_read_data_skip(c->inner) != ARCHIVE_OK)
                        return extract_archive_error(c, "bad file data");
                c->member_end = (uint64_t)archive_filter_bytes(c->inner, 0);
                /*
                 * libarchive reads the next header where this member's data ends, which, when
                 * a sparse map and the size disagree, can be inside a block, out of the scan's
                 * sight. And the scan skipped up to skip_end: had libarchive stopped short of
                 * it, the scan would have skipped blocks it reads as headers.
                 */
                if (c->member_end % EXTRACT_TAR_BLOCK != 0)
                        return extract_fail(
                                c, -EBADMSG,
                                "file data ends at offset %llu, inside a block: its header's sizes disagree",
                                (unsigned long long)c->member_end);
                if (c->scan.skip_end > c->member_end)
                        return extract_fail(
                                c, -EBADMSG,
                                "file data ends at offset %llu, before the end its header declares (offset %llu)",
                                (unsigned long long)c->member_end,
                                (unsigned long long)c->scan.skip_end);
                c->scan.skip_start = 0;
                c->scan.skip_end = 0;
                r = extract_progress(c, false);
                if (r < 0)
                        return r;
        }
        if (c->stream_r < 0)
                return extract_stream_error(c);
        r = extract_check_end(c);
        if (r < 0)
                return r;
        r = extract_apply_dirs(c);
        if (r < 0)
                return r;
        return extract_progress(c, true);
}

static void extract_ctx_done(struct extract_ctx *c)
{
        if (c->inner)
                archive_read_free(c->inner);
        if (c->outer)
                archive_read_free(c->outer);
        lzma_end(&c->xz_strm);
        free(c->xz_out);
        free(c->in_buf);
        extract_scan_done(&c->scan);
        free(c->suspects);
        extract_cache_drop(c);
        extract_tree_done(&c->tree);
        free(c->inodes.slots);
        free(c->cache_path);
        free(c->path);
        free(c->link_path);
        free(c->scratch);
}

static int extract_ctx_init(struct extract_ctx *c, int root_fd, const struct extract_options *opts)
{
        struct stat st;

        *c = (struct extract_ctx){
                .root_fd = root_fd,
                .in_fd = -1,
                .xz_strm = LZMA_STREAM_INIT,
                .cache_fd = -1,
                .have_openat2 = !extract_disable_openat2,
        };
        if (opts)
                c->opts = *opts;
        else
                extract_options_init(&c->opts);
        if (c->opts.max_path_length == 0 || c->opts.max_path_length > EXTRACT_MAX_PATH_LENGTH_LIMIT)
                return err_set(-EINVAL, "invalid maximum path length %u", c->opts.max_path_length);
        if (c->opts.max_sparse_entries == 0)
                return err_set(-EINVAL, "invalid maximum of sparse map entries 0");
        if (fstat(root_fd, &st) < 0)
                return err_set(-errno, "failed to stat the extraction root: %s", strerror(errno));
        if (!S_ISDIR(st.st_mode))
                return err_set(-ENOTDIR, "extraction root is not a directory");
        c->root_dev = st.st_dev;
        if (getrandom(c->tree.key, sizeof(c->tree.key), GRND_NONBLOCK) !=
            (ssize_t)sizeof(c->tree.key)) {
                /* Early boot without entropy: a weaker key still differs per run. */
                c->tree.key[0] = (uint64_t)util_now_realtime_ms() ^ ((uint64_t)getpid() << 32);
                c->tree.key[1] = (uint64_t)(uintptr_t)c ^ (uint64_t)util_now_monotonic_ms();
        }

        c->path_size = (size_t)c->opts.max_path_length + 2;
        c->path = malloc(c->path_size);
        c->link_path = malloc(c->path_size);
        c->scratch = malloc(c->path_size);
        c->cache_path = malloc(c->path_size);
        if (!c->path || !c->link_path || !c->scratch || !c->cache_path)
                return err_set(-ENOMEM, "out of memory");

        /* Decompressed stream: file data plus headers and padding, generously. */
        c->stream_limit = UINT64_MAX;
        if (c->opts.max_total_bytes < UINT64_MAX / 2 && c->opts.max_entries < (UINT64_C(1) << 40))
                c->stream_limit = c->opts.max_total_bytes + EXTRACT_STREAM_SLACK +
                                  c->opts.max_entries * EXTRACT_STREAM_SLACK_PER_ENTRY;
        c->next_progress_ms = util_now_monotonic_ms() + (int64_t)c->opts.progress_interval_ms;

        c->outer = archive_read_new();
        c->inner = archive_read_new();
        if (!c->outer || !c->inner)
                return err_set(-ENOMEM, "out of memory");
        /* ARCHIVE_WARN here means "through an external program", which still works. */
        if (archive_read_support_filter_gzip(c->outer) < ARCHIVE_WARN ||
            archive_read_support_filter_zstd(c->outer) < ARCHIVE_WARN ||
            archive_read_support_format_raw(c->outer) != ARCHIVE_OK ||
            archive_read_support_format_tar(c->inner) != ARCHIVE_OK)
                return err_set(-ENOMEM, "failed to set up libarchive: %s",
                               archive_error_string(c->outer));
        return 0;
}

/*
 * Detect xz, open the input with the xz decoder or the outer reader, and start the inner
 * reader on the decompressed stream.
 */
static int extract_start(struct extract_ctx *c)
{
        struct archive_entry *e;
        int r;

        r = extract_detect(c);
        if (r < 0)
                return r;
        if (c->xz) {
                r = extract_xz_start(c);
                if (r < 0)
                        return r;
        } else {
                if (c->in_fd >= 0)
                        r = archive_read_open(c->outer, c, NULL, extract_input_read, NULL);
                else
                        r = archive_read_open_memory(c->outer, c->in_mem, c->in_mem_len);
                if (r != ARCHIVE_OK)
                        return err_set(-EBADMSG, "failed to read archive: %s",
                                       archive_error_string(c->outer));
                if (archive_read_next_header(c->outer, &e) != ARCHIVE_OK)
                        return err_set(-EBADMSG, "failed to read archive: %s",
                                       archive_error_string(c->outer));
        }
        if (archive_read_set_read_callback(c->inner, extract_stream_read) != ARCHIVE_OK ||
            archive_read_set_callback_data(c->inner, c) != ARCHIVE_OK)
                return err_set(-ENOMEM, "failed to set up libarchive: %s",
                               archive_error_string(c->inner));
        if (archive_read_open1(c->inner) != ARCHIVE_OK) {
                if (c->stream_r < 0)
                        return extract_stream_error(c);
                return err_set(-EBADMSG, "failed to read archive: not a tar archive (%s)",
                               archive_error_string(c->inner));
        }
        return 0;
}

/* Common body of the extract_*() entry points: @tar_fd, or @size bytes at @data. */
static int extract_run(int root_fd, const struct extract_options *opts, int tar_fd,
                       const void *data, size_t size, struct extract_result *ret_result)
{
        struct extract_ctx c;
        locale_t loc = (locale_t)0;
        locale_t old = (locale_t)0;
        int r;

        err_clear();
        if (ret_result)
                memset(ret_result, 0, sizeof(*ret_result));
        /*
         * libarchive converts pax names from UTF-8 to the locale's charset. C.UTF-8 keeps
         * valid UTF-8 names as they are; for the rest it warns and keeps the raw bytes.
         * The thread's locale changes only for the duration of this call.
         */
        loc = newlocale(LC_CTYPE_MASK, "C.UTF-8", (locale_t)0);
        if (loc != (locale_t)0)
                old = uselocale(loc);

        r = extract_ctx_init(&c, root_fd, opts);
        if (r < 0)
                goto out;
        if (tar_fd >= 0) {
                (void)posix_fadvise(tar_fd, 0, 0, POSIX_FADV_SEQUENTIAL);
                c.in_fd = tar_fd;
                c.in_buf = malloc(EXTRACT_READ_BLOCK);
                if (!c.in_buf) {
                        r = err_set(-ENOMEM, "out of memory");
                        goto out;
                }
        } else {
                c.in_mem = data;
                c.in_mem_len = size;
        }
        r = extract_start(&c);
        if (r < 0)
                goto out;
        r = extract_loop(&c);
        /* On failure too: what was created before it, for the caller to report. */
        if (ret_result)
                *ret_result = c.res;
        if (r < 0)
                goto out;
        log_debug("extracted archive", "entries=%llu bytes=%llu dirs=%llu",
                  (unsigned long long)c.entries, (unsigned long long)c.bytes,
                  (unsigned long long)c.res.dir_count);
out:
        extract_ctx_done(&c);
        if (loc != (locale_t)0) {
                (void)uselocale(old);
                freelocale(loc);
        }
        return r;
}

int extract_fd(int root_fd, int tar_fd, const struct extract_options *opts,
               struct extract_result *ret_result)
{
        FIM_ASSERT(tar_fd >= 0);
        return extract_run(root_fd, opts, tar_fd, NULL, 0, ret_result);
}

int extract_memory(int root_fd, const void *data, size_t size, const struct extract_options *opts,
                   struct extract_result *ret_result)
{
        return extract_run(root_fd, opts, -1, data, size, ret_result);
}

int extract_file(int root_fd, const char *tar_path, const struct extract_options *opts,
                 struct extract_result *ret_result)
{
        int fd = open(tar_path, O_RDONLY | O_CLOEXEC);
        int r;

        if (fd < 0)
                return err_set(-errno, "failed to open '%s': %s", tar_path, strerror(errno));
        r = extract_fd(root_fd, fd, opts, ret_result);
        (void)close(fd);
        return r;
}

int extract_path(const char *root_path, const char *tar_path, const struct extract_options *opts,
                 struct extract_result *ret_result)
{
        int root_fd = open(root_path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        int r;

        if (root_fd < 0)
                return err_set(-errno, "failed to open extraction root '%s': %s", root_path,
                               strerror(errno));
        r = extract_file(root_fd, tar_path, opts, ret_result);
        (void)close(root_fd);
        return r;
}
