#include "stages/s3_sigv4.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>

#include "common/err.h"
#include "common/util.h"

/*
 * The four steps of SigV4, each a small function over a growable string:
 *
 *   canonical request = method \n canonical URI \n canonical query \n canonical headers \n
 *                       signed headers \n payload hash
 *   string to sign    = "AWS4-HMAC-SHA256" \n date \n scope \n hex(sha256(canonical request))
 *   signing key       = HMAC chain over "AWS4"+secret, date, region, service, "aws4_request"
 *   signature         = hex(HMAC(signing key, string to sign))
 *
 * Path handling is the only place where S3 differs from the generic rules: S3 keys are
 * opaque, so "/a/./b" and "//" are signed as sent and the wire path is not encoded again.
 * The two flags SIGV4_NORMALIZE_PATH and SIGV4_DOUBLE_ENCODE select the generic behaviour.
 */

#define SIGV4_ALGORITHM "AWS4-HMAC-SHA256"

/* A growable string with a sticky out-of-memory flag, so appends need no individual checks. */
struct sigv4_buf {
        char *p;
        size_t len;
        size_t cap;
        bool oom;
};

static void sigv4_buf_append_n(struct sigv4_buf *b, const char *s, size_t n)
{
        if (b->oom)
                return;
        if (b->len + n + 1 > b->cap) {
                size_t cap = b->cap ? b->cap : 256;

                while (cap < b->len + n + 1)
                        cap *= 2;
                char *p = realloc(b->p, cap);

                if (!p) {
                        b->oom = true;
                        return;
                }
                b->p = p;
                b->cap = cap;
        }
        memcpy(b->p + b->len, s, n);
        b->len += n;
        b->p[b->len] = '\0';
}

static void sigv4_buf_append(struct sigv4_buf *b, const char *s)
{
        sigv4_buf_append_n(b, s, strlen(s));
}

static void sigv4_buf_append_char(struct sigv4_buf *b, char c)
{
        sigv4_buf_append_n(b, &c, 1);
}

/* Hand the string over to the caller (an empty string if nothing was appended). */
static char *sigv4_buf_steal(struct sigv4_buf *b)
{
        if (b->oom)
                return NULL;
        if (!b->p)
                sigv4_buf_append_n(b, "", 0);
        b->len = 0;
        b->cap = 0;
        return steal_ptr(b->p);
}

static void sigv4_buf_done(struct sigv4_buf *b)
{
        free(b->p);
        *b = (struct sigv4_buf){0};
}

static bool sigv4_is_unreserved(unsigned char c)
{
        return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
               c == '-' || c == '_' || c == '.' || c == '~';
}

static void sigv4_encode_into(struct sigv4_buf *b, const char *s, size_t n, bool keep_slash)
{
        static const char hex[] = "0123456789ABCDEF";

        for (size_t i = 0; i < n; i++) {
                unsigned char c = (unsigned char)s[i];

                if (sigv4_is_unreserved(c) || (keep_slash && c == '/')) {
                        sigv4_buf_append_char(b, (char)c);
                } else {
                        char esc[3] = {'%', hex[c >> 4], hex[c & 0xf]};

                        sigv4_buf_append_n(b, esc, sizeof(esc));
                }
        }
}

int sigv4_uri_encode(const char *in, bool keep_slash, char **ret)
{
        struct sigv4_buf b = {0};

        sigv4_encode_into(&b, in, strlen(in), keep_slash);
        char *s = sigv4_buf_steal(&b);

        sigv4_buf_done(&b);
        if (!s)
                return -ENOMEM;
        *ret = s;
        return 0;
}

static int sigv4_hex_value(char c)
{
        if (c >= '0' && c <= '9')
                return c - '0';
        if (c >= 'a' && c <= 'f')
                return c - 'a' + 10;
        if (c >= 'A' && c <= 'F')
                return c - 'A' + 10;
        return -1;
}

/* Decode %XX escapes of @n bytes into @b ('+' stays a plus: SigV4 queries are not forms). */
static int sigv4_decode_into(struct sigv4_buf *b, const char *s, size_t n)
{
        for (size_t i = 0; i < n; i++) {
                if (s[i] != '%') {
                        sigv4_buf_append_char(b, s[i]);
                        continue;
                }
                if (i + 2 >= n)
                        return err_set(-EINVAL,
                                       "failed to sign request: truncated percent escape in query");
                int hi = sigv4_hex_value(s[i + 1]);
                int lo = sigv4_hex_value(s[i + 2]);

                if (hi < 0 || lo < 0)
                        return err_set(-EINVAL,
                                       "failed to sign request: bad percent escape in query");
                sigv4_buf_append_char(b, (char)(hi << 4 | lo));
                i += 2;
        }
        return 0;
}

