/* ticker: prints "TICK n" on the console every ~10 ms, n increasing, and
 * rewrites a few pages of a 16 MiB buffer per tick, so a live migration
 * has memory to chase and a test can see the guest carry on (the counter
 * never goes back). Used by the VM migration tests. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define BUF (16u << 20)
#define PAGE 4096u

int main(void) {
    unsigned char *buf = malloc(BUF);
    if (!buf) return 1;
    memset(buf, 1, BUF);
    struct timespec ts = {0, 10 * 1000 * 1000};
    char line[32];
    for (unsigned long n = 0;; n++) {
        for (unsigned p = 0; p < 16; p++) {
            size_t off = ((n * 16 + p) * PAGE) % BUF;
            memset(buf + off, (int)(n & 0xff), 64);
        }
        int len = snprintf(line, sizeof line, "TICK %lu\n", n);
        if (write(1, line, (size_t)len) < 0) return 1;
        nanosleep(&ts, NULL);
    }
}
