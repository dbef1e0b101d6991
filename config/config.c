#include "config/config.h"

#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#include <libpq-fe.h>

#include "common/err.h"
#include "common/log.h"
#include "common/util.h"
#include "stages/request.h"

#define CONFIG_DEFAULT_FILE "/etc/flyio-image-manager/config"

enum config_type {
        CONFIG_STRING,      /* any text, may be empty */
        CONFIG_NONEMPTY,    /* text that must not be empty */
        CONFIG_SECRET,      /* text without control characters, never printed */
        CONFIG_ACCESS_KEY,  /* an S3 access key id: printable, no '/', ',' or spaces */
        CONFIG_DB_URL,      /* libpq conninfo or URI; its password is a secret */
        CONFIG_BUCKET,      /* S3 bucket name rules */
        CONFIG_NAME,        /* identifier: letters, digits, '-', '_', '.'; at most max long */
        CONFIG_DM_NAME,     /* a device-mapper device name */
        CONFIG_ABS_PATH,    /* an absolute path */
        CONFIG_HTTP_URL,    /* empty, or http(s)://host[:port][/prefix] */
        CONFIG_LISTEN_ADDR, /* empty, or [host]:port */
        CONFIG_BROKERS,     /* comma-separated [scheme://]host[:port] */
        CONFIG_REGION,      /* an AWS region name */
        CONFIG_INT,         /* integer within [min, max] */
        CONFIG_SIZE,        /* byte size with optional K/M/G/T suffix, within [min, max] */
        CONFIG_DEVICE_SIZE, /* a CONFIG_SIZE that is also a multiple of 512 */
        CONFIG_BOOL,
        CONFIG_LOG_LEVEL,
};

struct config_key {
        const char *name;
        enum config_type type;
        size_t offset;
        const char *default_value;
        int64_t min; /* CONFIG_INT, CONFIG_SIZE, CONFIG_DEVICE_SIZE: the bounds */
        int64_t max; /* ... and for text types the longest value, 0 meaning no limit */
        const char *help;
};

#define KIB INT64_C(1024)
#define MIB (KIB << 10)
#define GIB (MIB << 10)
#define TIB (GIB << 10)

/*
 * The longest LOCAL_DIR: a file name of up to NAME_MAX bytes must still fit below it within
 * PATH_MAX.
 */
#define CONFIG_LOCAL_DIR_MAX (4096 - 255 - 2)

/* Kafka topic names hold at most 249 characters; the longest suffix is ".download". */
#define CONFIG_TOPIC_PREFIX_MAX (249 - 9)

/* AWS access key ids are at most 128 characters. */
#define CONFIG_ACCESS_KEY_MAX 128

#define STR(field) offsetof(struct config, field)

