#include "worker/cli.h"

#include <errno.h>
#include <getopt.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/err.h"
#include "common/log.h"
#include "common/util.h"
#include "config/config.h"
#include "db/db.h"
#include "worker/commands.h"

#define CLI_MAX_SETS 64
#define CLI_PROGRAM "flyio-image-manager"

static struct {
        const char *config_file;
        const char *sets[CLI_MAX_SETS];
        int nsets;
        const char *log_level;
        char *const *argv; /* the argv getopt was last reset for */
} cli_globals;

struct cli_command {
        const char *name;
        int (*run)(int argc, char **argv);
        const char *summary;
};

static const struct cli_command cli_commands[] = {
        {"process-image", cmd_process_image, "download, unpack and activate one image"},
        {"list-images", cmd_list_images, "list downloaded images"},
        {"list-snapshots", cmd_list_snapshots, "list snapshots"},
        {"status", cmd_status, "show an FSM run and its history"},
        {"verify-system", cmd_verify_system, "check configuration, database, pool, S3, disk"},
        {"migrate", cmd_migrate, "apply database migrations"},
        {"show-config", cmd_show_config, "print the effective configuration (no secrets)"},
        {"extract", cmd_extract, "extract a tarball safely into a directory (no thin pool)"},
        {"download", cmd_download, "download one S3 object (developer and benchmark aid)"},
        {"gc", cmd_gc, "remove an image's snapshots, origin and tarball"},
        {"pool-setup", cmd_pool_setup, "create or tear down a loop-backed thin pool (dev/test)"},
        {"worker", cmd_worker, "consume stage requests from Kafka and run them"},
        {"enqueue", cmd_enqueue, "produce a download request to Kafka"},
        {"replay-dlq", cmd_replay_dlq, "re-publish dead-lettered requests to their stage topic"},
};

static void cli_print_help(FILE *out)
{
        fprintf(out,
                "Usage: flyio-image-manager [GLOBAL OPTIONS] COMMAND [FLAGS]\n"
                "\n"
                "Turns container image tarballs in S3 into devicemapper thin devices and\n"
                "snapshots.\n"
                "\n"
                "Global options:\n"
                "  --config FILE        read settings from FILE (KEY=value lines)\n"
                "  --set NAME=VALUE     override one setting (repeatable), e.g. --set POOL_NAME=p\n"
                "  --log-level LEVEL    debug, info, notice, warning or err\n"
                "  --version            print the version\n"
                "  -h, --help           print this help\n"
                "\n"
                "Commands:\n");
        for (size_t i = 0; i < ARRAY_SIZE(cli_commands); i++)
                fprintf(out, "  %-16s %s\n", cli_commands[i].name, cli_commands[i].summary);
        fprintf(out, "\nRun 'flyio-image-manager COMMAND --help' for a command's flags.\n");
}

int cli_usage(const char *command, const char *fmt, ...)
{
        va_list ap;

        fprintf(stderr, "%s: ", command);
        va_start(ap, fmt);
        vfprintf(stderr, fmt, ap);
        va_end(ap);
        if (strcmp(command, CLI_PROGRAM) == 0)
                fprintf(stderr, "\nTry '" CLI_PROGRAM " --help'.\n");
        else
                fprintf(stderr, "\nTry '" CLI_PROGRAM " %s --help'.\n", command);
        return CMD_EXIT_USAGE;
}

int cli_fail(int r)
{
        char msg[ERR_MSG_MAX];

        (void)snprintf(msg, sizeof(msg), "%s", err_text(r));
        log_redact(msg);
        fprintf(stderr, "error: %s\n", msg);
        return CMD_EXIT_FAILURE;
}

void cli_getopt_reset(void)
{
        cli_globals.argv = NULL;
}

/* The long option spelled exactly as the "--name[=value]" word @arg, or NULL. */
static const struct option *cli_long_option(const struct option *longopts, const char *arg)
{
        size_t len = strcspn(arg + 2, "=");

        for (const struct option *o = longopts; o->name; o++) {
                if (strlen(o->name) == len && strncmp(o->name, arg + 2, len) == 0)
                        return o;
        }
        return NULL;
}

/* Explain a '?' from getopt_long: an unknown flag, or a value given to a flag that takes none. */
static void cli_bad_option(const char *who, const char *what, char **argv,
                           const struct option *longopts)
{
        const char *bad = argv[optind - 1];

        if (bad && strncmp(bad, "--", 2) == 0) {
                const struct option *o = cli_long_option(longopts, bad);

                if (o && o->has_arg == no_argument && strchr(bad, '='))
                        cli_usage(who, "flag '--%s' takes no value", o->name);
                else
                        cli_usage(who, "unknown %s '%.*s'", what, (int)strcspn(bad, "="), bad);
        } else if (optopt && (!bad || bad[0] != '-' || bad[1] == '-')) {
                cli_usage(who, "unknown %s '-%c'", what, optopt);
        } else {
                cli_usage(who, "unknown %s '%s'", what, bad);
        }
}

