#include "stages/request.h"

#include <ctype.h>
#include <errno.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <json-c/json.h>

#include "common/err.h"
#include "common/util.h"

/* Nesting deeper than this is never a valid request; json-c's default is 32. */
#define REQUEST_JSON_DEPTH 8

enum field_type {
        FIELD_STRING,
        FIELD_INT64,
        FIELD_BOOL,
        FIELD_TIME, /* int64 ms in the struct, RFC 3339 string on the wire */
};

struct field_spec {
        const char *name;
        enum field_type type;
        size_t offset;
        size_t size; /* buffer size for strings */
        bool required;
        bool omit_empty;
};

#define F_STR(type, field, req, omit)                                                              \
        {                                                                                          \
#field, FIELD_STRING, offsetof(struct type, field),                                \
                        sizeof(((struct type *)0)->field), req, omit                               \
        }
#define F_INT(type, field, req, omit)                                                              \
        {                                                                                          \
#field, FIELD_INT64, offsetof(struct type, field), 0, req, omit                    \
        }
#define F_BOOL(type, field)                                                                        \
        {                                                                                          \
#field, FIELD_BOOL, offsetof(struct type, field), 0, false, false                  \
        }
#define F_TIME(type, field, name)                                                                  \
        {                                                                                          \
                name, FIELD_TIME, offsetof(struct type, field), 0, false, true                     \
        }

static const struct field_spec download_request_fields[] = {
        F_STR(download_request, s3_key, true, false),
        F_STR(download_request, image_id, true, false),
        F_STR(download_request, bucket, false, true),
        F_STR(download_request, checksum, false, true),
};

static const struct field_spec download_response_fields[] = {
        F_STR(download_response, image_id, true, false),
        F_STR(download_response, local_path, false, false),
        F_STR(download_response, checksum, false, false),
        F_INT(download_response, size_bytes, false, false),
        F_BOOL(download_response, downloaded),
        F_BOOL(download_response, already_exist),
        F_TIME(download_response, downloaded_at_ms, "downloaded_at"),
};

static const struct field_spec unpack_request_fields[] = {
        F_STR(unpack_request, image_id, true, false),
        F_STR(unpack_request, local_path, true, false),
        F_STR(unpack_request, checksum, true, false),
        F_STR(unpack_request, pool_name, false, true),
        F_INT(unpack_request, device_size, false, true),
};

static const struct field_spec unpack_response_fields[] = {
        F_STR(unpack_response, image_id, true, false),
        F_STR(unpack_response, device_id, false, false),
        F_STR(unpack_response, device_name, false, false),
        F_STR(unpack_response, device_path, false, false),
        F_INT(unpack_response, size_bytes, false, false),
        F_INT(unpack_response, file_count, false, false),
        F_BOOL(unpack_response, unpacked),
        F_BOOL(unpack_response, already_exist),
        F_TIME(unpack_response, unpacked_at_ms, "unpacked_at"),
};

static const struct field_spec activate_request_fields[] = {
        F_STR(activate_request, image_id, true, false),
        F_STR(activate_request, device_id, true, false),
        F_STR(activate_request, device_name, true, false),
        F_STR(activate_request, snapshot_name, false, true),
        F_STR(activate_request, pool_name, false, true),
};

static const struct field_spec activate_response_fields[] = {
        F_STR(activate_response, image_id, true, false),
        F_STR(activate_response, snapshot_id, false, false),
        F_STR(activate_response, snapshot_name, false, false),
        F_STR(activate_response, device_path, false, false),
        F_BOOL(activate_response, active),
        F_BOOL(activate_response, activated),
        F_BOOL(activate_response, already_exist),
};

/* ---- validation ---------------------------------------------------------------------- */

int request_validate_s3_key(const char *key)
{
        size_t len = strlen(key);
        const char *seg;

        if (len == 0)
                return err_set(-EINVAL, "field 's3_key' is empty");
        if (len > REQUEST_S3_KEY_MAX)
                return err_set(-EINVAL, "field 's3_key' is too long (%zu characters, at most %d)",
                               len, REQUEST_S3_KEY_MAX);
        for (size_t i = 0; i < len; i++) {
                unsigned char c = (unsigned char)key[i];

                if (!isalnum(c) && c != '-' && c != '_' && c != '.' && c != '/')
                        return err_set(
                                -EINVAL,
                                "field 's3_key' has a character outside letters, digits and '-_./' at offset %zu",
                                i);
        }
        if (key[0] == '/')
                return err_set(-EINVAL, "field 's3_key' must not start with '/'");
        if (key[len - 1] == '/')
                return err_set(-EINVAL, "field 's3_key' must name an object, not end with '/'");
        /* Path traversal: no "." or ".." segment anywhere. */
        for (seg = key; seg; seg = strchr(seg, '/') ? strchr(seg, '/') + 1 : NULL) {
                size_t n = strcspn(seg, "/");

                if ((n == 1 && seg[0] == '.') || (n == 2 && seg[0] == '.' && seg[1] == '.'))
                        return err_set(-EINVAL,
                                       "field 's3_key' must not contain '.' or '..' path segments");
        }
        return 0;
}