/* The one table of settings: names, types, defaults, limits. README's table mirrors it. */
static const struct config_key config_keys[] = {
        {"S3_BUCKET", CONFIG_BUCKET, STR(s3_bucket), "flyio-container-images", 0, 0,
         "default bucket for requests without one"},
        {"AWS_REGION", CONFIG_REGION, STR(s3_region), "us-east-1", 0, 63, "S3 region"},
        {"AWS_ACCESS_KEY_ID", CONFIG_ACCESS_KEY, STR(s3_access_key), "", 0, CONFIG_ACCESS_KEY_MAX,
         "S3 access key; empty means anonymous requests"},
        {"AWS_SECRET_ACCESS_KEY", CONFIG_SECRET, STR(s3_secret_key), "", 0, 0, "S3 secret key"},
        {"AWS_SESSION_TOKEN", CONFIG_SECRET, STR(s3_session_token), "", 0, 0,
         "temporary-credential session token"},
        {"S3_ENDPOINT", CONFIG_HTTP_URL, STR(s3_endpoint), "", 0, 2048,
         "S3-compatible endpoint URL; empty means AWS"},
        {"S3_FORCE_PATH_STYLE", CONFIG_BOOL, STR(s3_force_path_style), "false", 0, 0,
         "path-style instead of virtual-host addressing"},
        {"DB_PATH", CONFIG_STRING, STR(db_path), "/var/lib/flyio/images.db", 0, 0,
         "seed SQLite path; unused, state lives in DATABASE_URL"},
        {"FSM_DB_PATH", CONFIG_STRING, STR(fsm_db_path), "/var/lib/flyio/fsm", 0, 0,
         "seed FSM path; unused, state lives in DATABASE_URL"},
        {"DATABASE_URL", CONFIG_DB_URL, STR(database_url), "postgresql:///flyio_images", 0, 0,
         "PostgreSQL conninfo or URI"},
        {"HOST_ID", CONFIG_NAME, STR(host_id), NULL, 0, CONFIG_HOST_ID_MAX,
         "this host's id in shared tables; default the hostname"},
        {"POOL_NAME", CONFIG_DM_NAME, STR(pool_name), "pool", 0, REQUEST_DM_NAME_MAX,
         "devicemapper thin pool name"},
        {"LOCAL_DIR", CONFIG_ABS_PATH, STR(local_dir), "/var/lib/flyio/images", 0,
         CONFIG_LOCAL_DIR_MAX, "directory for downloaded tarballs"},
        /* A request may ask for at most 16 TiB (request_validate_device_size). */
        {"DEVICE_SIZE", CONFIG_DEVICE_SIZE, STR(device_size), "10G", MIB, 16 * TIB,
         "default thin device size"},
        {"POOL_HIGH_WATER_PERCENT", CONFIG_INT, STR(pool_high_water_percent), "90", 1, 100,
         "refuse new unpacks above this pool data or metadata usage"},
        /* Smaller than two tar blocks is no tarball; larger cannot fit the largest device. */
        {"MAX_OBJECT_SIZE", CONFIG_SIZE, STR(max_object_size), "32G", KIB, 16 * TIB,
         "largest tarball the download stage accepts"},
        /*
         * Limits on what one tarball may hold (its file data is bounded by the device size).
         * The defaults are the extractor's (stages/extract.h). The upper bounds cap what one
         * unpack may hold in memory: the extractor remembers every file it creates (16 to 32
         * bytes each, some 256 MiB for 10 million), and libarchive keeps a sparse file's whole
         * map (some 64 bytes an entry, 64 MiB for a million). libarchive refuses names over
         * 1 MiB anyway, and a path of 4096 components is far deeper than any image's.
         */
        {"EXTRACT_MAX_ENTRIES", CONFIG_INT, STR(extract_max_entries), "1000000", 1, 10000000,
         "archive members of any kind one tarball may hold"},
        {"EXTRACT_MAX_DEPTH", CONFIG_INT, STR(extract_max_depth), "64", 1, 4096,
         "path components of a member name or hardlink target"},
        {"EXTRACT_MAX_PATH_LENGTH", CONFIG_INT, STR(extract_max_path_length), "4096", 1, 1048576,
         "bytes in a member name or link target"},
        {"EXTRACT_MAX_SPARSE_ENTRIES", CONFIG_INT, STR(extract_max_sparse_entries), "65536", 1,
         1048576, "entries in one sparse file's map"},
        {"DOWNLOAD_QUEUE_SIZE", CONFIG_INT, STR(download_queue_size), "5", 1, 1024,
         "concurrent downloads per worker"},
        {"UNPACK_QUEUE_SIZE", CONFIG_INT, STR(unpack_queue_size), "2", 1, 1024,
         "concurrent unpacks per worker"},
        {"ACTIVATE_QUEUE_SIZE", CONFIG_INT, STR(activate_queue_size), "4", 1, 1024,
         "concurrent activations per worker"},
        {"DOWNLOAD_TIMEOUT", CONFIG_INT, STR(download_timeout), "300", 1, 604800,
         "seconds one whole download may take"},
        {"UNPACK_TIMEOUT", CONFIG_INT, STR(unpack_timeout), "1800", 1, 604800,
         "seconds one unpack may take"},
        {"DOWNLOAD_STALL_TIMEOUT", CONFIG_INT, STR(download_stall_timeout), "30", 1, 3600,
         "seconds without a byte before a download is retried"},
        /* An object no larger than the smallest part gains nothing from being split. */
        {"DOWNLOAD_PARALLEL_THRESHOLD", CONFIG_SIZE, STR(download_parallel_threshold), "64M",
         5 * MIB, 16 * TIB, "objects above this size download as parallel ranged parts"},
        /*
         * S3's multipart bounds (5 MiB to 5 GiB per part). Ranged GETs do not strictly need
         * them, but a smaller part turns one object into up to 10000 tiny requests.
         */
        {"DOWNLOAD_PART_SIZE", CONFIG_SIZE, STR(download_part_size), "16M", 5 * MIB, 5 * GIB,
         "size of one ranged part"},
        {"DOWNLOAD_CONNECTIONS", CONFIG_INT, STR(download_connections), "4", 1, 64,
         "connections per parallel download"},
        {"KAFKA_BROKERS", CONFIG_BROKERS, STR(kafka_brokers), "127.0.0.1:9092", 0, 0,
         "Kafka bootstrap servers"},
        {"KAFKA_TOPIC_PREFIX", CONFIG_NAME, STR(kafka_topic_prefix), "images", 0,
         CONFIG_TOPIC_PREFIX_MAX, "topics are <prefix>.download, .unpack, .activate, .dlq"},
        {"MAX_ATTEMPTS", CONFIG_INT, STR(max_attempts), "5", 1, 100,
         "tries of a run before it goes to the dead-letter topic"},
        {"RETRY_BASE_MS", CONFIG_INT, STR(retry_base_ms), "1000", 1, 3600000,
         "first retry delay; doubles per attempt, with jitter"},
        {"RETRY_MAX_MS", CONFIG_INT, STR(retry_max_ms), "60000", 1, 86400000,
         "longest retry delay"},
        {"LEASE_SECONDS", CONFIG_INT, STR(lease_seconds), "30", 2, 86400,
         "a run whose worker stops heartbeating this long is taken over"},
        {"SHUTDOWN_TIMEOUT", CONFIG_INT, STR(shutdown_timeout), "60", 0, 86400,
         "seconds in-flight work may take to finish after SIGTERM"},
        {"METRICS_ADDR", CONFIG_LISTEN_ADDR, STR(metrics_addr), "", 0, 0,
         "host:port for /metrics, /healthz, /readyz; empty disables"},
        {"LOG_LEVEL", CONFIG_LOG_LEVEL, STR(log_level), "info", 0, 0,
         "debug, info, notice, warning or err"},
};