/* One query parameter, decoded and then encoded again the canonical way. */
struct sigv4_param {
        char *name;
        char *value;
};

static int sigv4_param_cmp(const void *a, const void *b)
{
        const struct sigv4_param *x = a, *y = b;
        int c = strcmp(x->name, y->name);

        return c != 0 ? c : strcmp(x->value, y->value);
}

/* Decode then canonically encode @n bytes of a query name or value. */
static int sigv4_canonical_component(const char *s, size_t n, char **ret)
{
        struct sigv4_buf raw = {0};
        int r;

        r = sigv4_decode_into(&raw, s, n);
        if (r < 0) {
                sigv4_buf_done(&raw);
                return r;
        }
        sigv4_buf_append_n(&raw, "", 0);
        r = raw.oom ? -ENOMEM : sigv4_uri_encode(raw.p, false, ret);
        sigv4_buf_done(&raw);
        return r;
}

static void sigv4_params_free(struct sigv4_param *params, size_t n)
{
        for (size_t i = 0; i < n; i++) {
                free(params[i].name);
                free(params[i].value);
        }
        free(params);
}

/* Parse "a=1&b&c=%41" into decoded-and-re-encoded pairs. */
static int sigv4_parse_query(const char *query, struct sigv4_param **ret_params, size_t *ret_n)
{
        struct sigv4_param *params = NULL;
        size_t n = 0, cap = 0;
        int r = 0;

        for (const char *p = query; *p;) {
                size_t len = strcspn(p, "&");
                const char *eq = memchr(p, '=', len);
                size_t name_len = eq ? (size_t)(eq - p) : len;

                if (len == 0) {
                        p++;
                        continue;
                }
                if (n == cap) {
                        cap = cap ? cap * 2 : 8;
                        struct sigv4_param *np = realloc(params, cap * sizeof(*np));

                        if (!np) {
                                r = -ENOMEM;
                                goto out;
                        }
                        params = np;
                }
                params[n] = (struct sigv4_param){0};
                n++;
                r = sigv4_canonical_component(p, name_len, &params[n - 1].name);
                if (r < 0)
                        goto out;
                r = eq ? sigv4_canonical_component(eq + 1, len - name_len - 1, &params[n - 1].value)
                       : sigv4_canonical_component("", 0, &params[n - 1].value);
                if (r < 0)
                        goto out;
                p += len;
                if (*p == '&')
                        p++;
        }
        *ret_params = steal_ptr(params);
        *ret_n = n;
        n = 0;
out:
        sigv4_params_free(params, n);
        return r;
}

static int sigv4_append_canonical_query(struct sigv4_buf *b, const char *query)
{
        struct sigv4_param *params = NULL;
        size_t n = 0;
        int r;

        if (!query || !*query)
                return 0;
        r = sigv4_parse_query(query, &params, &n);
        if (r < 0)
                return r;
        qsort(params, n, sizeof(*params), sigv4_param_cmp);
        for (size_t i = 0; i < n; i++) {
                if (i > 0)
                        sigv4_buf_append_char(b, '&');
                sigv4_buf_append(b, params[i].name);
                sigv4_buf_append_char(b, '=');
                sigv4_buf_append(b, params[i].value);
        }
        sigv4_params_free(params, n);
        return 0;
}

/*
 * RFC 3986 dot-segment removal plus collapsing of empty segments: "//a/./b/../c/" -> "/a/c/".
 * A trailing "/", "/." or "/.." leaves a trailing slash, as in the RFC.
 */
static void sigv4_normalize_path(struct sigv4_buf *out, const char *path)
{
        size_t *starts = NULL; /* where each output segment's '/' begins, for "..". */
        size_t depth = 0, cap = 0;
        const char *last = strrchr(path, '/') + 1;
        bool trailing = strcmp(last, "") == 0 || strcmp(last, ".") == 0 || strcmp(last, "..") == 0;

        sigv4_buf_append_n(out, "", 0);
        for (const char *p = path; *p;) {
                while (*p == '/')
                        p++;
                size_t len = strcspn(p, "/");

                if (len == 0 || (len == 1 && p[0] == '.')) {
                        p += len;
                        continue;
                }
                if (len == 2 && p[0] == '.' && p[1] == '.') {
                        if (depth > 0) {
                                depth--;
                                out->len = starts[depth];
                                if (!out->oom)
                                        out->p[out->len] = '\0';
                        }
                        p += len;
                        continue;
                }
                if (depth == cap) {
                        cap = cap ? cap * 2 : 16;
                        size_t *ns = realloc(starts, cap * sizeof(*ns));

                        if (!ns) {
                                out->oom = true;
                                break;
                        }
                        starts = ns;
                }
                starts[depth++] = out->len;
                sigv4_buf_append_char(out, '/');
                sigv4_buf_append_n(out, p, len);
                p += len;
        }
        if (depth == 0 || trailing)
                sigv4_buf_append_char(out, '/');
        free(starts);
}

