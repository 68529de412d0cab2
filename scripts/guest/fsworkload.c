/*
 * File-system workload for the ext4 crash-consistency test
 * (crates/journal/tests/ext4_guest.rs). Runs inside the QEMU guest on the
 * ext4 file system mounted at argv[1]; every fsync() reaches the virtual
 * disk as the kernel's real write/flush sequence.
 *
 * Deterministic (fixed-seed PRNG), a few hundred operations:
 *   - a mini "database": write db.tmp, fsync, rename over db, fsync the dir
 *     (the classic atomic-replace pattern);
 *   - an append-only log with fdatasync after every append;
 *   - small files created, rewritten, renamed across directories, hard
 *     linked, truncated and unlinked, directories made and removed.
 * At the end it re-reads the database and the log and checks their
 * contents, prints "FSWORKLOAD-DONE ops=N", and exits 0 (non-zero on any
 * error, with the failing call printed).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static uint64_t rng_state = 0x5eed1234abcdULL;
static unsigned long ops;

static uint64_t rnd(void)
{
    uint64_t z = (rng_state += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

static void die(const char *what, const char *path)
{
    printf("FSWORKLOAD-FAIL %s %s: %s\n", what, path ? path : "", strerror(errno));
    fflush(stdout);
    exit(1);
}

static void fill(unsigned char *buf, size_t len, uint64_t tag)
{
    for (size_t i = 0; i < len; i++)
        buf[i] = (unsigned char)((tag * 131 + i * 7 + (i >> 9)) & 0xff);
}

static void fsync_dir(const char *dir)
{
    int fd = open(dir, O_RDONLY | O_DIRECTORY);
    if (fd < 0)
        die("open dir", dir);
    if (fsync(fd) != 0)
        die("fsync dir", dir);
    close(fd);
    ops++;
}

static void write_file(const char *path, size_t len, uint64_t tag, int do_fsync)
{
    static unsigned char buf[256 * 1024];
    if (len > sizeof buf)
        len = sizeof buf;
    fill(buf, len, tag);
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0)
        die("open", path);
    if (write(fd, buf, len) != (ssize_t)len)
        die("write", path);
    if (do_fsync && fsync(fd) != 0)
        die("fsync", path);
    close(fd);
    ops++;
}

/* The mini database: one "transaction" replaces db atomically. */
static size_t db_len;
static uint64_t db_tag;

static void db_commit(const char *root, uint64_t txn)
{
    char tmp[256], db[256];
    snprintf(tmp, sizeof tmp, "%s/data/db.tmp", root);
    snprintf(db, sizeof db, "%s/data/db", root);
    db_len = 4096 + (rnd() % 60) * 1024 + (rnd() % 4096);
    db_tag = txn;
    write_file(tmp, db_len, db_tag, 1);
    if (rename(tmp, db) != 0)
        die("rename", tmp);
    ops++;
    char dir[256];
    snprintf(dir, sizeof dir, "%s/data", root);
    fsync_dir(dir);
}

static int log_fd = -1;
static unsigned log_records;

static void log_append(uint64_t n)
{
    char rec[200];
    int len = snprintf(rec, sizeof rec, "record %08llu ", (unsigned long long)n);
    while (len < (int)sizeof rec - 1) {
        rec[len] = (char)('a' + (n + (uint64_t)len) % 26);
        len++;
    }
    rec[len - 1] = '\n';
    if (write(log_fd, rec, len) != len)
        die("append", "log");
    if (fdatasync(log_fd) != 0)
        die("fdatasync", "log");
    log_records++;
    ops++;
}

static void check_db(const char *root)
{
    static unsigned char want[256 * 1024], got[256 * 1024];
    char db[256];
    snprintf(db, sizeof db, "%s/data/db", root);
    int fd = open(db, O_RDONLY);
    if (fd < 0)
        die("open", db);
    ssize_t n = read(fd, got, sizeof got);
    close(fd);
    fill(want, db_len, db_tag);
    if (n != (ssize_t)db_len || memcmp(want, got, db_len) != 0) {
        printf("FSWORKLOAD-FAIL db content mismatch (%zd of %zu bytes)\n", n, db_len);
        exit(1);
    }
}

