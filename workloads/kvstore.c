/* Key-value store: open-addressing hash table with random (skewed) updates
 * of small values, counters and timestamps, and a Redis-like fork()
 * snapshot every few seconds (copy-on-write copies pages the parent then
 * modifies: the new physical page is a near copy of another one). */
#include "common.h"
#include <sys/wait.h>
#include <unistd.h>

#define NSLOTS (1u << 18) /* 262144 entries x 96 B = 24 MiB */

struct entry {
    uint64_t key;
    uint64_t version;
    uint32_t hits;
    uint32_t len;
    char value[72];
};

int main(void) {
    struct entry *t = xmalloc(sizeof(struct entry) * NSLOTS);
    memset(t, 0, sizeof(struct entry) * NSLOTS);
    for (uint32_t i = 0; i < NSLOTS * 3 / 4; i++) {
        uint64_t k = i * 2654435761u + 1;
        struct entry *e = &t[k & (NSLOTS - 1)];
        while (e->key) e = &t[(e - t + 1) & (NSLOTS - 1)];
        e->key = k;
        e->len = snprintf(e->value, sizeof e->value, "user:%lu:name=%08lx", (unsigned long)i, (unsigned long)rnd());
    }
    started("kvstore");
    uint64_t ops = 0;
    for (;;) {
        uint64_t i = skewed(NSLOTS * 3 / 4);
        uint64_t k = i * 2654435761u + 1;
        struct entry *e = &t[k & (NSLOTS - 1)];
        int probes = 0;
        while (e->key && e->key != k && probes++ < 64) e = &t[(e - t + 1) & (NSLOTS - 1)];
        e->key = k;
        e->version++;
        e->hits++;
        if (rnd() % 4 == 0) {
            e->len = snprintf(e->value, sizeof e->value, "user:%lu:name=%08lx:ts=%lu", (unsigned long)i,
                              (unsigned long)rnd(), (unsigned long)ops);
        }
        if (++ops % 3000000 == 0) {
            pid_t p = fork();
            if (p == 0) {
                /* Child: "serialise" the table (reads only) and exit. */
                uint64_t sum = 0;
                for (uint32_t j = 0; j < NSLOTS; j++) sum += t[j].version;
                _exit((int)(sum & 1));
            }
            if (p > 0) waitpid(p, NULL, WNOHANG);
        }
        if (ops % 100000 == 0) while (waitpid(-1, NULL, WNOHANG) > 0) {}
    }
}
