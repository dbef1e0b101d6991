/*
 * Unit tests for stages/s3_client that need no server: the XML error parser (fed hostile
 * bodies), the error-code table, URL building and option checks.
 */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "common/err.h"
#include "common/util.h"
#include "stages/s3_client.h"

static void test_s3_client_parse_error_document(void **state)
{
        static const char body[] =
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>NoSuchKey</Code>"
                "<Message>The specified key does not exist.</Message><Key>a/b.tar</Key>"
                "<RequestId>4442587FB7D0A2F9</RequestId><HostId>h</HostId></Error>";
        struct s3_error e;

        (void)state;
        assert_int_equal(s3_client_parse_error(body, strlen(body), &e), 0);
        assert_string_equal(e.code, "NoSuchKey");
        assert_string_equal(e.message, "The specified key does not exist.");
        assert_string_equal(e.request_id, "4442587FB7D0A2F9");
}

static void test_s3_client_parse_error_entities_and_control_bytes(void **state)
{
        static const char body[] = "<Error><Code>AccessDenied</Code><Message>a &amp; b &lt;c&gt; "
                                   "&quot;d&quot; &apos;e&apos; &bogus; \x1b[31mred\r\n\xc3\xbc"
                                   "</Message></Error>";
        struct s3_error e;

        (void)state;
        assert_int_equal(s3_client_parse_error(body, sizeof(body) - 1, &e), 0);
        assert_string_equal(e.code, "AccessDenied");
        assert_string_equal(e.message, "a & b <c> \"d\" 'e' &bogus; ?[31mred????");
        assert_string_equal(e.request_id, "");
}

static void test_s3_client_parse_error_rejects_garbage(void **state)
{
        static const char unclosed[] = "<Error><Code>NoSuchKey";
        static const char bad_code[] = "<Error><Code>No Such<Key></Code></Error>";
        static const char empty_code[] = "<Error><Code></Code></Error>";
        static const char html[] = "<html><body>502 Bad Gateway</body></html>";
        static const char with_nul[] = "<Error>\0<Code>SlowDown</Code></Error>";
        struct s3_error e = {.code = "untouched"};

        (void)state;
        assert_int_equal(s3_client_parse_error(unclosed, sizeof(unclosed) - 1, &e), -ENODATA);
        assert_int_equal(s3_client_parse_error(bad_code, sizeof(bad_code) - 1, &e), -ENODATA);
        assert_int_equal(s3_client_parse_error(empty_code, sizeof(empty_code) - 1, &e), -ENODATA);
        assert_int_equal(s3_client_parse_error(html, sizeof(html) - 1, &e), -ENODATA);
        assert_int_equal(s3_client_parse_error(NULL, 0, &e), -ENODATA);
        assert_int_equal(s3_client_parse_error("", 0, &e), -ENODATA);
        assert_string_equal(e.code, "untouched"); /* not written on failure */
        /* An embedded NUL does not end the search: the body is bytes, not a string. */
        assert_int_equal(s3_client_parse_error(with_nul, sizeof(with_nul) - 1, &e), 0);
        assert_string_equal(e.code, "SlowDown");
}

static void test_s3_client_parse_error_oversized_body(void **state)
{
        const size_t big = 8u << 20;
        char *body = malloc(big);
        struct s3_error e;

        (void)state;
        assert_non_null(body);
        /* Only the first 16 KiB are looked at: a code placed later is not seen. */
        memset(body, 'A', big);
        memcpy(body + big - 64, "<Code>NoSuchKey</Code>", 22);
        assert_int_equal(s3_client_parse_error(body, big, &e), -ENODATA);

        /* A huge message is cut to the buffer, a huge code is refused. */
        memset(body, 'M', big);
        memcpy(body, "<Error><Code>InternalError</Code><Message>", 42);
        memcpy(body + 10000, "</Message>", 10);
        assert_int_equal(s3_client_parse_error(body, big, &e), 0);
        assert_string_equal(e.code, "InternalError");
        assert_int_equal(strlen(e.message), sizeof(e.message) - 1);
        assert_int_equal(s3_client_parse_error(body, 16384, &e), 0);

        memset(body, 'C', big);
        memcpy(body, "<Code>", 6);
        memcpy(body + 1000, "</Code>", 7);
        assert_int_equal(s3_client_parse_error(body, big, &e), 0);
        assert_int_equal(strlen(e.code), sizeof(e.code) - 1); /* truncated, still a code */
        free(body);
}

