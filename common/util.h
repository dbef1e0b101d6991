#pragma once

/* Small helpers every module uses: assertions, ownership hand-off, checked parsing, clocks. */

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))

/* File-static functions become visible to unit tests, and only to them. */
#ifdef FIM_UNIT_TEST
#define FIM_TESTABLE
#else
#define FIM_TESTABLE static
#endif

/*
 * Invariants that, when broken, mean a bug. Always compiled in (also under NDEBUG): a process
 * that drives thin-pool metadata must not carry on with a broken invariant.
 */
#define FIM_ASSERT(cond)                                                                           \
        do {                                                                                       \
                if (!(cond))                                                                       \
                        util_assert_failed(#cond, __FILE__, __LINE__, __func__);                   \
        } while (0)

_Noreturn void util_assert_failed(const char *expr, const char *file, int line, const char *func);

/*
 * Crash points for recovery tests: in test builds (FIM_UNIT_TEST), when the environment
 * variable FIM_CRASH_AT equals @point, the process kills itself with SIGKILL right there, as a
 * power cut or an OOM kill would. When FIM_STOP_AT equals @point it stops itself with SIGSTOP
 * instead, so that a test can act inside that window and then let it go on (SIGCONT). In
 * production builds this compiles to nothing.
 */
#ifdef FIM_UNIT_TEST
void util_crash_point(const char *point);
#else
static inline void util_crash_point(const char *point)
{
        (void)point;
}
#endif

/* Move ownership out of a local: returns *p and leaves NULL behind. */
static inline void *steal_ptr_impl(void **p)
{
        void *v = *p;

        *p = NULL;
        return v;
}
#define steal_ptr(p) steal_ptr_impl((void **)&(p))

/* Parse a whole string as a decimal unsigned 64-bit integer. Returns 0, -EINVAL or -ERANGE. */
int util_parse_u64(const char *s, uint64_t *ret_value);

/* Parse a whole string as a decimal int within [min, max]. Returns 0, -EINVAL or -ERANGE. */
int util_parse_int(const char *s, int min, int max, int *ret_value);

/*
 * Parse a byte size: a decimal number with an optional binary suffix K, M, G, T (also KiB,
 * MiB, GiB, TiB). Returns 0, -EINVAL or -ERANGE.
 */
int util_parse_size(const char *s, uint64_t *ret_bytes);

/* Parse a boolean: 1/0, true/false, yes/no, on/off. Returns 0 or -EINVAL. */
int util_parse_bool(const char *s, bool *ret_value);

/* Monotonic and wall-clock time in milliseconds. */
int64_t util_now_monotonic_ms(void);
int64_t util_now_realtime_ms(void);

/* Sleep for @ms milliseconds, resuming after signals. */
void util_sleep_ms(int64_t ms);

/* Format a wall-clock time in ms as RFC 3339 UTC with milliseconds into @buf (>= 32 bytes). */
void util_format_time(int64_t realtime_ms, char *buf, size_t size);

/* snprintf into a fixed buffer; returns 0, or -ENAMETOOLONG when the result was truncated. */
int util_snprintf(char *buf, size_t size, const char *fmt, ...)
        __attribute__((format(printf, 3, 4)));

/* Hex-encode @len bytes into @out (2*len+1 bytes). */
void util_hex_encode(const unsigned char *in, size_t len, char *out);

/* Whether @s is exactly 64 lowercase hex digits (a SHA-256 in hex). */
bool util_is_sha256_hex(const char *s);

/*
 * Write @len bytes of untrusted @data (a Kafka key, a header value) into @out as printable
 * ASCII, for a terminal or a double-quoted field: backslash and double quote get a backslash,
 * tab, newline and carriage return become \t, \n and \r, and every other byte outside
 * 0x20-0x7e (ESC and other control characters, NUL, bytes of UTF-8 sequences) becomes \xNN.
 * Always NUL-terminates @out, which holds @size >= 4 bytes; a text that does not fit is cut
 * before an escape and ends in "...".
 */
void util_escape_bytes(const void *data, size_t len, char *out, size_t size);
