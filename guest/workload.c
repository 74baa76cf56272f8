/*
 * nc-workload: the NovaCron test guest's workload (runs as a child of /init).
 *
 * Phases:
 *   1. prepare: trim the corpus unpacked from the initramfs to the sizes asked for on the kernel
 *      command line and generate per-boot random data, all in /data (rootfs, which is a tmpfs);
 *   2. run: fork the heartbeat, the dirtier, its ping-pong partner and the control process, then
 *      print the READY marker on the console.
 *
 * Working set: MAP_SHARED pages, each with a header (magic, index, generation, checksum) that is
 * rewritten with every change, so any page can be verified at any moment.  A per-page sequence
 * counter (seqlock, in a separate shared array) lets VERIFY read consistently while the dirtier runs.
 *
 * The dirtier and the "ticker" ping-pong a byte through two pipes every ~2 ms.  That forces an
 * address-space switch several hundred times a second: QEMU 7.2 under TCG can otherwise lose guest
 * writes across a live migration (its soft TLB is not flushed), which is a QEMU problem, not ours.
 *
 * Control protocol on /dev/ttyS1: see docs/guest.md.  Console output on /dev/ttyS0.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096u
#define HDR_BYTES 32u
#define BODY_BYTES (PAGE - HDR_BYTES)
#define PAGE_MAGIC 0x4e435753u /* "NCWS" */
#define TICK_NS 2000000L       /* ping-pong period: ~2 ms */
#define MAX_LINE 256
#define MAX_FILES 200000
#define POOL_BYTES (1u << 20) /* realistic bytes the dirtier copies from */
#define RECORD_BYTES 128u
#define TMPFS_MAGIC_VALUE 0x01021994L
#define MAX_RATE 1000000u
#define CORPUS_DIR "/corpus"
#define DATA_DIR "/data"

struct page_hdr {
    uint32_t magic;
    uint32_t index;
    uint64_t generation;
    uint64_t checksum;
    uint64_t reserved;
};

/* Shared between all workload processes (MAP_SHARED, created before fork). */
struct shared {
    volatile uint32_t dirty_rate;    /* requested pages/s (0 = stopped) */
    volatile uint32_t dirty_bytes;   /* bytes changed per dirtied page */
    volatile uint32_t rewrite_rate;  /* full page rewrites per s */
    volatile uint32_t rate_epoch;    /* bumped on every DIRTY/STOP */
    volatile uint64_t pages_dirtied;
    volatile uint64_t pages_rewritten;
    volatile uint64_t heartbeats;
    volatile uint64_t achieved_milli; /* achieved dirty rate over the last window, pages/s * 1000 */
    volatile uint64_t ticks;
};

static struct shared *sh;
static unsigned char *ws;      /* working set */
static volatile uint32_t *seq; /* per-page seqlock counters */
static uint32_t ws_pages;
static unsigned char *pool;
static size_t pool_len;
static int console_fd = 2;
static uint64_t boot_ms_at_ready;

/* ---------- small helpers ---------- */

static void say(const char *fmt, ...) {
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    if (n < 0) return;
    if ((size_t)n >= sizeof buf) n = sizeof buf - 1;
    ssize_t w = write(console_fd, buf, (size_t)n);
    (void)w;
}

static void die(const char *what) {
    say("NOVACRON-WORKLOAD-ERROR %s: %s\n", what, strerror(errno));
    exit(1);
}

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static double uptime_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_BOOTTIME, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static uint64_t xorshift(uint64_t *s) {
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *s = x;
    return x;
}

/* 64-bit hash over a buffer; four independent lanes so it stays fast under TCG. */
static inline uint64_t mix(uint64_t h, uint64_t w) {
    h ^= w * 0x9e3779b97f4a7c15ull;
    h = (h << 27) | (h >> 37);
    return h * 0xbf58476d1ce4e5b9ull + 0x94d049bb133111ebull;
}