static void test_s3_client_error_mapping_table(void **state)
{
        static const struct {
                long status;
                const char *code;
                int r;
                const char *hint_has;
        } cases[] = {
                {404, "NoSuchKey", -ENOENT, "object does not exist"},
                {404, "NoSuchBucket", -ENOENT, "bucket does not exist"},
                {403, "AccessDenied", -EACCES, "policy"},
                {403, "InvalidAccessKeyId", -EACCES, "AWS_ACCESS_KEY_ID"},
                {403, "SignatureDoesNotMatch", -EACCES, "AWS_SECRET_ACCESS_KEY"},
                {403, "RequestTimeTooSkewed", -EACCES, "clock"},
                {400, "ExpiredToken", -EACCES, "AWS_SESSION_TOKEN"},
                {416, "InvalidRange", -ERANGE, "range"},
                {412, "PreconditionFailed", -ESTALE, "ETag"},
                {503, "SlowDown", -EAGAIN, "transient"},
                {500, "InternalError", -EAGAIN, "transient"},
                {400, "RequestTimeout", -ETIMEDOUT, "transient"},
                {301, "PermanentRedirect", -EINVAL, "AWS_REGION"},
                /* No code (HEAD has no body, or a proxy's HTML page): by status. */
                {404, "", -ENOENT, "does not exist"},
                {403, "", -EACCES, "credentials"},
                {401, "", -EACCES, "credentials"},
                {412, "", -ESTALE, "ETag"},
                {416, "", -ERANGE, "range"},
                {408, "", -ETIMEDOUT, "transient"},
                {429, "", -EAGAIN, "transient"},
                {502, "", -EAGAIN, "transient"},
                {503, "", -EAGAIN, "transient"},
                {400, "", -EBADMSG, "unexpected"},
                {503, "SomethingNew", -EAGAIN, "transient"},
                /* Not implemented is not a passing condition. */
                {501, "NotImplemented", -ENOSYS, "S3_ENDPOINT"},
                {501, "", -ENOSYS, "S3_ENDPOINT"},
        };

        (void)state;
        for (size_t i = 0; i < ARRAY_SIZE(cases); i++) {
                const char *hint = NULL;
                int r = s3_client_errno_for(cases[i].status, cases[i].code, &hint);

                if (r != cases[i].r || !hint || !strstr(hint, cases[i].hint_has))
                        fail_msg("%ld %s: got %s '%s'", cases[i].status, cases[i].code, err_name(r),
                                 hint ? hint : "(null)");
        }
        /* The classes the FSM relies on. */
        const char *hint;

        assert_false(err_is_transient(s3_client_errno_for(404, "NoSuchKey", &hint)));
        assert_false(err_is_transient(s3_client_errno_for(403, "SignatureDoesNotMatch", &hint)));
        assert_true(err_is_transient(s3_client_errno_for(503, "SlowDown", &hint)));
        assert_true(err_is_transient(s3_client_errno_for(500, "", &hint)));
        assert_false(err_is_transient(s3_client_errno_for(501, "NotImplemented", &hint)));
        assert_false(err_is_transient(s3_client_errno_for(501, "", &hint)));
}

struct url_case {
        const char *endpoint;
        const char *region;
        bool path_style;
        const char *bucket;
        const char *key;
        const char *url;
        const char *host;
        const char *path;
};

static void check_url(const struct url_case *t)
{
        const struct s3_client_options o = {
                .endpoint = t->endpoint,
                .region = t->region,
                .force_path_style = t->path_style,
        };
        struct s3_client *c = NULL;
        char *url = NULL, *host = NULL, *path = NULL;

        assert_int_equal(s3_client_new(&o, &c), 0);
        assert_int_equal(s3_client_build_url(c, t->bucket, t->key, &url, &host, &path), 0);
        assert_string_equal(url, t->url);
        assert_string_equal(host, t->host);
        assert_string_equal(path, t->path);
        free(url);
        free(host);
        free(path);
        s3_client_free(c);
}

static void test_s3_client_build_url(void **state)
{
        static const struct url_case cases[] = {
                /* Path style against a local endpoint; an IP literal forces it anyway. */
                {"http://127.0.0.1:19000", NULL, true, "images", "a/b.tar",
                 "http://127.0.0.1:19000/images/a/b.tar", "127.0.0.1:19000", "/images/a/b.tar"},
                {"http://127.0.0.1:19000/", NULL, false, "images", "x",
                 "http://127.0.0.1:19000/images/x", "127.0.0.1:19000", "/images/x"},
                /* AWS default: virtual host in the region. */
                {NULL, "eu-west-1", false, "my-bucket", "img/1.tar",
                 "https://my-bucket.s3.eu-west-1.amazonaws.com/img/1.tar",
                 "my-bucket.s3.eu-west-1.amazonaws.com", "/img/1.tar"},
                {NULL, NULL, false, "b-1", "k", "https://b-1.s3.us-east-1.amazonaws.com/k",
                 "b-1.s3.us-east-1.amazonaws.com", "/k"},
                /* Dotted bucket over TLS would fail the wildcard certificate: path style. */
                {NULL, "us-west-2", false, "my.bucket", "k",
                 "https://s3.us-west-2.amazonaws.com/my.bucket/k", "s3.us-west-2.amazonaws.com",
                 "/my.bucket/k"},
                /* Upper case is not a DNS name: path style. */
                {"https://Store.Example:9000/s3/", NULL, false, "Legacy_Bucket", "k",
                 "https://store.example:9000/s3/Legacy_Bucket/k", "store.example:9000",
                 "/s3/Legacy_Bucket/k"},
                {"https://store.example", NULL, false, "bkt", "k", "https://bkt.store.example/k",
                 "bkt.store.example", "/k"},
                /* Key encoding: every segment escaped, '/' kept, dots and doubled slashes kept. */
                {"http://127.0.0.1:19000", NULL, true, "b", "dir one/./../x//y+z=1&\xc3\xbc.tar",
                 "http://127.0.0.1:19000/b/dir%20one/./../x//y%2Bz%3D1%26%C3%BC.tar",
                 "127.0.0.1:19000", "/b/dir%20one/./../x//y%2Bz%3D1%26%C3%BC.tar"},
                /* Bucket-level request. */
                {"http://127.0.0.1:19000", NULL, true, "b", NULL, "http://127.0.0.1:19000/b",
                 "127.0.0.1:19000", "/b"},
        };

        (void)state;
        for (size_t i = 0; i < ARRAY_SIZE(cases); i++)
                check_url(&cases[i]);
}