static int sigv4_append_canonical_uri(struct sigv4_buf *b, const char *path, unsigned flags)
{
        struct sigv4_buf normalized = {0};
        const char *p = path;

        if (path[0] != '/')
                return err_set(-EINVAL, "failed to sign request: path '%s' does not start with '/'",
                               path);
        if (flags & SIGV4_NORMALIZE_PATH) {
                sigv4_normalize_path(&normalized, path);
                if (normalized.oom) {
                        sigv4_buf_done(&normalized);
                        return -ENOMEM;
                }
                p = normalized.p;
        }
        if (flags & SIGV4_DOUBLE_ENCODE) {
                sigv4_encode_into(b, p, strlen(p), true);
        } else {
                for (const char *c = p; *c; c++) {
                        if ((unsigned char)*c <= 0x20 || (unsigned char)*c >= 0x7f) {
                                sigv4_buf_done(&normalized);
                                return err_set(
                                        -EINVAL,
                                        "failed to sign request: path has a byte that must be percent-encoded");
                        }
                }
                sigv4_buf_append(b, p);
        }
        sigv4_buf_done(&normalized);
        return 0;
}

/* A header about to be signed: lower-case name, trimmed value, position for stable sort. */
struct sigv4_hdr {
        char *name;
        char *value;
        size_t index;
};

static int sigv4_hdr_cmp(const void *a, const void *b)
{
        const struct sigv4_hdr *x = a, *y = b;
        int c = strcmp(x->name, y->name);

        if (c != 0)
                return c;
        return x->index < y->index ? -1 : x->index > y->index;
}

static bool sigv4_is_token_char(unsigned char c)
{
        return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
               (c != '\0' && strchr("!#$%&'*+-.^_`|~", c) != NULL);
}

static bool sigv4_is_space(char c)
{
        return c == ' ' || c == '\t';
}

/* Lower-case and check a header name. Returns a new string, NULL on bad input or no memory. */
static int sigv4_header_name(const char *name, char **ret)
{
        size_t n = strlen(name);

        if (n == 0)
                return err_set(-EINVAL, "failed to sign request: empty header name");
        for (size_t i = 0; i < n; i++) {
                if (!sigv4_is_token_char((unsigned char)name[i]))
                        return err_set(-EINVAL, "failed to sign request: bad header name");
        }
        char *s = strdup(name);

        if (!s)
                return -ENOMEM;
        for (size_t i = 0; i < n; i++) {
                if (s[i] >= 'A' && s[i] <= 'Z')
                        s[i] = (char)(s[i] - 'A' + 'a');
        }
        *ret = s;
        return 0;
}

/* Trim and collapse runs of spaces and tabs into one space. */
static int sigv4_header_value(const char *value, char **ret)
{
        struct sigv4_buf b = {0};

        for (const char *p = value; *p; p++) {
                if (*p == '\r' || *p == '\n')
                        return err_set(
                                -EINVAL,
                                "failed to sign request: header value contains a line break");
        }
        while (sigv4_is_space(*value))
                value++;
        sigv4_buf_append_n(&b, "", 0);
        for (const char *p = value; *p;) {
                if (sigv4_is_space(*p)) {
                        while (sigv4_is_space(*p))
                                p++;
                        if (*p)
                                sigv4_buf_append_char(&b, ' ');
                        continue;
                }
                sigv4_buf_append_char(&b, *p++);
        }
        char *s = sigv4_buf_steal(&b);

        sigv4_buf_done(&b);
        if (!s)
                return -ENOMEM;
        *ret = s;
        return 0;
}

static bool sigv4_is_reserved_header(const char *lname)
{
        return strcmp(lname, "authorization") == 0 || strcmp(lname, "x-amz-date") == 0 ||
               strcmp(lname, "x-amz-content-sha256") == 0 ||
               strcmp(lname, "x-amz-security-token") == 0;
}

