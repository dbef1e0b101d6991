#include "stages/s3_client.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <curl/curl.h>
#include <openssl/crypto.h>

#include "common/err.h"
#include "common/log.h"
#include "common/util.h"
#include "config/config.h"
#include "stages/s3_sigv4.h"

/*
 * DESIGN
 *
 * Every request, even a lone HEAD, is one "transfer" (struct s3_xfer) run by one loop over
 * the client's curl multi handle (s3_client_run). That gives three things in one place:
 *   - keep-alive: the multi handle owns the connection cache, so connections survive from
 *     one call to the next although each transfer gets a fresh easy handle;
 *   - parallel ranged GETs with a bound on how many are in flight;
 *   - our own stall and deadline checks per transfer, in milliseconds (curl's low-speed
 *     check counts whole seconds and cannot see a transfer that never started).
 * Requests are signed when they start, not when they are queued, so a long parallel download
 * never sends a signature older than a few milliseconds.
 *
 * The response is classified as it arrives: a 2xx body goes to the caller's callback, any
 * other body is an error document and is kept, capped at S3_ERROR_BODY_MAX, for the XML
 * parser. The server is untrusted: the parser looks for three elements by plain substring
 * search, bounds every copy and replaces anything that is not printable ASCII.
 */

#define S3_ERROR_BODY_MAX (16 * 1024)
#define S3_KEY_MAX 1024
#define S3_POLL_MS 100
#define S3_RECV_BUFFER (256 * 1024)
#define S3_DEFAULT_CONNECT_TIMEOUT_MS 10000L
/*
 * curl's own timeout is only a backstop, set this much later than the caller's deadline: our
 * check fires first and its message names the limit, where curl's would only say "Timeout was
 * reached".
 */
#define S3_CURL_TIMEOUT_GRACE_MS 2000

struct s3_client {
        CURLM *multi;
        char *scheme;    /* "http" or "https" */
        char *authority; /* host[:port] */
        char *base_path; /* "" or "/prefix", no trailing slash */
        bool path_style;
        char *region;
        char *access_key_id; /* NULL: anonymous */
        char *secret_access_key;
        char *session_token;
        long connect_timeout_ms;
        long low_speed_limit;
        long low_speed_time_s;
        char *user_agent;
};

enum s3_op {
        S3_OP_HEAD,
        S3_OP_GET,
        S3_OP_PUT,
        S3_OP_CREATE_BUCKET,
};

/* One HTTP request and what came back. */
struct s3_xfer {
        enum s3_op op;
        const char *verb; /* for messages: "download", "look up", ... */
        const char *bucket;
        const char *key; /* NULL for bucket operations */
        char *url;
        char *host;
        char *path;

        /* Request */
        bool ranged;
        uint64_t offset;
        uint64_t length;
        const char *if_match;
        s3_client_write_fn write_cb;
        void *userdata;
        const unsigned char *up_data; /* PUT from memory */
        int up_fd;                    /* PUT from a file, or -1 */
        uint64_t up_len;
        uint64_t up_pos;
        char payload_hash[SIGV4_HEX_LEN + 1];

        /* Transfer state */
        CURL *easy;
        struct curl_slist *headers;
        bool active;
        int64_t last_progress_ms;
        char curl_error[CURL_ERROR_SIZE];
        int cb_r; /* failure decided inside a callback, message already set */

        /* Response */
        long status;
        bool have_length;
        uint64_t content_length;
        bool have_range;
        uint64_t range_start;
        uint64_t range_total;
        bool range_total_known;
        char request_id[128];
        char etag[S3_ETAG_MAX];
        char last_modified[64];
        uint64_t received;
        char *err_body;
        size_t err_len;
        char err_code[64];
};

static pthread_once_t s3_client_global_once = PTHREAD_ONCE_INIT;
static CURLcode s3_client_global_result;

static void s3_client_global_init(void)
{
        s3_client_global_result = curl_global_init(CURL_GLOBAL_DEFAULT);
}

/* printf into a new string; NULL when out of memory. */
static char *s3_strdupf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static char *s3_strdupf(const char *fmt, ...)
{
        va_list ap;
        int n;
        char *s;

        va_start(ap, fmt);
        n = vsnprintf(NULL, 0, fmt, ap);
        va_end(ap);
        if (n < 0)
                return NULL;
        s = malloc((size_t)n + 1);
        if (!s)
                return NULL;
        va_start(ap, fmt);
        (void)vsnprintf(s, (size_t)n + 1, fmt, ap);
        va_end(ap);
        return s;
}

static char *s3_strdup_or_null(const char *s)
{
        return s && s[0] ? strdup(s) : NULL;
}

/* Copy untrusted text: printable ASCII only (others become '?'), always NUL-terminated. */
static void s3_copy_printable(char *out, size_t out_size, const char *in, size_t len)
{
        size_t n = 0;

        for (size_t i = 0; i < len && n + 1 < out_size; i++) {
                unsigned char c = (unsigned char)in[i];

                out[n++] = c >= 0x20 && c < 0x7f ? (char)c : '?';
        }
        out[n] = '\0';
}

/* ---- XML error documents ---------------------------------------------------------------- */

/* Decode the five predefined XML entities while copying like s3_copy_printable(). */
static void s3_xml_text(char *out, size_t out_size, const char *in, size_t len)
{
        static const struct {
                const char *entity;
                char c;
        } entities[] = {
                {"&amp;", '&'}, {"&lt;", '<'}, {"&gt;", '>'}, {"&quot;", '"'}, {"&apos;", '\''}};
        size_t n = 0;

        for (size_t i = 0; i < len && n + 1 < out_size; i++) {
                unsigned char c = (unsigned char)in[i];

                if (c == '&') {
                        for (size_t e = 0; e < ARRAY_SIZE(entities); e++) {
                                size_t el = strlen(entities[e].entity);

                                if (len - i >= el && memcmp(in + i, entities[e].entity, el) == 0) {
                                        c = (unsigned char)entities[e].c;
                                        i += el - 1;
                                        break;
                                }
                        }
                }
                out[n++] = c >= 0x20 && c < 0x7f ? (char)c : '?';
        }
        out[n] = '\0';
}

/* The text of the first <tag>...</tag> within @len bytes; false when absent or unclosed. */
static bool s3_xml_element(const char *body, size_t len, const char *tag, char *out,
                           size_t out_size)
{
        char open[32], close[32];
        const char *start, *end;

        (void)snprintf(open, sizeof(open), "<%s>", tag);
        (void)snprintf(close, sizeof(close), "</%s>", tag);
        start = memmem(body, len, open, strlen(open));
        if (!start)
                return false;
        start += strlen(open);
        end = memmem(start, len - (size_t)(start - body), close, strlen(close));
        if (!end)
                return false;
        s3_xml_text(out, out_size, start, (size_t)(end - start));
        return true;
}

