/* Unit tests for stages/request: JSON codecs of the seed's types and their validation. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "common/err.h"
#include "stages/request.h"

static char *repeat(char c, size_t n)
{
        char *s = malloc(n + 1);

        assert_non_null(s);
        memset(s, c, n);
        s[n] = '\0';
        return s;
}

static void test_request_s3_key_boundaries(void **state)
{
        char *max = repeat('a', 1024);
        char *over = repeat('a', 1025);

        (void)state;
        assert_int_equal(request_validate_s3_key("images/alpine-3.18.tar"), 0);
        assert_int_equal(request_validate_s3_key("a"), 0);
        assert_int_equal(request_validate_s3_key(max), 0);
        assert_int_equal(request_validate_s3_key(over), -EINVAL);
        assert_non_null(strstr(err_last(), "at most 1024"));
        assert_int_equal(request_validate_s3_key(""), -EINVAL);
        assert_int_equal(request_validate_s3_key("images/../etc/passwd"), -EINVAL);
        assert_non_null(strstr(err_last(), "'..'"));
        assert_int_equal(request_validate_s3_key(".."), -EINVAL);
        assert_int_equal(request_validate_s3_key("a/./b"), -EINVAL);
        assert_int_equal(request_validate_s3_key("a/.."), -EINVAL);
        assert_int_equal(request_validate_s3_key("/abs/key"), -EINVAL);
        assert_int_equal(request_validate_s3_key("dir/"), -EINVAL);
        assert_int_equal(request_validate_s3_key("a b"), -EINVAL);
        assert_int_equal(request_validate_s3_key("a%2e%2e"), -EINVAL);
        assert_int_equal(request_validate_s3_key("a\\b"), -EINVAL);
        /* Dots inside a segment are not traversal. */
        assert_int_equal(request_validate_s3_key("a/..b/c...tar"), 0);
        free(max);
        free(over);
}

static void test_request_image_id_boundaries(void **state)
{
        char *max = repeat('x', REQUEST_IMAGE_ID_VALID_MAX);
        char *over = repeat('x', REQUEST_IMAGE_ID_VALID_MAX + 1);
        char *seed_max = repeat('x', 255);

        (void)state;
        /* 118 = 127 (DM_NAME_LEN - 1) - strlen("snapshot-"). */
        assert_int_equal(REQUEST_IMAGE_ID_VALID_MAX, 118);
        assert_int_equal(request_validate_image_id("alpine-3_18-001"), 0);
        /* The seed's own example id. */
        assert_int_equal(request_validate_image_id("alpine-3.18-001"), 0);
        assert_int_equal(request_validate_image_id("a"), 0);
        assert_int_equal(request_validate_image_id("a."), 0);
        assert_int_equal(request_validate_image_id("a..b"), 0);
        assert_int_equal(request_validate_image_id(max), 0);
        assert_int_equal(request_validate_image_id(over), -EINVAL);
        assert_non_null(strstr(err_last(), "at most 118"));
        assert_non_null(strstr(err_last(), "snapshot-<image_id>"));
        assert_int_equal(request_validate_image_id(seed_max), -EINVAL);
        assert_int_equal(request_validate_image_id(""), -EINVAL);
        assert_int_equal(request_validate_image_id("."), -EINVAL);
        assert_non_null(strstr(err_last(), "must not start with '.'"));
        assert_int_equal(request_validate_image_id(".."), -EINVAL);
        assert_int_equal(request_validate_image_id(".hidden"), -EINVAL);
        assert_int_equal(request_validate_image_id("a/b"), -EINVAL);
        assert_int_equal(request_validate_image_id("../x"), -EINVAL);
        assert_int_equal(request_validate_image_id("a b"), -EINVAL);
        assert_int_equal(request_validate_image_id("caf\xc3\xa9"), -EINVAL);
        free(max);
        free(over);
        free(seed_max);
}