_Static_assert(ARRAY_SIZE(config_keys) <= sizeof(((struct config *)0)->sources),
               "struct config.sources is too small for the key table");

static const struct config_key *config_find(const char *name)
{
        for (size_t i = 0; i < ARRAY_SIZE(config_keys); i++) {
                if (strcmp(config_keys[i].name, name) == 0)
                        return &config_keys[i];
        }
        return NULL;
}

static void *config_field(struct config *cfg, const struct config_key *key)
{
        return (char *)cfg + key->offset;
}

static const void *config_field_const(const struct config *cfg, const struct config_key *key)
{
        return (const char *)cfg + key->offset;
}

static bool config_has_control(const char *s)
{
        for (; *s; s++) {
                if ((unsigned char)*s < 0x20 || *s == 0x7f)
                        return true;
        }
        return false;
}

/* Letters, digits, '-', '_' and '.'; 1 to @max characters (0: 255). */
static bool config_is_name(const char *s, int64_t max)
{
        size_t len = strlen(s);

        if (len == 0 || len > (size_t)(max ? max : 255))
                return false;
        for (; *s; s++) {
                if (!isalnum((unsigned char)*s) && *s != '-' && *s != '_' && *s != '.')
                        return false;
        }
        return true;
}

/* A host name, an IPv4 address, or an IPv6 address in brackets; exactly @len bytes of @h. */
static bool config_is_host(const char *h, size_t len)
{
        if (len >= 2 && h[0] == '[')
                return h[len - 1] == ']' && len > 2 &&
                       strspn(h + 1, "0123456789abcdefABCDEF:.") == len - 2;
        if (len == 0 || len > 253)
                return false;
        for (size_t i = 0; i < len; i++) {
                if (!isalnum((unsigned char)h[i]) && h[i] != '-' && h[i] != '.' && h[i] != '_')
                        return false;
        }
        return true;
}

/* A decimal port within [@min, 65535], exactly @len bytes of @p. */
static bool config_is_port(const char *p, size_t len, int min)
{
        unsigned v = 0;

        if (len == 0 || len > 5 || strspn(p, "0123456789") < len)
                return false;
        for (size_t i = 0; i < len; i++)
                v = v * 10 + (unsigned)(p[i] - '0');
        return v >= (unsigned)min && v <= 65535;
}

/*
 * "host[:port]" in exactly @len bytes: the host may be an IPv6 literal in brackets (the
 * only form in which it may hold a ':'). @port_min < 0 means the port is optional.
 */
static bool config_is_host_port(const char *s, size_t len, bool empty_host, int port_min)
{
        const char *end = s + len;
        const char *colon = NULL;
        size_t hlen;

        if (len > 0 && s[0] == '[') {
                const char *close = memchr(s, ']', len);

                if (!close)
                        return false;
                if (close + 1 < end && close[1] != ':')
                        return false;
                colon = close + 1 < end ? close + 1 : NULL;
        } else {
                colon = memchr(s, ':', len);
                if (colon && memchr(colon + 1, ':', (size_t)(end - colon - 1)))
                        return false;
        }
        hlen = colon ? (size_t)(colon - s) : len;
        if (!(hlen == 0 && empty_host) && !config_is_host(s, hlen))
                return false;
        if (!colon)
                return port_min < 0;
        return config_is_port(colon + 1, (size_t)(end - colon - 1), port_min < 0 ? 1 : port_min);
}

/* "http(s)://host[:port][/prefix]" without credentials, query, fragment or spaces. */
static bool config_is_http_url(const char *s)
{
        size_t scheme, auth;

        if (strncasecmp(s, "http://", 7) == 0)
                scheme = 7;
        else if (strncasecmp(s, "https://", 8) == 0)
                scheme = 8;
        else
                return false;
        if (strcspn(s, "@?# \t\r\n") != strlen(s) || config_has_control(s))
                return false;
        auth = strcspn(s + scheme, "/");
        return config_is_host_port(s + scheme, auth, false, -1);
}