static void sigv4_hdrs_free(struct sigv4_hdr *hdrs, size_t n)
{
        for (size_t i = 0; i < n; i++) {
                free(hdrs[i].name);
                free(hdrs[i].value);
        }
        free(hdrs);
}

static int sigv4_hdr_add(struct sigv4_hdr *hdrs, size_t *n, const char *name, const char *value)
{
        struct sigv4_hdr *h = &hdrs[*n];
        int r;

        *h = (struct sigv4_hdr){.index = *n};
        (*n)++;
        r = sigv4_header_name(name, &h->name);
        if (r < 0)
                return r;
        return sigv4_header_value(value, &h->value);
}

/*
 * Collect the caller's headers plus the ones the signer adds, sorted by name. Repeated names
 * stay in their original order, to be joined with ',' when printed.
 */
static int sigv4_collect_headers(const struct sigv4_signer *signer, const struct sigv4_request *req,
                                 const char *amz_date, const char *payload_hash,
                                 struct sigv4_hdr **ret_hdrs, size_t *ret_n)
{
        struct sigv4_hdr *hdrs = calloc(req->n_headers + 3, sizeof(*hdrs));
        bool token = signer->session_token && signer->session_token[0] &&
                     !(signer->flags & SIGV4_UNSIGNED_SESSION_TOKEN);
        size_t n = 0;
        int r = 0;

        if (!hdrs)
                return -ENOMEM;
        for (size_t i = 0; i < req->n_headers; i++) {
                r = sigv4_hdr_add(hdrs, &n, req->headers[i].name, req->headers[i].value);
                if (r < 0)
                        goto out;
                if (sigv4_is_reserved_header(hdrs[n - 1].name)) {
                        r = err_set(-EINVAL,
                                    "failed to sign request: header '%s' is set by the signer",
                                    hdrs[n - 1].name);
                        goto out;
                }
        }
        r = sigv4_hdr_add(hdrs, &n, "x-amz-date", amz_date);
        if (r >= 0 && (signer->flags & SIGV4_CONTENT_SHA256_HEADER))
                r = sigv4_hdr_add(hdrs, &n, "x-amz-content-sha256", payload_hash);
        if (r >= 0 && token)
                r = sigv4_hdr_add(hdrs, &n, "x-amz-security-token", signer->session_token);
        if (r < 0)
                goto out;
        qsort(hdrs, n, sizeof(*hdrs), sigv4_hdr_cmp);
        *ret_hdrs = steal_ptr(hdrs);
        *ret_n = n;
        n = 0;
out:
        sigv4_hdrs_free(hdrs, n);
        return r;
}

/* "name:v1,v2\n" for each distinct name, then the signed header list into @signed_list. */
static void sigv4_append_headers(struct sigv4_buf *b, struct sigv4_buf *signed_list,
                                 const struct sigv4_hdr *hdrs, size_t n)
{
        for (size_t i = 0; i < n; i++) {
                bool first = i == 0 || strcmp(hdrs[i - 1].name, hdrs[i].name) != 0;
                bool last = i + 1 == n || strcmp(hdrs[i + 1].name, hdrs[i].name) != 0;

                if (first) {
                        if (signed_list->len > 0)
                                sigv4_buf_append_char(signed_list, ';');
                        sigv4_buf_append(signed_list, hdrs[i].name);
                        sigv4_buf_append(b, hdrs[i].name);
                        sigv4_buf_append_char(b, ':');
                } else {
                        sigv4_buf_append_char(b, ',');
                }
                sigv4_buf_append(b, hdrs[i].value);
                if (last)
                        sigv4_buf_append_char(b, '\n');
        }
}

int sigv4_sha256_hex(const void *data, size_t len, char *ret_hex)
{
        unsigned char md[EVP_MAX_MD_SIZE];
        unsigned int md_len = 0;

        if (EVP_Digest(data, len, md, &md_len, EVP_sha256(), NULL) != 1)
                return err_set(-ENOMEM, "failed to compute SHA-256: OpenSSL error");
        util_hex_encode(md, md_len, ret_hex);
        return 0;
}

static int sigv4_hmac(const void *key, size_t key_len, const char *msg, unsigned char *out)
{
        unsigned int out_len = 0;

        FIM_ASSERT(key_len <= (size_t)INT32_MAX);
        if (!HMAC(EVP_sha256(), key, (int)key_len, (const unsigned char *)msg, strlen(msg), out,
                  &out_len))
                return err_set(-ENOMEM, "failed to compute HMAC-SHA256: OpenSSL error");
        FIM_ASSERT(out_len == 32);
        return 0;
}