struct hasher {
    uint64_t lane[4];
    uint64_t total;
};

static void hasher_init(struct hasher *h, uint64_t seed) {
    for (int i = 0; i < 4; i++) h->lane[i] = seed + 0x632be59bd9b4e019ull * (uint64_t)(i + 1);
    h->total = 0;
}

/* Buffers passed here always have a length that is a multiple of 8 except possibly the last one. */
static void hasher_update(struct hasher *h, const unsigned char *p, size_t n) {
    size_t i = 0;
    for (; i + 32 <= n; i += 32) {
        uint64_t w[4];
        memcpy(w, p + i, 32);
        h->lane[0] = mix(h->lane[0], w[0]);
        h->lane[1] = mix(h->lane[1], w[1]);
        h->lane[2] = mix(h->lane[2], w[2]);
        h->lane[3] = mix(h->lane[3], w[3]);
    }
    for (; i < n; i++) h->lane[i & 3] = mix(h->lane[i & 3], p[i]);
    h->total += n;
}

static uint64_t hasher_final(const struct hasher *h) {
    uint64_t r = h->total;
    for (int i = 0; i < 4; i++) r = mix(r, h->lane[i]);
    return r;
}

static uint64_t page_checksum(const unsigned char *page) {
    const struct page_hdr *hd = (const struct page_hdr *)page;
    struct hasher h;
    hasher_init(&h, ((uint64_t)hd->index << 32) ^ hd->generation ^ hd->magic);
    hasher_update(&h, page + HDR_BYTES, BODY_BYTES);
    return hasher_final(&h);
}

/* ---------- kernel command line ---------- */

struct config {
    unsigned data_mib;
    unsigned ws_mib;
    unsigned dirty_rate;
    unsigned dirty_bytes;
    unsigned rewrite_rate;
};

static unsigned cmdline_uint(const char *cmdline, const char *key, unsigned dflt) {
    char pat[64];
    snprintf(pat, sizeof pat, "novacron.%s=", key);
    const char *p = cmdline;
    while ((p = strstr(p, pat)) != NULL) {
        if (p == cmdline || p[-1] == ' ') {
            char *end;
            unsigned long v = strtoul(p + strlen(pat), &end, 10);
            if (end != p + strlen(pat)) return (unsigned)v;
        }
        p += strlen(pat);
    }
    return dflt;
}

static void read_config(struct config *c) {
    char cmd[4096] = {0};
    int fd = open("/proc/cmdline", O_RDONLY);
    if (fd >= 0) {
        ssize_t n = read(fd, cmd, sizeof cmd - 1);
        if (n < 0) n = 0;
        cmd[n] = 0;
        close(fd);
    }
    c->data_mib = cmdline_uint(cmd, "data_mib", 24);
    c->ws_mib = cmdline_uint(cmd, "ws_mib", 8);
    c->dirty_rate = cmdline_uint(cmd, "dirty_rate", 0);
    c->dirty_bytes = cmdline_uint(cmd, "dirty_bytes", 64);
    c->rewrite_rate = cmdline_uint(cmd, "rewrite_rate", 0);
    if (c->ws_mib < 1) c->ws_mib = 1;
    if (c->dirty_bytes < 1) c->dirty_bytes = 1;
    if (c->dirty_bytes > BODY_BYTES) c->dirty_bytes = BODY_BYTES;
    if (c->dirty_rate > MAX_RATE) c->dirty_rate = MAX_RATE;
    if (c->rewrite_rate > MAX_RATE) c->rewrite_rate = MAX_RATE;
}

/* ---------- phase 1: data ---------- */

/* Files under /data, in the fixed order CHECKSUM walks them. */
static char **data_files;
static size_t n_data_files;
static uint64_t data_bytes;

static void add_data_file(const char *path) {
    if (n_data_files >= MAX_FILES) return;
    data_files[n_data_files++] = strdup(path);
}

