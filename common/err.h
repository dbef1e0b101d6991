#pragma once

/*
 * Error reporting: functions return 0 (or a documented positive value) on success and a
 * negative errno on failure. The human-readable reason travels beside the code in a
 * per-thread "last error" buffer, set where the failure is detected and read by the layer
 * that decides what to do (retry, abort, print).
 *
 * Each worker thread runs one job at a time, so a thread-local buffer is never shared.
 */

#include <stdbool.h>

#define ERR_MSG_MAX 1024

/*
 * Record a failure. Formats the message into the thread's last-error buffer and returns @r,
 * so that "return err_set(-EINVAL, ...)" is one statement. @r must be negative.
 */
int err_set(int r, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/*
 * Add context in front of the current message: "<context>: <previous message>". When no
 * message is set, the previous message is strerror(-r). Returns @r.
 */
int err_wrap(int r, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* The thread's last message, or "" when none is set. Borrowed: valid until the next err_*. */
const char *err_last(void);

/* The last message, or strerror(-r) when none is set. Borrowed like err_last(). */
const char *err_text(int r);

/* Forget the last message, after a failure was handled and not passed on. */
void err_clear(void);

/*
 * Whether a failure with this negative errno is worth retrying: network trouble, timeouts,
 * I/O errors (-EIO), busy devices and server-side overload are; bad input, missing objects,
 * full disks and refused access are not.
 */
bool err_is_transient(int r);

/* Symbolic name of an errno value ("EINVAL"), or "E?" for unknown ones. */
const char *err_name(int r);
