/* Unit tests for worker/metrics: exposition text, histograms, escaping, bounds, HTTP parsing. */
#include <errno.h>
#include <regex.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "worker/metrics.h"

static char *render(void)
{
        char *text = NULL;
        size_t len = 0;

        assert_int_equal(metrics_render(&text, &len), 0);
        assert_non_null(text);
        assert_int_equal(strlen(text), len);
        return text;
}

/* The value of the sample line that starts with exactly @series (name and labels), or NULL. */
static const char *sample(const char *text, const char *series)
{
        static char value[64];
        size_t n = strlen(series);

        for (const char *line = text; *line; line = strchr(line, '\n') + 1) {
                const char *end = strchr(line, '\n');

                assert_non_null(end);
                if (strncmp(line, series, n) == 0 && line[n] == ' ') {
                        size_t vlen = (size_t)(end - line) - n - 1;

                        assert_true(vlen < sizeof(value));
                        memcpy(value, line + n + 1, vlen);
                        value[vlen] = '\0';
                        return value;
                }
        }
        return NULL;
}

static void assert_sample(const char *text, const char *series, const char *want)
{
        const char *got = sample(text, series);

        if (!got)
                fail_msg("no sample '%s' in:\n%s", series, text);
        if (strcmp(got, want) != 0)
                fail_msg("sample '%s' is %s, expected %s", series, got, want);
}

static int setup(void **state)
{
        (void)state;
        metrics_reset();
        return 0;
}

static void test_metrics_every_family_has_help_and_type(void **state)
{
        static const struct {
                const char *name;
                const char *type;
        } families[] = {
                {"fim_jobs_total", "counter"},
                {"fim_stage_duration_seconds", "histogram"},
                {"fim_downloaded_bytes_total", "counter"},
                {"fim_extracted_bytes_total", "counter"},
                {"fim_retries_total", "counter"},
                {"fim_dlq_messages_total", "counter"},
                {"fim_inflight_jobs", "gauge"},
                {"fim_consumer_lag_messages", "gauge"},
                {"fim_pool_data_usage_ratio", "gauge"},
                {"fim_pool_data_used_blocks", "gauge"},
                {"fim_pool_data_total_blocks", "gauge"},
                {"fim_pool_metadata_usage_ratio", "gauge"},
                {"fim_pool_metadata_used_blocks", "gauge"},
                {"fim_pool_metadata_total_blocks", "gauge"},
                {"fim_build_info", "gauge"},
        };
        char *text = render();
        char want[256];

        (void)state;
        for (size_t i = 0; i < sizeof(families) / sizeof(families[0]); i++) {
                const char *help, *type;

                (void)snprintf(want, sizeof(want), "# HELP %s ", families[i].name);
                help = strstr(text, want);
                assert_non_null(help);
                assert_true(help == text || help[-1] == '\n');
                (void)snprintf(want, sizeof(want), "\n# TYPE %s %s\n", families[i].name,
                               families[i].type);
                type = strstr(text, want);
                if (!type)
                        fail_msg("missing '%s'", want + 1);
                /* TYPE directly follows its HELP line, each family once. */
                assert_ptr_equal(strchr(help, '\n'), type);
                assert_null(strstr(type + 1, want));
        }
        assert_sample(text, "fim_build_info{version=\"" FIM_VERSION "\"}", "1");
        free(text);
}

/*
 * Every sample line is "name{label="value",...} number" with a name of the family declared
 * by the last TYPE line (or its _bucket/_sum/_count for a histogram).
 */