static int cmp_names(const struct dirent **a, const struct dirent **b) {
    return strcmp((*a)->d_name, (*b)->d_name);
}

/*
 * Keep the first files of a corpus class (sorted names) until `budget` bytes, delete the rest.
 * The corpus already sits in rootfs (a tmpfs), so keeping a file costs no copy; deleting one frees
 * its pages, which init_on_free=1 zeroes.
 */
static uint64_t keep_class(const char *cls, uint64_t budget) {
    char src[512], dst[512];
    snprintf(src, sizeof src, "%s/%s", CORPUS_DIR, cls);
    snprintf(dst, sizeof dst, "%s/%s", DATA_DIR, cls);
    mkdir(dst, 0755);
    struct dirent **names;
    int n = scandir(src, &names, NULL, cmp_names);
    if (n < 0) return 0;
    uint64_t kept = 0;
    for (int i = 0; i < n; i++) {
        const char *nm = names[i]->d_name;
        if (nm[0] == '.') {
            free(names[i]);
            continue;
        }
        char from[1024], to[1024];
        snprintf(from, sizeof from, "%s/%s", src, nm);
        snprintf(to, sizeof to, "%s/%s", dst, nm);
        struct stat st;
        if (stat(from, &st) != 0) {
            free(names[i]);
            continue;
        }
        if (kept < budget) {
            if (rename(from, to) != 0) die("rename corpus file");
            add_data_file(to);
            kept += (uint64_t)st.st_size;
        } else {
            unlink(from);
        }
        free(names[i]);
    }
    free(names);
    rmdir(src);
    return kept;
}

/* Write `bytes` of generated data as 1 MiB files; `kind` 0 = random, 1 = records. */
static void generate_class(const char *cls, uint64_t bytes, uint64_t seed, int kind) {
    char dir[256];
    snprintf(dir, sizeof dir, "%s/%s", DATA_DIR, cls);
    mkdir(dir, 0755);
    const size_t chunk = 1u << 20;
    unsigned char *buf = malloc(chunk);
    if (!buf) die("malloc");
    uint64_t s = seed | 1;
    unsigned file_no = 0;
    uint64_t record_no = 0;
    while (bytes > 0) {
        size_t len = bytes < chunk ? (size_t)bytes : chunk;
        if (kind == 0) {
            for (size_t i = 0; i + 8 <= len; i += 8) {
                uint64_t r = xorshift(&s);
                memcpy(buf + i, &r, 8);
            }
        } else {
            /* heap-like records: ids, timestamps, small counters, a short name, zero padding */
            memset(buf, 0, len);
            for (size_t off = 0; off + RECORD_BYTES <= len; off += RECORD_BYTES) {
                uint64_t f[4] = {record_no, 1700000000ull + record_no * 7, xorshift(&s) & 0xffff,
                                 (uint64_t)(off / RECORD_BYTES) % 97};
                memcpy(buf + off, f, sizeof f);
                snprintf((char *)buf + off + 32, 24, "item-%llu", (unsigned long long)record_no);
                record_no++;
            }
        }
        char path[512];
        snprintf(path, sizeof path, "%s/%05u", dir, file_no++);
        int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        if (fd < 0) die("create generated file");
        size_t done = 0;
        while (done < len) {
            ssize_t w = write(fd, buf + done, len - done);
            if (w <= 0) die("write generated file");
            done += (size_t)w;
        }
        close(fd);
        add_data_file(path);
        bytes -= len;
    }
    free(buf);
}

static void remove_tree(const char *path) {
    DIR *d = opendir(path);
    if (!d) {
        unlink(path);
        return;
    }
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        char p[1024];
        snprintf(p, sizeof p, "%s/%s", path, e->d_name);
        struct stat st;
        if (lstat(p, &st) == 0 && S_ISDIR(st.st_mode))
            remove_tree(p);
        else
            unlink(p);
    }
    closedir(d);
    rmdir(path);
}

