#include "common/ulid.h"

#include <ctype.h>
#include <errno.h>
#include <string.h>
#include <sys/random.h>

#include "common/util.h"

static const char ulid_alphabet[] = "0123456789ABCDEFGHJKMNPQRSTVWXYZ";

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

int ulid_new(char out[ULID_LEN + 1])
{
        unsigned char random[10];
        ssize_t n;

        do {
                n = getrandom(random, sizeof(random), 0);
        } while (n < 0 && errno == EINTR);
        if (n != (ssize_t)sizeof(random))
                return -EIO;
        ulid_encode(util_now_realtime_ms(), random, out);
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
