#pragma once

/*
 * One function per subcommand, each in its own worker/cmd_<name>.c. Each parses its own
 * flags (argv[0] is the subcommand name) and returns the process exit status:
 * 0 success, 1 failure, 2 usage error. cli.c only dispatches.
 */

int cmd_migrate(int argc, char **argv);
int cmd_process_image(int argc, char **argv);
int cmd_list_images(int argc, char **argv);
int cmd_list_snapshots(int argc, char **argv);
int cmd_status(int argc, char **argv);
int cmd_verify_system(int argc, char **argv);
int cmd_show_config(int argc, char **argv);
int cmd_extract(int argc, char **argv);
int cmd_pool_setup(int argc, char **argv);
int cmd_download(int argc, char **argv);
int cmd_worker(int argc, char **argv);
int cmd_enqueue(int argc, char **argv);
int cmd_replay_dlq(int argc, char **argv);
int cmd_gc(int argc, char **argv);

/* Exit statuses shared by every command. */
enum cmd_exit {
        CMD_EXIT_OK = 0,
        CMD_EXIT_FAILURE = 1,
        CMD_EXIT_USAGE = 2, /* bad flags or arguments, or an invalid configuration */
};