static bool s3_is_error_code(const char *code)
{
        if (!code[0])
                return false;
        for (const char *p = code; *p; p++) {
                if (!((*p >= 'A' && *p <= 'Z') || (*p >= 'a' && *p <= 'z') ||
                      (*p >= '0' && *p <= '9') || *p == '.'))
                        return false;
        }
        return true;
}

FIM_TESTABLE int s3_client_parse_error(const char *body, size_t len, struct s3_error *ret)
{
        struct s3_error e = {0};

        if (!body)
                return -ENODATA;
        if (len > S3_ERROR_BODY_MAX)
                len = S3_ERROR_BODY_MAX;
        (void)s3_xml_element(body, len, "Code", e.code, sizeof(e.code));
        if (!s3_is_error_code(e.code))
                return -ENODATA;
        (void)s3_xml_element(body, len, "Message", e.message, sizeof(e.message));
        (void)s3_xml_element(body, len, "RequestId", e.request_id, sizeof(e.request_id));
        *ret = e;
        return 0;
}

static const struct {
        const char *code;
        int r;
        const char *hint;
} s3_error_table[] = {
        {"NoSuchKey", -ENOENT,
         "the object does not exist: check the key and that the image was uploaded"},
        {"NoSuchBucket", -ENOENT,
         "the bucket does not exist: check the bucket name, S3_ENDPOINT and AWS_REGION"},
        {"AccessDenied", -EACCES,
         "the credentials may not read this object: check the bucket policy and the key's permissions"},
        {"AllAccessDisabled", -EACCES,
         "all access to this object is disabled: ask the bucket owner"},
        {"AccountProblem", -EACCES, "the S3 account has a problem: ask the account owner"},
        {"InvalidAccessKeyId", -EACCES,
         "the server does not know this access key: check AWS_ACCESS_KEY_ID and S3_ENDPOINT"},
        {"SignatureDoesNotMatch", -EACCES,
         "the signature did not verify: check AWS_SECRET_ACCESS_KEY and AWS_REGION"},
        {"AuthorizationHeaderMalformed", -EACCES,
         "the request was signed for the wrong region: set AWS_REGION to the bucket's region"},
        {"RequestTimeTooSkewed", -EACCES,
         "this host's clock differs from the server's by more than 15 minutes: check the clock (NTP)"},
        {"ExpiredToken", -EACCES, "the session token has expired: refresh AWS_SESSION_TOKEN"},
        {"InvalidToken", -EACCES, "the session token is invalid: check AWS_SESSION_TOKEN"},
        {"TokenRefreshRequired", -EACCES,
         "the session token must be refreshed: refresh AWS_SESSION_TOKEN"},
        {"InvalidRange", -ERANGE, "the requested byte range lies outside the object"},
        {"PreconditionFailed", -ESTALE,
         "the object changed while it was being downloaded (ETag mismatch): the download must start over"},
        {"SlowDown", -EAGAIN, "S3 asks for a lower request rate: transient, retry later"},
        {"ServiceUnavailable", -EAGAIN, "S3 is unavailable: transient, retry later"},
        {"InternalError", -EAGAIN, "S3 had an internal error: transient, retry later"},
        {"RequestTimeout", -ETIMEDOUT,
         "the server gave up waiting for the request: transient, retry later"},
        {"PermanentRedirect", -EINVAL,
         "the bucket needs another endpoint: check AWS_REGION and S3_ENDPOINT"},
        {"NotImplemented", -ENOSYS,
         "the server does not implement this request: check that S3_ENDPOINT is an S3 API"},
        {"XAmzContentSHA256Mismatch", -EBADMSG,
         "the server saw a different payload hash: a client bug or a proxy that alters requests"},
};

FIM_TESTABLE int s3_client_errno_for(long status, const char *code, const char **ret_hint)
{
        const char *hint;
        int r;

        for (size_t i = 0; code && i < ARRAY_SIZE(s3_error_table); i++) {
                if (strcmp(code, s3_error_table[i].code) == 0) {
                        *ret_hint = s3_error_table[i].hint;
                        return s3_error_table[i].r;
                }
        }
        if (status == 404) {
                r = -ENOENT;
                hint = "the bucket or the object does not exist: check both names";
        } else if (status == 401 || status == 403) {
                r = -EACCES;
                hint = "access refused: check the credentials, AWS_REGION and the bucket policy";
        } else if (status == 412) {
                r = -ESTALE;
                hint = "the object changed (ETag mismatch): the download must start over";
        } else if (status == 416) {
                r = -ERANGE;
                hint = "the requested byte range lies outside the object";
        } else if (status == 408) {
                r = -ETIMEDOUT;
                hint = "the server timed out the request: transient, retry later";
        } else if (status == 501) {
                /* Asking again will not make the server implement it. */
                r = -ENOSYS;
                hint = "the server does not implement this request: check that S3_ENDPOINT is an S3 API";
        } else if (status == 429 || status >= 500) {
                r = -EAGAIN;
                hint = "server-side trouble: transient, retry later";
        } else if (status == 301 || status == 307) {
                r = -EINVAL;
                hint = "the server redirects: check AWS_REGION and S3_ENDPOINT";
        } else {
                /* Asking the same server the same way gives the same answer: permanent. */
                r = -EBADMSG;
                hint = "unexpected answer from the server: check S3_ENDPOINT";
        }
        *ret_hint = hint;
        return r;
}

/* ---- Messages ----------------------------------------------------------------------------- */

static void s3_xfer_target(const struct s3_xfer *x, char *buf, size_t size)
{
        if (x->key)
                (void)snprintf(buf, size, "object '%.300s' in bucket '%.100s'", x->key, x->bucket);
        else
                (void)snprintf(buf, size, "bucket '%.100s'", x->bucket);
}

/* A failure the server explained (or at least answered with a status). */
static int s3_xfer_fail_http(struct s3_xfer *x, const struct s3_error *e)
{
        char target[512];
        const char *hint = NULL;
        const char *code = e->code[0] ? e->code : (x->status == 404 ? "NotFound" : "NoErrorCode");
        int r = s3_client_errno_for(x->status, e->code, &hint);

        s3_xfer_target(x, target, sizeof(target));
        return err_set(r, "failed to %s %s: %s%s%s (HTTP %ld%s%s%s); %s", x->verb, target, code,
                       e->message[0] ? ": " : "", e->message, x->status,
                       e->request_id[0] ? ", request id '" : "", e->request_id,
                       e->request_id[0] ? "'" : "", hint);
}