static void test_s3_client_rejects_bad_names_and_options(void **state)
{
        const struct s3_client_options ok = {.endpoint = "http://127.0.0.1:1"};
        struct s3_client_options o = ok;
        struct s3_client *c = NULL;
        char *url, *host, *path;
        char long_key[1100];

        (void)state;
        assert_int_equal(s3_client_new(&ok, &c), 0);
        assert_int_equal(s3_client_build_url(c, "", "k", &url, &host, &path), -EINVAL);
        assert_int_equal(s3_client_build_url(c, "a/b", "k", &url, &host, &path), -EINVAL);
        assert_int_equal(s3_client_build_url(c, "a b", "k", &url, &host, &path), -EINVAL);
        assert_int_equal(s3_client_build_url(c, "b", "", &url, &host, &path), -EINVAL);
        memset(long_key, 'k', sizeof(long_key) - 1);
        long_key[sizeof(long_key) - 1] = '\0';
        assert_int_equal(s3_client_build_url(c, "b", long_key, &url, &host, &path), -EINVAL);
        s3_client_free(c);

        static const char *const bad_endpoints[] = {
                "ftp://host",          "127.0.0.1:19000",  "http://",
                "http://user:pw@host", "http://host/?q=1", "http://host/a b",
        };
        for (size_t i = 0; i < ARRAY_SIZE(bad_endpoints); i++) {
                o = ok;
                o.endpoint = bad_endpoints[i];
                if (s3_client_new(&o, &c) != -EINVAL)
                        fail_msg("endpoint '%s' accepted", bad_endpoints[i]);
        }

        /* Half-set credentials are a configuration mistake, not anonymous access. */
        o = ok;
        o.access_key_id = "AKID";
        assert_int_equal(s3_client_new(&o, &c), -EINVAL);
        assert_non_null(strstr(err_last(), "AWS_SECRET_ACCESS_KEY"));
        o = ok;
        o.secret_access_key = "secret-only";
        assert_int_equal(s3_client_new(&o, &c), -EINVAL);
        assert_null(strstr(err_last(), "secret-only"));
        o = ok;
        o.region = "us east";
        assert_int_equal(s3_client_new(&o, &c), -EINVAL);
        err_clear();
}

/* Nothing listens on port 1: a transient connection error that names the object. */
static void test_s3_client_connection_refused_is_transient(void **state)
{
        const struct s3_client_options o = {
                .endpoint = "http://127.0.0.1:1",
                .access_key_id = "AKIDEXAMPLE",
                .secret_access_key = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
        };
        struct s3_client *c = NULL;
        struct s3_object_info info;
        int r;

        (void)state;
        assert_int_equal(s3_client_new(&o, &c), 0);
        r = s3_client_head(c, "bucket", "some/key.tar", NULL, &info);
        assert_int_equal(r, -ECONNREFUSED);
        assert_true(err_is_transient(r));
        assert_non_null(strstr(err_last(), "'some/key.tar'"));
        assert_non_null(strstr(err_last(), "'bucket'"));
        assert_null(strstr(err_last(), "wJalrXUtnFEMI"));
        assert_null(strstr(err_last(), "Authorization"));
        s3_client_free(c);
        err_clear();
}

int main(void)
{
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_s3_client_parse_error_document),
                cmocka_unit_test(test_s3_client_parse_error_entities_and_control_bytes),
                cmocka_unit_test(test_s3_client_parse_error_rejects_garbage),
                cmocka_unit_test(test_s3_client_parse_error_oversized_body),
                cmocka_unit_test(test_s3_client_error_mapping_table),
                cmocka_unit_test(test_s3_client_build_url),
                cmocka_unit_test(test_s3_client_rejects_bad_names_and_options),
                cmocka_unit_test(test_s3_client_connection_refused_is_transient),
        };

        return cmocka_run_group_tests(tests, NULL, NULL);
}