static void test_metrics_every_line_is_well_formed(void **state)
{
        regex_t sample_re;
        char *text, *line, *save = NULL;
        char family[128] = "", type[32] = "";

        (void)state;
        assert_int_equal(metrics_pool_set("a \"quoted\" pool\\x", 1, 4, 2, 8), 0);
        metrics_job_finished(STAGE_UNPACK, METRICS_OUTCOME_COMPLETE, 12.5);
        assert_int_equal(
                regcomp(&sample_re,
                        "^([a-zA-Z_:][a-zA-Z0-9_:]*)"
                        "(\\{([a-zA-Z_][a-zA-Z0-9_]*=\"([^\"\\\\\n]|\\\\[\\\\\"n])*\",?)*\\})?"
                        " (\\+Inf|-?[0-9]+(\\.[0-9]+)?(e[-+]?[0-9]+)?)$",
                        REG_EXTENDED),
                0);
        text = render();
        assert_true(text[strlen(text) - 1] == '\n');
        for (line = strtok_r(text, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
                regmatch_t m[2];

                if (strncmp(line, "# HELP ", 7) == 0)
                        continue;
                if (strncmp(line, "# TYPE ", 7) == 0) {
                        assert_int_equal(sscanf(line + 7, "%127s %31s", family, type), 2);
                        continue;
                }
                if (regexec(&sample_re, line, 2, m, 0) != 0)
                        fail_msg("malformed sample line: %s", line);

                size_t n = (size_t)(m[1].rm_eo - m[1].rm_so), flen = strlen(family);
                char suffix[16] = "";

                assert_true(n >= flen && n - flen < sizeof(suffix));
                assert_memory_equal(line, family, flen);
                memcpy(suffix, line + flen, n - flen);
                if (strcmp(type, "histogram") == 0)
                        assert_true(strcmp(suffix, "_bucket") == 0 || strcmp(suffix, "_sum") == 0 ||
                                    strcmp(suffix, "_count") == 0);
                else
                        assert_string_equal(suffix, "");
        }
        regfree(&sample_re);
        free(text);
}

static void test_metrics_histogram_buckets_are_cumulative(void **state)
{
        static const char *const les[] = {"0.1", "0.25", "0.5", "1",   "2.5", "5",    "10",
                                          "30",  "60",   "120", "300", "600", "1800", "3600"};
        char *text, series[128];
        const char *prev_pos;
        unsigned long prev = 0;

        (void)state;
        metrics_job_finished(STAGE_DOWNLOAD, METRICS_OUTCOME_COMPLETE, 0.05);
        metrics_job_finished(STAGE_DOWNLOAD, METRICS_OUTCOME_COMPLETE, 0.1); /* le is <= */
        metrics_job_finished(STAGE_DOWNLOAD, METRICS_OUTCOME_FAILED, 0.2);
        metrics_job_finished(STAGE_DOWNLOAD, METRICS_OUTCOME_COMPLETE, 7.0);
        metrics_job_finished(STAGE_DOWNLOAD, METRICS_OUTCOME_COMPLETE, 5000.0); /* above 1 h */
        metrics_job_finished(STAGE_DOWNLOAD, METRICS_OUTCOME_COMPLETE, -3.0);   /* clamps to 0 */
        /* Outcomes without real work count as jobs but stay out of the histogram. */
        metrics_job_finished(STAGE_DOWNLOAD, METRICS_OUTCOME_ALREADY_COMPLETE, 0.001);
        metrics_job_finished(STAGE_DOWNLOAD, METRICS_OUTCOME_BUSY, 0.001);
        metrics_job_finished(STAGE_DOWNLOAD, METRICS_OUTCOME_INTERRUPTED, 9.0);
        text = render();

        assert_sample(text, "fim_stage_duration_seconds_bucket{stage=\"download\",le=\"0.1\"}",
                      "3");
        assert_sample(text, "fim_stage_duration_seconds_bucket{stage=\"download\",le=\"0.25\"}",
                      "4");
        assert_sample(text, "fim_stage_duration_seconds_bucket{stage=\"download\",le=\"5\"}", "4");
        assert_sample(text, "fim_stage_duration_seconds_bucket{stage=\"download\",le=\"10\"}", "5");
        assert_sample(text, "fim_stage_duration_seconds_bucket{stage=\"download\",le=\"3600\"}",
                      "5");
        assert_sample(text, "fim_stage_duration_seconds_bucket{stage=\"download\",le=\"+Inf\"}",
                      "6");
        assert_sample(text, "fim_stage_duration_seconds_count{stage=\"download\"}", "6");
        assert_sample(text, "fim_stage_duration_seconds_sum{stage=\"download\"}", "5007.350000");
        assert_sample(text, "fim_stage_duration_seconds_count{stage=\"unpack\"}", "0");
        assert_sample(text, "fim_stage_duration_seconds_bucket{stage=\"activate\",le=\"+Inf\"}",
                      "0");

        /* Ascending le, never decreasing, +Inf last and then _sum and _count. */
        prev_pos = text;
        for (size_t i = 0; i <= sizeof(les) / sizeof(les[0]); i++) {
                const char *le = i < sizeof(les) / sizeof(les[0]) ? les[i] : "+Inf";
                const char *pos;
                unsigned long v;

                (void)snprintf(series, sizeof(series),
                               "fim_stage_duration_seconds_bucket{stage=\"download\",le=\"%s\"}",
                               le);
                pos = strstr(text, series);
                assert_non_null(pos);
                assert_true(pos > prev_pos);
                v = strtoul(sample(text, series), NULL, 10);
                assert_true(v >= prev);
                prev = v;
                prev_pos = pos;
        }
        assert_true(strstr(text, "fim_stage_duration_seconds_sum{stage=\"download\"}") > prev_pos);
        assert_sample(text, "fim_jobs_total{stage=\"download\",outcome=\"complete\"}", "5");
        assert_sample(text, "fim_jobs_total{stage=\"download\",outcome=\"already_complete\"}", "1");
        assert_sample(text, "fim_jobs_total{stage=\"download\",outcome=\"interrupted\"}", "1");
        free(text);
}

static void test_metrics_counters_move(void **state)
{
        char *text;

        (void)state;
        text = render();
        /* Every label combination is present from the start, at zero. */
        assert_sample(text, "fim_jobs_total{stage=\"activate\",outcome=\"invalid\"}", "0");
        assert_sample(text, "fim_dlq_messages_total{stage=\"unpack\",error_class=\"other\"}", "0");
        assert_sample(text, "fim_downloaded_bytes_total", "0");
        free(text);

        metrics_job_finished(STAGE_ACTIVATE, METRICS_OUTCOME_INVALID, 0.0);
        metrics_job_finished(STAGE_ACTIVATE, METRICS_OUTCOME_INVALID, 0.0);
        metrics_add_bytes_downloaded(1000);
        metrics_add_bytes_downloaded(24);
        metrics_add_bytes_extracted(1ULL << 40);
        metrics_retry(STAGE_UNPACK, METRICS_RETRY_BUSY);
        metrics_retry(STAGE_UNPACK, METRICS_RETRY_BUSY);
        metrics_retry(STAGE_UNPACK, METRICS_RETRY_STAGE_CALL);
        metrics_retry(STAGE_DOWNLOAD, METRICS_RETRY_INTERRUPTED);
        metrics_retry_by_name("activate");
        metrics_retry_by_name("test-fsm"); /* not a stage: ignored */
        metrics_dlq(STAGE_UNPACK, STAGE_ERROR_PERMANENT);
        metrics_dlq(STAGE_UNPACK, STAGE_ERROR_EXHAUSTED);
        metrics_dlq(STAGE_UNPACK, "made-up");
        metrics_dlq(STAGE_UNPACK, NULL);
        metrics_dlq(STAGE_DOWNLOAD, STAGE_ERROR_INVALID_REQUEST);
        metrics_inflight_set(STAGE_DOWNLOAD, 5);
        metrics_inflight_add(STAGE_DOWNLOAD, -2);
        metrics_inflight_add(STAGE_UNPACK, 1);
        metrics_lag_set(STAGE_ACTIVATE, 12345);
        metrics_lag_set(STAGE_DOWNLOAD, 7);
        metrics_lag_set(STAGE_DOWNLOAD, 3);

        text = render();
        assert_sample(text, "fim_jobs_total{stage=\"activate\",outcome=\"invalid\"}", "2");
        assert_sample(text, "fim_jobs_total{stage=\"activate\",outcome=\"complete\"}", "0");
        assert_sample(text, "fim_stage_duration_seconds_count{stage=\"activate\"}", "0");
        assert_sample(text, "fim_downloaded_bytes_total", "1024");
        assert_sample(text, "fim_extracted_bytes_total", "1099511627776");
        assert_sample(text, "fim_retries_total{stage=\"unpack\",reason=\"busy\"}", "2");
        assert_sample(text, "fim_retries_total{stage=\"unpack\",reason=\"stage_call\"}", "1");
        assert_sample(text, "fim_retries_total{stage=\"unpack\",reason=\"transition\"}", "0");
        assert_sample(text, "fim_retries_total{stage=\"download\",reason=\"interrupted\"}", "1");
        assert_sample(text, "fim_retries_total{stage=\"activate\",reason=\"transition\"}", "1");
        assert_null(strstr(text, "test-fsm"));
        assert_sample(text, "fim_dlq_messages_total{stage=\"unpack\",error_class=\"permanent\"}",
                      "1");
        assert_sample(text, "fim_dlq_messages_total{stage=\"unpack\",error_class=\"exhausted\"}",
                      "1");
        assert_sample(text, "fim_dlq_messages_total{stage=\"unpack\",error_class=\"other\"}", "2");
        assert_sample(text,
                      "fim_dlq_messages_total{stage=\"download\",error_class=\"invalid_request\"}",
                      "1");
        assert_null(strstr(text, "made-up"));
        assert_sample(text, "fim_inflight_jobs{stage=\"download\"}", "3");
        assert_sample(text, "fim_inflight_jobs{stage=\"unpack\"}", "1");
        assert_sample(text, "fim_consumer_lag_messages{stage=\"activate\"}", "12345");
        assert_sample(text, "fim_consumer_lag_messages{stage=\"download\"}", "3");
        free(text);

        metrics_reset();
        text = render();
        assert_sample(text, "fim_downloaded_bytes_total", "0");
        assert_sample(text, "fim_retries_total{stage=\"unpack\",reason=\"busy\"}", "0");
        free(text);
}

static void test_metrics_label_values_are_escaped(void **state)
{
        char out[64], tiny[6];
        char *text;

        (void)state;
        metrics_escape_label("plain", out, sizeof(out));
        assert_string_equal(out, "plain");
        metrics_escape_label("a\\b\"c\nd", out, sizeof(out));
        assert_string_equal(out, "a\\\\b\\\"c\\nd");
        /* Truncation never leaves half an escape behind. */
        metrics_escape_label("abcd\"e", tiny, sizeof(tiny));
        assert_string_equal(tiny, "abcd");
        metrics_escape_label("", out, sizeof(out));
        assert_string_equal(out, "");

        assert_int_equal(metrics_pool_set("we\"ird\\po\nol", 10, 40, 1, 100), 0);
        text = render();
        assert_sample(text, "fim_pool_data_usage_ratio{pool=\"we\\\"ird\\\\po\\nol\"}", "0.25");
        assert_sample(text, "fim_pool_metadata_usage_ratio{pool=\"we\\\"ird\\\\po\\nol\"}", "0.01");
        assert_sample(text, "fim_pool_data_used_blocks{pool=\"we\\\"ird\\\\po\\nol\"}", "10");
        assert_sample(text, "fim_pool_metadata_total_blocks{pool=\"we\\\"ird\\\\po\\nol\"}", "100");
        free(text);
}

static void test_metrics_pool_label_set_is_bounded(void **state)
{
        char name[METRICS_POOL_NAME_MAX + 2];
        char *text;

        (void)state;
        for (int i = 0; i < METRICS_POOLS_MAX; i++) {
                (void)snprintf(name, sizeof(name), "pool%d", i);
                assert_int_equal(metrics_pool_set(name, (uint64_t)i, 100, 0, 0), 0);
        }
        assert_int_equal(metrics_pool_set("one-too-many", 1, 2, 3, 4), -ENOSPC);
        /* A known pool still updates when the table is full. */
        assert_int_equal(metrics_pool_set("pool3", 50, 100, 3, 4), 0);
        memset(name, 'x', sizeof(name) - 1);
        name[sizeof(name) - 1] = '\0';
        assert_int_equal(metrics_pool_set(name, 1, 2, 3, 4), -ENAMETOOLONG);

        text = render();
        assert_null(strstr(text, "one-too-many"));
        assert_sample(text, "fim_pool_data_usage_ratio{pool=\"pool3\"}", "0.5");
        assert_sample(text, "fim_pool_metadata_usage_ratio{pool=\"pool3\"}", "0.75");
        assert_sample(text, "fim_pool_data_total_blocks{pool=\"pool7\"}", "100");
        /* No metadata size known: the ratio is 0, never a division by zero. */
        assert_sample(text, "fim_pool_metadata_usage_ratio{pool=\"pool0\"}", "0");
        free(text);
}

static void test_metrics_outcome_of_stage_result(void **state)
{
        struct stage_result res = {.outcome = FSM_OUTCOME_FAILED};

        (void)state;
        res.error_class = STAGE_ERROR_INVALID_REQUEST;
        assert_int_equal(metrics_outcome_of(&res), METRICS_OUTCOME_INVALID);
        res.error_class = STAGE_ERROR_PERMANENT;
        assert_int_equal(metrics_outcome_of(&res), METRICS_OUTCOME_FAILED);
        res.error_class = NULL;
        res.outcome = FSM_OUTCOME_ALREADY_COMPLETE;
        assert_int_equal(metrics_outcome_of(&res), METRICS_OUTCOME_ALREADY_COMPLETE);
        res.outcome = FSM_OUTCOME_BUSY;
        assert_int_equal(metrics_outcome_of(&res), METRICS_OUTCOME_BUSY);
        res.outcome = FSM_OUTCOME_INTERRUPTED;
        assert_int_equal(metrics_outcome_of(&res), METRICS_OUTCOME_INTERRUPTED);
        assert_string_equal(metrics_outcome_name(METRICS_OUTCOME_ALREADY_COMPLETE),
                            "already_complete");
}

static int parse(const char *req, enum metrics_page *page, bool *head)
{
        return metrics_parse_request(req, strlen(req), page, head);
}

static void test_metrics_parse_request(void **state)
{
        enum metrics_page page = METRICS_PAGE_HEALTHZ;
        bool head = true;

        (void)state;
        assert_int_equal(
                parse("GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n", &page, &head),
                200);
        assert_int_equal(page, METRICS_PAGE_METRICS);
        assert_false(head);
        assert_int_equal(parse("HEAD /healthz HTTP/1.0\n\n", &page, &head), 200);
        assert_int_equal(page, METRICS_PAGE_HEALTHZ);
        assert_true(head);
        assert_int_equal(parse("GET /readyz?verbose=1 HTTP/1.1\r\n\r\n", &page, &head), 200);
        assert_int_equal(page, METRICS_PAGE_READYZ);

        assert_int_equal(parse("GET / HTTP/1.1\r\n\r\n", &page, &head), 404);
        assert_int_equal(parse("GET /metricsx HTTP/1.1\r\n\r\n", &page, &head), 404);
        assert_int_equal(parse("GET /metrics/ HTTP/1.1\r\n\r\n", &page, &head), 404);
        assert_int_equal(parse("POST /metrics HTTP/1.1\r\n\r\n", &page, &head), 405);
        assert_int_equal(parse("DELETE /nope HTTP/1.1\r\n\r\n", &page, &head), 404);

        assert_int_equal(parse("GET /metrics\r\n\r\n", &page, &head), 400);
        assert_int_equal(parse("GET  /metrics HTTP/1.1\r\n\r\n", &page, &head), 400);
        assert_int_equal(parse("get /metrics HTTP/1.1\r\n\r\n", &page, &head), 400);
        assert_int_equal(parse("GET metrics HTTP/1.1\r\n\r\n", &page, &head), 400);
        assert_int_equal(parse("GET /metrics HTTP/2.0\r\n\r\n", &page, &head), 400);
        assert_int_equal(parse("GET /metrics HTTP/1.1 \r\n\r\n", &page, &head), 400);
        assert_int_equal(parse("GET /met\x01rics HTTP/1.1\r\n\r\n", &page, &head), 400);
        assert_int_equal(parse("\r\n\r\n", &page, &head), 400);
        assert_int_equal(parse("GET /metrics HTTP/1.1\r\nno colon here\r\n\r\n", &page, &head),
                         400);
        assert_int_equal(parse("GET /metrics HTTP/1.1\r\nA: b\r\n folded\r\n\r\n", &page, &head),
                         400);
        assert_int_equal(parse("GET /metrics HTTP/1.1\r\n: empty-name\r\n\r\n", &page, &head), 400);
        {
                static const char nul[] = "GET /metrics HTTP/1.1\r\nA: \0\r\n\r\n";

                assert_int_equal(metrics_parse_request(nul, sizeof(nul) - 1, &page, &head), 400);
        }
}

int main(void)
{
        const struct CMUnitTest tests[] = {
                cmocka_unit_test_setup(test_metrics_every_family_has_help_and_type, setup),
                cmocka_unit_test_setup(test_metrics_every_line_is_well_formed, setup),
                cmocka_unit_test_setup(test_metrics_histogram_buckets_are_cumulative, setup),
                cmocka_unit_test_setup(test_metrics_counters_move, setup),
                cmocka_unit_test_setup(test_metrics_label_values_are_escaped, setup),
                cmocka_unit_test_setup(test_metrics_pool_label_set_is_bounded, setup),
                cmocka_unit_test_setup(test_metrics_outcome_of_stage_result, setup),
                cmocka_unit_test_setup(test_metrics_parse_request, setup),
        };

        return cmocka_run_group_tests(tests, NULL, NULL);
}