/* Every request type applies the same image id rule; a field over 255 is refused earlier. */
static void test_request_image_id_rule_in_every_request(void **state)
{
        char *over = repeat('x', REQUEST_IMAGE_ID_VALID_MAX + 1);
        char *huge = repeat('x', 256);
        char json[1024];
        struct download_request d;
        struct unpack_request u;
        struct activate_request a;

        (void)state;
        (void)snprintf(json, sizeof(json), "{\"s3_key\":\"k\",\"image_id\":\"%s\"}", over);
        assert_int_equal(download_request_decode(json, &d), -EINVAL);
        assert_non_null(strstr(err_last(), "image_id"));
        (void)snprintf(json, sizeof(json), "{\"s3_key\":\"k\",\"image_id\":\"%s\"}", huge);
        assert_int_equal(download_request_decode(json, &d), -EINVAL);
        assert_non_null(strstr(err_last(), "(256 bytes, at most 255)"));
        (void)snprintf(json, sizeof(json),
                       "{\"image_id\":\"%s\",\"local_path\":\"/x\",\"checksum\":"
                       "\"e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855\"}",
                       over);
        assert_int_equal(unpack_request_decode(json, &u), -EINVAL);
        assert_non_null(strstr(err_last(), "image_id"));
        (void)snprintf(json, sizeof(json),
                       "{\"image_id\":\"%s\",\"device_id\":\"1\",\"device_name\":\"thin-1\"}",
                       over);
        assert_int_equal(activate_request_decode(json, &a), -EINVAL);
        assert_non_null(strstr(err_last(), "image_id"));
        assert_int_equal(activate_request_decode("{\"image_id\":\"alpine-3.18-001\","
                                                 "\"device_id\":\"1\",\"device_name\":\"thin-1\"}",
                                                 &a),
                         0);
        assert_string_equal(a.image_id, "alpine-3.18-001");
        free(over);
        free(huge);
}

static void test_request_snapshot_name_namespaces(void **state)
{
        char *max = repeat('s', REQUEST_DM_NAME_MAX);
        char *over = repeat('s', REQUEST_DM_NAME_MAX + 1);
        struct activate_request a;

        (void)state;
        assert_int_equal(request_validate_snapshot_name("snapshot-alpine-3.18-001", NULL), 0);
        assert_int_equal(request_validate_snapshot_name("my_snap.1", "pool"), 0);
        assert_int_equal(request_validate_snapshot_name("thin-", NULL), 0);
        assert_int_equal(request_validate_snapshot_name("thin-1a", NULL), 0);
        assert_int_equal(request_validate_snapshot_name("controller", NULL), 0);
        assert_int_equal(request_validate_snapshot_name(max, NULL), 0);
        assert_int_equal(request_validate_snapshot_name(over, NULL), -EINVAL);
        assert_non_null(strstr(err_last(), "at most 127"));
        assert_int_equal(request_validate_snapshot_name("control", NULL), -EINVAL);
        assert_non_null(strstr(err_last(), "/dev/mapper/control"));
        assert_int_equal(request_validate_snapshot_name("thin-0", NULL), -EINVAL);
        assert_int_equal(request_validate_snapshot_name("thin-16777215", NULL), -EINVAL);
        assert_non_null(strstr(err_last(), "origin devices"));
        assert_int_equal(request_validate_snapshot_name(".snap", NULL), -EINVAL);
        assert_int_equal(request_validate_snapshot_name("-snap", NULL), -EINVAL);
        assert_int_equal(request_validate_snapshot_name(".", NULL), -EINVAL);
        assert_int_equal(request_validate_snapshot_name("..", NULL), -EINVAL);
        assert_int_equal(request_validate_snapshot_name("", NULL), -EINVAL);
        assert_int_equal(request_validate_snapshot_name("a/b", NULL), -EINVAL);
        assert_int_equal(request_validate_snapshot_name("pool", "pool"), -EINVAL);
        assert_non_null(strstr(err_last(), "pool's name 'pool'"));
        assert_int_equal(request_validate_snapshot_name("pool", ""), 0);

        /* Through the decoder. */
        assert_int_equal(activate_request_decode("{\"image_id\":\"a\",\"device_id\":\"1\","
                                                 "\"device_name\":\"thin-1\","
                                                 "\"snapshot_name\":\"thin-2\"}",
                                                 &a),
                         -EINVAL);
        assert_int_equal(activate_request_decode("{\"image_id\":\"a\",\"device_id\":\"1\","
                                                 "\"device_name\":\"thin-1\",\"pool_name\":\"p1\","
                                                 "\"snapshot_name\":\"p1\"}",
                                                 &a),
                         -EINVAL);
        assert_int_equal(activate_request_decode("{\"image_id\":\"a\",\"device_id\":\"1\","
                                                 "\"device_name\":\"thin-1\","
                                                 "\"snapshot_name\":\"control\"}",
                                                 &a),
                         -EINVAL);
        free(max);
        free(over);
}

