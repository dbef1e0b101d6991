#pragma once

/*
 * The seed's six request and response types, their JSON wire format (json-c) and their
 * validation rules. Field names are the seed's json tags. Unknown fields are ignored, so
 * producers may add fields; wrong types, missing required fields and documents larger than
 * REQUEST_JSON_MAX give -EINVAL with a message naming the field.
 *
 * Strings live in fixed buffers sized by the validation limits, so a decoded request owns no
 * heap memory and can be copied by value.
 */

#include <stdbool.h>
#include <stdint.h>

#define REQUEST_JSON_MAX (64 * 1024)
#define REQUEST_S3_KEY_MAX 1024
#define REQUEST_BUCKET_MAX 63
#define REQUEST_DM_NAME_MAX 127 /* DM_NAME_LEN - 1 */
#define REQUEST_SNAPSHOT_PREFIX "snapshot-"

/*
 * Image ids. The seed allows 255 characters, and the buffers are that large, so a longer
 * field is refused as too long before validation. But an id becomes the device-mapper name
 * of its snapshot, snapshot-<image_id>, and device-mapper names hold at most 127 bytes: an id
 * longer than REQUEST_IMAGE_ID_VALID_MAX (118) would download and unpack, then always fail to
 * activate. Validation therefore refuses it at the front door, in every request type. The
 * same limit keeps LOCAL_DIR/<image_id>.tar.part.meta.tmp within NAME_MAX.
 */
#define REQUEST_IMAGE_ID_MAX 255
#define REQUEST_IMAGE_ID_VALID_MAX                                                                 \
        (REQUEST_DM_NAME_MAX - (int)(sizeof(REQUEST_SNAPSHOT_PREFIX) - 1))
#define REQUEST_PATH_MAX 4095
#define REQUEST_THIN_ID_MAX 0xffffff /* thin device ids are 24-bit */

/* Download: s3_key and image_id required; bucket and checksum optional. */
struct download_request {
        char s3_key[REQUEST_S3_KEY_MAX + 1];
        char image_id[REQUEST_IMAGE_ID_MAX + 1];
        char bucket[REQUEST_BUCKET_MAX + 1];
        char checksum[65]; /* extension to the seed: expected SHA-256, lowercase hex */
};

struct download_response {
        char image_id[REQUEST_IMAGE_ID_MAX + 1];
        char local_path[REQUEST_PATH_MAX + 1];
        char checksum[65];
        int64_t size_bytes;
        bool downloaded;
        bool already_exist;
        int64_t downloaded_at_ms; /* 0 = unset (omitted) */
};

struct unpack_request {
        char image_id[REQUEST_IMAGE_ID_MAX + 1];
        char local_path[REQUEST_PATH_MAX + 1];
        char checksum[65];
        char pool_name[REQUEST_DM_NAME_MAX + 1]; /* "" = configured default */
        int64_t device_size;                     /* 0 = configured default */
};

struct unpack_response {
        char image_id[REQUEST_IMAGE_ID_MAX + 1];
        char device_id[16];
        char device_name[REQUEST_DM_NAME_MAX + 1];
        char device_path[REQUEST_PATH_MAX + 1];
        int64_t size_bytes;
        int64_t file_count;
        bool unpacked;
        bool already_exist;
        int64_t unpacked_at_ms;
};

struct activate_request {
        char image_id[REQUEST_IMAGE_ID_MAX + 1];
        char device_id[16];
        char device_name[REQUEST_DM_NAME_MAX + 1];
        char snapshot_name[REQUEST_DM_NAME_MAX + 1]; /* "" = snapshot-<image_id> */
        char pool_name[REQUEST_DM_NAME_MAX + 1];
};

struct activate_response {
        char image_id[REQUEST_IMAGE_ID_MAX + 1];
        char snapshot_id[16];
        char snapshot_name[REQUEST_DM_NAME_MAX + 1];
        char device_path[REQUEST_PATH_MAX + 1];
        bool active;
        bool activated;
        bool already_exist;
};

/* Validation of single fields. Each returns 0 or -EINVAL with a message naming the field. */
int request_validate_s3_key(const char *key);

/*
 * An image id: 1 to REQUEST_IMAGE_ID_VALID_MAX letters, digits, '-', '_' and '.', not
 * starting with '.' (which also rules out '.' and '..'): it names a file in LOCAL_DIR and
 * the device-mapper device snapshot-<id>.
 */
int request_validate_image_id(const char *id);
int request_validate_bucket(const char *bucket);
int request_validate_checksum(const char *hex);
int request_validate_dm_name(const char *field, const char *name);

/*
 * A snapshot name given in an activate request: a dm name (request_validate_dm_name) that
 * cannot collide with names device-mapper or we use ourselves: not "control" (the
 * /dev/mapper/control node), not "thin-<digits>" (our origin devices), not starting with '.'
 * or '-', and not @pool_name (the request's pool; NULL or "" when not given: the stage then
 * compares with the configured pool).
 */
int request_validate_snapshot_name(const char *name, const char *pool_name);
int request_validate_device_id(const char *field, const char *id);
int request_validate_device_size(int64_t size);

/*
 * Decoders: parse @json (NUL-terminated, at most REQUEST_JSON_MAX bytes), check types and
 * required fields, then validate. Return 0 or -EINVAL (-EMSGSIZE for oversized documents).
 */
int download_request_decode(const char *json, struct download_request *ret_req);
int unpack_request_decode(const char *json, struct unpack_request *ret_req);
int activate_request_decode(const char *json, struct activate_request *ret_req);
int download_response_decode(const char *json, struct download_response *ret_resp);
int unpack_response_decode(const char *json, struct unpack_response *ret_resp);
int activate_response_decode(const char *json, struct activate_response *ret_resp);

/* Full validation of a request built in code (the decoders call these too). */
int download_request_validate(const struct download_request *req);
int unpack_request_validate(const struct unpack_request *req);
int activate_request_validate(const struct activate_request *req);

/*
 * Encoders: return a newly allocated compact JSON string (free() it), or NULL on ENOMEM.
 * Optional fields that are empty are omitted, as with Go's omitempty.
 */
char *download_request_encode(const struct download_request *req);
char *unpack_request_encode(const struct unpack_request *req);
char *activate_request_encode(const struct activate_request *req);
char *download_response_encode(const struct download_response *resp);
char *unpack_response_encode(const struct unpack_response *resp);
char *activate_response_encode(const struct activate_response *resp);

/* Parse an RFC 3339 UTC timestamp ("2026-12-03T18:51:31Z", optional fraction) to ms. */
int request_parse_time(const char *s, int64_t *ret_ms);
