#pragma once

/*
 * The command line: global options, then a subcommand and its flags.
 *
 *   flyio-image-manager [--config FILE] [--set NAME=VALUE]... [--log-level L] COMMAND [...]
 *
 * --set applies any configuration variable as a flag (highest precedence). Commands get their
 * configuration from cli_config() and report with cli_fail() / cli_usage().
 */

#include <stdbool.h>

struct config;
struct db;
struct option;
struct pg_result;

/* Run the CLI. Returns the process exit status (0 ok, 1 failure, 2 usage error). */
int cli_main(int argc, char **argv);

/*
 * Load the configuration: defaults, file, environment, then --set flags. Prints on error.
 * Commands exit with status 2 (CMD_EXIT_USAGE) when it fails: an invalid setting, an
 * unreadable --config file or an inconsistent pair of settings is a mistake in how the
 * command was invoked, which running it again will not fix (verify-system also lists it as
 * a failed check before it exits 2).
 */
int cli_config(struct config *cfg);

/* Connect to PostgreSQL and, when @check_schema, refuse an out-of-date schema. Prints. */
int cli_db_open(const struct config *cfg, bool check_schema, struct db **ret_db);

/* Print "error: <last error>" (with @r's text) to stderr and return exit status 1. */
int cli_fail(int r);

/* Print "<command>: <message>" and a hint to use --help; returns exit status 2. */
int cli_usage(const char *command, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/*
 * getopt_long wrapper with our error messages: returns the option, -1 at the end, or '?'
 * after printing a usage error for an unknown option, a missing argument, a value given to a
 * flag that takes none, or an abbreviated long option (only whole names are accepted, so
 * that adding a flag never changes what an existing command line means). Resets getopt
 * state on the first call for a new argv.
 */
int cli_getopt(int argc, char **argv, const char *shortopts, const struct option *longopts);

/*
 * Forget the getopt state, so that the next cli_getopt() starts a fresh scan. cli_main() does
 * this before dispatching; tests that call a command function several times do it between
 * calls (the same argv address may come back with other contents).
 */
void cli_getopt_reset(void);

/*
 * The value of a boolean flag declared with optional_argument, called right after
 * cli_getopt() returned it: "--flag" is true, "--flag=BOOL" and "--flag BOOL" give BOOL
 * (true/false, yes/no, on/off, 1/0; the separate word is consumed). For commands without
 * positional arguments only: there any other word after the flag is a usage error that says
 * how to write the flag. Returns 0 or prints and returns 2.
 */
int cli_bool_flag(int argc, char **argv, const char *flag, bool *ret_value);

/* Reject positional arguments left after the flags. Returns 0 or prints and returns 2. */
int cli_no_positional(const char *command, int argc, char **argv);

/*
 * Print a result as an aligned text table with the given headers (one per column); SQL
 * NULLs print as "-".
 */
void cli_print_table(const struct pg_result *res, const char *const *headers);

/*
 * Run @sql, which must return one row with one JSON text column, and print it. The list
 * commands let PostgreSQL build their --json output so types come out right.
 */
int cli_print_json_query(struct db *db, const char *sql, int nparams, const char *const *params);

/* Whether stdout is a terminal (progress display, colours). */
bool cli_stdout_is_tty(void);
