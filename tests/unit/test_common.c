/* Unit tests for common/: error buffer, errno classification, logging, parsing helpers. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "common/err.h"
#include "common/log.h"
#include "common/util.h"

static void test_common_err_set_returns_code_and_keeps_text(void **state)
{
        (void)state;
        assert_int_equal(err_set(-EINVAL, "bad '%s'", "x"), -EINVAL);
        assert_string_equal(err_last(), "bad 'x'");
        assert_int_equal(err_wrap(-EINVAL, "failed to parse"), -EINVAL);
        assert_string_equal(err_last(), "failed to parse: bad 'x'");
        err_clear();
        assert_string_equal(err_last(), "");
        assert_string_equal(err_text(-ENOENT), strerror(ENOENT));
        err_wrap(-ENOENT, "failed to open '%s'", "f");
        assert_string_equal(err_last(), "failed to open 'f': No such file or directory");
        err_clear();
}

static void test_common_err_transient_classification(void **state)
{
        (void)state;
        assert_true(err_is_transient(-EAGAIN));
        assert_true(err_is_transient(-ETIMEDOUT));
        assert_true(err_is_transient(-ECONNRESET));
        assert_true(err_is_transient(-EBUSY));
        assert_false(err_is_transient(-EINVAL));
        assert_false(err_is_transient(-ENOENT));
        assert_false(err_is_transient(-EACCES));
        assert_false(err_is_transient(-EBADMSG));
        assert_string_equal(err_name(-EBADMSG), "EBADMSG");
        assert_string_equal(err_name(-9999), "E?");
}

static void test_common_log_redacts_registered_secrets(void **state)
{
        char line[128] = "secret=wJalrXUtnFEMI/K7MDENG and again wJalrXUtnFEMI/K7MDENG";
        char shortline[64] = "pw=abcd!";

        (void)state;
        assert_int_equal(log_register_secret("wJalrXUtnFEMI/K7MDENG"), 0);
        assert_int_equal(log_register_secret("abcd"), 0);
        assert_int_equal(log_register_secret("ab"), 0); /* too short: ignored */
        log_redact(line);
        assert_null(strstr(line, "wJalr"));
        assert_string_equal(line, "secret=[redacted] and again [redacted]");
        log_redact(shortline);
        assert_string_equal(shortline, "pw=****!");
        log_forget_secrets();
}

static void test_common_log_escape(void **state)
{
        char out[64];
        char tiny[6];

        (void)state;
        log_escape("a \"q\" \\ \n\x01", out, sizeof(out));
        assert_string_equal(out, "a \\\"q\\\" \\\\ \\n\\x01");
        log_escape("abcdefghij", tiny, sizeof(tiny));
        assert_true(strlen(tiny) < sizeof(tiny));
}

static void test_common_parse_numbers(void **state)
{
        uint64_t u;
        int i;
        bool b;

        (void)state;
        assert_int_equal(util_parse_u64("18446744073709551615", &u), 0);
        assert_true(u == UINT64_MAX);
        assert_int_equal(util_parse_u64("18446744073709551616", &u), -ERANGE);
        assert_int_equal(util_parse_u64("-1", &u), -EINVAL);
        assert_int_equal(util_parse_u64("12abc", &u), -EINVAL);
        assert_int_equal(util_parse_u64("", &u), -EINVAL);
        assert_int_equal(util_parse_int("5", 1, 10, &i), 0);
        assert_int_equal(i, 5);
        assert_int_equal(util_parse_int("0", 1, 10, &i), -ERANGE);
        assert_int_equal(util_parse_int("abc", 1, 10, &i), -EINVAL);
        assert_int_equal(util_parse_int(" 5", 1, 10, &i), -EINVAL);
        assert_int_equal(util_parse_size("10G", &u), 0);
        assert_true(u == 10ULL << 30);
        assert_int_equal(util_parse_size("512MiB", &u), 0);
        assert_true(u == 512ULL << 20);
        assert_int_equal(util_parse_size("7", &u), 0);
        assert_true(u == 7);
        assert_int_equal(util_parse_size("10X", &u), -EINVAL);
        assert_int_equal(util_parse_size("99999999999999T", &u), -ERANGE);
        assert_int_equal(util_parse_bool("yes", &b), 0);
        assert_true(b);
        assert_int_equal(util_parse_bool("OFF", &b), 0);
        assert_false(b);
        assert_int_equal(util_parse_bool("maybe", &b), -EINVAL);
}

static void test_common_sha256_hex(void **state)
{
        (void)state;
        assert_true(util_is_sha256_hex(
                "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"));
        assert_false(util_is_sha256_hex(
                "E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855"));
        assert_false(util_is_sha256_hex("e3b0"));
}

int main(void)
{
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_common_err_set_returns_code_and_keeps_text),
                cmocka_unit_test(test_common_err_transient_classification),
                cmocka_unit_test(test_common_log_redacts_registered_secrets),
                cmocka_unit_test(test_common_log_escape),
                cmocka_unit_test(test_common_parse_numbers),
                cmocka_unit_test(test_common_sha256_hex),
        };

        return cmocka_run_group_tests(tests, NULL, NULL);
}