static int s3_errno_for_curl(CURLcode cc, const char **ret_hint)
{
        const char *transient = "network trouble: transient, retry later";

        *ret_hint = transient;
        switch (cc) {
        case CURLE_OPERATION_TIMEDOUT:
                return -ETIMEDOUT;
        case CURLE_COULDNT_CONNECT:
                *ret_hint = "nothing accepts connections there: check S3_ENDPOINT, or retry later";
                return -ECONNREFUSED;
        case CURLE_COULDNT_RESOLVE_HOST:
        case CURLE_COULDNT_RESOLVE_PROXY:
                *ret_hint = "the host name did not resolve: check S3_ENDPOINT and DNS";
                return -EHOSTUNREACH;
        case CURLE_RECV_ERROR:
        case CURLE_SEND_ERROR:
        case CURLE_GOT_NOTHING:
                return -ECONNRESET;
        case CURLE_PARTIAL_FILE:
                return -EPIPE;
        case CURLE_SSL_CONNECT_ERROR:
        case CURLE_HTTP2:
        case CURLE_HTTP2_STREAM:
        case CURLE_WEIRD_SERVER_REPLY:
                return -EPROTO;
        case CURLE_PEER_FAILED_VERIFICATION:
        case CURLE_SSL_CACERT_BADFILE:
        case CURLE_SSL_CERTPROBLEM:
                *ret_hint =
                        "the server's TLS certificate did not verify: check S3_ENDPOINT and the CA bundle";
                return -EKEYREJECTED;
        case CURLE_OUT_OF_MEMORY:
                *ret_hint = "out of memory";
                return -ENOMEM;
        case CURLE_URL_MALFORMAT:
        case CURLE_UNSUPPORTED_PROTOCOL:
                *ret_hint = "check S3_ENDPOINT";
                return -EINVAL;
        default:
                *ret_hint = "unexpected transfer error";
                return -EIO;
        }
}

static int s3_xfer_fail_curl(struct s3_xfer *x, CURLcode cc)
{
        char target[512];
        const char *hint;
        int r = s3_errno_for_curl(cc, &hint);

        s3_xfer_target(x, target, sizeof(target));
        return err_set(r, "failed to %s %s: %s (curl: %s); %s", x->verb, target,
                       curl_easy_strerror(cc), x->curl_error[0] ? x->curl_error : "no detail",
                       hint);
}

/* ---- Addressing ----------------------------------------------------------------------------- */

static bool s3_host_is_ip_literal(const char *authority)
{
        if (authority[0] == '[')
                return true;
        for (const char *p = authority; *p && *p != ':'; p++) {
                if (!((*p >= '0' && *p <= '9') || *p == '.'))
                        return false;
        }
        return true;
}

/* Whether @bucket can be a DNS label in front of the endpoint (virtual-host style). */
static bool s3_bucket_is_dns_compatible(const char *bucket, bool https)
{
        size_t n = strlen(bucket);

        if (n < 3 || n > 63 || bucket[0] == '-' || bucket[n - 1] == '-' || bucket[0] == '.' ||
            bucket[n - 1] == '.' || strstr(bucket, ".."))
                return false;
        /* A dotted bucket does not match the endpoint's wildcard TLS certificate. */
        if (https && strchr(bucket, '.'))
                return false;
        for (const char *p = bucket; *p; p++) {
                if (!((*p >= 'a' && *p <= 'z') || (*p >= '0' && *p <= '9') || *p == '-' ||
                      *p == '.'))
                        return false;
        }
        return !s3_host_is_ip_literal(bucket);
}

static int s3_check_names(const char *bucket, const char *key)
{
        size_t n = strlen(bucket);

        if (n == 0 || n > 255)
                return err_set(-EINVAL,
                               "bad S3 bucket name '%.100s': it must have 1 to 255 characters",
                               bucket);
        for (const char *p = bucket; *p; p++) {
                if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') ||
                      (*p >= '0' && *p <= '9') || *p == '-' || *p == '.' || *p == '_'))
                        return err_set(
                                -EINVAL,
                                "bad S3 bucket name '%.100s': only letters, digits, '.', '-' and '_' are allowed",
                                bucket);
        }
        if (key && (key[0] == '\0' || strlen(key) > S3_KEY_MAX))
                return err_set(-EINVAL, "bad S3 key '%.100s': it must have 1 to %d bytes", key,
                               S3_KEY_MAX);
        return 0;
}

FIM_TESTABLE int s3_client_build_url(const struct s3_client *c, const char *bucket, const char *key,
                                     char **ret_url, char **ret_host, char **ret_path)
{
        char *enc_key = NULL, *url = NULL, *host = NULL, *path = NULL;
        bool vhost;
        int r;

        r = s3_check_names(bucket, key);
        if (r < 0)
                return r;
        if (key) {
                r = sigv4_uri_encode(key, true, &enc_key);
                if (r < 0)
                        return r;
        }
        vhost = !c->path_style &&
                s3_bucket_is_dns_compatible(bucket, strcmp(c->scheme, "https") == 0);
        if (vhost) {
                host = s3_strdupf("%s.%s", bucket, c->authority);
                path = s3_strdupf("%s/%s", c->base_path, enc_key ? enc_key : "");
        } else {
                host = strdup(c->authority);
                path = s3_strdupf("%s/%s%s%s", c->base_path, bucket, enc_key ? "/" : "",
                                  enc_key ? enc_key : "");
        }
        if (host && path)
                url = s3_strdupf("%s://%s%s", c->scheme, host, path);
        free(enc_key);
        if (!url) {
                free(host);
                free(path);
                return -ENOMEM;
        }
        *ret_url = url;
        *ret_host = host;
        *ret_path = path;
        return 0;
}

/* Split "scheme://authority/prefix" into the client's fields. */
static int s3_client_parse_endpoint(struct s3_client *c, const char *endpoint)
{
        const char *sep, *auth, *slash;
        size_t auth_len;

        if (!endpoint || !endpoint[0]) {
                c->scheme = strdup("https");
                c->authority = s3_strdupf("s3.%s.amazonaws.com", c->region);
                c->base_path = strdup("");
                return c->scheme && c->authority && c->base_path ? 0 : -ENOMEM;
        }
        sep = strstr(endpoint, "://");
        if (!sep || !((sep - endpoint == 4 && strncasecmp(endpoint, "http", 4) == 0) ||
                      (sep - endpoint == 5 && strncasecmp(endpoint, "https", 5) == 0)))
                return err_set(-EINVAL,
                               "bad S3 endpoint '%s': it must start with http:// or https://",
                               endpoint);
        auth = sep + 3;
        slash = strchr(auth, '/');
        auth_len = slash ? (size_t)(slash - auth) : strlen(auth);
        if (auth_len == 0 || strcspn(endpoint, "@?# \t\r\n") != strlen(endpoint))
                return err_set(
                        -EINVAL,
                        "bad S3 endpoint '%s': expected scheme://host[:port][/prefix] without credentials, query or spaces",
                        endpoint);
        c->scheme = sep - endpoint == 5 ? strdup("https") : strdup("http");
        c->authority = strndup(auth, auth_len);
        c->base_path = strdup(slash ? slash : "");
        if (!c->scheme || !c->authority || !c->base_path)
                return -ENOMEM;
        for (size_t n = strlen(c->base_path); n > 0 && c->base_path[n - 1] == '/'; n--)
                c->base_path[n - 1] = '\0';
        for (char *p = c->authority; *p; p++) {
                if (*p >= 'A' && *p <= 'Z')
                        *p = (char)(*p - 'A' + 'a');
        }
        if (s3_host_is_ip_literal(c->authority))
                c->path_style = true;
        return 0;
}