int request_validate_image_id(const char *id)
{
        size_t len = strlen(id);

        if (len == 0)
                return err_set(-EINVAL, "field 'image_id' is empty");
        if (len > REQUEST_IMAGE_ID_VALID_MAX)
                return err_set(
                        -EINVAL,
                        "field 'image_id' is too long (%zu characters, at most %d, so that its snapshot's device-mapper name '" REQUEST_SNAPSHOT_PREFIX
                        "<image_id>' fits in %d bytes)",
                        len, REQUEST_IMAGE_ID_VALID_MAX, REQUEST_DM_NAME_MAX);
        for (size_t i = 0; i < len; i++) {
                unsigned char c = (unsigned char)id[i];

                if (!isalnum(c) && c != '-' && c != '_' && c != '.')
                        return err_set(
                                -EINVAL,
                                "field 'image_id' has a character outside letters, digits, '-', '_' and '.' at offset %zu",
                                i);
        }
        /* It names the file LOCAL_DIR/<image_id>.tar: no hidden files, no '.' or '..'. */
        if (id[0] == '.')
                return err_set(-EINVAL, "field 'image_id' must not start with '.'");
        return 0;
}

static bool request_looks_like_ipv4(const char *s)
{
        int dots = 0;

        for (; *s; s++) {
                if (*s == '.')
                        dots++;
                else if (!isdigit((unsigned char)*s))
                        return false;
        }
        return dots == 3;
}

static bool request_has_prefix(const char *s, const char *p)
{
        return strncmp(s, p, strlen(p)) == 0;
}

static bool request_has_suffix(const char *s, const char *suffix)
{
        size_t n = strlen(s), m = strlen(suffix);

        return n >= m && strcmp(s + n - m, suffix) == 0;
}

/* The general-purpose bucket naming rules of Amazon S3. */
int request_validate_bucket(const char *bucket)
{
        static const char *const bad_prefixes[] = {"xn--", "sthree-", "amzn-s3-demo-"};
        static const char *const bad_suffixes[] = {"-s3alias", "--ol-s3", ".mrap", "--x-s3"};
        size_t len = strlen(bucket);

        if (len < 3 || len > REQUEST_BUCKET_MAX)
                return err_set(-EINVAL, "field 'bucket' must be 3 to %d characters long (got %zu)",
                               REQUEST_BUCKET_MAX, len);
        for (size_t i = 0; i < len; i++) {
                unsigned char c = (unsigned char)bucket[i];

                if (!islower(c) && !isdigit(c) && c != '-' && c != '.')
                        return err_set(
                                -EINVAL,
                                "field 'bucket' may hold only lowercase letters, digits, '-' and '.' (offset %zu)",
                                i);
        }
        if (!isalnum((unsigned char)bucket[0]) || !isalnum((unsigned char)bucket[len - 1]))
                return err_set(-EINVAL, "field 'bucket' must begin and end with a letter or digit");
        if (strstr(bucket, ".."))
                return err_set(-EINVAL, "field 'bucket' must not contain two adjacent periods");
        if (request_looks_like_ipv4(bucket))
                return err_set(-EINVAL, "field 'bucket' must not be formatted as an IP address");
        for (size_t i = 0; i < ARRAY_SIZE(bad_prefixes); i++) {
                if (request_has_prefix(bucket, bad_prefixes[i]))
                        return err_set(-EINVAL, "field 'bucket' must not start with '%s'",
                                       bad_prefixes[i]);
        }
        for (size_t i = 0; i < ARRAY_SIZE(bad_suffixes); i++) {
                if (request_has_suffix(bucket, bad_suffixes[i]))
                        return err_set(-EINVAL, "field 'bucket' must not end with '%s'",
                                       bad_suffixes[i]);
        }
        return 0;
}

