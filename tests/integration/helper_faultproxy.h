#pragma once

/*
 * tests/integration/faultproxy.py, started on a free loopback port in front of an S3 endpoint
 * and driven through its standard input (see the script for the commands). The proxy logs
 * one line per request, which tests search with faultproxy_log_count().
 */

#include <stddef.h>
#include <stdio.h>
#include <sys/types.h>

struct faultproxy {
        pid_t pid;
        FILE *in;  /* commands */
        FILE *out; /* answers */
        int port;
        char log_path[512];
        char url[64]; /* http://127.0.0.1:<port> */
};

/* Start it in front of @endpoint ("http://host:port"), logging to @log_path. 0 or -1. */
int faultproxy_start(struct faultproxy *fp, const char *endpoint, const char *log_path);

/* Send a command; fails the test unless the answer starts with "ok". The answer goes to @ret. */
void faultproxy_query(struct faultproxy *fp, const char *cmd, char *ret, size_t size);

/* Send a command that must be answered exactly "ok". */
void faultproxy_command(struct faultproxy *fp, const char *cmd);

/* Lines of the request log that contain every one of the NULL-terminated strings. */
int faultproxy_log_count(const struct faultproxy *fp, ...);

/* Stop it (end of input, then SIGKILL after 5 s). Safe on a proxy that never started. */
void faultproxy_stop(struct faultproxy *fp);
