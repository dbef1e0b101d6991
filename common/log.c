#include "log.h"

#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "err.h"

#define LOG_LINE_MAX 8192
#define LOG_SECRETS_MAX 32
#define LOG_QUOTE_SLOTS 8
#define LOG_QUOTE_MAX 2048

static enum log_level log_min_level = LOG_LEVEL_INFO;

/* Registered once at start-up, read by every thread afterwards. */
static pthread_mutex_t log_secrets_lock = PTHREAD_MUTEX_INITIALIZER;
static char *log_secrets[LOG_SECRETS_MAX];

static _Thread_local struct {
        char run_id[32];
        char image_id[256];
        char stage[16];
        int attempt;
} log_ctx = {.attempt = -1};

static const char *const log_level_names[] = {
        [LOG_LEVEL_DEBUG] = "debug",     [LOG_LEVEL_INFO] = "info", [LOG_LEVEL_NOTICE] = "notice",
        [LOG_LEVEL_WARNING] = "warning", [LOG_LEVEL_ERR] = "err",
};

void log_set_level(enum log_level level)
{
        log_min_level = level;
}

int log_level_parse(const char *s, enum log_level *ret_level)
{
        for (size_t i = 0; i < sizeof(log_level_names) / sizeof(log_level_names[0]); i++) {
                if (strcmp(s, log_level_names[i]) == 0) {
                        *ret_level = (enum log_level)i;
                        return 0;
                }
        }
        return -EINVAL;
}

bool log_enabled(enum log_level level)
{
        return level >= log_min_level;
}

int log_register_secret(const char *secret)
{
        int r = 0;

        if (!secret || secret[0] == '\0')
                return 0;
        if (strlen(secret) < LOG_SECRET_MIN)
                return -EINVAL;
        pthread_mutex_lock(&log_secrets_lock);
        for (size_t i = 0; i < LOG_SECRETS_MAX; i++) {
                if (log_secrets[i] && strcmp(log_secrets[i], secret) == 0)
                        goto out;
                if (!log_secrets[i]) {
                        log_secrets[i] = strdup(secret);
                        if (!log_secrets[i])
                                r = -ENOMEM;
                        goto out;
                }
        }
        r = -ENOSPC;
out:
        pthread_mutex_unlock(&log_secrets_lock);
        return r;
}

void log_forget_secrets(void)
{
        pthread_mutex_lock(&log_secrets_lock);
        for (size_t i = 0; i < LOG_SECRETS_MAX; i++) {
                free(log_secrets[i]);
                log_secrets[i] = NULL;
        }
        pthread_mutex_unlock(&log_secrets_lock);
}

void log_redact(char *buf)
{
        static const char mask[] = "[redacted]";
        const size_t mlen = sizeof(mask) - 1;

        pthread_mutex_lock(&log_secrets_lock);
        for (size_t i = 0; i < LOG_SECRETS_MAX && log_secrets[i]; i++) {
                size_t slen = strlen(log_secrets[i]);
                char *from = buf, *p;

                /*
                 * The search goes on after each replacement, never over it: a secret that
                 * looks like its own mask ("****", "[redacted]") must not be found again.
                 */
                while ((p = strstr(from, log_secrets[i])) != NULL) {
                        /* A mask longer than the secret would not fit in place: use stars. */
                        if (slen >= mlen) {
                                memcpy(p, mask, mlen);
                                memmove(p + mlen, p + slen, strlen(p + slen) + 1);
                                from = p + mlen;
                        } else {
                                memset(p, '*', slen);
                                from = p + slen;
                        }
                }
        }
        pthread_mutex_unlock(&log_secrets_lock);
}

static void log_copy(char *dst, size_t size, const char *src)
{
        if (!src) {
                dst[0] = '\0';
                return;
        }
        (void)snprintf(dst, size, "%s", src);
}

