#pragma once

/*
 * SHA-256 of a file that is being written, computed on a thread of its own.
 *
 * The download writes received bytes to the file and tells the hasher how long the
 * contiguous prefix on disk has become; the hasher reads that prefix back (from the page
 * cache) and feeds it to SHA-256 while the next bytes arrive. Receiving and hashing then use
 * two cores instead of taking turns on one: at 1-2 GB/s, SHA-256 costs about as much CPU as
 * receiving does.
 *
 * The hash state belongs to the hasher from prefix_hasher_start() until prefix_hasher_finish()
 * or prefix_hasher_stop() returns; the caller must not touch it, nor close the file, in
 * between. One caller thread drives a hasher; it is not meant to be shared further.
 */

#include <stdint.h>

#include <openssl/evp.h>

struct prefix_hasher;

/*
 * Start hashing @fd (named @path in messages) into @sha, which has already been fed bytes
 * [0, @hashed). Nothing more is read until prefix_hasher_advance() says so.
 * Returns 0 or a negative errno (-ENOMEM, or pthread_create's error).
 */
int prefix_hasher_start(int fd, const char *path, EVP_MD_CTX *sha, uint64_t hashed,
                        struct prefix_hasher **ret);

/*
 * Bytes [0, @end) are in the file and will not change: hash up to there. Never shrinks. An
 * idle thread starts once 1 MiB is waiting, or at prefix_hasher_finish().
 */
void prefix_hasher_advance(struct prefix_hasher *h, uint64_t end);

/*
 * Wait until everything asked for is hashed, end the thread and free @h. @ret_hashed gets
 * the number of bytes fed to the hash in all. Returns 0, or the negative errno (with the
 * message) of the read or hash that failed; @sha is then incomplete.
 */
int prefix_hasher_finish(struct prefix_hasher *h, uint64_t *ret_hashed);

/* End the thread without waiting for the rest and free @h; @sha is left incomplete. NULL: no-op. */
void prefix_hasher_stop(struct prefix_hasher *h);