void s3_client_options_from_config(const struct config *cfg, struct s3_client_options *ret)
{
        *ret = (struct s3_client_options){
                .endpoint = cfg->s3_endpoint,
                .region = cfg->s3_region,
                .access_key_id = cfg->s3_access_key,
                .secret_access_key = cfg->s3_secret_key,
                .session_token = cfg->s3_session_token[0] ? cfg->s3_session_token : NULL,
                .force_path_style = cfg->s3_force_path_style,
        };
}

int s3_client_new(const struct s3_client_options *opts, struct s3_client **ret)
{
        struct s3_client *c = NULL;
        bool have_ak = opts->access_key_id && opts->access_key_id[0];
        bool have_sk = opts->secret_access_key && opts->secret_access_key[0];
        int r;

        (void)pthread_once(&s3_client_global_once, s3_client_global_init);
        if (s3_client_global_result != CURLE_OK)
                return err_set(-ENOMEM, "failed to initialise libcurl: %s",
                               curl_easy_strerror(s3_client_global_result));
        if (have_ak != have_sk)
                return err_set(
                        -EINVAL,
                        "incomplete S3 credentials: set both AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or neither for anonymous access");
        c = calloc(1, sizeof(*c));
        if (!c)
                return -ENOMEM;
        c->region = strdup(opts->region && opts->region[0] ? opts->region : "us-east-1");
        if (!c->region) {
                r = -ENOMEM;
                goto out;
        }
        if (strcspn(c->region, "/ \t\r\n") != strlen(c->region)) {
                r = err_set(-EINVAL, "bad AWS region '%s'", c->region);
                goto out;
        }
        c->path_style = opts->force_path_style;
        r = s3_client_parse_endpoint(c, opts->endpoint);
        if (r < 0)
                goto out;
        c->access_key_id = have_ak ? strdup(opts->access_key_id) : NULL;
        c->secret_access_key = have_sk ? strdup(opts->secret_access_key) : NULL;
        c->session_token = s3_strdup_or_null(opts->session_token);
        c->user_agent = opts->user_agent ? strdup(opts->user_agent)
                                         : strdup("flyio-image-manager/" FIM_VERSION);
        c->multi = curl_multi_init();
        if ((have_ak && (!c->access_key_id || !c->secret_access_key)) || !c->user_agent ||
            !c->multi || (opts->session_token && opts->session_token[0] && !c->session_token)) {
                r = -ENOMEM;
                goto out;
        }
        /* A secret that slips into any later log line is masked. */
        if (have_sk)
                (void)log_register_secret(c->secret_access_key);
        if (c->session_token)
                (void)log_register_secret(c->session_token);
        c->connect_timeout_ms = opts->connect_timeout_ms > 0 ? opts->connect_timeout_ms
                                                             : S3_DEFAULT_CONNECT_TIMEOUT_MS;
        c->low_speed_limit = opts->low_speed_limit;
        c->low_speed_time_s = opts->low_speed_time_s;
        *ret = steal_ptr(c);
        r = 0;
out:
        s3_client_free(c);
        return r;
}

static void s3_free_secret(char *s)
{
        if (s) {
                OPENSSL_cleanse(s, strlen(s));
                free(s);
        }
}

struct s3_client *s3_client_free(struct s3_client *c)
{
        if (!c)
                return NULL;
        if (c->multi)
                curl_multi_cleanup(c->multi);
        free(c->scheme);
        free(c->authority);
        free(c->base_path);
        free(c->region);
        free(c->access_key_id);
        s3_free_secret(c->secret_access_key);
        s3_free_secret(c->session_token);
        free(c->user_agent);
        free(c);
        return NULL;
}

/* ---- Transfers ------------------------------------------------------------------------------- */

static void s3_xfer_init(struct s3_xfer *x, enum s3_op op, const char *verb, const char *bucket,
                         const char *key)
{
        *x = (struct s3_xfer){.op = op, .verb = verb, .bucket = bucket, .key = key, .up_fd = -1};
        memcpy(x->payload_hash, SIGV4_EMPTY_SHA256, sizeof(x->payload_hash));
}

static int s3_xfer_prepare(const struct s3_client *c, struct s3_xfer *x)
{
        return s3_client_build_url(c, x->bucket, x->key, &x->url, &x->host, &x->path);
}

/* Drop a transfer's curl state; the response fields stay readable. */
static void s3_xfer_stop(struct s3_client *c, struct s3_xfer *x)
{
        if (x->active)
                (void)curl_multi_remove_handle(c->multi, x->easy);
        x->active = false;
        if (x->easy)
                curl_easy_cleanup(x->easy);
        x->easy = NULL;
        curl_slist_free_all(x->headers);
        x->headers = NULL;
}

static void s3_xfer_done(struct s3_client *c, struct s3_xfer *x)
{
        s3_xfer_stop(c, x);
        free(x->url);
        free(x->host);
        free(x->path);
        free(x->err_body);
        x->url = x->host = x->path = x->err_body = NULL;
}

/* Trimmed value of "Name: value\r\n" when the name matches, else NULL. */
static const char *s3_header_value(const char *line, size_t len, const char *name, size_t *ret_len)
{
        size_t nlen = strlen(name);

        if (len <= nlen || line[nlen] != ':' || strncasecmp(line, name, nlen) != 0)
                return NULL;
        const char *v = line + nlen + 1;
        size_t vlen = len - nlen - 1;

        while (vlen > 0 && (*v == ' ' || *v == '\t')) {
                v++;
                vlen--;
        }
        while (vlen > 0 && (v[vlen - 1] == '\r' || v[vlen - 1] == '\n' || v[vlen - 1] == ' '))
                vlen--;
        *ret_len = vlen;
        return v;
}