static void test_request_bucket_rules(void **state)
{
        char *max = repeat('b', 63);
        char *over = repeat('b', 64);

        (void)state;
        assert_int_equal(request_validate_bucket("flyio-container-images"), 0);
        assert_int_equal(request_validate_bucket("abc"), 0);
        assert_int_equal(request_validate_bucket("my.bucket.1"), 0);
        assert_int_equal(request_validate_bucket(max), 0);
        assert_int_equal(request_validate_bucket(over), -EINVAL);
        assert_int_equal(request_validate_bucket("ab"), -EINVAL);
        assert_int_equal(request_validate_bucket("Upper"), -EINVAL);
        assert_int_equal(request_validate_bucket("-abc"), -EINVAL);
        assert_int_equal(request_validate_bucket("abc-"), -EINVAL);
        assert_int_equal(request_validate_bucket("a..b"), -EINVAL);
        assert_int_equal(request_validate_bucket("192.168.5.4"), -EINVAL);
        assert_int_equal(request_validate_bucket("xn--abc"), -EINVAL);
        assert_int_equal(request_validate_bucket("sthree-abc"), -EINVAL);
        assert_int_equal(request_validate_bucket("abc-s3alias"), -EINVAL);
        assert_int_equal(request_validate_bucket("abc--ol-s3"), -EINVAL);
        assert_int_equal(request_validate_bucket("a_b"), -EINVAL);
        free(max);
        free(over);
}

static void test_request_download_decode(void **state)
{
        struct download_request req;

        (void)state;
        assert_int_equal(download_request_decode(
                                 "{\"s3_key\":\"images/a.tar\",\"image_id\":\"a-1\","
                                 "\"bucket\":\"my-bucket\",\"extra\":[1,2],\"checksum\":null}",
                                 &req),
                         0);
        assert_string_equal(req.s3_key, "images/a.tar");
        assert_string_equal(req.image_id, "a-1");
        assert_string_equal(req.bucket, "my-bucket");
        assert_string_equal(req.checksum, "");

        assert_int_equal(download_request_decode("{\"image_id\":\"a\"}", &req), -EINVAL);
        assert_string_equal(err_last(), "missing required field 's3_key'");
        assert_int_equal(download_request_decode("{\"s3_key\":5,\"image_id\":\"a\"}", &req),
                         -EINVAL);
        assert_string_equal(err_last(), "field 's3_key': expected a string, got int");
        assert_int_equal(download_request_decode("{\"s3_key\":\"k\"", &req), -EINVAL);
        assert_non_null(strstr(err_last(), "not valid JSON"));
        assert_int_equal(download_request_decode("[1]", &req), -EINVAL);
        assert_string_equal(err_last(), "message must be a JSON object");
        assert_int_equal(download_request_decode("{\"s3_key\":\"k\",\"image_id\":\"a\"} x", &req),
                         -EINVAL);
        assert_int_equal(download_request_decode("", &req), -EINVAL);
        assert_int_equal(
                download_request_decode("{\"s3_key\":\"a\\u0000b\",\"image_id\":\"a\"}", &req),
                -EINVAL);
        assert_non_null(strstr(err_last(), "NUL"));
        assert_int_equal(
                download_request_decode(
                        "{\"s3_key\":\"k\",\"image_id\":\"a\",\"checksum\":\"abc\"}", &req),
                -EINVAL);
        assert_non_null(strstr(err_last(), "checksum"));
        assert_int_equal(download_request_decode("{\"a\":[[[[[[[[[[[[1]]]]]]]]]]]]}", &req),
                         -EINVAL);
}

