#pragma once

/* The command line: parses the subcommand and its flags and dispatches. */

/* Run the CLI. Returns the process exit status (0 ok, 1 failure, 2 usage error). */
int cli_main(int argc, char **argv);