/* A comma-separated list of "[scheme://]host[:port]", as librdkafka takes it. */
static bool config_is_broker_list(const char *s)
{
        if (s[0] == '\0')
                return false;
        for (;;) {
                size_t len = strcspn(s, ",");
                const char *sep = strstr(s, "://");
                const char *hp = s;

                if (sep && sep < s + len) {
                        for (const char *c = s; c < sep; c++) {
                                if (!isalpha((unsigned char)*c) && *c != '_')
                                        return false;
                        }
                        if (sep == s)
                                return false;
                        hp = sep + 3;
                }
                if (!config_is_host_port(hp, len - (size_t)(hp - s), false, -1))
                        return false;
                if (s[len] == '\0')
                        return true;
                s += len + 1;
        }
}

/* An AWS region: it becomes a DNS label (s3.<region>.amazonaws.com) and the SigV4 scope. */
static bool config_is_region(const char *s, int64_t max)
{
        size_t len = strlen(s);

        if (len == 0 || len > (size_t)max || s[0] == '-' || s[len - 1] == '-')
                return false;
        for (; *s; s++) {
                if (!isalnum((unsigned char)*s) && *s != '-')
                        return false;
        }
        return true;
}

/* An access key id goes into "Credential=<id>/<date>/...", a comma-separated header. */
static bool config_is_access_key(const char *s, int64_t max)
{
        if (strlen(s) > (size_t)max)
                return false;
        for (; *s; s++) {
                if (*s <= 0x20 || *s >= 0x7f || *s == '/' || *s == ',')
                        return false;
        }
        return true;
}

/* A byte count for messages: "16T", "5M", or plain bytes when no suffix divides it. */
static void config_format_size(int64_t v, char *buf, size_t size)
{
        static const struct {
                int64_t unit;
                char suffix;
        } units[] = {{TIB, 'T'}, {GIB, 'G'}, {MIB, 'M'}, {KIB, 'K'}};

        for (size_t i = 0; i < ARRAY_SIZE(units); i++) {
                if (v >= units[i].unit && v % units[i].unit == 0) {
                        (void)snprintf(buf, size, "%" PRId64 "%c", v / units[i].unit,
                                       units[i].suffix);
                        return;
                }
        }
        (void)snprintf(buf, size, "%" PRId64, v);
}

/*
 * A value as error messages show it: control characters as '?', and cut (with "...") past
 * 200 bytes, so that a pasted file or a newline cannot flood or forge the output.
 */
static void config_shown_value(const char *value, char *buf, size_t size)
{
        size_t n = 0;

        for (; value[n] && n < 200 && n + 4 < size; n++)
                buf[n] = (unsigned char)value[n] < 0x20 || value[n] == 0x7f ? '?' : value[n];
        buf[n] = '\0';
        if (value[n])
                (void)snprintf(buf + n, size - n, "...");
}

static int config_set_string(char **field, const char *value)
{
        char *copy = strdup(value);

        if (!copy)
                return -ENOMEM;
        free(*field);
        *field = copy;
        return 0;
}

/* The password of a conninfo string or URI, decoded, or NULL. Owned by the caller. */
static char *config_db_password(const char *url)
{
        PQconninfoOption *opts = PQconninfoParse(url, NULL);
        char *password = NULL;

        if (!opts)
                return NULL;
        for (PQconninfoOption *o = opts; o->keyword; o++) {
                if (strcmp(o->keyword, "password") == 0 && o->val && o->val[0])
                        password = strdup(o->val);
        }
        PQconninfoFree(opts);
        return password;
}

#define CONFIG_DB_SPANS_MAX 8

/* Where a password is written in a conninfo string, as it is written (still encoded). */
struct config_span {
        size_t start;
        size_t len;
};

static size_t config_add_span(struct config_span *spans, size_t n, size_t start, size_t len)
{
        if (len == 0 || n == CONFIG_DB_SPANS_MAX)
                return n;
        spans[n].start = start;
        spans[n].len = len;
        return n + 1;
}

/*
 * The password spans of a URI: the userinfo's "user:PASSWORD@" (libpq ends the userinfo at
 * the first '@' before any '/') and any "password=" query parameter.
 */
static size_t config_uri_password_spans(const char *url, size_t scheme_len,
                                        struct config_span *spans)
{
        const char *a = url + scheme_len;
        size_t auth_len = strcspn(a, "@/?");
        const char *q;
        size_t n = 0;