void log_context_set(const char *run_id, const char *image_id, const char *stage, int attempt)
{
        log_copy(log_ctx.run_id, sizeof(log_ctx.run_id), run_id);
        log_copy(log_ctx.image_id, sizeof(log_ctx.image_id), image_id);
        log_copy(log_ctx.stage, sizeof(log_ctx.stage), stage);
        log_ctx.attempt = attempt;
}

void log_context_clear(void)
{
        log_context_set(NULL, NULL, NULL, -1);
}

void log_escape(const char *in, char *out, unsigned long out_size)
{
        size_t o = 0;

        if (out_size == 0)
                return;
        for (; *in && o + 5 < out_size; in++) {
                unsigned char c = (unsigned char)*in;

                if (c == '"' || c == '\\') {
                        out[o++] = '\\';
                        out[o++] = (char)c;
                } else if (c == '\n') {
                        out[o++] = '\\';
                        out[o++] = 'n';
                } else if (c < 0x20 || c == 0x7f) {
                        o += (size_t)snprintf(out + o, out_size - o, "\\x%02x", c);
                } else {
                        out[o++] = (char)c;
                }
        }
        out[o] = '\0';
}

/* Redact, then escape: a secret holding a quote would no longer match once escaped. */
static void log_escape_redacted(const char *in, char *out, size_t out_size)
{
        char copy[ERR_MSG_MAX * 2];

        (void)snprintf(copy, sizeof(copy), "%s", in ? in : "");
        log_redact(copy);
        log_escape(copy, out, out_size);
}

const char *log_quote(const char *value)
{
        static _Thread_local char slots[LOG_QUOTE_SLOTS][LOG_QUOTE_MAX];
        static _Thread_local unsigned next;
        char *slot = slots[next++ % LOG_QUOTE_SLOTS];
        size_t len;

        slot[0] = '"';
        log_escape_redacted(value, slot + 1, LOG_QUOTE_MAX - 2);
        len = strlen(slot);
        slot[len] = '"';
        slot[len + 1] = '\0';
        return slot;
}

static size_t log_append(char *line, size_t len, const char *fmt, ...)
        __attribute__((format(printf, 3, 4)));

static size_t log_append(char *line, size_t len, const char *fmt, ...)
{
        va_list ap;
        int n;

        if (len >= LOG_LINE_MAX - 1)
                return len;
        va_start(ap, fmt);
        n = vsnprintf(line + len, LOG_LINE_MAX - len, fmt, ap);
        va_end(ap);
        if (n < 0)
                return len;
        len += (size_t)n;
        return len < LOG_LINE_MAX - 1 ? len : LOG_LINE_MAX - 1;
}

/*
 * Append @text with every control character escaped (a newline becomes \n), so that no
 * record ever spans two lines, whatever a caller put in a field. Quotes and backslashes are
 * left alone here: in the caller's format they may be the value's own delimiters. Values that
 * may hold them go through log_quote().
 */
static size_t log_append_one_line(char *line, size_t len, const char *text)
{
        for (; *text && len < LOG_LINE_MAX - 5; text++) {
                unsigned char c = (unsigned char)*text;

                if (c == '\n') {
                        line[len++] = '\\';
                        line[len++] = 'n';
                } else if (c == '\r') {
                        line[len++] = '\\';
                        line[len++] = 'r';
                } else if (c == '\t') {
                        line[len++] = '\\';
                        line[len++] = 't';
                } else if (c < 0x20 || c == 0x7f) {
                        len += (size_t)snprintf(line + len, LOG_LINE_MAX - len, "\\x%02x", c);
                } else {
                        line[len++] = (char)c;
                }
        }
        line[len] = '\0';
        return len;
}

/* Whether @value can stand unquoted: a non-empty run of characters that end no field. */
static bool log_is_bare(const char *value)
{
        if (!value[0])
                return false;
        for (; *value; value++) {
                unsigned char c = (unsigned char)*value;

                if (c <= 0x20 || c >= 0x7f || c == '"' || c == '\\' || c == '=' || c == '\'')
                        return false;
        }
        return true;
}

