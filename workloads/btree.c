/* Database-like: a B+tree of 4 KiB nodes with random inserts and updates,
 * an append-only write-ahead log in a ring buffer, and a buffer pool that
 * periodically copies dirty nodes into page-aligned frames (checkpointing). */
#include "common.h"

#define NODE 4096
#define KEYS ((NODE - 16) / 16)
#define MAXNODES 6000 /* ~24 MiB of nodes */
#define LOGSZ (8u << 20)
#define POOL 2048 /* 8 MiB buffer pool */

struct node {
    uint32_t n, leaf;
    uint64_t lsn;
    uint64_t key[KEYS];
    uint64_t val[KEYS];
};

static struct node *nodes;
static uint32_t nnodes;
static uint8_t *wal;
static uint64_t wal_pos, lsn;
static uint8_t *pool;
static uint32_t dirty[MAXNODES], ndirty;

static uint32_t alloc_node(int leaf) {
    if (nnodes >= MAXNODES) return UINT32_MAX;
    struct node *x = &nodes[nnodes];
    memset(x, 0, sizeof *x);
    x->leaf = leaf;
    return nnodes++;
}

static void log_rec(uint64_t k, uint64_t v) {
    struct { uint64_t lsn, k, v; uint32_t crc, len; } r = { ++lsn, k, v, (uint32_t)(k ^ v), 24 };
    if (wal_pos + sizeof r > LOGSZ) wal_pos = 0;
    memcpy(wal + wal_pos, &r, sizeof r);
    wal_pos += sizeof r;
}

static void mark(uint32_t id) {
    if (ndirty < MAXNODES) dirty[ndirty++] = id;
    nodes[id].lsn = lsn;
}

/* Leaf-level sorted insert into a flat two-level tree: root -> leaves. */
static uint32_t root;
static void insert(uint64_t k, uint64_t v) {
    struct node *r = &nodes[root];
    uint32_t i = 0;
    while (i + 1 < r->n && r->key[i + 1] <= k) i++;
    uint32_t lid = (uint32_t)r->val[i];
    struct node *l = &nodes[lid];
    uint32_t j = 0;
    while (j < l->n && l->key[j] < k) j++;
    log_rec(k, v);
    if (j < l->n && l->key[j] == k) { l->val[j] = v; mark(lid); return; }
    if (l->n == KEYS) {
        uint32_t nid = alloc_node(1);
        if (nid == UINT32_MAX || r->n == KEYS) { l->val[j % l->n] = v; mark(lid); return; }
        l = &nodes[lid];
        struct node *n2 = &nodes[nid];
        uint32_t h = KEYS / 2;
        memcpy(n2->key, l->key + h, (KEYS - h) * 8);
        memcpy(n2->val, l->val + h, (KEYS - h) * 8);
        n2->n = KEYS - h;
        l->n = h;
        memmove(r->key + i + 2, r->key + i + 1, (r->n - i - 1) * 8);
        memmove(r->val + i + 2, r->val + i + 1, (r->n - i - 1) * 8);
        r->key[i + 1] = n2->key[0];
        r->val[i + 1] = nid;
        r->n++;
        mark(nid);
        mark(root);
        insert(k, v);
        return;
    }
    memmove(l->key + j + 1, l->key + j, (l->n - j) * 8);
    memmove(l->val + j + 1, l->val + j, (l->n - j) * 8);
    l->key[j] = k;
    l->val[j] = v;
    l->n++;
    mark(lid);
}

int main(void) {
    nodes = xmalloc(sizeof(struct node) * MAXNODES);
    wal = xmalloc(LOGSZ);
    memset(wal, 0, LOGSZ);
    pool = xmalloc((size_t)POOL * NODE);
    memset(pool, 0, (size_t)POOL * NODE);
    root = alloc_node(0);
    uint32_t first = alloc_node(1);
    nodes[root].n = 1;
    nodes[root].key[0] = 0;
    nodes[root].val[0] = first;
    for (int i = 0; i < 200000; i++) insert(rnd() >> 16, i);
    started("btree");
    uint64_t ops = 0, frame = 0;
    for (;;) {
        if (rnd() % 10 < 7) {
            /* Update of an existing hot key range or insert of a new key. */
            insert(rnd() % 2 ? skewed(1ull << 48) : rnd() >> 16, ops);
        } else {
            insert(rnd() >> 16, ops);
        }
        if (++ops % 20000 == 0) {
            /* Checkpoint: copy dirty nodes into buffer-pool frames. */
            for (uint32_t d = 0; d < ndirty; d++) {
                memcpy(pool + (frame % POOL) * NODE, &nodes[dirty[d]], NODE);
                frame++;
            }
            ndirty = 0;
        }
    }
}