        if (a[auth_len] == '@') {
                const char *colon = memchr(a, ':', auth_len);

                if (colon)
                        n = config_add_span(spans, n, (size_t)(colon + 1 - url),
                                            (size_t)(a + auth_len - colon - 1));
        }
        q = strchr(a, '?');
        while (q) {
                const char *param = q + 1;
                size_t plen = strcspn(param, "&");

                if (plen > 9 && strncmp(param, "password=", 9) == 0)
                        n = config_add_span(spans, n, (size_t)(param + 9 - url), plen - 9);
                q = param[plen] == '&' ? param + plen : NULL;
        }
        return n;
}

/*
 * The password spans of a "key=value key='quoted value'" conninfo string: the value of every
 * "password" keyword, without its quotes, escapes still in place.
 */
static size_t config_kv_password_spans(const char *s, struct config_span *spans)
{
        const char *p = s;
        size_t n = 0;

        while (*p) {
                const char *key, *val;
                size_t klen;

                while (isspace((unsigned char)*p))
                        p++;
                key = p;
                while (*p && *p != '=' && !isspace((unsigned char)*p))
                        p++;
                klen = (size_t)(p - key);
                while (isspace((unsigned char)*p))
                        p++;
                if (*p != '=')
                        break; /* malformed: libpq rejects it before we get here */
                p++;
                while (isspace((unsigned char)*p))
                        p++;
                if (*p == '\'') {
                        val = ++p;
                        while (*p && *p != '\'') {
                                if (*p == '\\' && p[1])
                                        p++;
                                p++;
                        }
                } else {
                        val = p;
                        while (*p && !isspace((unsigned char)*p)) {
                                if (*p == '\\' && p[1])
                                        p++;
                                p++;
                        }
                }
                if (klen == 8 && strncmp(key, "password", 8) == 0)
                        n = config_add_span(spans, n, (size_t)(val - s), (size_t)(p - val));
                if (*p == '\'')
                        p++;
        }
        return n;
}

/* Every place a password is written in @url, in order. */
static size_t config_db_password_spans(const char *url, struct config_span *spans)
{
        static const char *const schemes[] = {"postgresql://", "postgres://"};

        for (size_t i = 0; i < ARRAY_SIZE(schemes); i++) {
                size_t len = strlen(schemes[i]);

                if (strncmp(url, schemes[i], len) == 0)
                        return config_uri_password_spans(url, len, spans);
        }
        return config_kv_password_spans(url, spans);
}

/*
 * Register every form of the DATABASE_URL password with the log mask: the decoded value that
 * libpq uses (and may echo in its errors) and each form as written, e.g. percent-encoded in a
 * URI. Returns 0, or -EINVAL when a form is too short to mask, or -ENOSPC/-ENOMEM.
 */
static int config_register_db_secrets(const char *url)
{
        struct config_span spans[CONFIG_DB_SPANS_MAX];
        size_t n = config_db_password_spans(url, spans);
        char *password = config_db_password(url);
        int r, ret = 0;

        r = log_register_secret(password);
        free(password);
        if (r < 0)
                ret = r;
        for (size_t i = 0; i < n; i++) {
                char *raw = strndup(url + spans[i].start, spans[i].len);

                if (!raw)
                        return -ENOMEM;
                r = log_register_secret(raw);
                free(raw);
                if (r < 0 && ret != -ENOMEM && ret != -ENOSPC)
                        ret = r;
        }
        return ret;
}

static int config_check_size(const struct config_key *key, const char *value, const char *shown,
                             const char *from)
{
        char lo[32], hi[32];
        uint64_t u;
        bool ok;

        ok = util_parse_size(value, &u) == 0 && u >= (uint64_t)key->min &&
             u <= (uint64_t)key->max && (key->type != CONFIG_DEVICE_SIZE || u % 512 == 0);
        if (ok)
                return 0;
        config_format_size(key->min, lo, sizeof(lo));
        config_format_size(key->max, hi, sizeof(hi));
        return err_set(
                -EINVAL,
                "%s='%s': expected a size from %s to %s%s, in bytes or with a K, M, G or T suffix%s",
                key->name, shown, lo, hi,
                key->type == CONFIG_DEVICE_SIZE ? " that is a multiple of 512 bytes" : "", from);
}

