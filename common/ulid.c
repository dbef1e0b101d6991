#include "common/ulid.h"

#include <ctype.h>
#include <errno.h>
#include <pthread.h>
#include <string.h>
#include <sys/random.h>

#include "common/util.h"

static const char ulid_alphabet[] = "0123456789ABCDEFGHJKMNPQRSTVWXYZ";

/* The last ULID this process made, for monotonic ids within one millisecond. */
static pthread_mutex_t ulid_lock = PTHREAD_MUTEX_INITIALIZER;
static int64_t ulid_last_ms = -1;
static unsigned char ulid_last_random[10];

void ulid_encode(int64_t ms, const unsigned char random[10], char out[ULID_LEN + 1])
{
        uint64_t t = (uint64_t)ms & 0xffffffffffffULL;
        unsigned acc = 0, bits = 0;
        size_t o = 10;

        /* 48 bits of time in 10 characters, the first carrying only 3 bits. */
        for (int i = 9; i >= 0; i--) {
                out[i] = ulid_alphabet[t & 31];
                t >>= 5;
        }
        /* 80 random bits in 16 characters, most significant first. */
        for (size_t i = 0; i < 10; i++) {
                acc = (acc << 8) | random[i];
                bits += 8;
                while (bits >= 5) {
                        bits -= 5;
                        out[o++] = ulid_alphabet[(acc >> bits) & 31];
                }
        }
        out[ULID_LEN] = '\0';
}

/* Add one to an 80-bit big-endian number; returns true when it wrapped to zero. */
static bool ulid_increment(unsigned char random[10])
{
        for (int i = 9; i >= 0; i--) {
                if (++random[i] != 0)
                        return false;
        }
        return true;
}

int ulid_new(char out[ULID_LEN + 1])
{
        unsigned char random[10];
        int64_t ms = util_now_realtime_ms();
        ssize_t n;

        do {
                n = getrandom(random, sizeof(random), 0);
        } while (n < 0 && errno == EINTR);
        if (n != (ssize_t)sizeof(random))
                return -EIO;
        pthread_mutex_lock(&ulid_lock);
        if (ms <= ulid_last_ms) {
                /* Same millisecond, or the clock stepped back: one more than the last id. A
                 * wrap of the 80 bits (2^80 ids in one ms) moves on to the next millisecond. */
                ms = ulid_last_ms;
                memcpy(random, ulid_last_random, sizeof(random));
                if (ulid_increment(random))
                        ms++;
        }
        ulid_last_ms = ms;
        memcpy(ulid_last_random, random, sizeof(random));
        pthread_mutex_unlock(&ulid_lock);
        ulid_encode(ms, random, out);
        return 0;
}

bool ulid_is_valid(const char *s)
{
        if (strlen(s) != ULID_LEN)
                return false;
        /* The first character holds the top 3 bits of the time: 0..7. */
        if (s[0] < '0' || s[0] > '7')
                return false;
        for (size_t i = 0; i < ULID_LEN; i++) {
                if (!strchr(ulid_alphabet, toupper((unsigned char)s[i])))
                        return false;
        }
        return true;
}

int ulid_normalize(const char *s, char out[ULID_LEN + 1])
{
        if (!ulid_is_valid(s))
                return -EINVAL;
        for (size_t i = 0; i < ULID_LEN; i++)
                out[i] = (char)toupper((unsigned char)s[i]);
        out[ULID_LEN] = '\0';
        return 0;
}
