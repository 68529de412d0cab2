/* Allocator churn: a pool of live objects of mixed sizes that are freed,
 * reallocated (realloc copies), filled with structured records and
 * partially updated, like a long-running service's heap. */
#include "common.h"

#define LIVE 3000

struct obj { uint8_t *p; size_t n; };

static void fill(uint8_t *p, size_t n, uint64_t tag) {
    for (size_t i = 0; i + 16 <= n; i += 16) {
        uint64_t rec[2] = { tag, i };
        memcpy(p + i, rec, 16);
    }
}

int main(void) {
    struct obj *o = xmalloc(sizeof(struct obj) * LIVE);
    for (int i = 0; i < LIVE; i++) {
        o[i].n = 64 + rnd() % (24 * 1024);
        o[i].p = xmalloc(o[i].n);
        fill(o[i].p, o[i].n, i);
    }
    started("churn");
    uint64_t ops = 0;
    for (;;) {
        int i = (int)skewed(LIVE);
        switch (rnd() % 8) {
        case 0: /* free and allocate a new object */
            free(o[i].p);
            o[i].n = 64 + rnd() % (24 * 1024);
            o[i].p = xmalloc(o[i].n);
            fill(o[i].p, o[i].n, ops);
            break;
        case 1: { /* grow or shrink: realloc may move (copy) the data */
            size_t n = 64 + rnd() % (48 * 1024);
            uint8_t *p = realloc(o[i].p, n);
            if (!p) break;
            if (n > o[i].n) fill(p + o[i].n, n - o[i].n, ops);
            o[i].p = p;
            o[i].n = n;
            break;
        }
        default: { /* update a few fields in place */
            size_t at = (rnd() % (o[i].n / 16)) * 16;
            uint64_t v = ops;
            memcpy(o[i].p + at + 8, &v, 8);
            break;
        }
        }
        ops++;
    }
}