/*
 * getopt_long accepts any unambiguous prefix of a long option ("--stat" for "--status").
 * Scripts that rely on one break as soon as another flag with that prefix is added, so
 * only whole names are accepted. Returns 0, or prints a usage error and returns -1.
 */
static int cli_check_whole_name(const char *who, char **argv, const struct option *longopts,
                                int index)
{
        const struct option *o = &longopts[index];
        /* The word is the last one consumed, or the one before it when it took the value. */
        const char *word = argv[optind - 1];

        if (o->has_arg == required_argument && optarg == argv[optind - 1])
                word = argv[optind - 2];
        if (strncmp(word, "--", 2) != 0 || cli_long_option(longopts, word) == o)
                return 0;
        cli_usage(who, "unknown flag '%.*s' (abbreviations are not accepted: write '--%s')",
                  (int)strcspn(word, "="), word, o->name);
        return -1;
}

/* cli_getopt for @who; @posix stops at the first non-option (the global options). */
static int cli_getopt_as(const char *who, const char *what, bool posix, int argc, char **argv,
                         const char *shortopts, const struct option *longopts)
{
        char opts[128];
        int index = -1;
        int c;

        /* Leading ':' makes getopt report a missing argument as ':' instead of '?'. */
        (void)snprintf(opts, sizeof(opts), "%s:%s", posix ? "+" : "", shortopts);
        opterr = 0;
        c = getopt_long(argc, argv, opts, longopts, &index);
        if (c == '?') {
                cli_bad_option(who, what, argv, longopts);
                return '?';
        }
        if (c == ':') {
                cli_usage(who, "flag '%s' needs a value", argv[optind - 1]);
                return '?';
        }
        if (c != -1 && index >= 0 && cli_check_whole_name(who, argv, longopts, index) < 0)
                return '?';
        return c;
}

int cli_getopt(int argc, char **argv, const char *shortopts, const struct option *longopts)
{
        if (cli_globals.argv != argv) {
                cli_globals.argv = argv;
                optind = 0; /* full re-initialisation in glibc */
        }
        return cli_getopt_as(argv[0], "flag", false, argc, argv, shortopts, longopts);
}

int cli_bool_flag(int argc, char **argv, const char *flag, bool *ret_value)
{
        const char *next = optind < argc ? argv[optind] : NULL;

        if (optarg) {
                if (util_parse_bool(optarg, ret_value) < 0)
                        return cli_usage(argv[0], "%s='%s': expected true or false", flag, optarg);
                return 0;
        }
        /* "--flag false": the next word is the value when it is one. */
        if (next && util_parse_bool(next, ret_value) == 0) {
                optind++;
                return 0;
        }
        if (next && next[0] != '-')
                return cli_usage(argv[0],
                                 "%s takes true or false, not '%s': write %s, %s=false or %s false",
                                 flag, next, flag, flag, flag);
        *ret_value = true;
        return 0;
}

int cli_no_positional(const char *command, int argc, char **argv)
{
        if (optind < argc)
                return cli_usage(command, "unexpected argument '%s'", argv[optind]);
        return 0;
}

void cli_print_table(const struct pg_result *res, const char *const *headers)
{
        int cols = PQnfields(res), rows = PQntuples(res);
        size_t width[32] = {0};

        FIM_ASSERT(cols <= 32);
        for (int c = 0; c < cols; c++)
                width[c] = strlen(headers[c]);
        for (int row = 0; row < rows; row++) {
                for (int c = 0; c < cols; c++) {
                        const char *v = db_get(res, row, c);
                        size_t n = strlen(v ? v : "-");

                        if (n > width[c])
                                width[c] = n;
                }
        }
        for (int c = 0; c < cols; c++)
                printf("%-*s%s", c == cols - 1 ? 0 : (int)width[c], headers[c],
                       c == cols - 1 ? "\n" : "  ");
        for (int row = 0; row < rows; row++) {
                for (int c = 0; c < cols; c++) {
                        const char *v = db_get(res, row, c);

                        printf("%-*s%s", c == cols - 1 ? 0 : (int)width[c], v ? v : "-",
                               c == cols - 1 ? "\n" : "  ");
                }
        }
}