int request_validate_checksum(const char *hex)
{
        if (!util_is_sha256_hex(hex))
                return err_set(-EINVAL, "field 'checksum' must be a SHA-256 as 64 hex digits");
        return 0;
}

int request_validate_dm_name(const char *field, const char *name)
{
        size_t len = strlen(name);

        if (len == 0)
                return err_set(-EINVAL, "field '%s' is empty", field);
        if (len > REQUEST_DM_NAME_MAX)
                return err_set(-EINVAL, "field '%s' is too long (%zu characters, at most %d)",
                               field, len, REQUEST_DM_NAME_MAX);
        if (strcmp(name, ".") == 0 || strcmp(name, "..") == 0)
                return err_set(-EINVAL, "field '%s' must not be '.' or '..'", field);
        for (size_t i = 0; i < len; i++) {
                unsigned char c = (unsigned char)name[i];

                if (!isalnum(c) && c != '-' && c != '_' && c != '.')
                        return err_set(
                                -EINVAL,
                                "field '%s' may hold only letters, digits, '-', '_' and '.' (offset %zu)",
                                field, i);
        }
        return 0;
}

int request_validate_snapshot_name(const char *name, const char *pool_name)
{
        static const char thin_prefix[] = "thin-";
        const size_t tlen = sizeof(thin_prefix) - 1;
        int r;

        r = request_validate_dm_name("snapshot_name", name);
        if (r < 0)
                return r;
        if (name[0] == '.' || name[0] == '-')
                return err_set(-EINVAL, "field 'snapshot_name' must not start with '%c'", name[0]);
        if (strcmp(name, "control") == 0)
                return err_set(-EINVAL,
                               "field 'snapshot_name' must not be 'control' (/dev/mapper/control)");
        if (strncmp(name, thin_prefix, tlen) == 0 && name[tlen] &&
            strspn(name + tlen, "0123456789") == strlen(name + tlen))
                return err_set(
                        -EINVAL,
                        "field 'snapshot_name' must not look like 'thin-<number>': those are the names of origin devices");
        if (pool_name && pool_name[0] && strcmp(name, pool_name) == 0)
                return err_set(-EINVAL, "field 'snapshot_name' must not be the pool's name '%s'",
                               pool_name);
        return 0;
}

int request_validate_device_id(const char *field, const char *id)
{
        uint64_t v;

        if (util_parse_u64(id, &v) < 0 || v > REQUEST_THIN_ID_MAX || (id[0] == '0' && id[1]))
                return err_set(-EINVAL, "field '%s' must be a thin device id from 0 to %d", field,
                               REQUEST_THIN_ID_MAX);
        return 0;
}

int request_validate_device_size(int64_t size)
{
        /* 16 TiB is the largest thin device worth allowing from a message. */
        if (size <= 0 || size % 512 != 0 || size > (INT64_C(16) << 40))
                return err_set(
                        -EINVAL,
                        "field 'device_size' must be a positive multiple of 512 bytes, at most 16 TiB");
        return 0;
}

int download_request_validate(const struct download_request *req)
{
        int r;

        r = request_validate_s3_key(req->s3_key);
        if (r < 0)
                return r;
        r = request_validate_image_id(req->image_id);
        if (r < 0)
                return r;
        if (req->bucket[0]) {
                r = request_validate_bucket(req->bucket);
                if (r < 0)
                        return r;
        }
        if (req->checksum[0])
                return request_validate_checksum(req->checksum);
        return 0;
}

int unpack_request_validate(const struct unpack_request *req)
{
        int r;

        r = request_validate_image_id(req->image_id);
        if (r < 0)
                return r;
        if (req->local_path[0] != '/')
                return err_set(-EINVAL, "field 'local_path' must be an absolute path");
        r = request_validate_checksum(req->checksum);
        if (r < 0)
                return r;
        if (req->pool_name[0]) {
                r = request_validate_dm_name("pool_name", req->pool_name);
                if (r < 0)
                        return r;
        }
        if (req->device_size != 0)
                return request_validate_device_size(req->device_size);
        return 0;
}

int activate_request_validate(const struct activate_request *req)
{
        int r;

        r = request_validate_image_id(req->image_id);
        if (r < 0)
                return r;
        r = request_validate_device_id("device_id", req->device_id);
        if (r < 0)
                return r;
        r = request_validate_dm_name("device_name", req->device_name);
        if (r < 0)
                return r;
        if (req->pool_name[0]) {
                r = request_validate_dm_name("pool_name", req->pool_name);
                if (r < 0)
                        return r;
        }
        if (req->snapshot_name[0])
                return request_validate_snapshot_name(req->snapshot_name, req->pool_name);
        return 0;
}

