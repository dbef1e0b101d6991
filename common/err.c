#include "err.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

static _Thread_local char err_buf[ERR_MSG_MAX];

int err_set(int r, const char *fmt, ...)
{
        va_list ap;

        va_start(ap, fmt);
        (void)vsnprintf(err_buf, sizeof(err_buf), fmt, ap);
        va_end(ap);
        return r;
}

int err_wrap(int r, const char *fmt, ...)
{
        char prev[ERR_MSG_MAX];
        char ctx[ERR_MSG_MAX];
        va_list ap;

        (void)snprintf(prev, sizeof(prev), "%s", err_text(r));
        va_start(ap, fmt);
        (void)vsnprintf(ctx, sizeof(ctx), fmt, ap);
        va_end(ap);
        /* Truncation is fine: the start of a message carries the most context. */
        size_t n = strlen(ctx);

        memcpy(err_buf, ctx, n);
        if (n + 2 < sizeof(err_buf)) {
                memcpy(err_buf + n, ": ", 2);
                n += 2;
                size_t rest = strnlen(prev, sizeof(err_buf) - n - 1);
                memcpy(err_buf + n, prev, rest);
                n += rest;
        }
        err_buf[n] = '\0';
        return r;
}

const char *err_last(void)
{
        return err_buf;
}

const char *err_text(int r)
{
        if (err_buf[0] != '\0')
                return err_buf;
        return strerror(r < 0 ? -r : r);
}

void err_clear(void)
{
        err_buf[0] = '\0';
}

bool err_is_transient(int r)
{
        switch (-r) {
        /*
         * An I/O error (a disk, a device or a transfer that failed) may pass, and the run's
         * attempts bound the retries; what it touched is kept for the retry (a half-made
         * device, a partial download) and given back only when the run fails for good.
         */
        case EIO:
        case EAGAIN:
        case EINTR:
        case ETIMEDOUT:
        case ECONNRESET:
        case ECONNREFUSED:
        case ECONNABORTED:
        case EPIPE:
        case EHOSTUNREACH:
        case ENETUNREACH:
        case ENETDOWN:
        case EBUSY:
        case ENOTCONN:
        case EPROTO:
                return true;
        default:
                return false;
        }
}

const char *err_name(int r)
{
        static const struct {
                int code;
                const char *name;
        } names[] = {
                {EPERM, "EPERM"},
                {ENOENT, "ENOENT"},
                {EINTR, "EINTR"},
                {EIO, "EIO"},
                {E2BIG, "E2BIG"},
                {EBADF, "EBADF"},
                {EAGAIN, "EAGAIN"},
                {ENOMEM, "ENOMEM"},
                {EACCES, "EACCES"},
                {EBUSY, "EBUSY"},
                {EEXIST, "EEXIST"},
                {EXDEV, "EXDEV"},
                {ENODEV, "ENODEV"},
                {ENOTDIR, "ENOTDIR"},
                {EISDIR, "EISDIR"},
                {EINVAL, "EINVAL"},
                {EFBIG, "EFBIG"},
                {ENOSPC, "ENOSPC"},
                {EROFS, "EROFS"},
                {EMLINK, "EMLINK"},
                {EPIPE, "EPIPE"},
                {ERANGE, "ERANGE"},
                {ENAMETOOLONG, "ENAMETOOLONG"},
                {ENOSYS, "ENOSYS"},
                {ELOOP, "ELOOP"},
                {ENODATA, "ENODATA"},
                {EPROTO, "EPROTO"},
                {EBADMSG, "EBADMSG"},
                {EOVERFLOW, "EOVERFLOW"},
                {EILSEQ, "EILSEQ"},
                {ENOTSUP, "ENOTSUP"},
                {ENETDOWN, "ENETDOWN"},
                {ENETUNREACH, "ENETUNREACH"},
                {ECONNABORTED, "ECONNABORTED"},
                {ECONNRESET, "ECONNRESET"},
                {ENOTCONN, "ENOTCONN"},
                {ETIMEDOUT, "ETIMEDOUT"},
                {ECONNREFUSED, "ECONNREFUSED"},
                {EHOSTUNREACH, "EHOSTUNREACH"},
                {EALREADY, "EALREADY"},
                {ECANCELED, "ECANCELED"},
                {EDQUOT, "EDQUOT"},
                {ESTALE, "ESTALE"},
                {EUCLEAN, "EUCLEAN"},
                {EKEYREJECTED, "EKEYREJECTED"},
                {EMSGSIZE, "EMSGSIZE"},
                {ESRCH, "ESRCH"},
                {ECHILD, "ECHILD"},
        };
        int code = r < 0 ? -r : r;

        for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
                if (names[i].code == code)
                        return names[i].name;
        }
        return "E?";
}
