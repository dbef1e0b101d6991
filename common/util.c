#include "util.h"

#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <signal.h>
#include <time.h>
#include <unistd.h>

void util_assert_failed(const char *expr, const char *file, int line, const char *func)
{
        fprintf(stderr, "level=crit msg=\"assertion failed\" expr=\"%s\" file=%s line=%d func=%s\n",
                expr, file, line, func);
        abort();
}

int util_parse_u64(const char *s, uint64_t *ret_value)
{
        unsigned long long v;
        char *end;

        if (!s || !isdigit((unsigned char)s[0]))
                return -EINVAL;
        errno = 0;
        v = strtoull(s, &end, 10);
        if (errno == ERANGE)
                return -ERANGE;
        if (*end != '\0')
                return -EINVAL;
        *ret_value = (uint64_t)v;
        return 0;
}

int util_parse_int(const char *s, int min, int max, int *ret_value)
{
        long v;
        char *end;

        if (!s || s[0] == '\0' || isspace((unsigned char)s[0]))
                return -EINVAL;
        errno = 0;
        v = strtol(s, &end, 10);
        if (errno == ERANGE)
                return -ERANGE;
        if (*end != '\0')
                return -EINVAL;
        if (v < min || v > max)
                return -ERANGE;
        *ret_value = (int)v;
        return 0;
}

int util_parse_size(const char *s, uint64_t *ret_bytes)
{
        static const struct {
                const char *suffix;
                unsigned shift;
        } suffixes[] = {
                {"", 0},     {"B", 0},  {"K", 10},   {"KiB", 10}, {"M", 20},
                {"MiB", 20}, {"G", 30}, {"GiB", 30}, {"T", 40},   {"TiB", 40},
        };
        unsigned long long v;
        char *end;

        if (!s || !isdigit((unsigned char)s[0]))
                return -EINVAL;
        errno = 0;
        v = strtoull(s, &end, 10);
        if (errno == ERANGE)
                return -ERANGE;
        for (size_t i = 0; i < ARRAY_SIZE(suffixes); i++) {
                if (strcasecmp(end, suffixes[i].suffix) != 0)
                        continue;
                if (suffixes[i].shift > 0 && v > (UINT64_MAX >> suffixes[i].shift))
                        return -ERANGE;
                *ret_bytes = (uint64_t)v << suffixes[i].shift;
                return 0;
        }
        return -EINVAL;
}

int util_parse_bool(const char *s, bool *ret_value)
{
        static const char *const yes[] = {"1", "true", "yes", "on"};
        static const char *const no[] = {"0", "false", "no", "off"};

        for (size_t i = 0; i < ARRAY_SIZE(yes); i++) {
                if (strcasecmp(s, yes[i]) == 0) {
                        *ret_value = true;
                        return 0;
                }
                if (strcasecmp(s, no[i]) == 0) {
                        *ret_value = false;
                        return 0;
                }
        }
        return -EINVAL;
}

static int64_t util_clock_ms(clockid_t id)
{
        struct timespec ts;

        (void)clock_gettime(id, &ts);
        return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int64_t util_now_monotonic_ms(void)
{
        return util_clock_ms(CLOCK_MONOTONIC);
}

int64_t util_now_realtime_ms(void)
{
        return util_clock_ms(CLOCK_REALTIME);
}

void util_sleep_ms(int64_t ms)
{
        struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (ms % 1000) * 1000000};

        while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
                ;
}

void util_format_time(int64_t realtime_ms, char *buf, size_t size)
{
        time_t secs = (time_t)(realtime_ms / 1000);
        struct tm tm;

        (void)gmtime_r(&secs, &tm);
        (void)snprintf(buf, size, "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", tm.tm_year + 1900,
                       tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
                       (int)(realtime_ms % 1000));
}

int util_snprintf(char *buf, size_t size, const char *fmt, ...)
{
        va_list ap;
        int n;

        va_start(ap, fmt);
        n = vsnprintf(buf, size, fmt, ap);
        va_end(ap);
        if (n < 0 || (size_t)n >= size)
                return -ENAMETOOLONG;
        return 0;
}

void util_hex_encode(const unsigned char *in, size_t len, char *out)
{
        static const char digits[] = "0123456789abcdef";

        for (size_t i = 0; i < len; i++) {
                out[2 * i] = digits[in[i] >> 4];
                out[2 * i + 1] = digits[in[i] & 0xf];
        }
        out[2 * len] = '\0';
}

bool util_is_sha256_hex(const char *s)
{
        size_t i;

        for (i = 0; s[i]; i++) {
                if (!isdigit((unsigned char)s[i]) && !(s[i] >= 'a' && s[i] <= 'f'))
                        return false;
        }
        return i == 64;
}

/* The escape of one byte for util_escape_bytes(); returns its length. */
static size_t util_escape_byte(unsigned char c, char esc[5])
{
        switch (c) {
        case '\t':
                c = 't';
                break;
        case '\n':
                c = 'n';
                break;
        case '\r':
                c = 'r';
                break;
        case '\\':
        case '"':
                break;
        default:
                if (c < 0x20 || c > 0x7e) {
                        (void)snprintf(esc, 5, "\\x%02x", c);
                        return 4;
                }
                esc[0] = (char)c;
                return 1;
        }
        esc[0] = '\\';
        esc[1] = (char)c;
        return 2;
}

void util_escape_bytes(const void *data, size_t len, char *out, size_t size)
{
        const unsigned char *in = data;
        size_t total = 0, room, o = 0;
        char esc[5];

        FIM_ASSERT(size >= 4);
        for (size_t i = 0; i < len; i++)
                total += util_escape_byte(in[i], esc);
        /* Cut short: keep room for the "..." that says so. */
        room = total < size ? total : size - 4;
        for (size_t i = 0; i < len; i++) {
                size_t n = util_escape_byte(in[i], esc);

                if (o + n > room)
                        break;
                memcpy(out + o, esc, n);
                o += n;
        }
        if (total >= size) {
                memcpy(out + o, "...", 3);
                o += 3;
        }
        out[o] = '\0';
}

#ifdef FIM_UNIT_TEST
void util_crash_point(const char *point)
{
        const char *want = getenv("FIM_CRASH_AT");
        const char *stop = getenv("FIM_STOP_AT");

        if (want && strcmp(want, point) == 0)
                (void)kill(getpid(), SIGKILL);
        if (stop && strcmp(stop, point) == 0)
                (void)kill(getpid(), SIGSTOP);
}
#endif
