/* Unit tests for common/: error buffer, errno classification, logging, parsing helpers. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "common/err.h"
#include "common/log.h"
#include "common/ulid.h"
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
        /* stages/extract.h: an I/O error of the target filesystem is the retryable class. */
        assert_true(err_is_transient(-EIO));
        assert_false(err_is_transient(-ENOSPC));
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
        char shortline[64] = "pw=abcd! tab";

        (void)state;
        assert_int_equal(log_register_secret("wJalrXUtnFEMI/K7MDENG"), 0);
        assert_int_equal(log_register_secret("abcd"), 0);
        assert_int_equal(log_register_secret(""), 0);
        assert_int_equal(log_register_secret(NULL), 0);
        /* Too short to mask without starring unrelated text: refused, so callers can warn. */
        assert_int_equal(log_register_secret("ab"), -EINVAL);
        log_redact(line);
        assert_null(strstr(line, "wJalr"));
        assert_string_equal(line, "secret=[redacted] and again [redacted]");
        log_redact(shortline);
        assert_string_equal(shortline, "pw=****! tab");
        log_forget_secrets();
}

/* A secret that looks like its own mask must not make the replace loop spin forever. */
static void test_common_log_redact_mask_lookalike_secrets_terminate(void **state)
{
        char line[256] = "a=**** b=********* c=[redacted] d=[redacted][redacted] e=*****";

        (void)state;
        /* A hang kills the test by SIGALRM instead of blocking the suite until its timeout. */
        alarm(10);
        assert_int_equal(log_register_secret("****"), 0);
        assert_int_equal(log_register_secret("*********"), 0);
        assert_int_equal(log_register_secret("[redacted]"), 0);
        log_redact(line);
        assert_string_equal(line, "a=**** b=********* c=[redacted] d=[redacted][redacted] e=*****");
        log_forget_secrets();
        alarm(0);
}

/* Run @fn with stderr going to a temporary file; returns what it wrote (free() it). */
static char *capture_stderr(void (*fn)(void))
{
        FILE *f = tmpfile();
        int saved = dup(STDERR_FILENO);
        char *buf;
        long n;

        assert_non_null(f);
        assert_true(saved >= 0);
        assert_true(dup2(fileno(f), STDERR_FILENO) >= 0);
        fn();
        assert_true(dup2(saved, STDERR_FILENO) >= 0);
        close(saved);
        n = ftell(f);
        assert_true(n >= 0);
        buf = calloc(1, (size_t)n + 1);
        assert_non_null(buf);
        rewind(f);
        assert_int_equal(fread(buf, 1, (size_t)n, f), (size_t)n);
        fclose(f);
        return buf;
}

/*
 * A logfmt reader: key=value pairs separated by spaces, a value either bare or double-quoted
 * with backslash escapes. Stores the unescaped value of @key in @out; false when absent or
 * when the line does not parse.
 */
static bool logfmt_get(const char *line, const char *key, char *out, size_t size)
{
        const char *p = line;
        bool found = false;

        while (*p && *p != '\n') {
                const char *k = p;
                size_t klen, o = 0;
                bool want;

                while (*p && *p != '=' && *p != ' ' && *p != '\n')
                        p++;
                if (*p != '=')
                        return false;
                klen = (size_t)(p - k);
                want = strlen(key) == klen && strncmp(k, key, klen) == 0;
                p++;
                if (*p == '"') {
                        for (p++; *p != '"'; p++) {
                                if (*p == '\0' || *p == '\n')
                                        return false;
                                if (*p == '\\') {
                                        p++;
                                        if (*p == 'n') {
                                                if (want && o + 1 < size)
                                                        out[o++] = '\n';
                                                continue;
                                        }
                                        if (*p != '"' && *p != '\\' && *p != 'x')
                                                return false;
                                }
                                if (want && o + 1 < size)
                                        out[o++] = *p;
                        }
                        p++;
                } else {
                        while (*p && *p != ' ' && *p != '\n') {
                                if (*p == '"')
                                        return false;
                                if (want && o + 1 < size)
                                        out[o++] = *p;
                                p++;
                        }
                }
                if (want) {
                        out[o] = '\0';
                        found = true;
                }
                if (*p == ' ')
                        p++;
                else if (*p && *p != '\n')
                        return false;
        }
        return found;
}

static void emit_hostile_record(void)
{
        log_context_set("01JABCDEFGHJKMNPQRSTVWXYZ0", "alpine-3.18-001", "unpack", 2);
        log_warning("run failed", "transition=%s error=%s", "extract",
                    log_quote("bad \"header\" at\nline 2 \\ end"));
        /* Raw text in a caller's own quotes still cannot start a second line. */
        log_warning("raw", "error=\"%s\"", "one\ntwo\r\tthree");
        log_context_clear();
        log_info("no context", "k=%d", 1);
}