/*
 * A context field (" key=value"), left out when empty. The image id of a request that failed
 * validation can hold anything, so a value that could end the field early is quoted.
 */
static size_t log_append_context(char *line, size_t len, const char *key, const char *value)
{
        if (!value[0])
                return len;
        if (log_is_bare(value))
                return log_append(line, len, " %s=%s", key, value);
        return log_append(line, len, " %s=%s", key, log_quote(value));
}

static void log_vemit(enum log_level level, int r, const char *msg, const char *fields, va_list ap)
        __attribute__((format(printf, 4, 0)));

static void log_vemit(enum log_level level, int r, const char *msg, const char *fields, va_list ap)
{
        char line[LOG_LINE_MAX];
        char text[LOG_LINE_MAX];
        char esc[ERR_MSG_MAX * 2];
        struct timespec ts;
        struct tm tm;
        size_t len = 0;
        int saved_errno = errno;

        if (!log_enabled(level))
                return;
        (void)clock_gettime(CLOCK_REALTIME, &ts);
        (void)gmtime_r(&ts.tv_sec, &tm);
        len = log_append(line, len, "ts=%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ level=%s thread=%ld",
                         tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min,
                         tm.tm_sec, ts.tv_nsec / 1000000, log_level_names[level],
                         (long)syscall(SYS_gettid));
        log_escape_redacted(msg, esc, sizeof(esc));
        len = log_append(line, len, " msg=\"%s\"", esc);
        if (fields && fields[0] != '\0') {
                (void)vsnprintf(text, sizeof(text), fields, ap);
                log_redact(text);
                len = log_append(line, len, " ");
                len = log_append_one_line(line, len, text);
        }
        len = log_append_context(line, len, "run_id", log_ctx.run_id);
        len = log_append_context(line, len, "image_id", log_ctx.image_id);
        len = log_append_context(line, len, "stage", log_ctx.stage);
        if (log_ctx.attempt >= 0)
                len = log_append(line, len, " attempt=%d", log_ctx.attempt);
        if (r < 0) {
                log_escape_redacted(err_text(r), esc, sizeof(esc));
                len = log_append(line, len, " error=\"%s\" errno=%s", esc, err_name(r));
        }
        line[len] = '\0';
        /* Once more over the whole line, for a secret that only formed across fields. */
        log_redact(line);
        len = strlen(line);
        line[len++] = '\n';
        /* One write per record so that lines from several threads never interleave. */
        (void)!write(STDERR_FILENO, line, len);
        errno = saved_errno;
}

void log_emit(enum log_level level, int r, const char *msg, const char *fields, ...)
{
        va_list ap;

        va_start(ap, fields);
        log_vemit(level, r, msg, fields, ap);
        va_end(ap);
}

#define LOG_DEFINE_LEVEL(name, level)                                                              \
        void log_##name(const char *msg, const char *fields, ...)                                  \
        {                                                                                          \
                va_list ap;                                                                        \
                va_start(ap, fields);                                                              \
                log_vemit(level, 0, msg, fields, ap);                                              \
                va_end(ap);                                                                        \
        }

LOG_DEFINE_LEVEL(debug, LOG_LEVEL_DEBUG)
LOG_DEFINE_LEVEL(info, LOG_LEVEL_INFO)
LOG_DEFINE_LEVEL(notice, LOG_LEVEL_NOTICE)
LOG_DEFINE_LEVEL(warning, LOG_LEVEL_WARNING)
LOG_DEFINE_LEVEL(err, LOG_LEVEL_ERR)

int log_warning_errno(int r, const char *msg, const char *fields, ...)
{
        va_list ap;

        va_start(ap, fields);
        log_vemit(LOG_LEVEL_WARNING, r, msg, fields, ap);
        va_end(ap);
        return r;
}

int log_err_errno(int r, const char *msg, const char *fields, ...)
{
        va_list ap;

        va_start(ap, fields);
        log_vemit(LOG_LEVEL_ERR, r, msg, fields, ap);
        va_end(ap);
        return r;
}