static void fill_pool(void) {
    /* Realistic bytes for the dirtier: the start of the kept program and text files, mixed. */
    pool = malloc(POOL_BYTES);
    if (!pool) die("malloc pool");
    pool_len = 0;
    for (size_t i = 0; i < n_data_files && pool_len < POOL_BYTES; i++) {
        if (!strstr(data_files[i], "/prog/") && !strstr(data_files[i], "/text/")) continue;
        int fd = open(data_files[i], O_RDONLY);
        if (fd < 0) continue;
        ssize_t n = read(fd, pool + pool_len, (POOL_BYTES - pool_len) < 65536 ? POOL_BYTES - pool_len : 65536);
        if (n > 0) pool_len += (size_t)n;
        close(fd);
    }
    if (pool_len < PAGE) { /* corpus empty (data_mib=0): fall back to printable filler */
        for (size_t i = 0; i < POOL_BYTES; i++) pool[i] = (unsigned char)(' ' + (i * 7) % 90);
        pool_len = POOL_BYTES;
    }
}

static void prepare_data(const struct config *c, uint64_t seed) {
    mkdir(DATA_DIR, 0755);
    data_files = calloc(MAX_FILES, sizeof *data_files);
    if (!data_files) die("calloc");
    uint64_t total = (uint64_t)c->data_mib << 20;
    /* composition: 55% programs and libraries, 30% text, 10% random, 5% heap-like records */
    uint64_t prog = keep_class("prog", total * 55 / 100);
    uint64_t text = keep_class("text", total * 30 / 100);
    remove_tree(CORPUS_DIR); /* anything left over is freed (and zeroed by init_on_free=1) */
    uint64_t rnd = total * 10 / 100;
    uint64_t rec = total > prog + text + rnd ? total - prog - text - rnd : 0;
    generate_class("random", rnd, seed, 0);
    generate_class("records", rec, seed ^ 0x5eed5eed5eedull, 1);
    data_bytes = prog + text + rnd + rec;
    say("NOVACRON-DATA prog=%llu text=%llu random=%llu records=%llu files=%zu\n",
        (unsigned long long)prog, (unsigned long long)text, (unsigned long long)rnd,
        (unsigned long long)rec, n_data_files);
}

static int data_checksum(uint64_t *out, uint64_t *bytes) {
    struct hasher h;
    hasher_init(&h, 0x4e6f7661ull);
    static unsigned char buf[1u << 16];
    *bytes = 0;
    for (size_t i = 0; i < n_data_files; i++) {
        int fd = open(data_files[i], O_RDONLY);
        if (fd < 0) return -1;
        hasher_update(&h, (const unsigned char *)data_files[i], strlen(data_files[i]));
        for (;;) {
            ssize_t n = read(fd, buf, sizeof buf);
            if (n < 0) {
                close(fd);
                return -1;
            }
            if (n == 0) break;
            hasher_update(&h, buf, (size_t)n);
            *bytes += (uint64_t)n;
        }
        close(fd);
    }
    *out = hasher_final(&h);
    return 0;
}

/* ---------- working set ---------- */

static inline unsigned char *page_at(uint32_t i) { return ws + (size_t)i * PAGE; }

static inline void seq_begin(uint32_t i) {
    __atomic_fetch_add(&seq[i], 1, __ATOMIC_ACQ_REL); /* odd: write in progress */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
}

static inline void seq_end(uint32_t i) {
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    __atomic_fetch_add(&seq[i], 1, __ATOMIC_ACQ_REL);
}

static void write_full_page(uint32_t i, uint64_t *rng) {
    unsigned char *p = page_at(i);
    struct page_hdr *hd = (struct page_hdr *)p;
    size_t off = (size_t)(xorshift(rng) % (pool_len - BODY_BYTES + 1));
    seq_begin(i);
    memcpy(p + HDR_BYTES, pool + off, BODY_BYTES);
    hd->magic = PAGE_MAGIC;
    hd->index = i;
    hd->generation++;
    hd->checksum = page_checksum(p);
    seq_end(i);
}