/* signature = HMAC(HMAC(HMAC(HMAC(HMAC("AWS4"+secret, date), region), service), "aws4_request"),
 * sts) */
static int sigv4_signature(const struct sigv4_signer *signer, const char *date,
                           const char *string_to_sign, char *ret_hex)
{
        unsigned char k[32], sig[32];
        char *seed = NULL;
        size_t seed_len = strlen(signer->secret_access_key) + 4;
        int r;

        seed = malloc(seed_len + 1);
        if (!seed)
                return -ENOMEM;
        memcpy(seed, "AWS4", 4);
        memcpy(seed + 4, signer->secret_access_key, seed_len - 4 + 1);
        r = sigv4_hmac(seed, seed_len, date, k);
        if (r >= 0)
                r = sigv4_hmac(k, sizeof(k), signer->region, k);
        if (r >= 0)
                r = sigv4_hmac(k, sizeof(k), signer->service, k);
        if (r >= 0)
                r = sigv4_hmac(k, sizeof(k), "aws4_request", k);
        if (r >= 0)
                r = sigv4_hmac(k, sizeof(k), string_to_sign, sig);
        if (r >= 0)
                util_hex_encode(sig, sizeof(sig), ret_hex);
        OPENSSL_cleanse(seed, seed_len);
        OPENSSL_cleanse(k, sizeof(k));
        free(seed);
        return r;
}

static char *sigv4_strjoin(const char *a, const char *b)
{
        size_t la = strlen(a), lb = strlen(b);
        char *s = malloc(la + lb + 1);

        if (!s)
                return NULL;
        memcpy(s, a, la);
        memcpy(s + la, b, lb + 1);
        return s;
}

static int sigv4_build_canonical(const struct sigv4_signer *signer, const struct sigv4_request *req,
                                 const char *amz_date, const char *payload_hash,
                                 struct sigv4_buf *ret_canonical, struct sigv4_buf *ret_signed_list)
{
        struct sigv4_hdr *hdrs = NULL;
        size_t n_hdrs = 0;
        int r;

        sigv4_buf_append(ret_canonical, req->method);
        sigv4_buf_append_char(ret_canonical, '\n');
        r = sigv4_append_canonical_uri(ret_canonical, req->path, signer->flags);
        if (r < 0)
                return r;
        sigv4_buf_append_char(ret_canonical, '\n');
        r = sigv4_append_canonical_query(ret_canonical, req->query);
        if (r < 0)
                return r;
        sigv4_buf_append_char(ret_canonical, '\n');
        r = sigv4_collect_headers(signer, req, amz_date, payload_hash, &hdrs, &n_hdrs);
        if (r < 0)
                return r;
        sigv4_append_headers(ret_canonical, ret_signed_list, hdrs, n_hdrs);
        sigv4_hdrs_free(hdrs, n_hdrs);
        sigv4_buf_append_char(ret_canonical, '\n');
        sigv4_buf_append(ret_canonical, ret_signed_list->p ? ret_signed_list->p : "");
        sigv4_buf_append_char(ret_canonical, '\n');
        sigv4_buf_append(ret_canonical, payload_hash);
        if (ret_canonical->oom || ret_signed_list->oom)
                return -ENOMEM;
        return 0;
}

/* Fill the "Name: value" lines the caller must add to the request. */
static int sigv4_add_headers(const struct sigv4_signer *signer, const char *payload_hash,
                             const char *authorization, struct sigv4_signed *s)
{
        const char *token = signer->session_token;
        const char *lines[SIGV4_ADD_HEADERS_MAX][2];
        size_t n = 0;

        lines[n][0] = "X-Amz-Date: ";
        lines[n++][1] = s->amz_date;
        if (signer->flags & SIGV4_CONTENT_SHA256_HEADER) {
                lines[n][0] = "x-amz-content-sha256: ";
                lines[n++][1] = payload_hash;
        }
        if (token && token[0]) {
                lines[n][0] = "X-Amz-Security-Token: ";
                lines[n++][1] = token;
        }
        lines[n][0] = "Authorization: ";
        lines[n++][1] = authorization;
        for (size_t i = 0; i < n; i++) {
                s->add_headers[i] = sigv4_strjoin(lines[i][0], lines[i][1]);
                if (!s->add_headers[i])
                        return -ENOMEM;
                s->n_add_headers = i + 1;
        }
        return 0;
}