static bool s3_parse_u64_n(const char *s, size_t len, uint64_t *ret)
{
        char buf[32];

        if (len == 0 || len >= sizeof(buf))
                return false;
        memcpy(buf, s, len);
        buf[len] = '\0';
        return util_parse_u64(buf, ret) == 0;
}

/* "bytes START-END/TOTAL" (TOTAL may be "*"). */
static void s3_parse_content_range(struct s3_xfer *x, const char *v, size_t len)
{
        char buf[96];
        unsigned long long start, end;
        char total[32];

        if (len >= sizeof(buf))
                return;
        memcpy(buf, v, len);
        buf[len] = '\0';
        if (sscanf(buf, "bytes %llu-%llu/%31s", &start, &end, total) != 3)
                return;
        x->have_range = true;
        x->range_start = start;
        x->range_total_known = util_parse_u64(total, &x->range_total) == 0;
}

static bool s3_etag_is_usable(const char *v, size_t len)
{
        if (len == 0 || len >= S3_ETAG_MAX)
                return false;
        for (size_t i = 0; i < len; i++) {
                if ((unsigned char)v[i] < 0x21 || (unsigned char)v[i] > 0x7e)
                        return false;
        }
        return true;
}

static size_t s3_xfer_on_header(char *line, size_t size, size_t n, void *userdata)
{
        struct s3_xfer *x = userdata;
        size_t len = size * n, vlen;
        const char *v;

        x->last_progress_ms = util_now_monotonic_ms();
        if (len > 5 && memcmp(line, "HTTP/", 5) == 0) {
                /* A new response (after a 100 Continue, say): forget the previous one. */
                const char *sp = memchr(line, ' ', len);

                x->status = sp ? strtol(sp + 1, NULL, 10) : 0;
                x->have_length = x->have_range = false;
                x->etag[0] = x->last_modified[0] = x->request_id[0] = '\0';
                return len;
        }
        if ((v = s3_header_value(line, len, "Content-Length", &vlen)))
                x->have_length = s3_parse_u64_n(v, vlen, &x->content_length);
        else if ((v = s3_header_value(line, len, "Content-Range", &vlen)))
                s3_parse_content_range(x, v, vlen);
        else if ((v = s3_header_value(line, len, "ETag", &vlen)) && s3_etag_is_usable(v, vlen))
                s3_copy_printable(x->etag, sizeof(x->etag), v, vlen);
        else if ((v = s3_header_value(line, len, "Last-Modified", &vlen)))
                s3_copy_printable(x->last_modified, sizeof(x->last_modified), v, vlen);
        else if ((v = s3_header_value(line, len, "x-amz-request-id", &vlen)))
                s3_copy_printable(x->request_id, sizeof(x->request_id), v, vlen);
        return len;
}

/* The first body bytes of a ranged GET: the server must answer the range we asked for. */
static int s3_xfer_check_range(struct s3_xfer *x)
{
        char target[512];

        if (x->status == 206 && x->have_range && x->range_start == x->offset)
                return 0;
        s3_xfer_target(x, target, sizeof(target));
        if (x->status == 200)
                return err_set(
                        -ENOTSUP,
                        "failed to %s %s: asked for bytes from %llu, the server ignored the Range header and answered HTTP 200 with the whole object",
                        x->verb, target, (unsigned long long)x->offset);
        return err_set(
                -EPROTO,
                "failed to %s %s: asked for bytes from %llu, the server answered HTTP %ld %s; the server does not support ranged GETs properly",
                x->verb, target, (unsigned long long)x->offset, x->status,
                x->have_range ? "with another range" : "without a range");
}

static size_t s3_xfer_on_body(char *data, size_t size, size_t n, void *userdata)
{
        struct s3_xfer *x = userdata;
        size_t len = size * n;
        int r;

        x->last_progress_ms = util_now_monotonic_ms();
        if (x->status < 200 || x->status >= 300) {
                size_t room = S3_ERROR_BODY_MAX - x->err_len;
                size_t take = len < room ? len : room;

                if (take == 0)
                        return len; /* beyond the cap: drained, not kept */
                char *b = realloc(x->err_body, x->err_len + take);

                if (!b) {
                        x->cb_r = -ENOMEM;
                        return 0;
                }
                memcpy(b + x->err_len, data, take);
                x->err_body = b;
                x->err_len += take;
                return len;
        }
        if (x->op != S3_OP_GET)
                return len;
        if (x->received == 0 && x->ranged) {
                r = s3_xfer_check_range(x);
                if (r < 0) {
                        x->cb_r = r;
                        return 0;
                }
        }
        if (x->ranged && x->length > 0 && x->received + len > x->length) {
                char target[512];

                s3_xfer_target(x, target, sizeof(target));
                x->cb_r = err_set(
                        -EPROTO,
                        "failed to %s %s: the server sent more than the %llu bytes asked for",
                        x->verb, target, (unsigned long long)x->length);
                return 0;
        }
        r = x->write_cb(data, len, x->userdata);
        if (r < 0) {
                x->cb_r = r;
                return 0;
        }
        x->received += len;
        return len;
}

static size_t s3_xfer_on_read(char *buf, size_t size, size_t n, void *userdata)
{
        struct s3_xfer *x = userdata;
        uint64_t left = x->up_len - x->up_pos;
        size_t want = size * n < left ? size * n : (size_t)left;

        x->last_progress_ms = util_now_monotonic_ms();
        if (want == 0)
                return 0;
        if (x->up_fd < 0) {
                memcpy(buf, x->up_data + x->up_pos, want);
                x->up_pos += want;
                return want;
        }
        ssize_t got = pread(x->up_fd, buf, want, (off_t)x->up_pos);

        if (got <= 0) {
                x->cb_r = err_set(got < 0 ? -errno : -EIO,
                                  "failed to read the file to upload as '%.300s': %s", x->key,
                                  got < 0 ? strerror(errno) : "it shrank");
                return CURL_READFUNC_ABORT;
        }
        x->up_pos += (uint64_t)got;
        return (size_t)got;
}

static int s3_xfer_add_header(struct s3_xfer *x, const char *name, const char *value)
{
        char *line = s3_strdupf("%s: %s", name, value);
        struct curl_slist *l;

        if (!line)
                return -ENOMEM;
        l = curl_slist_append(x->headers, line);
        free(line);
        if (!l)
                return -ENOMEM;
        x->headers = l;
        return 0;
}

