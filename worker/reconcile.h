#pragma once

/*
 * What the worker does at start before taking jobs: repair what crashes left in the thin
 * pool (stages/thin_registry.h: half-made devices of dead runs, interrupted deletes, unknown
 * ids reserved) and re-activate the devices a reboot took away, logging every finding.
 */

struct config;
struct db;

/*
 * Reconcile every pool this host has thin device rows in, and POOL_NAME (requests may name
 * any pool), re-activate their devices and report runs stalled longer than UNPACK_TIMEOUT.
 * A pool that cannot be read does not stop the others. Returns 0, or the first negative errno
 * (the caller decides whether to start anyway).
 */
int reconcile_at_start(const struct config *cfg, struct db *db);
