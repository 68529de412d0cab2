/* Shared helpers for the guest workloads: a fast PRNG and a start marker. */
#ifndef WORKLOAD_COMMON_H
#define WORKLOAD_COMMON_H
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static inline uint64_t rnd(void) {
    uint64_t x = rng_state;
    x ^= x << 13; x ^= x >> 7; x ^= x << 17;
    return rng_state = x;
}
/* Skewed choice in [0, n): most picks land in a hot tenth. */
static inline uint64_t skewed(uint64_t n) {
    if (rnd() % 100 < 85) return rnd() % (n / 10 + 1);
    return rnd() % n;
}
static void *xmalloc(size_t n) {
    void *p = malloc(n);
    if (!p) { perror("malloc"); exit(1); }
    return p;
}
static void started(const char *name) {
    printf("WORKLOAD-START %s\n", name);
    fflush(stdout);
}
#endif