/* Build the request headers, signing them when the client has credentials. */
static int s3_xfer_build_headers(const struct s3_client *c, struct s3_xfer *x)
{
        const char *method = x->op == S3_OP_HEAD ? "HEAD" : x->op == S3_OP_GET ? "GET" : "PUT";
        struct sigv4_header hdrs[3];
        struct sigv4_signed s = {0};
        char range[64];
        size_t n = 0;
        int r = 0;

        hdrs[n++] = (struct sigv4_header){"Host", x->host};
        if (x->ranged) {
                if (x->length > 0)
                        (void)snprintf(range, sizeof(range), "bytes=%llu-%llu",
                                       (unsigned long long)x->offset,
                                       (unsigned long long)(x->offset + x->length - 1));
                else
                        (void)snprintf(range, sizeof(range), "bytes=%llu-",
                                       (unsigned long long)x->offset);
                hdrs[n++] = (struct sigv4_header){"Range", range};
        }
        if (x->if_match)
                hdrs[n++] = (struct sigv4_header){"If-Match", x->if_match};
        for (size_t i = 0; i < n && r >= 0; i++)
                r = s3_xfer_add_header(x, hdrs[i].name, hdrs[i].value);
        if (r < 0)
                return r;
        /* A PUT with Expect: 100-continue waits a second for nothing on some servers. */
        if (x->op == S3_OP_PUT || x->op == S3_OP_CREATE_BUCKET)
                x->headers = curl_slist_append(x->headers, "Expect:");
        if (!c->access_key_id)
                return s3_xfer_add_header(x, "x-amz-content-sha256", x->payload_hash);

        const struct sigv4_signer signer = {
                .access_key_id = c->access_key_id,
                .secret_access_key = c->secret_access_key,
                .session_token = c->session_token,
                .region = c->region,
                .service = "s3",
                .flags = SIGV4_FLAGS_S3,
        };
        const struct sigv4_request req = {
                .method = method,
                .path = x->path,
                .headers = hdrs,
                .n_headers = n,
                .payload_hash = x->payload_hash,
        };

        r = sigv4_sign(&signer, &req, time(NULL), &s);
        if (r < 0)
                return r;
        for (size_t i = 0; i < s.n_add_headers && r >= 0; i++) {
                struct curl_slist *l = curl_slist_append(x->headers, s.add_headers[i]);

                if (!l)
                        r = -ENOMEM;
                else
                        x->headers = l;
        }
        sigv4_signed_done(&s);
        return r;
}