static void dirty_page(uint32_t i, uint32_t nbytes, uint64_t *rng) {
    unsigned char *p = page_at(i);
    struct page_hdr *hd = (struct page_hdr *)p;
    size_t at = (size_t)(xorshift(rng) % (BODY_BYTES - nbytes + 1));
    size_t from = (size_t)(xorshift(rng) % (pool_len - nbytes + 1));
    seq_begin(i);
    memcpy(p + HDR_BYTES + at, pool + from, nbytes);
    hd->generation++;
    hd->checksum = page_checksum(p);
    seq_end(i);
}

static void init_working_set(uint64_t seed) {
    uint64_t rng = seed | 1;
    for (uint32_t i = 0; i < ws_pages; i++) write_full_page(i, &rng);
}

/* Count pages whose stored checksum does not match their content (seqlock-consistent reads). */
static uint64_t verify_working_set(uint64_t *retries) {
    static unsigned char copy[PAGE];
    uint64_t bad = 0;
    *retries = 0;
    for (uint32_t i = 0; i < ws_pages; i++) {
        for (;;) {
            uint32_t s1 = __atomic_load_n(&seq[i], __ATOMIC_ACQUIRE);
            if (s1 & 1u) {
                (*retries)++;
                sched_yield();
                continue;
            }
            memcpy(copy, page_at(i), PAGE);
            __atomic_thread_fence(__ATOMIC_SEQ_CST);
            uint32_t s2 = __atomic_load_n(&seq[i], __ATOMIC_ACQUIRE);
            if (s1 != s2) {
                (*retries)++;
                continue;
            }
            const struct page_hdr *hd = (const struct page_hdr *)copy;
            if (hd->magic != PAGE_MAGIC || hd->index != i || hd->checksum != page_checksum(copy)) bad++;
            break;
        }
    }
    return bad;
}

/* ---------- processes ---------- */