static int config_check_text(const struct config_key *key, const char *value, const char *shown,
                             const char *from)
{
        switch (key->type) {
        case CONFIG_SECRET:
                /* A newline in a header value would end the header: refuse, quietly. */
                if (config_has_control(value))
                        return err_set(
                                -EINVAL,
                                "%s: expected a value without control characters (not shown: it is a secret)%s",
                                key->name, from);
                return 0;
        case CONFIG_ACCESS_KEY:
                if (!config_is_access_key(value, key->max))
                        return err_set(
                                -EINVAL,
                                "%s='%s': expected an access key id of at most %d printable characters without spaces, '/' or ','%s",
                                key->name, shown, (int)key->max, from);
                return 0;
        case CONFIG_NAME:
                if (!config_is_name(value, key->max))
                        return err_set(
                                -EINVAL,
                                "%s='%s': expected a name of letters, digits, '-', '_' or '.' (at most %d characters)%s",
                                key->name, shown, (int)key->max, from);
                return 0;
        case CONFIG_DM_NAME:
                if (request_validate_dm_name(key->name, value) < 0)
                        return err_set(
                                -EINVAL,
                                "%s='%s': expected a device-mapper name of letters, digits, '-', '_' or '.' (at most %d characters, not '.' or '..')%s",
                                key->name, shown, (int)key->max, from);
                return 0;
        case CONFIG_ABS_PATH:
                if (value[0] != '/' || strlen(value) > (size_t)key->max ||
                    config_has_control(value))
                        return err_set(
                                -EINVAL,
                                "%s='%s': expected an absolute path (starting with '/', at most %d characters)%s",
                                key->name, shown, (int)key->max, from);
                return 0;
        case CONFIG_HTTP_URL:
                if (value[0] && (strlen(value) > (size_t)key->max || !config_is_http_url(value)))
                        return err_set(
                                -EINVAL,
                                "%s='%s': expected an http:// or https:// URL as scheme://host[:port][/prefix], without credentials, query or spaces (or empty for AWS)%s",
                                key->name, shown, from);
                return 0;
        case CONFIG_LISTEN_ADDR:
                if (value[0] && !config_is_host_port(value, strlen(value), true, 0))
                        return err_set(
                                -EINVAL,
                                "%s='%s': expected host:port with a port from 0 to 65535 (e.g. 127.0.0.1:9464, :9464 or [::1]:9464), or empty to disable%s",
                                key->name, shown, from);
                return 0;
        case CONFIG_BROKERS:
                if (!config_is_broker_list(value))
                        return err_set(
                                -EINVAL,
                                "%s='%s': expected a comma-separated list of host[:port] (e.g. kafka1:9092,kafka2:9092)%s",
                                key->name, shown, from);
                return 0;
        case CONFIG_REGION:
                if (!config_is_region(value, key->max))
                        return err_set(
                                -EINVAL,
                                "%s='%s': expected a region name of letters, digits and '-' (e.g. us-east-1)%s",
                                key->name, shown, from);
                return 0;
        default:
                return 0;
        }
}

static int config_check(const struct config_key *key, const char *value, const char *shown,
                        const char *from)
{
        char *errmsg = NULL;
        PQconninfoOption *opts;
        int i;
        bool b;
        enum log_level lvl;

        switch (key->type) {
        case CONFIG_STRING:
                return 0;
        case CONFIG_NONEMPTY:
                if (value[0] == '\0')
                        return err_set(-EINVAL, "%s='': expected a non-empty value%s", key->name,
                                       from);
                return 0;
        case CONFIG_DB_URL:
                opts = PQconninfoParse(value, &errmsg);
                if (!opts) {
                        /* libpq's message may quote the input, which may hold a password. */
                        PQfreemem(errmsg);
                        return err_set(
                                -EINVAL,
                                "%s: expected a PostgreSQL connection string or URI (e.g. postgresql://user@host:5432/db)%s",
                                key->name, from);
                }
                PQconninfoFree(opts);
                return 0;
        case CONFIG_BUCKET:
                if (request_validate_bucket(value) < 0)
                        return err_set(
                                -EINVAL,
                                "%s='%s': expected an S3 bucket name (3-63 lowercase letters, digits, '-' and '.')%s",
                                key->name, shown, from);
                return 0;
        case CONFIG_INT:
                if (util_parse_int(value, (int)key->min, (int)key->max, &i) < 0) {
                        if (key->min == 1 && key->max >= 1024)
                                return err_set(
                                        -EINVAL,
                                        "%s='%s': expected a positive integer (at most %d)%s",
                                        key->name, shown, (int)key->max, from);
                        return err_set(-EINVAL, "%s='%s': expected an integer from %d to %d%s",
                                       key->name, shown, (int)key->min, (int)key->max, from);
                }
                return 0;
        case CONFIG_SIZE:
        case CONFIG_DEVICE_SIZE:
                return config_check_size(key, value, shown, from);
        case CONFIG_BOOL:
                if (util_parse_bool(value, &b) < 0)
                        return err_set(-EINVAL, "%s='%s': expected true or false%s", key->name,
                                       shown, from);
                return 0;
        case CONFIG_LOG_LEVEL:
                if (log_level_parse(value, &lvl) < 0)
                        return err_set(
                                -EINVAL,
                                "%s='%s': expected one of debug, info, notice, warning, err%s",
                                key->name, shown, from);
                return 0;
        default:
                return config_check_text(key, value, shown, from);
        }
}

