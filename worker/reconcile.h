#pragma once

/*
 * What the worker does at start before taking jobs: repair what crashes left in the thin
 * pool (stages/thin_registry.h: half-made devices of dead runs, interrupted deletes, unknown
 * ids reserved) and re-activate the devices a reboot took away, logging every finding.
 */

struct config;
struct db;

/*
 * Reconcile POOL_NAME on this host and re-activate its devices. Returns 0, or a negative
 * errno when the pool cannot be read (the caller decides whether to start anyway).
 */
int reconcile_at_start(const struct config *cfg, struct db *db);