/* ---- time ------------------------------------------------------------------------------ */

int request_parse_time(const char *s, int64_t *ret_ms)
{
        struct tm tm = {0};
        const char *p;
        int64_t ms = 0;
        time_t secs;

        p = strptime(s, "%Y-%m-%dT%H:%M:%S", &tm);
        if (!p)
                return -EINVAL;
        if (*p == '.') {
                int digits = 0;

                for (p++; isdigit((unsigned char)*p); p++, digits++) {
                        if (digits < 3)
                                ms = ms * 10 + (*p - '0');
                }
                if (digits == 0)
                        return -EINVAL;
                for (; digits < 3; digits++)
                        ms *= 10;
        }
        if (strcmp(p, "Z") != 0 && strcmp(p, "+00:00") != 0)
                return -EINVAL;
        secs = timegm(&tm);
        if (secs == (time_t)-1)
                return -EINVAL;
        *ret_ms = (int64_t)secs * 1000 + ms;
        return 0;
}

/* ---- generic codec -------------------------------------------------------------------- */

static int request_parse(const char *json, struct json_object **ret_obj)
{
        struct json_tokener *tok = NULL;
        struct json_object *obj = NULL;
        size_t len = strnlen(json, REQUEST_JSON_MAX + 1);
        size_t end;
        int r = 0;

        if (len > REQUEST_JSON_MAX)
                return err_set(-EMSGSIZE, "message is larger than %d bytes", REQUEST_JSON_MAX);
        tok = json_tokener_new_ex(REQUEST_JSON_DEPTH);
        if (!tok)
                return err_set(-ENOMEM, "out of memory");
        obj = json_tokener_parse_ex(tok, json, (int)len);
        if (!obj || json_tokener_get_error(tok) != json_tokener_success) {
                enum json_tokener_error e = json_tokener_get_error(tok);

                r = err_set(-EINVAL, "message is not valid JSON: %s at offset %zu",
                            e == json_tokener_continue ? "unexpected end of input"
                                                       : json_tokener_error_desc(e),
                            json_tokener_get_parse_end(tok));
                goto out;
        }
        /* Whitespace after the document, e.g. the newline of a line-per-message producer,
         * is not data. */
        end = json_tokener_get_parse_end(tok);
        end += strspn(json + end, " \t\r\n");
        if (end != len) {
                r = err_set(-EINVAL,
                            "message has trailing data after the JSON object at offset %zu", end);
                goto out;
        }
        if (!json_object_is_type(obj, json_type_object)) {
                r = err_set(-EINVAL, "message must be a JSON object");
                goto out;
        }
        *ret_obj = steal_ptr(obj);
out:
        json_object_put(obj);
        json_tokener_free(tok);
        return r;
}

static const char *request_type_name(struct json_object *v)
{
        return json_type_to_name(json_object_get_type(v));
}

static int request_decode_field(const struct field_spec *f, struct json_object *v, void *out)
{
        char *dst = (char *)out + f->offset;
        const char *s;
        size_t len;

        switch (f->type) {
        case FIELD_STRING:
                if (!json_object_is_type(v, json_type_string))
                        return err_set(-EINVAL, "field '%s': expected a string, got %s", f->name,
                                       request_type_name(v));
                s = json_object_get_string(v);
                len = (size_t)json_object_get_string_len(v);
                if (strlen(s) != len)
                        return err_set(-EINVAL, "field '%s' contains a NUL character", f->name);
                if (len >= f->size)
                        return err_set(-EINVAL, "field '%s' is too long (%zu bytes, at most %zu)",
                                       f->name, len, f->size - 1);
                memcpy(dst, s, len + 1);
                return 0;
        case FIELD_INT64:
                if (!json_object_is_type(v, json_type_int))
                        return err_set(-EINVAL, "field '%s': expected an integer, got %s", f->name,
                                       request_type_name(v));
                errno = 0;
                *(int64_t *)(void *)dst = json_object_get_int64(v);
                if (errno == EINVAL || (json_object_get_int64(v) == INT64_MAX &&
                                        json_object_get_uint64(v) > (uint64_t)INT64_MAX))
                        return err_set(-EINVAL, "field '%s' is out of range", f->name);
                return 0;
        case FIELD_BOOL:
                if (!json_object_is_type(v, json_type_boolean))
                        return err_set(-EINVAL, "field '%s': expected a boolean, got %s", f->name,
                                       request_type_name(v));
                *(bool *)(void *)dst = json_object_get_boolean(v);
                return 0;
        case FIELD_TIME:
                if (!json_object_is_type(v, json_type_string) ||
                    request_parse_time(json_object_get_string(v), (int64_t *)(void *)dst) < 0)
                        return err_set(-EINVAL, "field '%s': expected an RFC 3339 UTC timestamp",
                                       f->name);
                return 0;
        }
        return -EINVAL;
}

