/* Unit tests for stages/request: JSON codecs of the seed's types and their validation. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
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
        char *max = repeat('x', 255);
        char *over = repeat('x', 256);

        (void)state;
        assert_int_equal(request_validate_image_id("alpine-3_18-001"), 0);
        assert_int_equal(request_validate_image_id(max), 0);
        assert_int_equal(request_validate_image_id(over), -EINVAL);
        assert_non_null(strstr(err_last(), "at most 255"));
        assert_int_equal(request_validate_image_id(""), -EINVAL);
        assert_int_equal(request_validate_image_id("alpine.3"), -EINVAL);
        assert_int_equal(request_validate_image_id("a/b"), -EINVAL);
        assert_int_equal(request_validate_image_id("../x"), -EINVAL);
        assert_int_equal(request_validate_image_id("caf\xc3\xa9"), -EINVAL);
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

static void test_request_oversized_document(void **state)
{
        size_t n = REQUEST_JSON_MAX + 10;
        char *doc = malloc(n + 1);
        struct download_request req;

        (void)state;
        assert_non_null(doc);
        memset(doc, ' ', n);
        memcpy(doc, "{\"s3_key\":\"k\",\"image_id\":\"a\"}", 29);
        doc[n] = '\0';
        assert_int_equal(download_request_decode(doc, &req), -EMSGSIZE);
        assert_non_null(strstr(err_last(), "larger than"));
        free(doc);
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
