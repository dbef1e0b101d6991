#pragma once

/* What the downloader leaves on disk, read the way a test that kills it needs to. */

#include <stdint.h>

/*
 * The "verified N" line of @dest's partial-download sidecar (@dest.part.meta): the bytes the
 * last checkpoint synced. 0 when there is no sidecar (yet) or no such line.
 */
uint64_t download_test_verified(const char *dest);
