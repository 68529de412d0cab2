/* Text processing: generate documents from a vocabulary, count words in a
 * hash table, LZ77-compress each document into an output buffer, and keep
 * a rolling archive of compressed blocks. */
#include "common.h"

static const char *vocab[] = {
    "the", "replica", "memory", "page", "checkpoint", "primary", "backup", "guest", "kernel", "dirty",
    "bitmap", "delta", "compress", "network", "latency", "storage", "virtual", "machine", "snapshot",
    "journal", "epoch", "barrier", "flush", "write", "read", "block", "device", "queue", "thread", "lock",
    "hash", "table", "index", "record", "commit", "abort", "retry", "timeout", "buffer", "cache"};
#define NV (sizeof vocab / sizeof *vocab)
#define DOC (64 * 1024)
#define NDOCS 128 /* 8 MiB of documents */
#define HT (1u << 16)
#define ARCH (16u << 20)

struct wc { char w[16]; uint64_t n; };

static size_t lz77(const uint8_t *in, size_t n, uint8_t *out) {
    static uint32_t head[1 << 14];
    memset(head, 0xff, sizeof head);
    size_t i = 0, o = 0;
    while (i + 4 < n) {
        uint32_t h = ((in[i] << 16) ^ (in[i + 1] << 8) ^ in[i + 2]) * 2654435761u >> 18;
        uint32_t c = head[h];
        head[h] = (uint32_t)i;
        if (c != 0xffffffffu && i - c < 65535 && memcmp(in + c, in + i, 4) == 0) {
            size_t l = 4;
            while (i + l < n && l < 255 && in[c + l] == in[i + l]) l++;
            out[o++] = 0xff; out[o++] = (uint8_t)l;
            out[o++] = (uint8_t)((i - c) >> 8); out[o++] = (uint8_t)(i - c);
            i += l;
        } else {
            out[o++] = in[i] == 0xff ? 0xfe : in[i];
            i++;
        }
    }
    while (i < n) out[o++] = in[i++];
    return o;
}

int main(void) {
    uint8_t *docs = xmalloc((size_t)NDOCS * DOC);
    uint8_t *out = xmalloc(2 * DOC);
    uint8_t *arch = xmalloc(ARCH);
    struct wc *ht = xmalloc(sizeof(struct wc) * HT);
    memset(ht, 0, sizeof(struct wc) * HT);
    memset(arch, 0, ARCH);
    for (int d = 0; d < NDOCS; d++) {
        size_t p = 0;
        while (p + 20 < DOC) p += snprintf((char *)docs + (size_t)d * DOC + p, 20, "%s ", vocab[rnd() % NV]);
    }
    started("textproc");
    size_t ap = 0;
    for (;;) {
        int d = (int)skewed(NDOCS);
        uint8_t *doc = docs + (size_t)d * DOC;
        /* Edit: rewrite a sentence somewhere in the document. */
        size_t p = rnd() % (DOC - 400);
        for (int w = 0; w < 30; w++) p += snprintf((char *)doc + p, 20, "%s ", vocab[rnd() % NV]);
        /* Count words. */
        for (size_t i = 0; i < DOC;) {
            size_t j = i;
            while (j < DOC && doc[j] > ' ') j++;
            if (j > i && j - i < 16) {
                uint32_t h = 2166136261u;
                for (size_t k = i; k < j; k++) h = (h ^ doc[k]) * 16777619u;
                struct wc *e = &ht[h & (HT - 1)];
                memcpy(e->w, doc + i, j - i);
                e->n++;
            }
            i = j + 1;
        }
        size_t n = lz77(doc, DOC, out);
        if (ap + n > ARCH) ap = 0;
        memcpy(arch + ap, out, n);
        ap += n;
    }
}