static int request_decode(const char *json, const struct field_spec *fields, size_t n, void *out,
                          size_t out_size)
{
        struct json_object *obj = NULL;
        int r;

        r = request_parse(json, &obj);
        if (r < 0)
                return r;
        memset(out, 0, out_size);
        for (size_t i = 0; i < n; i++) {
                struct json_object *v = NULL;

                /* A JSON null is the same as an absent field, as in Go. */
                if (!json_object_object_get_ex(obj, fields[i].name, &v) || !v) {
                        if (fields[i].required) {
                                r = err_set(-EINVAL, "missing required field '%s'", fields[i].name);
                                goto out;
                        }
                        continue;
                }
                r = request_decode_field(&fields[i], v, out);
                if (r < 0)
                        goto out;
        }
out:
        json_object_put(obj);
        return r;
}

static char *request_encode(const struct field_spec *fields, size_t n, const void *in)
{
        struct json_object *obj = json_object_new_object();
        char *result = NULL;

        if (!obj)
                return NULL;
        for (size_t i = 0; i < n; i++) {
                const char *src = (const char *)in + fields[i].offset;
                struct json_object *v = NULL;
                char when[40];
                int64_t num;

                switch (fields[i].type) {
                case FIELD_STRING:
                        if (fields[i].omit_empty && src[0] == '\0')
                                continue;
                        v = json_object_new_string(src);
                        break;
                case FIELD_INT64:
                        num = *(const int64_t *)(const void *)src;
                        if (fields[i].omit_empty && num == 0)
                                continue;
                        v = json_object_new_int64(num);
                        break;
                case FIELD_BOOL:
                        v = json_object_new_boolean(*(const bool *)(const void *)src);
                        break;
                case FIELD_TIME:
                        num = *(const int64_t *)(const void *)src;
                        if (num == 0)
                                continue;
                        util_format_time(num, when, sizeof(when));
                        v = json_object_new_string(when);
                        break;
                }
                if (!v || json_object_object_add(obj, fields[i].name, v) < 0) {
                        json_object_put(v);
                        goto out;
                }
        }
        result = strdup(json_object_to_json_string_ext(
                obj, JSON_C_TO_STRING_PLAIN | JSON_C_TO_STRING_NOSLASHESCAPE));
out:
        json_object_put(obj);
        return result;
}

#define REQUEST_CODEC(type, validate)                                                              \
        int type##_decode(const char *json, struct type *ret)                                      \
        {                                                                                          \
                struct type tmp;                                                                   \
                int r = request_decode(json, type##_fields, ARRAY_SIZE(type##_fields), &tmp,       \
                                       sizeof(tmp));                                               \
                if (r < 0)                                                                         \
                        return r;                                                                  \
                r = validate;                                                                      \
                if (r < 0)                                                                         \
                        return r;                                                                  \
                *ret = tmp;                                                                        \
                return 0;                                                                          \
        }                                                                                          \
        char *type##_encode(const struct type *in)                                                 \
        {                                                                                          \
                return request_encode(type##_fields, ARRAY_SIZE(type##_fields), in);               \
        }

/* sha256sum prints lower-case hex and other tools upper-case: accept both, keep lower. */
static void request_lower_checksum(char *hex)
{
        for (char *p = hex; *p; p++)
                *p = (char)tolower((unsigned char)*p);
}

static int download_request_prepare(struct download_request *req)
{
        request_lower_checksum(req->checksum);
        return download_request_validate(req);
}

static int unpack_request_prepare(struct unpack_request *req)
{
        request_lower_checksum(req->checksum);
        return unpack_request_validate(req);
}

REQUEST_CODEC(download_request, download_request_prepare(&tmp))
REQUEST_CODEC(unpack_request, unpack_request_prepare(&tmp))
REQUEST_CODEC(activate_request, activate_request_validate(&tmp))
REQUEST_CODEC(download_response, 0)
REQUEST_CODEC(unpack_response, 0)
REQUEST_CODEC(activate_response, 0)
