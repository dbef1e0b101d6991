#pragma once

/*
 * AWS Signature Version 4 for HTTP requests, with the Authorization header (no presigned
 * URLs). Pure computation over strings: no I/O, no libcurl, nothing logged.
 *
 * The caller describes the request as it goes on the wire (method, percent-encoded path,
 * raw query, the headers to sign including Host, the payload hash) and gets back the
 * headers to add: X-Amz-Date, optionally x-amz-content-sha256 and X-Amz-Security-Token,
 * and Authorization. The intermediate canonical request and string to sign are returned
 * too, so that tests can compare them with the published test vectors.
 */

#include <stdbool.h>
#include <stddef.h>
#include <time.h>

/* Hex SHA-256 of the empty string: the payload hash of a request without a body. */
#define SIGV4_EMPTY_SHA256 "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
/* Payload hash that tells S3 the body is not signed (allowed over any transport). */
#define SIGV4_UNSIGNED_PAYLOAD "UNSIGNED-PAYLOAD"

/* Hex digest and signature length, without the terminating NUL. */
#define SIGV4_HEX_LEN 64

enum sigv4_flags {
        /*
         * Remove "." and ".." segments and empty segments from the path before it is
         * canonicalised. Generic AWS services do this; S3 does not (object keys are opaque).
         */
        SIGV4_NORMALIZE_PATH = 1 << 0,
        /*
         * Percent-encode the (already encoded) wire path once more for the canonical URI,
         * the "double encoding" of generic services. S3 signs the wire path as it is.
         */
        SIGV4_DOUBLE_ENCODE = 1 << 1,
        /* Add and sign x-amz-content-sha256 with the payload hash. S3 requires it. */
        SIGV4_CONTENT_SHA256_HEADER = 1 << 2,
        /*
         * Send the session token without signing it (some STS-era services want it added
         * after signing). By default the token is signed, which is what S3 expects.
         */
        SIGV4_UNSIGNED_SESSION_TOKEN = 1 << 3,
};

/* What S3 expects: no normalisation, no double encoding, x-amz-content-sha256 signed. */
#define SIGV4_FLAGS_S3 SIGV4_CONTENT_SHA256_HEADER

/* Credentials and scope. Strings are borrowed for the duration of sigv4_sign(). */
struct sigv4_signer {
        const char *access_key_id;
        const char *secret_access_key;
        const char *session_token; /* NULL or "" when there is none */
        const char *region;        /* "us-east-1" */
        const char *service;       /* "s3" */
        unsigned flags;            /* enum sigv4_flags */
};

struct sigv4_header {
        const char *name;
        const char *value;
};

/* The request as it will be sent. Borrowed for the duration of sigv4_sign(). */
struct sigv4_request {
        const char *method; /* "GET" */
        /*
         * The path exactly as it appears on the request line, percent-encoded, without the
         * query: "/bucket/my%20key". Must start with '/'.
         */
        const char *path;
        /* The raw query after '?', or NULL. Names and values may be encoded or not. */
        const char *query;
        /* Headers to sign, Host included. Names are case-insensitive; repeats are joined. */
        const struct sigv4_header *headers;
        size_t n_headers;
        /* Hex SHA-256 of the body, or SIGV4_UNSIGNED_PAYLOAD; NULL means the empty body. */
        const char *payload_hash;
};

/* Headers sigv4_sign() asks the caller to add, as "Name: value" lines, in this order. */
#define SIGV4_ADD_HEADERS_MAX 4

/* The result of signing. Embedded by the caller; release with sigv4_signed_done(). */
struct sigv4_signed {
        char *canonical_request; /* owned */
        char *string_to_sign;    /* owned */
        char signature[SIGV4_HEX_LEN + 1];
        char amz_date[sizeof("20150830T123600Z")];
        /* X-Amz-Date, [x-amz-content-sha256], [X-Amz-Security-Token], Authorization. */
        char *add_headers[SIGV4_ADD_HEADERS_MAX]; /* owned */
        size_t n_add_headers;
};

/*
 * Sign @req at time @now (seconds since the epoch, UTC). On success fills @ret, which the
 * caller releases with sigv4_signed_done(); on failure @ret is left untouched.
 *
 * Returns 0, -EINVAL for a malformed request (path not starting with '/', a header name
 * that is not a token, a header value with CR, LF or NUL, a bad percent escape, a wire
 * path with bytes that must be escaped when double encoding is off) or -ENOMEM. The error
 * text never contains the secret key.
 */
int sigv4_sign(const struct sigv4_signer *signer, const struct sigv4_request *req, time_t now,
               struct sigv4_signed *ret);

/* Free what sigv4_sign() allocated and wipe the struct. Safe on a zeroed struct. */
void sigv4_signed_done(struct sigv4_signed *s);

/*
 * Percent-encode @in per the SigV4 rules: every byte other than A-Z a-z 0-9 - _ . ~ becomes
 * %XX with upper-case hex; '/' is kept when @keep_slash (object keys and paths). Returns a
 * new string in *ret (owned by the caller), 0 or -ENOMEM.
 */
int sigv4_uri_encode(const char *in, bool keep_slash, char **ret);

/* Hex SHA-256 of @len bytes into @ret_hex (SIGV4_HEX_LEN + 1 bytes). Returns 0 or -ENOMEM. */
int sigv4_sha256_hex(const void *data, size_t len, char *ret_hex);
