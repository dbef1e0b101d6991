#pragma once

/*
 * ULIDs: 26 characters of Crockford base32, a 48-bit millisecond timestamp followed by 80
 * random bits. They sort by creation time, which keeps run ids in `status` and the logs in
 * the order they happened.
 */

#include <stdbool.h>
#include <stdint.h>

#define ULID_LEN 26

/* Write a new ULID and a NUL into @out (ULID_LEN + 1 bytes). Returns 0 or -errno. */
int ulid_new(char out[ULID_LEN + 1]);

/* Same, with a given time in ms and random bytes (tests). */
void ulid_encode(int64_t ms, const unsigned char random[10], char out[ULID_LEN + 1]);

/* Whether @s is a syntactically valid ULID (case-insensitive). */
bool ulid_is_valid(const char *s);