#define S3_SETOPT(x, opt, val)                                                                     \
        do {                                                                                       \
                if (curl_easy_setopt((x)->easy, opt, val) != CURLE_OK)                             \
                        return err_set(-EINVAL, "failed to set curl option %s", #opt);             \
        } while (0)

static int s3_xfer_setopts(const struct s3_client *c, struct s3_xfer *x, int64_t timeout_ms)
{
        S3_SETOPT(x, CURLOPT_URL, x->url);
        S3_SETOPT(x, CURLOPT_PRIVATE, (void *)x);
        S3_SETOPT(x, CURLOPT_NOSIGNAL, 1L);
        S3_SETOPT(x, CURLOPT_PATH_AS_IS, 1L); /* S3 keys are opaque: never squash "/./" */
        S3_SETOPT(x, CURLOPT_PROTOCOLS_STR, "http,https");
        S3_SETOPT(x, CURLOPT_HTTP_VERSION, (long)CURL_HTTP_VERSION_1_1);
        S3_SETOPT(x, CURLOPT_HTTPHEADER, x->headers);
        S3_SETOPT(x, CURLOPT_USERAGENT, c->user_agent);
        S3_SETOPT(x, CURLOPT_ERRORBUFFER, x->curl_error);
        S3_SETOPT(x, CURLOPT_HEADERFUNCTION, s3_xfer_on_header);
        S3_SETOPT(x, CURLOPT_HEADERDATA, (void *)x);
        S3_SETOPT(x, CURLOPT_WRITEFUNCTION, s3_xfer_on_body);
        S3_SETOPT(x, CURLOPT_WRITEDATA, (void *)x);
        S3_SETOPT(x, CURLOPT_CONNECTTIMEOUT_MS, c->connect_timeout_ms);
        S3_SETOPT(x, CURLOPT_TCP_KEEPALIVE, 1L);
        S3_SETOPT(x, CURLOPT_BUFFERSIZE, (long)S3_RECV_BUFFER);
        if (c->low_speed_limit > 0 && c->low_speed_time_s > 0) {
                S3_SETOPT(x, CURLOPT_LOW_SPEED_LIMIT, c->low_speed_limit);
                S3_SETOPT(x, CURLOPT_LOW_SPEED_TIME, c->low_speed_time_s);
        }
        if (timeout_ms > 0)
                S3_SETOPT(x, CURLOPT_TIMEOUT_MS, (long)(timeout_ms + S3_CURL_TIMEOUT_GRACE_MS));
        if (x->op == S3_OP_HEAD)
                S3_SETOPT(x, CURLOPT_NOBODY, 1L);
        if (x->op == S3_OP_PUT || x->op == S3_OP_CREATE_BUCKET) {
                S3_SETOPT(x, CURLOPT_UPLOAD, 1L);
                S3_SETOPT(x, CURLOPT_READFUNCTION, s3_xfer_on_read);
                S3_SETOPT(x, CURLOPT_READDATA, (void *)x);
                S3_SETOPT(x, CURLOPT_INFILESIZE_LARGE, (curl_off_t)x->up_len);
        }
        return 0;
}

static int s3_xfer_timeout(struct s3_xfer *x, const char *why, int64_t ms)
{
        char target[512];

        s3_xfer_target(x, target, sizeof(target));
        return err_set(-ETIMEDOUT, "failed to %s %s: %s %lld ms; transient, retry later", x->verb,
                       target, why, (long long)ms);
}

static int s3_xfer_stalled(struct s3_xfer *x, const struct s3_limits *lim, int64_t ms)
{
        char target[512];

        s3_xfer_target(x, target, sizeof(target));
        return err_set(-ETIMEDOUT,
                       "failed to %s %s: the transfer stalled, no data for %lld ms (%s is %lld ms)"
                       " after %llu bytes of this request; transient, retry later",
                       x->verb, target, (long long)ms,
                       lim->stall_setting ? lim->stall_setting : "the stall timeout",
                       (long long)lim->stall_timeout_ms, (unsigned long long)x->received);
}

static int s3_xfer_start(struct s3_client *c, struct s3_xfer *x, const struct s3_limits *lim)
{
        int64_t now = util_now_monotonic_ms();
        int64_t timeout_ms = 0;
        int r;

        if (lim && lim->deadline_ms > 0) {
                timeout_ms = lim->deadline_ms - now;
                if (timeout_ms <= 0)
                        return s3_xfer_timeout(
                                x, "the time limit for the call ran out before the request, by",
                                -timeout_ms);
        }
        x->easy = curl_easy_init();
        if (!x->easy)
                return err_set(-ENOMEM, "failed to create a curl handle");
        r = s3_xfer_build_headers(c, x);
        if (r < 0)
                return r;
        r = s3_xfer_setopts(c, x, timeout_ms);
        if (r < 0)
                return r;
        x->last_progress_ms = now;
        if (curl_multi_add_handle(c->multi, x->easy) != CURLM_OK)
                return err_set(-ENOMEM, "failed to add a transfer to the curl multi handle");
        x->active = true;
        return 0;
}

/* Turn a finished transfer into 0 or a negative errno with its message. */
static int s3_xfer_finish(struct s3_xfer *x, CURLcode cc)
{
        struct s3_error e = {0};
        char target[512];

        if (x->cb_r < 0)
                return x->cb_r;
        if (cc != CURLE_OK)
                return s3_xfer_fail_curl(x, cc);
        if (x->status < 200 || x->status >= 300) {
                if (s3_client_parse_error(x->err_body, x->err_len, &e) == 0)
                        memcpy(x->err_code, e.code, sizeof(x->err_code));
                if (!e.request_id[0])
                        memcpy(e.request_id, x->request_id, sizeof(e.request_id));
                return s3_xfer_fail_http(x, &e);
        }
        s3_xfer_target(x, target, sizeof(target));
        if (x->op == S3_OP_HEAD && !x->have_length)
                return err_set(-EPROTO, "failed to %s %s: the answer has no Content-Length",
                               x->verb, target);
        if (x->op == S3_OP_GET && x->have_length && x->received != x->content_length)
                return err_set(
                        -EPIPE,
                        "failed to %s %s: the body ended after %llu of %llu bytes; transient, retry later",
                        x->verb, target, (unsigned long long)x->received,
                        (unsigned long long)x->content_length);
        if (x->op == S3_OP_GET && x->ranged && x->received > 0 && x->status != 206)
                return s3_xfer_check_range(x);
        return 0;
}

static void s3_xfer_info(const struct s3_xfer *x, struct s3_object_info *ret)
{
        *ret = (struct s3_object_info){.last_modified_s = -1};
        ret->size = x->status == 206 && x->range_total_known ? x->range_total : x->content_length;
        memcpy(ret->etag, x->etag, sizeof(ret->etag));
        memcpy(ret->last_modified, x->last_modified, sizeof(ret->last_modified));
        if (x->last_modified[0]) {
                time_t t = curl_getdate(x->last_modified, NULL);

                ret->last_modified_s = t >= 0 ? (int64_t)t : -1;
        }
}

/* Remember the first failure's message: later ones (and cancellations) must not replace it. */
static void s3_note_failure(int r, int *first_r, char *first_msg)
{
        if (*first_r < 0)
                return;
        *first_r = r;
        (void)snprintf(first_msg, ERR_MSG_MAX, "%s", err_text(r));
}

/* Stall and deadline checks for every transfer in flight. */
static void s3_client_check_timers(struct s3_client *c, struct s3_xfer *xs, size_t n,
                                   const struct s3_limits *lim, s3_client_done_fn done_cb,
                                   void *userdata, size_t *active, int *first_r, char *first_msg)
{
        int64_t now = util_now_monotonic_ms();

        for (size_t i = 0; lim && i < n; i++) {
                struct s3_xfer *x = &xs[i];
                int r = 0;

                if (!x->active)
                        continue;
                if (lim->deadline_ms > 0 && now >= lim->deadline_ms)
                        r = s3_xfer_timeout(x, "the time limit for the call ran out, by",
                                            now - lim->deadline_ms);
                else if (lim->stall_timeout_ms > 0 &&
                         now - x->last_progress_ms >= lim->stall_timeout_ms)
                        r = s3_xfer_stalled(x, lim, now - x->last_progress_ms);
                if (r == 0)
                        continue;
                s3_xfer_stop(c, x);
                (*active)--;
                s3_note_failure(r, first_r, first_msg);
                if (done_cb)
                        done_cb(i, r, userdata);
        }
}

/* Collect the transfers curl reports as finished. */
static void s3_client_reap(struct s3_client *c, struct s3_xfer *xs, s3_client_done_fn done_cb,
                           void *userdata, size_t *active, int *first_r, char *first_msg)
{
        CURLMsg *msg;
        int left;

        while ((msg = curl_multi_info_read(c->multi, &left)) != NULL) {
                struct s3_xfer *x = NULL;
                char *priv = NULL;

                if (msg->msg != CURLMSG_DONE)
                        continue;
                (void)curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, &priv);
                x = (struct s3_xfer *)(void *)priv;
                int r = s3_xfer_finish(x, msg->data.result);

                s3_xfer_stop(c, x);
                (*active)--;
                if (r < 0)
                        s3_note_failure(r, first_r, first_msg);
                if (done_cb)
                        done_cb((size_t)(x - xs), r, userdata);
        }
}

/* Run @n transfers, at most @max_parallel at once; see s3_client_get_many(). */
static int s3_client_run(struct s3_client *c, struct s3_xfer *xs, size_t n, unsigned max_parallel,
                         const struct s3_limits *lim, s3_client_done_fn done_cb, void *userdata)
{
        char first_msg[ERR_MSG_MAX] = "";
        size_t next = 0, active = 0;
        int first_r = 0;
        int running, r;

        if (max_parallel == 0)
                max_parallel = 1;
        for (;;) {
                while (first_r == 0 && next < n && active < max_parallel) {
                        r = s3_xfer_start(c, &xs[next], lim);
                        if (r < 0) {
                                s3_xfer_stop(c, &xs[next]);
                                s3_note_failure(r, &first_r, first_msg);
                                if (done_cb)
                                        done_cb(next, r, userdata);
                        } else {
                                active++;
                        }
                        next++;
                }
                if (active == 0 && (first_r < 0 || next == n))
                        break;
                if (curl_multi_perform(c->multi, &running) != CURLM_OK) {
                        s3_note_failure(
                                err_set(-EIO, "failed to drive S3 transfers: curl multi error"),
                                &first_r, first_msg);
                        break;
                }
                s3_client_reap(c, xs, done_cb, userdata, &active, &first_r, first_msg);
                s3_client_check_timers(c, xs, next, lim, done_cb, userdata, &active, &first_r,
                                       first_msg);
                /* The call's result is decided: waiting for the others would only cost time. */
                if (first_r < 0)
                        break;
                if (active == 0)
                        continue;
                (void)curl_multi_poll(c->multi, NULL, 0, S3_POLL_MS, NULL);
        }
        /* After a failure, whatever is still in flight is cancelled, without a done_cb. */
        for (size_t i = 0; i < next; i++)
                s3_xfer_stop(c, &xs[i]);
        if (first_r < 0)
                return err_set(first_r, "%s", first_msg);
        return 0;
}

/* ---- Public operations ---------------------------------------------------------------------- */