/* "20150830/us-east-1/service/aws4_request" */
static void sigv4_append_scope(struct sigv4_buf *b, const struct sigv4_signer *signer,
                               const char *date)
{
        sigv4_buf_append(b, date);
        sigv4_buf_append_char(b, '/');
        sigv4_buf_append(b, signer->region);
        sigv4_buf_append_char(b, '/');
        sigv4_buf_append(b, signer->service);
        sigv4_buf_append(b, "/aws4_request");
}

/* The string to sign: algorithm, time, scope and the hash of the canonical request. */
static int sigv4_append_string_to_sign(struct sigv4_buf *b, const char *amz_date, const char *scope,
                                       const struct sigv4_buf *canonical)
{
        char creq_hash[SIGV4_HEX_LEN + 1];
        int r;

        r = sigv4_sha256_hex(canonical->p, canonical->len, creq_hash);
        if (r < 0)
                return r;
        sigv4_buf_append(b, SIGV4_ALGORITHM "\n");
        sigv4_buf_append(b, amz_date);
        sigv4_buf_append_char(b, '\n');
        sigv4_buf_append(b, scope);
        sigv4_buf_append_char(b, '\n');
        sigv4_buf_append(b, creq_hash);
        return b->oom ? -ENOMEM : 0;
}

static void sigv4_append_authorization(struct sigv4_buf *b, const struct sigv4_signer *signer,
                                       const char *scope, const char *signed_list,
                                       const char *signature)
{
        sigv4_buf_append(b, SIGV4_ALGORITHM " Credential=");
        sigv4_buf_append(b, signer->access_key_id);
        sigv4_buf_append_char(b, '/');
        sigv4_buf_append(b, scope);
        sigv4_buf_append(b, ", SignedHeaders=");
        sigv4_buf_append(b, signed_list);
        sigv4_buf_append(b, ", Signature=");
        sigv4_buf_append(b, signature);
}

int sigv4_sign(const struct sigv4_signer *signer, const struct sigv4_request *req, time_t now,
               struct sigv4_signed *ret)
{
        struct sigv4_signed s = {0};
        struct sigv4_buf canonical = {0}, signed_list = {0}, scope = {0}, sts = {0}, auth = {0};
        const char *payload_hash = req->payload_hash ? req->payload_hash : SIGV4_EMPTY_SHA256;
        char date[sizeof("20150830")];
        struct tm tm;
        int r;

        if (!gmtime_r(&now, &tm) ||
            strftime(s.amz_date, sizeof(s.amz_date), "%Y%m%dT%H%M%SZ", &tm) == 0) {
                r = err_set(-EINVAL, "failed to sign request: time out of range");
                goto out;
        }
        memcpy(date, s.amz_date, 8);
        date[8] = '\0';
        r = sigv4_build_canonical(signer, req, s.amz_date, payload_hash, &canonical, &signed_list);
        if (r < 0)
                goto out;
        sigv4_append_scope(&scope, signer, date);
        r = scope.oom ? -ENOMEM
                      : sigv4_append_string_to_sign(&sts, s.amz_date, scope.p, &canonical);
        if (r < 0)
                goto out;
        r = sigv4_signature(signer, date, sts.p, s.signature);
        if (r < 0)
                goto out;
        sigv4_append_authorization(&auth, signer, scope.p, signed_list.p, s.signature);
        r = auth.oom ? -ENOMEM : sigv4_add_headers(signer, payload_hash, auth.p, &s);
        if (r < 0)
                goto out;
        s.canonical_request = sigv4_buf_steal(&canonical);
        s.string_to_sign = sigv4_buf_steal(&sts);
        *ret = s;
        s = (struct sigv4_signed){0};
out:
        sigv4_signed_done(&s);
        sigv4_buf_done(&canonical);
        sigv4_buf_done(&signed_list);
        sigv4_buf_done(&scope);
        sigv4_buf_done(&sts);
        if (auth.p)
                OPENSSL_cleanse(auth.p, auth.len);
        sigv4_buf_done(&auth);
        return r;
}

void sigv4_signed_done(struct sigv4_signed *s)
{
        free(s->canonical_request);
        free(s->string_to_sign);
        for (size_t i = 0; i < s->n_add_headers; i++) {
                /* The Authorization line is derived from the secret: wipe it. */
                OPENSSL_cleanse(s->add_headers[i], strlen(s->add_headers[i]));
                free(s->add_headers[i]);
        }
        *s = (struct sigv4_signed){0};
}