/* A valid download request of exactly @size bytes, padded with an unknown field. */
static char *sized_document(size_t size)
{
        static const char head[] = "{\"s3_key\":\"k\",\"image_id\":\"a\",\"pad\":\"";
        char *doc = malloc(size + 1);

        assert_non_null(doc);
        assert_true(size > sizeof(head) + 2);
        memcpy(doc, head, sizeof(head) - 1);
        memset(doc + sizeof(head) - 1, 'p', size - (sizeof(head) - 1) - 2);
        memcpy(doc + size - 2, "\"}", 2);
        doc[size] = '\0';
        return doc;
}

static void test_request_oversized_document(void **state)
{
        char *at_max = sized_document(REQUEST_JSON_MAX);
        char *over = sized_document(REQUEST_JSON_MAX + 1);
        size_t n = REQUEST_JSON_MAX + 10;
        char *spaces = malloc(n + 1);
        struct download_request req;

        (void)state;
        assert_int_equal(strlen(at_max), REQUEST_JSON_MAX);
        assert_int_equal(download_request_decode(at_max, &req), 0);
        assert_string_equal(req.image_id, "a");
        assert_int_equal(download_request_decode(over, &req), -EMSGSIZE);
        assert_non_null(strstr(err_last(), "larger than 65536 bytes"));

        /* Trailing whitespace counts towards the size too. */
        assert_non_null(spaces);
        memset(spaces, ' ', n);
        memcpy(spaces, "{\"s3_key\":\"k\",\"image_id\":\"a\"}", 29);
        spaces[n] = '\0';
        assert_int_equal(download_request_decode(spaces, &req), -EMSGSIZE);
        free(at_max);
        free(over);
        free(spaces);
}

static void test_request_trailing_whitespace(void **state)
{
        struct download_request req;

        (void)state;
        assert_int_equal(download_request_decode("{\"s3_key\":\"k\",\"image_id\":\"a\"}\n", &req),
                         0);
        assert_int_equal(
                download_request_decode("{\"s3_key\":\"k\",\"image_id\":\"a\"} \t\r\n", &req), 0);
        assert_int_equal(
                download_request_decode("\n {\"s3_key\":\"k\",\"image_id\":\"a\"}\n", &req), 0);
        assert_int_equal(download_request_decode("{\"s3_key\":\"k\",\"image_id\":\"a\"}\n x", &req),
                         -EINVAL);
        assert_non_null(strstr(err_last(), "trailing data"));
        assert_int_equal(
                download_request_decode("{\"s3_key\":\"k\",\"image_id\":\"a\"}{\"a\":1}", &req),
                -EINVAL);
}

