#pragma once

/*
 * A TCP proxy in front of the test PostgreSQL, for faults that the server alone cannot
 * make on demand: a database that stops answering, one that refuses connections, and a
 * connection lost exactly around a COMMIT. It runs in a thread of the test process and
 * forwards bytes unchanged; the COMMIT faults recognise libpq's simple-protocol "COMMIT"
 * message (what db_tx sends).
 */

#include <stdbool.h>
#include <stddef.h>

struct pgproxy;

enum pgproxy_mode {
        PGPROXY_PASS,      /* forward everything */
        PGPROXY_BLACKHOLE, /* accept and forward nothing, keep every socket open: a hang */
        PGPROXY_REFUSE,    /* close every connection, and each new one at once */
};

enum pgproxy_commit_fault {
        PGPROXY_COMMIT_DROP_BEFORE, /* drop the connection instead of forwarding COMMIT */
        PGPROXY_COMMIT_DROP_AFTER,  /* forward COMMIT, drop the connection instead of its reply */
        PGPROXY_COMMIT_CUT_AFTER_REPLY, /* forward COMMIT and its reply, then drop the connection */
};

/* Start a proxy on a free loopback port in front of the server of URI @url. Fails the test. */
struct pgproxy *pgproxy_start(const char *url);

/* Stop the thread, close everything, free. */
void pgproxy_stop(struct pgproxy *p);

/* @url with its host and port replaced by the proxy's, into @out. */
void pgproxy_url(const struct pgproxy *p, const char *url, char *out, size_t size);

void pgproxy_set_mode(struct pgproxy *p, enum pgproxy_mode mode);

/* Close every open connection now (new ones are accepted unless the mode says otherwise). */
void pgproxy_cut(struct pgproxy *p);

/* Apply @fault to the next COMMIT any client sends through the proxy (one shot). */
void pgproxy_arm_commit(struct pgproxy *p, enum pgproxy_commit_fault fault);

/* Whether the armed COMMIT fault has been applied. */
bool pgproxy_commit_fault_done(struct pgproxy *p);