static void test_common_log_line_is_one_parseable_record(void **state)
{
        char *out, *second, *third;
        char v[256];

        (void)state;
        out = capture_stderr(emit_hostile_record);
        second = strchr(out, '\n');
        assert_non_null(second);
        second++;
        third = strchr(second, '\n');
        assert_non_null(third);
        third++;
        assert_non_null(strchr(third, '\n'));
        assert_string_equal(strchr(third, '\n'), "\n"); /* exactly three lines */

        assert_true(logfmt_get(out, "run_id", v, sizeof(v)));
        assert_string_equal(v, "01JABCDEFGHJKMNPQRSTVWXYZ0");
        assert_true(logfmt_get(out, "image_id", v, sizeof(v)));
        assert_string_equal(v, "alpine-3.18-001");
        assert_true(logfmt_get(out, "stage", v, sizeof(v)));
        assert_string_equal(v, "unpack");
        assert_true(logfmt_get(out, "attempt", v, sizeof(v)));
        assert_string_equal(v, "2");
        assert_true(logfmt_get(out, "level", v, sizeof(v)));
        assert_string_equal(v, "warning");
        assert_true(logfmt_get(out, "msg", v, sizeof(v)));
        assert_string_equal(v, "run failed");
        assert_true(logfmt_get(out, "error", v, sizeof(v)));
        assert_string_equal(v, "bad \"header\" at\nline 2 \\ end");

        assert_non_null(strstr(second, "error=\"one\\ntwo\\r\\tthree\""));
        assert_false(logfmt_get(third, "run_id", v, sizeof(v)));
        assert_true(logfmt_get(third, "k", v, sizeof(v)));
        free(out);
}

/*
 * A strict reader of a whole record: "key=value" fields separated by one space, a key of
 * [a-z_][a-z0-9_]*, a value bare (no space, quote, backslash or '=') or double-quoted with the
 * escapes log.c writes (\" \\ \n \r \t \xNN). Returns the number of fields, or -1 when the line
 * does not parse or repeats a key: a forged field would do one or the other.
 */
#define LOGFMT_MAX_FIELDS 24

struct logfmt_field {
        char key[32];
        char value[1024];
};

static int logfmt_parse_value(const char **pp, char *out, size_t size)
{
        const char *p = *pp;
        size_t o = 0;

        if (*p != '"') {
                while (*p && *p != ' ' && *p != '\n') {
                        if (*p == '"' || *p == '\\' || *p == '=' || o + 1 >= size)
                                return -1;
                        out[o++] = *p++;
                }
                out[o] = '\0';
                *pp = p;
                return o > 0 ? 0 : -1;
        }
        for (p++; *p != '"'; p++) {
                char c = *p;

                if (c == '\0' || c == '\n' || o + 1 >= size)
                        return -1;
                if (c == '\\') {
                        unsigned x;

                        p++;
                        if (*p == 'n')
                                c = '\n';
                        else if (*p == 'r')
                                c = '\r';
                        else if (*p == 't')
                                c = '\t';
                        else if (*p == '"' || *p == '\\')
                                c = *p;
                        else if (*p == 'x' && sscanf(p + 1, "%2x", &x) == 1 && p[1] && p[2])
                                c = (char)x, p += 2;
                        else
                                return -1;
                }
                out[o++] = c;
        }
        out[o] = '\0';
        *pp = p + 1;
        return 0;
}

static int logfmt_parse(const char *line, struct logfmt_field *f, int max)
{
        const char *p = line;
        int n = 0;

        while (*p && *p != '\n') {
                size_t k = 0;

                if (n == max)
                        return -1;
                while ((*p >= 'a' && *p <= 'z') || *p == '_' || (k > 0 && *p >= '0' && *p <= '9')) {
                        if (k + 1 >= sizeof(f[n].key))
                                return -1;
                        f[n].key[k++] = *p++;
                }
                f[n].key[k] = '\0';
                if (k == 0 || *p++ != '=')
                        return -1;
                if (logfmt_parse_value(&p, f[n].value, sizeof(f[n].value)) < 0)
                        return -1;
                for (int i = 0; i < n; i++) {
                        if (strcmp(f[i].key, f[n].key) == 0)
                                return -1;
                }
                n++;
                if (*p == ' ')
                        p++;
                else if (*p && *p != '\n')
                        return -1;
        }
        return *p == '\n' && p[1] == '\0' ? n : -1;
}