static int s3_discard(const void *data, size_t len, void *userdata)
{
        (void)data;
        (void)len;
        (void)userdata;
        return 0;
}

/*
 * HEAD answers errors without a body. Ask again with a one-byte GET to learn the S3 code;
 * returns the probe's error if it has one, else @r unchanged (message restored).
 */
static int s3_client_probe_error(struct s3_client *c, const char *bucket, const char *key,
                                 const struct s3_limits *lim, int r)
{
        char saved[ERR_MSG_MAX];
        struct s3_xfer probe;
        int pr;

        (void)snprintf(saved, sizeof(saved), "%s", err_text(r));
        s3_xfer_init(&probe, S3_OP_GET, "look up", bucket, key);
        probe.ranged = true;
        probe.length = 1;
        probe.write_cb = s3_discard;
        pr = s3_xfer_prepare(c, &probe);
        if (pr >= 0)
                pr = s3_client_run(c, &probe, 1, 1, lim, NULL, NULL);
        if (pr < 0 && probe.err_code[0] && strcmp(probe.err_code, "InvalidRange") != 0) {
                s3_xfer_done(c, &probe);
                return pr;
        }
        s3_xfer_done(c, &probe);
        return err_set(r, "%s", saved);
}

int s3_client_head(struct s3_client *c, const char *bucket, const char *key,
                   const struct s3_limits *limits, struct s3_object_info *ret_info)
{
        struct s3_xfer x;
        int r;

        s3_xfer_init(&x, S3_OP_HEAD, "look up", bucket, key);
        r = s3_xfer_prepare(c, &x);
        if (r >= 0)
                r = s3_client_run(c, &x, 1, 1, limits, NULL, NULL);
        if (r < 0 && x.status >= 400 && x.status < 500 && !x.err_code[0])
                r = s3_client_probe_error(c, bucket, key, limits, r);
        if (r >= 0)
                s3_xfer_info(&x, ret_info);
        s3_xfer_done(c, &x);
        return r;
}

static void s3_xfer_from_get(struct s3_xfer *x, const struct s3_get *g)
{
        s3_xfer_init(x, S3_OP_GET, "download", g->bucket, g->key);
        x->ranged = g->offset > 0 || g->length > 0;
        x->offset = g->offset;
        x->length = g->length;
        x->if_match = g->if_match;
        x->write_cb = g->write_cb;
        x->userdata = g->userdata;
}

int s3_client_get(struct s3_client *c, const struct s3_get *get, const struct s3_limits *limits,
                  struct s3_object_info *ret_info)
{
        struct s3_xfer x;
        int r;

        s3_xfer_from_get(&x, get);
        r = s3_xfer_prepare(c, &x);
        if (r >= 0)
                r = s3_client_run(c, &x, 1, 1, limits, NULL, NULL);
        if (r >= 0 && ret_info)
                s3_xfer_info(&x, ret_info);
        s3_xfer_done(c, &x);
        return r;
}

int s3_client_get_many(struct s3_client *c, const struct s3_get *gets, size_t n,
                       unsigned max_parallel, const struct s3_limits *limits,
                       s3_client_done_fn done_cb, void *userdata)
{
        struct s3_xfer *xs = calloc(n ? n : 1, sizeof(*xs));
        int r = 0;

        if (!xs)
                return -ENOMEM;
        for (size_t i = 0; i < n; i++)
                s3_xfer_from_get(&xs[i], &gets[i]);
        for (size_t i = 0; i < n && r >= 0; i++)
                r = s3_xfer_prepare(c, &xs[i]);
        if (r >= 0)
                r = s3_client_run(c, xs, n, max_parallel, limits, done_cb, userdata);
        for (size_t i = 0; i < n; i++)
                s3_xfer_done(c, &xs[i]);
        free(xs);
        return r;
}

int s3_client_put(struct s3_client *c, const char *bucket, const char *key, const void *data,
                  size_t len, const struct s3_limits *limits)
{
        struct s3_xfer x;
        int r;

        s3_xfer_init(&x, S3_OP_PUT, "upload", bucket, key);
        x.up_data = data;
        x.up_len = len;
        r = sigv4_sha256_hex(data, len, x.payload_hash);
        if (r >= 0)
                r = s3_xfer_prepare(c, &x);
        if (r >= 0)
                r = s3_client_run(c, &x, 1, 1, limits, NULL, NULL);
        s3_xfer_done(c, &x);
        return r;
}

int s3_client_put_file(struct s3_client *c, const char *bucket, const char *key, const char *path,
                       const struct s3_limits *limits)
{
        struct s3_xfer x;
        struct stat st;
        int fd, r;

        fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0)
                return err_set(-errno, "failed to open '%s': %s", path, strerror(errno));
        if (fstat(fd, &st) < 0) {
                r = err_set(-errno, "failed to stat '%s': %s", path, strerror(errno));
                (void)close(fd);
                return r;
        }
        s3_xfer_init(&x, S3_OP_PUT, "upload", bucket, key);
        x.up_fd = fd;
        x.up_len = (uint64_t)st.st_size;
        memcpy(x.payload_hash, SIGV4_UNSIGNED_PAYLOAD, sizeof(SIGV4_UNSIGNED_PAYLOAD));
        r = s3_xfer_prepare(c, &x);
        if (r >= 0)
                r = s3_client_run(c, &x, 1, 1, limits, NULL, NULL);
        s3_xfer_done(c, &x);
        (void)close(fd);
        return r;
}

int s3_client_create_bucket(struct s3_client *c, const char *bucket, const struct s3_limits *limits)
{
        struct s3_xfer x;
        char *body = NULL;
        int r;

        /* us-east-1 is the default location; elsewhere the region must be named. */
        if (strcmp(c->region, "us-east-1") != 0) {
                body = s3_strdupf(
                        "<CreateBucketConfiguration xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\"><LocationConstraint>%s</LocationConstraint></CreateBucketConfiguration>",
                        c->region);
                if (!body)
                        return -ENOMEM;
        }
        s3_xfer_init(&x, S3_OP_CREATE_BUCKET, "create", bucket, NULL);
        x.up_data = (const unsigned char *)(body ? body : "");
        x.up_len = body ? strlen(body) : 0;
        r = sigv4_sha256_hex(x.up_data, (size_t)x.up_len, x.payload_hash);
        if (r >= 0)
                r = s3_xfer_prepare(c, &x);
        if (r >= 0)
                r = s3_client_run(c, &x, 1, 1, limits, NULL, NULL);
        if (r < 0 && strcmp(x.err_code, "BucketAlreadyOwnedByYou") == 0) {
                err_clear();
                r = 0;
        }
        s3_xfer_done(c, &x);
        free(body);
        return r;
}
