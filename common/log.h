#pragma once

/*
 * One logging module. Each record is one line on stderr made of key=value fields:
 *
 *   ts=2026-12-03T18:51:31.123Z level=info thread=4711 msg="run finished" <fields>
 *       run_id=... image_id=... stage=... attempt=... [error="..." errno=EIO]
 *
 * The caller gives a fixed message and a printf-style field list ("bytes=%zu key=%s"). A value
 * is either bare (numbers, names from a fixed set, validated identifiers such as run ids and
 * topic names) or comes from log_quote(): every free-text or remote-controlled value (error
 * text, S3 keys, member names, library messages) goes through log_quote(), never through
 * quotes of the caller's own, so that no value can end its field early and pose as another
 * (scripts/check-style.sh rejects key="%s" and key='%s' in log calls). The thread's job
 * context (set with log_context_set) is appended to every line, so stage code does not
 * repeat it; a context value that is not a plain token is quoted the same way. Any string
 * registered with log_register_secret() is replaced by
 * "[redacted]" before the line is written: a credential that slips into an error message from
 * a library still never reaches the log.
 *
 * Modules under stages/ and db/ log at debug level at most; the layer that decides to retry
 * or fail logs the failure, once.
 */

#include <stdbool.h>

enum log_level {
        LOG_LEVEL_DEBUG,
        LOG_LEVEL_INFO,
        LOG_LEVEL_NOTICE,
        LOG_LEVEL_WARNING,
        LOG_LEVEL_ERR,
};

/* Lowest level that is written; default info. */
void log_set_level(enum log_level level);

/* Parse "debug", "info", "notice", "warning" or "err". Returns 0 or -EINVAL. */
int log_level_parse(const char *s, enum log_level *ret_level);

/* Whether a record at @level would be written. */
bool log_enabled(enum log_level level);

/* Secrets shorter than this are not masked: they would turn unrelated text into stars. */
#define LOG_SECRET_MIN 4

/*
 * Remember a secret so that it is masked in every later line. The string is copied. An empty
 * or NULL secret is nothing to hide (returns 0). A secret shorter than LOG_SECRET_MIN bytes
 * is refused with -EINVAL and NOT masked: the caller warns the operator (config does, naming
 * the setting). Returns 0, -EINVAL, -ENOSPC (table full) or -ENOMEM.
 */
int log_register_secret(const char *secret);

/* Forget every registered secret (tests). */
void log_forget_secrets(void);

/*
 * Mask registered secrets in @buf in place. Exposed so that error text stored in Postgres or
 * printed by the CLI goes through the same filter as log lines.
 */
void log_redact(char *buf);

/* Set the thread's job context; NULL or negative values leave a field out. */
void log_context_set(const char *run_id, const char *image_id, const char *stage, int attempt);
void log_context_clear(void);

/* Write one record. @r (negative errno or 0) adds error= and errno= fields when non-zero. */
void log_emit(enum log_level level, int r, const char *msg, const char *fields, ...)
        __attribute__((format(printf, 4, 5)));

void log_debug(const char *msg, const char *fields, ...) __attribute__((format(printf, 2, 3)));
void log_info(const char *msg, const char *fields, ...) __attribute__((format(printf, 2, 3)));
void log_notice(const char *msg, const char *fields, ...) __attribute__((format(printf, 2, 3)));
void log_warning(const char *msg, const char *fields, ...) __attribute__((format(printf, 2, 3)));
void log_err(const char *msg, const char *fields, ...) __attribute__((format(printf, 2, 3)));

/* Log with the error text of @r (the thread's last error, else strerror) and return @r. */
int log_warning_errno(int r, const char *msg, const char *fields, ...)
        __attribute__((format(printf, 3, 4)));
int log_err_errno(int r, const char *msg, const char *fields, ...)
        __attribute__((format(printf, 3, 4)));

/*
 * @value as a double-quoted field value, secrets masked and quotes, backslashes and control
 * characters escaped, for fields that may hold free text (error messages, library text):
 *
 *     log_warning("run failed", "transition=%s error=%s", name, log_quote(text));
 *
 * Formatting raw text as error=\"%s\" would let a quote inside it end the value early. The
 * result lives in a small per-thread ring of buffers: it stays valid for the next 7 calls on
 * the same thread, enough for one log call's arguments. Long values are truncated.
 */
const char *log_quote(const char *value);

/*
 * Every record is one line: control characters in formatted fields (e.g. a newline inside a
 * raw %s) are escaped as \n, \r, \t or \xNN whatever the caller wrote.
 *
 * Escape @in for use inside a double-quoted field value: quotes, backslashes and control
 * characters are escaped. Always NUL-terminates @out (truncating if needed).
 */
void log_escape(const char *in, char *out, unsigned long out_size);