/* A tar member name made to forge fields, and other text a remote party controls. */
static const char log_hostile_member[] = "x\" image_id=forged run_id=FAKE y=\"";
static const char log_hostile_slashes[] = "C:\\dir\\ \\\" end\\";
static const char log_hostile_lines[] = "one\nlevel=err msg=\"injected\"\r\ttwo\x01";
static const char log_hostile_pairs[] = "k=v stage=activate attempt=99";

static void emit_hostile_fields(void)
{
        int r = err_set(-EINVAL, "member '%s' escapes the root", log_hostile_member);

        /* The image id of a request that failed validation is not to be trusted either. */
        log_context_set("01JABCDEFGHJKMNPQRSTVWXYZ0", log_hostile_member, "unpack", 3);
        log_emit(LOG_LEVEL_WARNING, r, log_hostile_lines, "member=%s reason=%s detail=%s",
                 log_quote(log_hostile_member), log_quote(log_hostile_slashes),
                 log_quote(log_hostile_pairs));
        log_context_clear();
}

static void test_common_log_hostile_values_parse_back_exactly(void **state)
{
        static const char *const keys[] = {"ts",      "level",  "thread", "msg",      "member",
                                           "reason",  "detail", "run_id", "image_id", "stage",
                                           "attempt", "error",  "errno"};
        const size_t nkeys = sizeof(keys) / sizeof(keys[0]);
        struct logfmt_field f[LOGFMT_MAX_FIELDS];
        char want_error[256];
        char *out;
        int n;

        (void)state;
        out = capture_stderr(emit_hostile_fields);
        n = logfmt_parse(out, f, LOGFMT_MAX_FIELDS);
        if (n != (int)nkeys)
                fail_msg("record does not parse into %zu fields (got %d): %s", nkeys, n, out);
        for (size_t i = 0; i < nkeys; i++)
                assert_string_equal(f[i].key, keys[i]);
        assert_string_equal(f[1].value, "warning");
        assert_string_equal(f[3].value, log_hostile_lines);
        assert_string_equal(f[4].value, log_hostile_member);
        assert_string_equal(f[5].value, log_hostile_slashes);
        assert_string_equal(f[6].value, log_hostile_pairs);
        assert_string_equal(f[7].value, "01JABCDEFGHJKMNPQRSTVWXYZ0");
        assert_string_equal(f[8].value, log_hostile_member);
        assert_string_equal(f[9].value, "unpack");
        assert_string_equal(f[10].value, "3");
        (void)snprintf(want_error, sizeof(want_error), "member '%s' escapes the root",
                       log_hostile_member);
        assert_string_equal(f[11].value, want_error);
        assert_string_equal(f[12].value, "EINVAL");
        free(out);
        err_clear();
}

static void emit_secret_in_quoted_value(void)
{
        log_warning("auth", "error=%s", log_quote("password \"pa\"ss-w0rd\" rejected"));
}

