/* `show-config`: the effective configuration, with where each value came from. */
#include <getopt.h>
#include <stdio.h>

#include "config/config.h"
#include "worker/cli.h"
#include "worker/commands.h"

int cmd_show_config(int argc, char **argv)
{
        static const struct option opts[] = {
                {"help", no_argument, NULL, 'h'},
                {0, 0, 0, 0},
        };
        struct config cfg;
        int c;

        while ((c = cli_getopt(argc, argv, "h", opts)) != -1) {
                switch (c) {
                case 'h':
                        printf("Usage: flyio-image-manager show-config\n\n"
                               "Print every setting as NAME=value with its source (default, file,\n"
                               "environment, flag). Secrets print as [set] or [not set].\n");
                        return CMD_EXIT_OK;
                default:
                        return CMD_EXIT_USAGE;
                }
        }
        if (cli_no_positional(argv[0], argc, argv))
                return CMD_EXIT_USAGE;
        if (cli_config(&cfg) < 0)
                return CMD_EXIT_USAGE;
        config_print(&cfg, stdout);
        config_done(&cfg);
        return CMD_EXIT_OK;
}