static void test_request_unpack_roundtrip(void **state)
{
        struct unpack_request in = {0}, out;
        char *json;

        (void)state;
        strcpy(in.image_id, "alpine-3_18-001");
        strcpy(in.local_path, "/var/lib/flyio/images/alpine-3_18-001.tar");
        strcpy(in.checksum, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
        in.device_size = 10737418240;
        json = unpack_request_encode(&in);
        assert_non_null(json);
        assert_null(strstr(json, "pool_name")); /* omitempty */
        assert_non_null(strstr(json, "\"device_size\":10737418240"));
        assert_int_equal(unpack_request_decode(json, &out), 0);
        assert_memory_equal(&in, &out, sizeof(in));
        free(json);

        assert_int_equal(unpack_request_decode("{\"image_id\":\"a\",\"local_path\":\"rel\","
                                               "\"checksum\":\"x\"}",
                                               &out),
                         -EINVAL);
        assert_int_equal(
                unpack_request_decode(
                        "{\"image_id\":\"a\",\"local_path\":\"/x\",\"checksum\":"
                        "\"e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855\","
                        "\"device_size\":1000}",
                        &out),
                -EINVAL);
        assert_non_null(strstr(err_last(), "multiple of 512"));
        assert_int_equal(
                unpack_request_decode(
                        "{\"image_id\":\"a\",\"local_path\":\"/x\",\"checksum\":"
                        "\"e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855\","
                        "\"device_size\":\"10G\"}",
                        &out),
                -EINVAL);
        assert_string_equal(err_last(), "field 'device_size': expected an integer, got string");
}

static void test_request_activate_validation(void **state)
{
        struct activate_request req;

        (void)state;
        assert_int_equal(activate_request_decode("{\"image_id\":\"a\",\"device_id\":\"12345\","
                                                 "\"device_name\":\"thin-12345\"}",
                                                 &req),
                         0);
        assert_string_equal(req.device_id, "12345");
        assert_int_equal(activate_request_decode("{\"image_id\":\"a\",\"device_id\":\"16777216\","
                                                 "\"device_name\":\"thin-1\"}",
                                                 &req),
                         -EINVAL);
        assert_int_equal(activate_request_decode("{\"image_id\":\"a\",\"device_id\":\"-1\","
                                                 "\"device_name\":\"thin-1\"}",
                                                 &req),
                         -EINVAL);
        assert_int_equal(activate_request_decode("{\"image_id\":\"a\",\"device_id\":\"1\","
                                                 "\"device_name\":\"thin/../x\"}",
                                                 &req),
                         -EINVAL);
        assert_int_equal(activate_request_decode("{\"image_id\":\"a\",\"device_id\":\"1\","
                                                 "\"device_name\":\"t\",\"snapshot_name\":\"..\"}",
                                                 &req),
                         -EINVAL);
}

static void test_request_responses_encode(void **state)
{
        struct download_response d = {0}, d2;
        struct activate_response a = {0};
        char *json;

        (void)state;
        strcpy(d.image_id, "img");
        strcpy(d.local_path, "/x/img.tar");
        strcpy(d.checksum, "abc");
        d.size_bytes = 42;
        d.downloaded = true;
        d.downloaded_at_ms = 1764788491123;
        json = download_response_encode(&d);
        assert_non_null(json);
        assert_non_null(strstr(json, "\"downloaded_at\":\"2025-12-03T19:01:31.123Z\""));
        assert_non_null(strstr(json, "\"downloaded\":true"));
        assert_int_equal(download_response_decode(json, &d2), 0);
        assert_memory_equal(&d, &d2, sizeof(d));
        free(json);

        strcpy(a.image_id, "img");
        json = activate_response_encode(&a);
        assert_non_null(strstr(json, "\"activated\":false"));
        assert_non_null(strstr(json, "\"snapshot_id\":\"\""));
        free(json);
}

static void test_request_unpack_response_roundtrip(void **state)
{
        struct unpack_response in = {0}, out;
        char *json;

        (void)state;
        strcpy(in.image_id, "alpine-3.18-001");
        strcpy(in.device_id, "42");
        strcpy(in.device_name, "thin-42");
        strcpy(in.device_path, "/dev/mapper/thin-42");
        in.size_bytes = 10737418240;
        in.file_count = 1234;
        in.unpacked = true;
        in.already_exist = false;
        in.unpacked_at_ms = 1764788491123;
        json = unpack_response_encode(&in);
        assert_non_null(json);
        assert_non_null(strstr(json, "\"device_id\":\"42\""));
        assert_non_null(strstr(json, "\"file_count\":1234"));
        assert_non_null(strstr(json, "\"unpacked\":true"));
        assert_non_null(strstr(json, "\"already_exist\":false"));
        assert_non_null(strstr(json, "\"unpacked_at\":\"2025-12-03T19:01:31.123Z\""));
        assert_int_equal(unpack_response_decode(json, &out), 0);
        assert_memory_equal(&in, &out, sizeof(in));
        free(json);

        /* Unset time is omitted, and decodes back to 0. */
        in.unpacked_at_ms = 0;
        json = unpack_response_encode(&in);
        assert_null(strstr(json, "unpacked_at"));
        assert_int_equal(unpack_response_decode(json, &out), 0);
        assert_true(out.unpacked_at_ms == 0);
        free(json);

        assert_int_equal(unpack_response_decode("{\"device_id\":\"1\"}", &out), -EINVAL);
        assert_string_equal(err_last(), "missing required field 'image_id'");
        assert_int_equal(unpack_response_decode("{\"image_id\":\"a\",\"file_count\":\"12\"}", &out),
                         -EINVAL);
        assert_string_equal(err_last(), "field 'file_count': expected an integer, got string");
        assert_int_equal(unpack_response_decode("{\"image_id\":\"a\",\"unpacked\":1}", &out),
                         -EINVAL);
        assert_string_equal(err_last(), "field 'unpacked': expected a boolean, got int");
        assert_int_equal(
                unpack_response_decode("{\"image_id\":\"a\",\"unpacked_at\":\"today\"}", &out),
                -EINVAL);
        assert_string_equal(err_last(), "field 'unpacked_at': expected an RFC 3339 UTC timestamp");
}

static void test_request_activate_response_roundtrip(void **state)
{
        struct activate_response in = {0}, out;
        char *json;

        (void)state;
        strcpy(in.image_id, "alpine-3.18-001");
        strcpy(in.snapshot_id, "43");
        strcpy(in.snapshot_name, "snapshot-alpine-3.18-001");
        strcpy(in.device_path, "/dev/mapper/snapshot-alpine-3.18-001");
        in.active = true;
        in.activated = true;
        json = activate_response_encode(&in);
        assert_non_null(json);
        assert_int_equal(activate_response_decode(json, &out), 0);
        assert_memory_equal(&in, &out, sizeof(in));
        free(json);

        assert_int_equal(activate_response_decode(
                                 "{\"image_id\":\"a\",\"snapshot_id\":\"7\",\"active\":false,"
                                 "\"already_exist\":true,\"future_field\":{\"x\":1}}",
                                 &out),
                         0);
        assert_string_equal(out.snapshot_id, "7");
        assert_false(out.active);
        assert_true(out.already_exist);
        assert_int_equal(activate_response_decode("{\"snapshot_id\":\"1\"}", &out), -EINVAL);
        assert_string_equal(err_last(), "missing required field 'image_id'");
        assert_int_equal(activate_response_decode("{\"image_id\":\"a\",\"active\":\"true\"}", &out),
                         -EINVAL);
        assert_string_equal(err_last(), "field 'active': expected a boolean, got string");
        assert_int_equal(activate_response_decode("{\"image_id\":\"a\",\"snapshot_id\":7}", &out),
                         -EINVAL);
        assert_string_equal(err_last(), "field 'snapshot_id': expected a string, got int");
}

/* Missing required fields and wrong types, for every decoder, each with its message. */
static void test_request_missing_and_wrong_types_every_decoder(void **state)
{
        static const char ck[] = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        struct unpack_request u;
        struct activate_request a;
        struct download_response d;
        char json[512];

        (void)state;
        (void)snprintf(json, sizeof(json), "{\"image_id\":\"a\",\"checksum\":\"%s\"}", ck);
        assert_int_equal(unpack_request_decode(json, &u), -EINVAL);
        assert_string_equal(err_last(), "missing required field 'local_path'");
        assert_int_equal(unpack_request_decode("{\"image_id\":\"a\",\"local_path\":\"/x\"}", &u),
                         -EINVAL);
        assert_string_equal(err_last(), "missing required field 'checksum'");
        (void)snprintf(json, sizeof(json),
                       "{\"image_id\":\"a\",\"local_path\":[\"/x\"],\"checksum\":\"%s\"}", ck);
        assert_int_equal(unpack_request_decode(json, &u), -EINVAL);
        assert_string_equal(err_last(), "field 'local_path': expected a string, got array");
        (void)snprintf(json, sizeof(json),
                       "{\"image_id\":\"a\",\"local_path\":\"/x\",\"checksum\":\"%s\","
                       "\"pool_name\":false}",
                       ck);
        assert_int_equal(unpack_request_decode(json, &u), -EINVAL);
        assert_string_equal(err_last(), "field 'pool_name': expected a string, got boolean");
        (void)snprintf(json, sizeof(json),
                       "{\"image_id\":\"a\",\"local_path\":\"/x\",\"checksum\":\"%s\","
                       "\"device_size\":1.5e9}",
                       ck);
        assert_int_equal(unpack_request_decode(json, &u), -EINVAL);
        assert_string_equal(err_last(), "field 'device_size': expected an integer, got double");

        assert_int_equal(
                activate_request_decode("{\"image_id\":\"a\",\"device_name\":\"thin-1\"}", &a),
                -EINVAL);
        assert_string_equal(err_last(), "missing required field 'device_id'");
        assert_int_equal(activate_request_decode("{\"image_id\":\"a\",\"device_id\":\"1\"}", &a),
                         -EINVAL);
        assert_string_equal(err_last(), "missing required field 'device_name'");
        assert_int_equal(
                activate_request_decode(
                        "{\"image_id\":\"a\",\"device_id\":1,\"device_name\":\"thin-1\"}", &a),
                -EINVAL);
        assert_string_equal(err_last(), "field 'device_id': expected a string, got int");
        assert_int_equal(activate_request_decode("{\"image_id\":{},\"device_id\":\"1\","
                                                 "\"device_name\":\"thin-1\"}",
                                                 &a),
                         -EINVAL);
        assert_string_equal(err_last(), "field 'image_id': expected a string, got object");

        assert_int_equal(download_response_decode("{\"downloaded\":true}", &d), -EINVAL);
        assert_string_equal(err_last(), "missing required field 'image_id'");
        assert_int_equal(
                download_response_decode("{\"image_id\":\"a\",\"downloaded\":\"yes\"}", &d),
                -EINVAL);
        assert_string_equal(err_last(), "field 'downloaded': expected a boolean, got string");
        assert_int_equal(download_response_decode("{\"image_id\":\"a\",\"already_exist\":0}", &d),
                         -EINVAL);
        assert_string_equal(err_last(), "field 'already_exist': expected a boolean, got int");
        assert_int_equal(download_response_decode("{\"image_id\":\"a\",\"size_bytes\":true}", &d),
                         -EINVAL);
        assert_string_equal(err_last(), "field 'size_bytes': expected an integer, got boolean");
        assert_int_equal(download_response_decode("{\"image_id\":\"a\",\"downloaded_at\":5}", &d),
                         -EINVAL);
        assert_string_equal(err_last(),
                            "field 'downloaded_at': expected an RFC 3339 UTC timestamp");
}

static void test_request_parse_time(void **state)
{
        int64_t ms;

        (void)state;
        assert_int_equal(request_parse_time("1970-01-01T00:00:01Z", &ms), 0);
        assert_true(ms == 1000);
        assert_int_equal(request_parse_time("1970-01-01T00:00:01.5Z", &ms), 0);
        assert_true(ms == 1500);
        assert_int_equal(request_parse_time("1970-01-01T00:00:01", &ms), -EINVAL);
        assert_int_equal(request_parse_time("yesterday", &ms), -EINVAL);
}

int main(void)
{
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_request_s3_key_boundaries),
                cmocka_unit_test(test_request_image_id_boundaries),
                cmocka_unit_test(test_request_image_id_rule_in_every_request),
                cmocka_unit_test(test_request_snapshot_name_namespaces),
                cmocka_unit_test(test_request_trailing_whitespace),
                cmocka_unit_test(test_request_unpack_response_roundtrip),
                cmocka_unit_test(test_request_activate_response_roundtrip),
                cmocka_unit_test(test_request_missing_and_wrong_types_every_decoder),
                cmocka_unit_test(test_request_bucket_rules),
                cmocka_unit_test(test_request_download_decode),
                cmocka_unit_test(test_request_oversized_document),
                cmocka_unit_test(test_request_unpack_roundtrip),
                cmocka_unit_test(test_request_activate_validation),
                cmocka_unit_test(test_request_responses_encode),
                cmocka_unit_test(test_request_parse_time),
        };

        return cmocka_run_group_tests(tests, NULL, NULL);
}
