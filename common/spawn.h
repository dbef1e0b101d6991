#pragma once

/* Run a helper program (mkfs.ext4, e2fsck) and collect the tail of what it printed. */

#include <stddef.h>

/*
 * Run argv[0] (searched in PATH) with @argv, stdin from /dev/null, stdout and stderr captured
 * together; the last @out_size - 1 bytes of that output go to @out (may be NULL). Returns 0
 * when it exited with status 0, -EIO (with err_last naming the program, its status and
 * output) when it failed, or a negative errno when it could not be started.
 */
int spawn_run(const char *const *argv, char *out, size_t out_size);