static void check_log(const char *root)
{
    char path[256];
    struct stat st;
    snprintf(path, sizeof path, "%s/data/log", root);
    if (stat(path, &st) != 0)
        die("stat", path);
    if (st.st_size != (off_t)log_records * 199) {
        printf("FSWORKLOAD-FAIL log has %lld bytes, want %u records\n",
               (long long)st.st_size, log_records);
        exit(1);
    }
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: fsworkload MOUNTPOINT\n");
        return 2;
    }
    const char *root = argv[1];
    char path[256], path2[512];

    snprintf(path, sizeof path, "%s/data", root);
    if (mkdir(path, 0755) != 0)
        die("mkdir", path);
    ops++;
    for (int d = 0; d < 4; d++) {
        snprintf(path, sizeof path, "%s/d%d", root, d);
        if (mkdir(path, 0755) != 0)
            die("mkdir", path);
        ops++;
    }
    fsync_dir(root);

    snprintf(path, sizeof path, "%s/data/log", root);
    log_fd = open(path, O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (log_fd < 0)
        die("open", path);

    /* Small files live in d0..d3 as f<N>; present[] tracks which exist. */
    enum { NFILES = 48 };
    int present[NFILES] = {0}, where[NFILES] = {0};

    for (uint64_t step = 0; step < 60; step++) {
        db_commit(root, step);
        log_append(step);
        for (int k = 0; k < 3; k++) {
            int f = (int)(rnd() % NFILES);
            snprintf(path, sizeof path, "%s/d%d/f%d", root, where[f], f);
            switch (rnd() % 6) {
            case 0:
            case 1: /* create or rewrite, sometimes durably */
                write_file(path, 1 + rnd() % 20000, step * 100 + f, rnd() % 2);
                present[f] = 1;
                break;
            case 2: /* move to another directory */
                if (present[f]) {
                    int to = (int)(rnd() % 4);
                    snprintf(path2, sizeof path2, "%s/d%d/f%d", root, to, f);
                    if (rename(path, path2) != 0)
                        die("rename", path);
                    where[f] = to;
                    ops++;
                }
                break;
            case 3: /* unlink */
                if (present[f]) {
                    if (unlink(path) != 0)
                        die("unlink", path);
                    present[f] = 0;
                    ops++;
                }
                break;
            case 4: /* truncate */
                if (present[f]) {
                    if (truncate(path, (off_t)(rnd() % 3000)) != 0)
                        die("truncate", path);
                    ops++;
                }
                break;
            default: /* hard link, then drop the link */
                if (present[f]) {
                    snprintf(path2, sizeof path2, "%s/d%d/link%d", root, (int)(rnd() % 4), f);
                    if (link(path, path2) != 0)
                        die("link", path);
                    ops++;
                    snprintf(path, sizeof path, "%s/d%d", root, where[f]);
                    fsync_dir(path);
                    if (unlink(path2) != 0)
                        die("unlink", path2);
                    ops++;
                }
                break;
            }
        }
        if (step % 10 == 9) {
            /* A directory tree made and torn down. */
            snprintf(path, sizeof path, "%s/tree%llu", root, (unsigned long long)step);
            if (mkdir(path, 0755) != 0)
                die("mkdir", path);
            ops++;
            for (int i = 0; i < 5; i++) {
                snprintf(path2, sizeof path2, "%s/x%d", path, i);
                write_file(path2, 512 + (size_t)i * 3000, step + (uint64_t)i, 0);
            }
            fsync_dir(path);
            if (step % 20 == 19) {
                for (int i = 0; i < 5; i++) {
                    snprintf(path2, sizeof path2, "%s/x%d", path, i);
                    if (unlink(path2) != 0)
                        die("unlink", path2);
                    ops++;
                }
                if (rmdir(path) != 0)
                    die("rmdir", path);
                ops++;
            }
            fsync_dir(root);
        }
    }
    close(log_fd);
    sync();
    check_db(root);
    check_log(root);
    printf("FSWORKLOAD-DONE ops=%lu\n", ops);
    fflush(stdout);
    return 0;
}