static void sleep_ns(long ns) {
    struct timespec ts = {ns / 1000000000L, ns % 1000000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

/* The ticker wakes the dirtier every ~2 ms and waits for its answer: two address spaces alternate. */
static void run_ticker(int tick_w, int ack_r) {
    unsigned char b = 0;
    for (;;) {
        sleep_ns(TICK_NS);
        if (write(tick_w, &b, 1) != 1) die("ticker write");
        if (read(ack_r, &b, 1) != 1) die("ticker read");
        b++;
    }
}

static void run_dirtier(int tick_r, int ack_w, uint64_t seed) {
    uint64_t rng = seed ^ 0xd1d1d1d1ull;
    uint32_t epoch = ~0u;
    uint64_t base_ns = 0, done_since_base = 0, rewrites_since_base = 0;
    uint64_t win_start = now_ns(), win_count = sh->pages_dirtied;
    uint32_t cursor = 0, rewrite_cursor = 0;
    /* Every pass dirties each page once, in a scrambled order (odd stride modulo a power of two
     * would be simplest; any stride coprime with the page count works). */
    uint32_t stride = 1;
    for (uint32_t cand = ws_pages / 2 + 1; cand < ws_pages * 2; cand++) {
        uint32_t a = cand, b = ws_pages;
        while (b) {
            uint32_t t = a % b;
            a = b;
            b = t;
        }
        if (a == 1) {
            stride = cand % ws_pages ? cand % ws_pages : 1;
            break;
        }
    }
    unsigned char b;
    for (;;) {
        if (read(tick_r, &b, 1) != 1) die("dirtier read");
        uint64_t now = now_ns();
        uint32_t e = __atomic_load_n(&sh->rate_epoch, __ATOMIC_ACQUIRE);
        if (e != epoch) { /* new rate: measure it from scratch */
            epoch = e;
            base_ns = now;
            done_since_base = 0;
            rewrites_since_base = 0;
            win_start = now;
            win_count = sh->pages_dirtied;
        }
        uint32_t rate = sh->dirty_rate, nbytes = sh->dirty_bytes, rrate = sh->rewrite_rate;
        double elapsed = (double)(now - base_ns) / 1e9;
        uint64_t due = (uint64_t)(elapsed * rate);
        uint64_t rdue = (uint64_t)(elapsed * rrate);
        /* Never build up more than 100 ms of debt: report a shortfall rather than burst. */
        uint64_t cap = rate / 10 + 1;
        if (due > done_since_base + cap) done_since_base = due - cap;
        if (rdue > rewrites_since_base + rrate / 10 + 1) rewrites_since_base = rdue - (rrate / 10 + 1);
        while (done_since_base < due) {
            dirty_page(cursor, nbytes, &rng);
            cursor = (uint32_t)(((uint64_t)cursor + stride) % ws_pages);
            done_since_base++;
            __atomic_fetch_add(&sh->pages_dirtied, 1, __ATOMIC_RELAXED);
        }
        while (rewrites_since_base < rdue) {
            write_full_page(rewrite_cursor, &rng);
            rewrite_cursor = (rewrite_cursor + 1) % ws_pages;
            rewrites_since_base++;
            __atomic_fetch_add(&sh->pages_rewritten, 1, __ATOMIC_RELAXED);
        }
        if (now - win_start >= 1000000000ull) {
            uint64_t cnt = sh->pages_dirtied;
            sh->achieved_milli = (cnt - win_count) * 1000000000000ull / (now - win_start);
            win_count = cnt;
            win_start = now;
        }
        __atomic_fetch_add(&sh->ticks, 1, __ATOMIC_RELAXED);
        if (write(ack_w, &b, 1) != 1) die("dirtier write");
    }
}

static void run_heartbeat(void) {
    uint64_t next = now_ns();
    for (;;) {
        next += 1000000000ull;
        uint64_t n = __atomic_add_fetch(&sh->heartbeats, 1, __ATOMIC_RELAXED);
        say("NOVACRON-HEARTBEAT n=%llu up=%.2f dirtied=%llu rate=%u achieved=%.1f\n", (unsigned long long)n,
            uptime_s(), (unsigned long long)sh->pages_dirtied, sh->dirty_rate,
            (double)sh->achieved_milli / 1000.0);
        uint64_t now = now_ns();
        if (next > now) sleep_ns((long)(next - now));
        else next = now;
    }
}

static void set_rates(uint32_t rate, uint32_t nbytes, uint32_t rrate) {
    sh->dirty_rate = rate;
    sh->dirty_bytes = nbytes;
    sh->rewrite_rate = rrate;
    sh->achieved_milli = 0;
    __atomic_fetch_add(&sh->rate_epoch, 1, __ATOMIC_RELEASE);
}

static void reply(int fd, const char *fmt, ...) {
    char buf[MAX_LINE * 2];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf - 1, fmt, ap);
    va_end(ap);
    if (n < 0) return;
    if ((size_t)n >= sizeof buf - 1) n = sizeof buf - 2;
    buf[n++] = '\n';
    size_t off = 0;
    while (off < (size_t)n) {
        ssize_t w = write(fd, buf + off, (size_t)n - off);
        if (w < 0) {
            if (errno == EINTR || errno == EAGAIN) continue;
            return;
        }
        off += (size_t)w;
    }
}

static void handle_command(int fd, char *line, const struct config *cfg) {
    char id[33] = {0}, cmd[17] = {0};
    int consumed = 0;
    if (sscanf(line, "%32s %16s %n", id, cmd, &consumed) < 2) {
        if (id[0]) reply(fd, "%s ERR bad-request expected '<id> <COMMAND> [args]'", id);
        else reply(fd, "- ERR bad-request empty line");
        return;
    }
    const char *args = line + consumed;
    if (!strcmp(cmd, "PING")) {
        reply(fd, "%s OK pong", id);
    } else if (!strcmp(cmd, "DIRTY")) {
        unsigned long rate, nbytes, rrate = sh->rewrite_rate;
        int n = sscanf(args, "%lu %lu %lu", &rate, &nbytes, &rrate);
        if (n < 2) {
            reply(fd, "%s ERR bad-args DIRTY <pages_per_s> <bytes_per_page> [rewrite_pages_per_s]", id);
        } else if (rate > MAX_RATE || rrate > MAX_RATE) {
            reply(fd, "%s ERR bad-args rate above %u", id, MAX_RATE);
        } else if (nbytes < 1 || nbytes > BODY_BYTES) {
            reply(fd, "%s ERR bad-args bytes_per_page must be 1..%u", id, BODY_BYTES);
        } else {
            set_rates((uint32_t)rate, (uint32_t)nbytes, (uint32_t)rrate);
            reply(fd, "%s OK rate=%lu bytes=%lu rewrite=%lu", id, rate, nbytes, rrate);
        }
    } else if (!strcmp(cmd, "STOP")) {
        set_rates(0, sh->dirty_bytes, 0);
        reply(fd, "%s OK rate=0", id);
    } else if (!strcmp(cmd, "VERIFY")) {
        uint64_t retries;
        uint64_t t0 = now_ns();
        uint64_t bad = verify_working_set(&retries);
        reply(fd, "%s OK corrupted=%llu pages=%u retries=%llu ms=%llu", id, (unsigned long long)bad, ws_pages,
              (unsigned long long)retries, (unsigned long long)((now_ns() - t0) / 1000000));
    } else if (!strcmp(cmd, "CHECKSUM")) {
        uint64_t sum, bytes, t0 = now_ns();
        if (data_checksum(&sum, &bytes) != 0)
            reply(fd, "%s ERR io %s", id, strerror(errno));
        else
            reply(fd, "%s OK checksum=%016llx bytes=%llu files=%zu ms=%llu", id, (unsigned long long)sum,
                  (unsigned long long)bytes, n_data_files, (unsigned long long)((now_ns() - t0) / 1000000));
    } else if (!strcmp(cmd, "STATUS")) {
        reply(fd,
              "%s OK uptime=%.3f heartbeats=%llu rate=%u bytes=%u rewrite=%u achieved=%.1f dirtied=%llu "
              "rewritten=%llu ticks=%llu ws_pages=%u data_mib=%u data_bytes=%llu ready_ms=%llu",
              id, uptime_s(), (unsigned long long)sh->heartbeats, sh->dirty_rate, sh->dirty_bytes,
              sh->rewrite_rate, (double)sh->achieved_milli / 1000.0, (unsigned long long)sh->pages_dirtied,
              (unsigned long long)sh->pages_rewritten, (unsigned long long)sh->ticks, ws_pages, cfg->data_mib,
              (unsigned long long)data_bytes, (unsigned long long)boot_ms_at_ready);
    } else {
        reply(fd, "%s ERR unknown-command %s", id, cmd);
    }
}

static void run_control(const struct config *cfg, int ready_fd) {
    int fd = open("/dev/ttyS1", O_RDWR | O_NOCTTY);
    if (fd < 0) die("open /dev/ttyS1");
    struct termios t;
    if (tcgetattr(fd, &t) == 0) {
        cfmakeraw(&t);
        cfsetispeed(&t, B115200);
        cfsetospeed(&t, B115200);
        t.c_cc[VMIN] = 1;
        t.c_cc[VTIME] = 0;
        tcsetattr(fd, TCSAFLUSH, &t);
    }
    /* Only now may READY be printed: commands sent earlier would be lost or echoed. */
    char one = 1;
    if (write(ready_fd, &one, 1) != 1) die("control ready");
    close(ready_fd);
    char line[MAX_LINE + 1];
    size_t len = 0;
    int overflow = 0;
    for (;;) {
        char ch;
        ssize_t n = read(fd, &ch, 1);
        if (n < 0) {
            if (errno == EINTR || errno == EAGAIN) continue;
            die("read /dev/ttyS1");
        }
        if (n == 0) continue;
        if (ch == '\r') continue;
        if (ch != '\n') {
            if (len < MAX_LINE) line[len++] = ch;
            else overflow = 1;
            continue;
        }
        line[len] = 0;
        if (overflow) reply(fd, "- ERR line-too-long max=%d", MAX_LINE);
        else if (len > 0) handle_command(fd, line, cfg);
        len = 0;
        overflow = 0;
    }
}

static pid_t spawn(void (*fn)(void *), void *arg) {
    pid_t pid = fork();
    if (pid < 0) die("fork");
    if (pid == 0) {
        fn(arg);
        _exit(0);
    }
    return pid;
}

struct pipes {
    int tick[2], ack[2], ready[2];
    uint64_t seed;
    const struct config *cfg;
};

static void ticker_main(void *a) {
    struct pipes *p = a;
    run_ticker(p->tick[1], p->ack[0]);
}
static void dirtier_main(void *a) {
    struct pipes *p = a;
    run_dirtier(p->tick[0], p->ack[1], p->seed);
}
static void control_main(void *a) {
    struct pipes *p = a;
    run_control(p->cfg, p->ready[1]);
}

int main(void) {
    int cfd = open("/dev/ttyS0", O_WRONLY | O_NOCTTY);
    if (cfd >= 0) console_fd = cfd;
    struct config cfg;
    read_config(&cfg);

    uint64_t seed = 0;
    int ufd = open("/dev/urandom", O_RDONLY);
    if (ufd < 0 || read(ufd, &seed, sizeof seed) != sizeof seed) seed = now_ns();
    if (ufd >= 0) close(ufd);

    struct statfs sfs;
    const char *fstype = "unknown";
    prepare_data(&cfg, seed);
    if (statfs(DATA_DIR, &sfs) == 0) fstype = sfs.f_type == TMPFS_MAGIC_VALUE ? "tmpfs" : "other";
    fill_pool();

    ws_pages = (uint32_t)(((uint64_t)cfg.ws_mib << 20) / PAGE);
    sh = mmap(NULL, sizeof *sh, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    ws = mmap(NULL, (size_t)ws_pages * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    seq = mmap(NULL, (size_t)ws_pages * sizeof *seq, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (sh == MAP_FAILED || ws == MAP_FAILED || seq == MAP_FAILED) die("mmap working set");
    memset((void *)sh, 0, sizeof *sh);
    init_working_set(seed);
    set_rates(cfg.dirty_rate, cfg.dirty_bytes, cfg.rewrite_rate);

    struct pipes p = {.seed = seed, .cfg = &cfg};
    if (pipe(p.tick) != 0 || pipe(p.ack) != 0 || pipe(p.ready) != 0) die("pipe");
    signal(SIGCHLD, SIG_DFL);
    boot_ms_at_ready = (uint64_t)(uptime_s() * 1000.0);
    spawn(ticker_main, &p);
    spawn(dirtier_main, &p);
    spawn(control_main, &p);
    char ready_byte;
    close(p.ready[1]);
    if (read(p.ready[0], &ready_byte, 1) != 1) die("control process did not start");
    close(p.ready[0]);
    say("NOVACRON-READY data_mib=%u data_bytes=%llu fs=%s ws_pages=%u rate=%u bytes=%u rewrite=%u "
        "uptime_ms=%llu\n",
        cfg.data_mib, (unsigned long long)data_bytes, fstype, ws_pages, cfg.dirty_rate, cfg.dirty_bytes,
        cfg.rewrite_rate, (unsigned long long)boot_ms_at_ready);
    /* The heartbeat runs in this process; children die with us only if init kills us. */
    run_heartbeat();
    return 0;
}