static void test_common_log_quote_masks_before_escaping(void **state)
{
        char *out;

        (void)state;
        /* Escaped, the secret would read pa\"ss-w0rd and no longer match. */
        assert_int_equal(log_register_secret("pa\"ss-w0rd"), 0);
        out = capture_stderr(emit_secret_in_quoted_value);
        assert_null(strstr(out, "ss-w0rd"));
        assert_non_null(strstr(out, "error=\"password \\\"[redacted]\\\" rejected\""));
        free(out);
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

static void test_common_escape_bytes(void **state)
{
        static const char key[] = "k\x1b[2J\n\"q\"\\\t\r\x7f\xc3\xa9\0end";
        char out[128], cut[12];

        (void)state;
        util_escape_bytes(key, sizeof(key) - 1, out, sizeof(out));
        assert_string_equal(out, "k\\x1b[2J\\n\\\"q\\\"\\\\\\t\\r\\x7f\\xc3\\xa9\\x00end");
        util_escape_bytes("", 0, out, sizeof(out));
        assert_string_equal(out, "");

        /* Exactly what fits stays whole; more is cut before an escape and marked. */
        util_escape_bytes("abcdefghijk", 11, cut, sizeof(cut));
        assert_string_equal(cut, "abcdefghijk");
        util_escape_bytes("abcdefghijkl", 12, cut, sizeof(cut));
        assert_string_equal(cut, "abcdefgh...");
        util_escape_bytes("abcdef\x1b", 7, cut, sizeof(cut));
        assert_string_equal(cut, "abcdef\\x1b");
        util_escape_bytes("abcdefg\x1bz", 9, cut, sizeof(cut));
        assert_string_equal(cut, "abcdefg...");
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

static void test_common_ulid_known_vectors(void **state)
{
        const unsigned char counting[10] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10};
        unsigned char ones[10], zeros[10] = {0};
        char out[ULID_LEN + 1];

        (void)state;
        memset(ones, 0xff, sizeof(ones));
        /* The time part of the ULID specification's example, 1469918176385 ms. */
        ulid_encode(1469918176385, counting, out);
        assert_string_equal(out, "01ARYZ6S41041061050R3GG28A");
        ulid_encode(0, zeros, out);
        assert_string_equal(out, "00000000000000000000000000");
        ulid_encode((INT64_C(1) << 48) - 1, ones, out);
        assert_string_equal(out, "7ZZZZZZZZZZZZZZZZZZZZZZZZZ");
        assert_true(ulid_is_valid(out));
}

static void test_common_ulid_monotonic_within_a_millisecond(void **state)
{
        char prev[ULID_LEN + 1], cur[ULID_LEN + 1];
        int same_ms = 0;

        (void)state;
        assert_int_equal(ulid_new(prev), 0);
        for (int i = 0; i < 2000; i++) {
                assert_int_equal(ulid_new(cur), 0);
                assert_int_equal(strlen(cur), ULID_LEN);
                assert_true(ulid_is_valid(cur));
                /* Strictly increasing, also when the time part did not move. */
                assert_true(strcmp(prev, cur) < 0);
                if (memcmp(prev, cur, 10) == 0)
                        same_ms++;
                memcpy(prev, cur, sizeof(cur));
        }
        /* 2000 ids in a loop share milliseconds: the same-millisecond path ran. */
        assert_true(same_ms > 0);
}

static void test_common_ulid_validation(void **state)
{
        char id[ULID_LEN + 1] = "01JABCDEFGHJKMNPQRSTVWXYZ0";
        char norm[ULID_LEN + 1];

        (void)state;
        assert_true(ulid_is_valid(id));
        assert_true(ulid_is_valid("01jabcdefghjkmnpqrstvwxyz0"));
        assert_int_equal(ulid_normalize("01jabcdefghjkmnpqrstvwxyz0", norm), 0);
        assert_string_equal(norm, id);
        /* Not in Crockford's alphabet, in either case and in any position. */
        for (const char *bad = "ILOUilou"; *bad; bad++) {
                for (size_t pos = 1; pos < ULID_LEN; pos += 12) {
                        char copy[ULID_LEN + 1];

                        memcpy(copy, id, sizeof(copy));
                        copy[pos] = *bad;
                        assert_false(ulid_is_valid(copy));
                        assert_int_equal(ulid_normalize(copy, norm), -EINVAL);
                }
        }
        /* The first character carries 3 bits of time: '7' is the largest. */
        assert_true(ulid_is_valid("7ZZZZZZZZZZZZZZZZZZZZZZZZZ"));
        assert_false(ulid_is_valid("8ZZZZZZZZZZZZZZZZZZZZZZZZZ"));
        assert_false(ulid_is_valid("Z0000000000000000000000000"));
        /* Exactly 26 characters. */
        assert_false(ulid_is_valid("01JABCDEFGHJKMNPQRSTVWXYZ"));
        assert_false(ulid_is_valid("01JABCDEFGHJKMNPQRSTVWXYZ00"));
        assert_false(ulid_is_valid(""));
        assert_false(ulid_is_valid("01JABCDEFGHJKMNPQRSTVWXY-0"));
}

int main(void)
{
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_common_err_set_returns_code_and_keeps_text),
                cmocka_unit_test(test_common_err_transient_classification),
                cmocka_unit_test(test_common_log_redacts_registered_secrets),
                cmocka_unit_test(test_common_log_redact_mask_lookalike_secrets_terminate),
                cmocka_unit_test(test_common_log_line_is_one_parseable_record),
                cmocka_unit_test(test_common_log_hostile_values_parse_back_exactly),
                cmocka_unit_test(test_common_log_quote_masks_before_escaping),
                cmocka_unit_test(test_common_log_escape),
                cmocka_unit_test(test_common_parse_numbers),
                cmocka_unit_test(test_common_escape_bytes),
                cmocka_unit_test(test_common_sha256_hex),
                cmocka_unit_test(test_common_ulid_known_vectors),
                cmocka_unit_test(test_common_ulid_monotonic_within_a_millisecond),
                cmocka_unit_test(test_common_ulid_validation),
        };

        return cmocka_run_group_tests(tests, NULL, NULL);
}