int cli_print_json_query(struct db *db, const char *sql, int nparams, const char *const *params)
{
        PGresult *res = NULL;
        int r;

        r = db_query_row(db, &res, sql, nparams, params);
        if (r < 0)
                return r;
        if (r > 0) {
                const char *v = db_get(res, 0, 0);

                printf("%s\n", v ? v : "null");
                PQclear(res);
        }
        return 0;
}

bool cli_stdout_is_tty(void)
{
        return isatty(STDOUT_FILENO) == 1;
}

int cli_config(struct config *cfg)
{
        int r;

        r = config_load(cfg, cli_globals.config_file);
        if (r < 0)
                goto fail;
        for (int i = 0; i < cli_globals.nsets; i++) {
                char name[128];
                const char *eq = strchr(cli_globals.sets[i], '=');
                size_t n = eq ? (size_t)(eq - cli_globals.sets[i]) : 0;

                if (!eq || n == 0 || n >= sizeof(name)) {
                        r = err_set(-EINVAL, "--set expects NAME=VALUE");
                        goto fail;
                }
                memcpy(name, cli_globals.sets[i], n);
                name[n] = '\0';
                r = config_set(cfg, name, eq + 1, CONFIG_SOURCE_FLAG);
                if (r < 0)
                        goto fail;
        }
        if (cli_globals.log_level) {
                r = config_set(cfg, "LOG_LEVEL", cli_globals.log_level, CONFIG_SOURCE_FLAG);
                if (r < 0)
                        goto fail;
        }
        {
                enum log_level level;

                if (log_level_parse(cfg->log_level, &level) == 0)
                        log_set_level(level);
        }
        r = config_validate(cfg);
        if (r < 0)
                goto fail;
        return 0;
fail:
        cli_fail(r);
        config_done(cfg);
        return r;
}

int cli_db_open(const struct config *cfg, bool check_schema, struct db **ret_db)
{
        struct db *db = NULL;
        int r;

        r = db_connect(cfg->database_url, &db);
        if (r < 0) {
                err_wrap(r, "database unreachable (DATABASE_URL)");
                cli_fail(r);
                return r;
        }
        if (check_schema) {
                r = db_schema_check(db);
                if (r < 0) {
                        cli_fail(r);
                        db_free(db);
                        return r;
                }
        }
        *ret_db = db;
        return 0;
}

int cli_main(int argc, char **argv)
{
        static const struct option opts[] = {
                {"config", required_argument, NULL, 'c'},
                {"set", required_argument, NULL, 's'},
                {"log-level", required_argument, NULL, 'l'},
                {"version", no_argument, NULL, 'V'},
                {"help", no_argument, NULL, 'h'},
                {0, 0, 0, 0},
        };
        const char *name;
        int c;

        cli_globals.argv = argv;
        optind = 0;
        for (;;) {
                c = cli_getopt_as(CLI_PROGRAM, "global flag", true, argc, argv, "h", opts);
                if (c == -1)
                        break;
                switch (c) {
                case 'c':
                        cli_globals.config_file = optarg;
                        break;
                case 's':
                        if (cli_globals.nsets == CLI_MAX_SETS)
                                return cli_usage(CLI_PROGRAM, "too many --set flags");
                        cli_globals.sets[cli_globals.nsets++] = optarg;
                        break;
                case 'l': {
                        enum log_level level;

                        /* Applied now as well, for the commands that read no configuration
                         * (extract); cli_config() applies it again over LOG_LEVEL. */
                        if (log_level_parse(optarg, &level) < 0)
                                return cli_usage(
                                        CLI_PROGRAM,
                                        "--log-level '%s': expected one of debug, info, notice, warning, err",
                                        optarg);
                        log_set_level(level);
                        cli_globals.log_level = optarg;
                        break;
                }
                case 'V':
                        printf(CLI_PROGRAM " %s\n", FIM_VERSION);
                        return CMD_EXIT_OK;
                case 'h':
                        cli_print_help(stdout);
                        return CMD_EXIT_OK;
                default:
                        return CMD_EXIT_USAGE;
                }
        }
        if (optind >= argc) {
                cli_print_help(stderr);
                return CMD_EXIT_USAGE;
        }
        name = argv[optind];
        for (size_t i = 0; i < ARRAY_SIZE(cli_commands); i++) {
                if (strcmp(cli_commands[i].name, name) == 0) {
                        char **sub = argv + optind;
                        int subc = argc - optind;

                        cli_getopt_reset();
                        return cli_commands[i].run(subc, sub);
                }
        }
        return cli_usage(CLI_PROGRAM, "unknown command '%s'", name);
}