int config_set(struct config *cfg, const char *name, const char *value, enum config_source src)
{
        static const char *const from_names[] = {
                [CONFIG_SOURCE_DEFAULT] = "",
                [CONFIG_SOURCE_FILE] = " (from the config file)",
                [CONFIG_SOURCE_ENV] = " (from the environment)",
                [CONFIG_SOURCE_FLAG] = " (from a command-line flag)",
        };
        const struct config_key *key = config_find(name);
        char shown[256];
        void *field;
        int r;

        if (!key)
                return err_set(-ENOENT, "unknown setting '%s'", name);
        if (key->type == CONFIG_SECRET)
                (void)snprintf(shown, sizeof(shown), "[redacted]");
        else
                config_shown_value(value, shown, sizeof(shown));
        r = config_check(key, value, shown, from_names[src]);
        if (r < 0)
                return r;

        field = config_field(cfg, key);
        cfg->sources[key - config_keys] = (unsigned char)src;
        switch (key->type) {
        case CONFIG_INT:
                (void)util_parse_int(value, (int)key->min, (int)key->max, (int *)field);
                return 0;
        case CONFIG_SIZE:
        case CONFIG_DEVICE_SIZE:
                (void)util_parse_size(value, (uint64_t *)field);
                return 0;
        case CONFIG_BOOL:
                (void)util_parse_bool(value, (bool *)field);
                return 0;
        case CONFIG_SECRET:
        case CONFIG_DB_URL:
                r = key->type == CONFIG_SECRET ? log_register_secret(value)
                                               : config_register_db_secrets(value);
                if (r == -EINVAL)
                        log_warning("secret too short to be masked in logs: use a longer one",
                                    "setting=%s min_length=%d", name, LOG_SECRET_MIN);
                else if (r < 0)
                        return err_set(r, "failed to remember %s for log masking", name);
                break;
        default:
                break;
        }
        r = config_set_string((char **)field, value);
        if (r < 0)
                return err_set(r, "out of memory while setting %s", name);
        return 0;
}

int config_init(struct config *cfg)
{
        char host[256];
        int r;

        memset(cfg, 0, sizeof(*cfg));
        for (size_t i = 0; i < ARRAY_SIZE(config_keys); i++) {
                const char *def = config_keys[i].default_value;

                if (!def)
                        continue;
                r = config_set(cfg, config_keys[i].name, def, CONFIG_SOURCE_DEFAULT);
                if (r < 0)
                        return r;
        }
        if (gethostname(host, sizeof(host)) < 0 || !config_is_name(host, CONFIG_HOST_ID_MAX))
                (void)snprintf(host, sizeof(host), "localhost");
        host[sizeof(host) - 1] = '\0';
        return config_set(cfg, "HOST_ID", host, CONFIG_SOURCE_DEFAULT);
}

void config_done(struct config *cfg)
{
        for (size_t i = 0; i < ARRAY_SIZE(config_keys); i++) {
                switch (config_keys[i].type) {
                case CONFIG_INT:
                case CONFIG_SIZE:
                case CONFIG_DEVICE_SIZE:
                case CONFIG_BOOL:
                        break;
                default:
                        free(*(char **)config_field(cfg, &config_keys[i]));
                        break;
                }
        }
        memset(cfg, 0, sizeof(*cfg));
}

/* Strip surrounding whitespace and one level of matching quotes, in place. */
static char *config_trim(char *s)
{
        size_t len;

        while (isspace((unsigned char)*s))
                s++;
        len = strlen(s);
        while (len > 0 && isspace((unsigned char)s[len - 1]))
                s[--len] = '\0';
        if (len >= 2 && (s[0] == '"' || s[0] == '\'') && s[len - 1] == s[0]) {
                s[len - 1] = '\0';
                s++;
        }
        return s;
}

int config_load_file(struct config *cfg, const char *path)
{
        FILE *f = NULL;
        char *line = NULL;
        size_t cap = 0;
        unsigned lineno = 0;
        int r = 0;

        f = fopen(path, "re");
        if (!f)
                return err_set(-errno, "failed to open config file '%s': %s", path,
                               strerror(errno));
        while (getline(&line, &cap, f) > 0) {
                char *s = line, *eq;

                lineno++;
                while (isspace((unsigned char)*s))
                        s++;
                if (*s == '#' || *s == '\0')
                        continue;
                if (strncmp(s, "export ", 7) == 0)
                        s += 7;
                eq = strchr(s, '=');
                if (!eq) {
                        r = err_set(-EINVAL, "config file '%s' line %u: expected KEY=value", path,
                                    lineno);
                        goto out;
                }
                *eq = '\0';
                r = config_set(cfg, config_trim(s), config_trim(eq + 1), CONFIG_SOURCE_FILE);
                if (r < 0) {
                        r = err_wrap(r, "config file '%s' line %u", path, lineno);
                        goto out;
                }
        }
out:
        free(line);
        fclose(f);
        return r;
}

