#pragma once

/*
 * ULIDs: 26 characters of Crockford base32, a 48-bit millisecond timestamp followed by 80
 * random bits. They sort by creation time, which keeps run ids in `status` and the logs in
 * the order they happened.
 *
 * ulid_new() is monotonic within a process: a ULID made in the same millisecond as the one
 * before it (or while the wall clock has stepped back) keeps that one's time and takes its
 * random part plus one, so ids of one process always sort in creation order.
 *
 * We always write the canonical form: uppercase, digits and letters without I, L, O and U.
 * Input is accepted in either case (ulid_normalize), but I, L and O are refused rather than
 * read as 1, 1 and 0 as Crockford's decoding allows: every id we print is canonical, so such
 * a letter means a mistyped id, and a clear error beats silently looking up another run.
 */

#include <stdbool.h>
#include <stdint.h>

#define ULID_LEN 26

/* Write a new ULID and a NUL into @out (ULID_LEN + 1 bytes). Returns 0 or -errno. */
int ulid_new(char out[ULID_LEN + 1]);

/* Same, with a given time in ms and random bytes (tests). */
void ulid_encode(int64_t ms, const unsigned char random[10], char out[ULID_LEN + 1]);

/*
 * Whether @s is a valid ULID: exactly 26 characters of the alphabet in either case, the
 * first at most '7' (48 bits of time).
 */
bool ulid_is_valid(const char *s);

/* Copy a valid ULID to @out in canonical (uppercase) form. Returns 0 or -EINVAL. */
int ulid_normalize(const char *s, char out[ULID_LEN + 1]);