int config_load_env(struct config *cfg)
{
        for (size_t i = 0; i < ARRAY_SIZE(config_keys); i++) {
                const char *v = getenv(config_keys[i].name);
                int r;

                if (!v)
                        continue;
                r = config_set(cfg, config_keys[i].name, v, CONFIG_SOURCE_ENV);
                if (r < 0)
                        return r;
        }
        return 0;
}

int config_validate(const struct config *cfg)
{
        bool has_key = cfg->s3_access_key[0] != '\0';
        bool has_secret = cfg->s3_secret_key[0] != '\0';

        if (has_key != has_secret)
                return err_set(
                        -EINVAL,
                        "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY must be set together (set both for signed requests, neither for anonymous access)");
        if (cfg->s3_session_token[0] && !has_key)
                return err_set(
                        -EINVAL,
                        "AWS_SESSION_TOKEN is set but AWS_ACCESS_KEY_ID is not: temporary credentials need all three");
        if (cfg->retry_max_ms < cfg->retry_base_ms)
                return err_set(-EINVAL, "RETRY_MAX_MS=%d is below RETRY_BASE_MS=%d",
                               cfg->retry_max_ms, cfg->retry_base_ms);
        return 0;
}

int config_load(struct config *cfg, const char *file)
{
        enum log_level level;
        int r;

        r = config_init(cfg);
        if (r < 0)
                return r;
        if (!file)
                file = getenv("FIM_CONFIG");
        if (!file && access(CONFIG_DEFAULT_FILE, F_OK) == 0)
                file = CONFIG_DEFAULT_FILE;
        if (file) {
                r = config_load_file(cfg, file);
                if (r < 0)
                        return r;
        }
        r = config_load_env(cfg);
        if (r < 0)
                return r;
        if (log_level_parse(cfg->log_level, &level) == 0)
                log_set_level(level);
        return 0;
}

bool config_has_s3_credentials(const struct config *cfg)
{
        return cfg->s3_access_key[0] != '\0' && cfg->s3_secret_key[0] != '\0';
}

/* DATABASE_URL for display: as written, with every password span replaced by "****". */
static void config_display_db_url(const char *url, char *buf, size_t size)
{
        struct config_span spans[CONFIG_DB_SPANS_MAX];
        size_t n = config_db_password_spans(url, spans);
        size_t at = 0, o = 0;

        for (size_t i = 0; i <= n && o < size; i++) {
                size_t end = i < n ? spans[i].start : strlen(url);
                int w = snprintf(buf + o, size - o, "%.*s%s", (int)(end - at), url + at,
                                 i < n ? "****" : "");

                if (w < 0)
                        break;
                o += (size_t)w;
                if (i < n)
                        at = spans[i].start + spans[i].len;
        }
        if (size > 0 && o >= size)
                buf[size - 1] = '\0';
}

int config_get_display(const struct config *cfg, const char *name, char *buf, size_t size)
{
        const struct config_key *key = config_find(name);
        const void *field;

        if (!key)
                return err_set(-ENOENT, "unknown setting '%s'", name);
        field = config_field_const(cfg, key);
        switch (key->type) {
        case CONFIG_INT:
                (void)snprintf(buf, size, "%d", *(const int *)field);
                break;
        case CONFIG_SIZE:
        case CONFIG_DEVICE_SIZE:
                (void)snprintf(buf, size, "%" PRIu64, *(const uint64_t *)field);
                break;
        case CONFIG_BOOL:
                (void)snprintf(buf, size, "%s", *(const bool *)field ? "true" : "false");
                break;
        case CONFIG_SECRET:
                (void)snprintf(buf, size, "%s", (*(char *const *)field)[0] ? "[set]" : "[not set]");
                break;
        case CONFIG_DB_URL:
                config_display_db_url(*(char *const *)field, buf, size);
                break;
        default:
                (void)snprintf(buf, size, "%s", *(char *const *)field);
                break;
        }
        return 0;
}

void config_print(const struct config *cfg, FILE *out)
{
        static const char *const source_names[] = {
                [CONFIG_SOURCE_DEFAULT] = "default",
                [CONFIG_SOURCE_FILE] = "file",
                [CONFIG_SOURCE_ENV] = "environment",
                [CONFIG_SOURCE_FLAG] = "flag",
        };
        char value[2048];

        for (size_t i = 0; i < ARRAY_SIZE(config_keys); i++) {
                (void)config_get_display(cfg, config_keys[i].name, value, sizeof(value));
                log_redact(value);
                fprintf(out, "%s=%s  # %s\n", config_keys[i].name, value,
                        source_names[cfg->sources[i] <= CONFIG_SOURCE_FLAG ? cfg->sources[i] : 0]);
        }
}
