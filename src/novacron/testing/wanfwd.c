/*
 * wanfwd: the packet forwarder of NovaCron's WAN emulator.
 *
 * It owns one TUN device per emulated node (the fds are inherited from the Python manager, which
 * opened each TUN inside its node's network namespace), reads IPv4 packets, routes them by destination
 * address to the destination node's TUN, and on the way applies the parameters of the directed link
 * src->dst: random loss, a rate-limited droptail bottleneck queue, one-way delay and jitter.
 *
 * Model of one directed link (per packet, at its arrival time `now`):
 *   1. link down            -> dropped (counted as "down")
 *   2. random loss          -> dropped (counted as "loss"), before it costs any bandwidth, like netem
 *   3. bottleneck (rate>0)  -> the link transmits one packet at a time; `busy_until` is when the last
 *      accepted packet finishes. The backlog waiting in front of the wire is (busy_until-now)*rate;
 *      if backlog + len exceeds the queue limit the packet is dropped ("qdrop", droptail).
 *   4. propagation          -> delivered at tx_end + delay + uniform(-jitter, +jitter), never before
 *      tx_end, and (unless reordering is allowed) never before the previous packet of the same link.
 * Packets in flight sit in one min-heap ordered by delivery time; a timerfd wakes us for the earliest.
 *
 * With --vnet-hdr the TUN devices carry a virtio_net_hdr and have TCP segmentation offload enabled:
 * the sending kernel hands us one TCP "super-packet" of up to 64 KiB instead of ~44 MTU-sized
 * segments, and the receiving kernel takes it whole (as if GRO had merged it). That cuts the per-packet
 * system-call and stack cost that otherwise caps the forwarder. The link model still works per
 * segment: each segment of a super-packet is judged on its own (loss, queue space, transmission time
 * at the link rate) and counted as one packet of MTU size; when some segments are dropped, the
 * surviving contiguous runs are rebuilt into smaller packets (headers, sequence numbers, lengths and
 * checksums adjusted), so the receiver sees exactly the holes a per-packet link would have made.
 *
 * Control protocol (stdin/stdout, and optionally a unix socket), one line per request and per answer:
 *   ping                              -> "ok pong"
 *   set SRC DST key=value ...         -> "ok" | "err <why>"
 *        keys: rate (bit/s, 0 = unlimited), delay (ns), jitter (ns), loss (0..1),
 *              queue (bytes, bottleneck queue limit), reorder (0|1), up (0|1)
 *   stats                             -> "ok {json}" (counters of every node and directed link)
 *   quit                              -> "ok bye", then exit
 * EOF on stdin means the owner is gone: exit, which closes the TUN fds and removes the devices.
 *
 * Usage: wanfwd [--vnet-hdr] [--seed N] [--max-held-bytes N] [--control-socket PATH] NAME:FD:IPV4 ...
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define MAX_NODES 16
#define MAX_NAME 32
#define MAX_PACKET (128 * 1024) /* a 64 KiB GSO super-packet plus headers fits with room to spare */
#define VNET_HDR_LEN 10
#define VNET_F_NEEDS_CSUM 1
#define VNET_GSO_NONE 0
#define VNET_GSO_TCPV4 1
#define READ_BATCH 64           /* packets read from one TUN before looking at the others */
#define DUE_SLACK_NS 20000      /* deliver packets due within 20 us now rather than sleep for them */
#define MAX_CONTROL_CLIENTS 4
#define CONTROL_LINE_MAX 1024
#define DEFAULT_MAX_HELD (128ull << 20) /* bound on bytes held in queues and delay lines together */

struct packet {
    uint64_t deliver_ns;
    uint64_t seq;      /* tie-break: equal delivery times keep arrival order */
    int link;
    uint32_t len;      /* bytes written to the TUN (including the vnet header) */
    uint32_t segs;     /* segments it stands for, and their bytes on the emulated wire */
    uint64_t wire;
    unsigned char data[];
};

/* How one read packet splits into segments on the emulated wire. */
struct segmenting {
    size_t vh;          /* vnet header length (0 or VNET_HDR_LEN) */
    size_t hl;          /* IPv4 + TCP header bytes repeated in every segment */
    size_t payload;     /* TCP payload bytes of the whole packet */
    size_t mss;         /* payload bytes per segment */
    size_t nseg;        /* 1 unless this is a TCP GSO super-packet */
};

struct link {
    int src, dst;
    uint64_t rate_bps; /* 0: no bottleneck */
    uint64_t delay_ns, jitter_ns, queue_bytes;
    double loss;
    int reorder, up;
    uint64_t busy_until, last_deliver;
    uint64_t rng;
    uint64_t fwd_pkts, fwd_bytes, loss_pkts, loss_bytes, qdrop_pkts, qdrop_bytes, down_pkts, down_bytes;
    uint64_t txerr_pkts, held_pkts, held_bytes, max_backlog_bytes;
};

struct node {
    char name[MAX_NAME];
    int fd;
    uint32_t addr; /* network byte order */
    uint64_t rx_pkts, rx_bytes, unroutable_pkts, oversize_pkts;
};

struct control {
    int fd_in, fd_out;
    size_t len;
    char buf[CONTROL_LINE_MAX];
};

static struct node nodes[MAX_NODES];
static int n_nodes;
static struct link *links; /* n_nodes * n_nodes, index src*n_nodes+dst */
static struct packet **heap;
static size_t heap_len, heap_cap;
static uint64_t next_seq, held_total, max_held = DEFAULT_MAX_HELD, memdrop_pkts;
static int epfd, tfd, listen_fd = -1;
static struct control controls[1 + MAX_CONTROL_CLIENTS];
static uint64_t armed_ns;
static int quitting, vnet;

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static uint64_t rng_next(uint64_t *s) { /* xorshift64*: fast, and good enough for loss and jitter */
    uint64_t x = *s;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *s = x;
    return x * 0x2545F4914F6CDD1Dull;
}

static double rng_unit(uint64_t *s) { return (double)(rng_next(s) >> 11) * (1.0 / 9007199254740992.0); }

static int before(const struct packet *a, const struct packet *b) {
    return a->deliver_ns < b->deliver_ns || (a->deliver_ns == b->deliver_ns && a->seq < b->seq);
}

static int heap_push(struct packet *p) {
    if (heap_len == heap_cap) {
        size_t cap = heap_cap ? heap_cap * 2 : 4096;
        struct packet **h = realloc(heap, cap * sizeof *h);
        if (!h) return -1;
        heap = h;
        heap_cap = cap;
    }
    size_t i = heap_len++;
    while (i > 0) {
        size_t parent = (i - 1) / 2;
        if (!before(p, heap[parent])) break;
        heap[i] = heap[parent];
        i = parent;
    }
    heap[i] = p;
    return 0;
}

static struct packet *heap_pop(void) {
    struct packet *top = heap[0], *last = heap[--heap_len];
    size_t i = 0;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= heap_len) break;
        if (c + 1 < heap_len && before(heap[c + 1], heap[c])) c++;
        if (!before(heap[c], last)) break;
        heap[i] = heap[c];
        i = c;
    }
    if (heap_len) heap[i] = last;
    return top;
}

static void deliver(struct packet *p) {
    struct link *l = &links[p->link];
    if (write(nodes[l->dst].fd, p->data, p->len) == (ssize_t)p->len) {
        l->fwd_pkts += p->segs;
        l->fwd_bytes += p->wire;
    } else {
        l->txerr_pkts += p->segs;
    }
    l->held_pkts -= p->segs;
    l->held_bytes -= p->wire;
    held_total -= p->wire;
    free(p);
}

static void deliver_due(uint64_t now) {
    while (heap_len && heap[0]->deliver_ns <= now + DUE_SLACK_NS) deliver(heap_pop());
}

static void arm_timer(void) {
    uint64_t want = heap_len ? heap[0]->deliver_ns : 0;
    if (want == armed_ns) return;
    struct itimerspec its = {0};
    its.it_value.tv_sec = (time_t)(want / 1000000000ull);
    its.it_value.tv_nsec = (long)(want % 1000000000ull);
    timerfd_settime(tfd, TFD_TIMER_ABSTIME, &its, NULL); /* want == 0 disarms */
    armed_ns = want;
}

static int node_by_addr(uint32_t addr) {
    for (int i = 0; i < n_nodes; i++)
        if (nodes[i].addr == addr) return i;
    return -1;
}

static int node_by_name(const char *name) {
    for (int i = 0; i < n_nodes; i++)
        if (strcmp(nodes[i].name, name) == 0) return i;
    return -1;
}

static uint16_t get16(const unsigned char *p) { return (uint16_t)(p[0] << 8 | p[1]); }
static void put16(unsigned char *p, uint16_t v) { p[0] = (unsigned char)(v >> 8); p[1] = (unsigned char)v; }
static uint32_t get32(const unsigned char *p) { return (uint32_t)get16(p) << 16 | get16(p + 2); }
static void put32(unsigned char *p, uint32_t v) { put16(p, (uint16_t)(v >> 16)); put16(p + 2, (uint16_t)v); }

static uint32_t csum_add(uint32_t sum, const unsigned char *p, size_t len) {
    for (; len > 1; p += 2, len -= 2) sum += get16(p);
    if (len) sum += (uint32_t)p[0] << 8;
    return sum;
}

static uint16_t csum_fold(uint32_t sum) {
    while (sum >> 16) sum = (sum & 0xffff) + (sum >> 16);
    return (uint16_t)sum;
}

/* Work out whether a read packet is a TCP/IPv4 GSO super-packet and how it splits into segments. */
static void classify(const unsigned char *buf, size_t len, struct segmenting *sg) {
    sg->vh = vnet ? VNET_HDR_LEN : 0;
    sg->nseg = 1;
    sg->hl = sg->payload = sg->mss = 0;
    if (!vnet || (buf[1] & 0x7f) != VNET_GSO_TCPV4) return;
    const unsigned char *ip = buf + sg->vh;
    size_t iplen = len - sg->vh, ihl = (size_t)(ip[0] & 0x0f) * 4;
    uint16_t mss = (uint16_t)(buf[4] | buf[5] << 8); /* virtio fields are little-endian on x86 */
    if (ihl < 20 || ip[9] != 6 || iplen < ihl + 20 || mss == 0) return;
    size_t hl = ihl + (size_t)(ip[ihl + 12] >> 4) * 4;
    if (hl > iplen) return;
    sg->hl = hl;
    sg->payload = iplen - hl;
    sg->mss = mss;
    sg->nseg = sg->payload ? (sg->payload + mss - 1) / mss : 1;
}

/* Judge one segment of `wire` bytes arriving now: 1 if the link accepts it (tx_end set), else 0. */
static int admit(struct link *l, size_t wire, uint64_t now, uint64_t *tx_end) {
    if (!l->up) {
        l->down_pkts++;
        l->down_bytes += wire;
        return 0;
    }
    if (l->loss > 0 && rng_unit(&l->rng) < l->loss) {
        l->loss_pkts++;
        l->loss_bytes += wire;
        return 0;
    }
    if (held_total + wire > max_held) { /* memory bound of the whole emulator */
        memdrop_pkts++;
        l->qdrop_pkts++;
        l->qdrop_bytes += wire;
        return 0;
    }
    *tx_end = now;
    if (l->rate_bps) {
        uint64_t start = l->busy_until > now ? l->busy_until : now;
        uint64_t backlog = (uint64_t)((double)(start - now) * (double)l->rate_bps / 8e9);
        if (backlog + wire > l->queue_bytes) {
            l->qdrop_pkts++;
            l->qdrop_bytes += wire;
            return 0;
        }
        if (backlog + wire > l->max_backlog_bytes) l->max_backlog_bytes = backlog + wire;
        *tx_end = start + (uint64_t)wire * 8000000000ull / l->rate_bps;
        l->busy_until = *tx_end;
    }
    return 1;
}

/* Copy segments [first, last) of a super-packet into a packet of their own, headers adjusted. */
static void build_run(unsigned char *out, const unsigned char *buf, const struct segmenting *sg, size_t first,
                      size_t last) {
    size_t off = first * sg->mss, end = last * sg->mss < sg->payload ? last * sg->mss : sg->payload;
    size_t plen = end - off, vh = sg->vh, ihl = (size_t)(buf[vh] & 0x0f) * 4;
    memcpy(out, buf, vh + sg->hl);
    memcpy(out + vh + sg->hl, buf + vh + sg->hl + off, plen);
    unsigned char *ip = out + vh, *tcp = ip + ihl;
    if (last - first == 1) { /* a single segment is an ordinary packet */
        out[1] = VNET_GSO_NONE;
        out[4] = out[5] = 0;
    }
    put16(ip + 2, (uint16_t)(sg->hl + plen));
    put16(ip + 4, (uint16_t)(get16(ip + 4) + first)); /* segmentation gives each segment the next IP id */
    put16(ip + 10, 0);
    put16(ip + 10, (uint16_t)~csum_fold(csum_add(0, ip, ihl)));
    put32(tcp + 4, get32(tcp + 4) + (uint32_t)off);
    if (last < sg->nseg) tcp[13] &= (unsigned char)~0x09; /* FIN and PSH belong to the last segment */
    if (first > 0) tcp[13] &= (unsigned char)~0x80;       /* CWR to the first */
    size_t tcplen = sg->hl - ihl + plen;
    uint32_t pseudo = csum_add(0, ip + 12, 8) + 6 + (uint32_t)tcplen;
    put16(tcp + 16, 0);
    if (out[0] & VNET_F_NEEDS_CSUM) /* the receiving kernel finishes it: leave the pseudo-header sum */
        put16(tcp + 16, csum_fold(pseudo));
    else
        put16(tcp + 16, (uint16_t)~csum_fold(csum_add(pseudo, tcp, tcplen)));
}

static void hold(struct link *l, int li, const unsigned char *buf, size_t len, const struct segmenting *sg,
                 size_t first, size_t last, uint64_t tx_end) {
    uint64_t wire = 0;
    size_t segs = last - first;
    if (sg->nseg == 1) {
        wire = len - sg->vh;
    } else {
        size_t end = last * sg->mss < sg->payload ? last * sg->mss : sg->payload;
        wire = (uint64_t)segs * sg->hl + (end - first * sg->mss);
        len = sg->vh + sg->hl + (end - first * sg->mss);
    }
    int64_t jitter = 0;
    if (l->jitter_ns) jitter = (int64_t)((rng_unit(&l->rng) * 2.0 - 1.0) * (double)l->jitter_ns);
    int64_t prop = (int64_t)l->delay_ns + jitter;
    uint64_t at = tx_end + (uint64_t)(prop > 0 ? prop : 0);
    if (!l->reorder && at < l->last_deliver) at = l->last_deliver;
    l->last_deliver = at;
    struct packet *p = malloc(sizeof *p + len);
    if (!p) {
        memdrop_pkts += segs;
        return;
    }
    if (sg->nseg == 1 || segs == sg->nseg)
        memcpy(p->data, buf, len);
    else
        build_run(p->data, buf, sg, first, last);
    p->deliver_ns = at;
    p->seq = next_seq++;
    p->link = li;
    p->len = (uint32_t)len;
    p->segs = (uint32_t)segs;
    p->wire = wire;
    l->held_pkts += segs;
    l->held_bytes += wire;
    held_total += wire;
    if (heap_push(p) < 0) {
        memdrop_pkts += segs;
        l->held_pkts -= segs;
        l->held_bytes -= wire;
        held_total -= wire;
        free(p);
    }
}

/* One packet read from node `src`: route it, judge each of its segments, hold what survives. */
static void enqueue(int src, const unsigned char *buf, size_t len, uint64_t now) {
    struct node *sn = &nodes[src];
    struct segmenting sg;
    size_t vh = vnet ? VNET_HDR_LEN : 0;
    sn->rx_pkts++;
    sn->rx_bytes += len;
    if (len < vh + 20 || (buf[vh] >> 4) != 4) { /* only IPv4 is routed (IPv6 is disabled in the nodes) */
        sn->unroutable_pkts++;
        return;
    }
    uint32_t daddr;
    memcpy(&daddr, buf + vh + 16, 4);
    int dst = node_by_addr(daddr);
    if (dst < 0 || dst == src) {
        sn->unroutable_pkts++;
        return;
    }
    int li = src * n_nodes + dst;
    struct link *l = &links[li];
    classify(buf, len, &sg);
    size_t run_start = 0;
    int in_run = 0;
    uint64_t run_tx_end = now;
    for (size_t i = 0; i < sg.nseg; i++) {
        size_t wire = len - vh;
        if (sg.nseg > 1) wire = sg.hl + (i + 1 == sg.nseg ? sg.payload - i * sg.mss : sg.mss);
        uint64_t tx_end;
        int keep = admit(l, wire, now, &tx_end);
        if (keep) {
            if (!in_run) run_start = i;
            in_run = 1;
            run_tx_end = tx_end;
        }
        if (in_run && (!keep || i + 1 == sg.nseg)) {
            hold(l, li, buf, len, &sg, run_start, keep ? i + 1 : i, run_tx_end);
            in_run = 0;
        }
    }
}

static void read_node(int src) {
    static unsigned char buf[MAX_PACKET];
    for (int i = 0; i < READ_BATCH; i++) {
        ssize_t n = read(nodes[src].fd, buf, sizeof buf);
        if (n <= 0) break; /* EAGAIN: drained */
        enqueue(src, buf, (size_t)n, now_ns());
    }
}

/* ---- control channel ---- */

static void reply(struct control *c, const char *text) {
    size_t len = strlen(text), off = 0;
    while (off < len) {
        ssize_t n = write(c->fd_out, text + off, len - off);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return; /* the client went away; it will be closed on its next read */
        off += (size_t)n;
    }
}

static int parse_u64(const char *s, uint64_t *out) {
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || end == s || *end || s[0] == '-') return -1;
    *out = v;
    return 0;
}

static void cmd_set(struct control *c, char *args) {
    char *save = NULL, *src = strtok_r(args, " ", &save), *dst = strtok_r(NULL, " ", &save);
    char msg[256];
    if (!src || !dst) {
        reply(c, "err usage: set SRC DST key=value...\n");
        return;
    }
    int s = node_by_name(src), d = node_by_name(dst);
    if (s < 0 || d < 0 || s == d) {
        snprintf(msg, sizeof msg, "err unknown link %s->%s\n", src, dst);
        reply(c, msg);
        return;
    }
    struct link next = links[s * n_nodes + d]; /* apply all keys or none */
    for (char *kv; (kv = strtok_r(NULL, " ", &save));) {
        char *eq = strchr(kv, '=');
        if (!eq) {
            snprintf(msg, sizeof msg, "err expected key=value, got %.100s\n", kv);
            reply(c, msg);
            return;
        }
        *eq = 0;
        const char *key = kv, *val = eq + 1;
        uint64_t u = 0;
        int bad = 0;
        if (strcmp(key, "loss") == 0) {
            char *end;
            double v = strtod(val, &end);
            bad = end == val || *end || !(v >= 0.0 && v <= 1.0);
            next.loss = v;
        } else if (parse_u64(val, &u) < 0) {
            bad = 1;
        } else if (strcmp(key, "rate") == 0) {
            next.rate_bps = u;
        } else if (strcmp(key, "delay") == 0) {
            next.delay_ns = u;
        } else if (strcmp(key, "jitter") == 0) {
            next.jitter_ns = u;
        } else if (strcmp(key, "queue") == 0) {
            next.queue_bytes = u;
        } else if (strcmp(key, "reorder") == 0 && u <= 1) {
            next.reorder = (int)u;
        } else if (strcmp(key, "up") == 0 && u <= 1) {
            next.up = (int)u;
        } else {
            bad = 1;
        }
        if (bad) {
            snprintf(msg, sizeof msg, "err bad value for %.40s: %.100s\n", key, val);
            reply(c, msg);
            return;
        }
    }
    if (!next.rate_bps) next.busy_until = 0;
    links[s * n_nodes + d] = next;
    reply(c, "ok\n");
}

static void cmd_stats(struct control *c) {
    /* One JSON line; sized for MAX_NODES^2 links of ~420 bytes each. */
    size_t cap = 4096 + (size_t)n_nodes * (size_t)n_nodes * 512, off = 0;
    char *out = malloc(cap);
    if (!out) {
        reply(c, "err out of memory\n");
        return;
    }
    off += (size_t)snprintf(out + off, cap - off,
                            "ok {\"now_ns\":%" PRIu64 ",\"held_bytes\":%" PRIu64 ",\"memdrop_pkts\":%" PRIu64
                            ",\"nodes\":[",
                            now_ns(), held_total, memdrop_pkts);
    for (int i = 0; i < n_nodes; i++) {
        struct node *n = &nodes[i];
        off += (size_t)snprintf(out + off, cap - off,
                                "%s{\"name\":\"%s\",\"rx_pkts\":%" PRIu64 ",\"rx_bytes\":%" PRIu64
                                ",\"unroutable_pkts\":%" PRIu64 "}",
                                i ? "," : "", n->name, n->rx_pkts, n->rx_bytes, n->unroutable_pkts);
    }
    off += (size_t)snprintf(out + off, cap - off, "],\"links\":[");
    int first = 1;
    for (int s = 0; s < n_nodes; s++)
        for (int d = 0; d < n_nodes; d++) {
            if (s == d) continue;
            struct link *l = &links[s * n_nodes + d];
            off += (size_t)snprintf(
                out + off, cap - off,
                "%s{\"src\":\"%s\",\"dst\":\"%s\",\"rate_bps\":%" PRIu64 ",\"delay_ns\":%" PRIu64
                ",\"jitter_ns\":%" PRIu64 ",\"loss\":%.9g,\"queue_bytes\":%" PRIu64
                ",\"reorder\":%d,\"up\":%d,\"fwd_pkts\":%" PRIu64 ",\"fwd_bytes\":%" PRIu64
                ",\"loss_pkts\":%" PRIu64 ",\"loss_bytes\":%" PRIu64 ",\"qdrop_pkts\":%" PRIu64
                ",\"qdrop_bytes\":%" PRIu64 ",\"down_pkts\":%" PRIu64 ",\"down_bytes\":%" PRIu64
                ",\"txerr_pkts\":%" PRIu64 ",\"held_pkts\":%" PRIu64 ",\"held_bytes\":%" PRIu64
                ",\"max_backlog_bytes\":%" PRIu64 "}",
                first ? "" : ",", nodes[s].name, nodes[d].name, l->rate_bps, l->delay_ns, l->jitter_ns,
                l->loss, l->queue_bytes, l->reorder, l->up, l->fwd_pkts, l->fwd_bytes, l->loss_pkts,
                l->loss_bytes, l->qdrop_pkts, l->qdrop_bytes, l->down_pkts, l->down_bytes, l->txerr_pkts,
                l->held_pkts, l->held_bytes, l->max_backlog_bytes);
            first = 0;
        }
    snprintf(out + off, cap - off, "]}\n");
    reply(c, out);
    free(out);
}

static void handle_line(struct control *c, char *line) {
    if (strcmp(line, "ping") == 0) {
        reply(c, "ok pong\n");
    } else if (strncmp(line, "set ", 4) == 0) {
        cmd_set(c, line + 4);
    } else if (strcmp(line, "stats") == 0) {
        cmd_stats(c);
    } else if (strcmp(line, "quit") == 0) {
        reply(c, "ok bye\n");
        quitting = 1;
    } else {
        reply(c, "err unknown command\n");
    }
}

static void close_control(struct control *c) {
    epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd_in, NULL);
    close(c->fd_in);
    c->fd_in = c->fd_out = -1;
    c->len = 0;
}

/* Returns -1 when the client is gone. */
static int read_control(struct control *c) {
    ssize_t n = read(c->fd_in, c->buf + c->len, sizeof c->buf - c->len);
    if (n < 0 && (errno == EAGAIN || errno == EINTR)) return 0;
    if (n <= 0) return -1;
    c->len += (size_t)n;
    for (;;) {
        char *nl = memchr(c->buf, '\n', c->len);
        if (!nl) break;
        *nl = 0;
        handle_line(c, c->buf);
        size_t used = (size_t)(nl - c->buf) + 1;
        memmove(c->buf, nl + 1, c->len - used);
        c->len -= used;
    }
    if (c->len == sizeof c->buf) { /* a line longer than the limit: refuse it rather than grow */
        reply(c, "err line too long\n");
        c->len = 0;
    }
    return 0;
}

static void accept_control(void) {
    int fd = accept4(listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) return;
    for (int i = 1; i <= MAX_CONTROL_CLIENTS; i++)
        if (controls[i].fd_in < 0) {
            controls[i].fd_in = controls[i].fd_out = fd;
            controls[i].len = 0;
            struct epoll_event ev = {.events = EPOLLIN, .data.u64 = 3000 + (uint64_t)i};
            epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev);
            return;
        }
    close(fd); /* all slots busy */
}

static int fail(const char *what) {
    fprintf(stderr, "wanfwd: %s: %s\n", what, strerror(errno));
    return 1;
}

static int parse_node(char *spec, struct node *n) {
    char *c1 = strchr(spec, ':'), *c2 = c1 ? strchr(c1 + 1, ':') : NULL;
    if (!c1 || !c2 || c1 - spec >= MAX_NAME || c1 == spec) return -1;
    *c1 = 0;
    *c2 = 0;
    strcpy(n->name, spec);
    char *end;
    long fd = strtol(c1 + 1, &end, 10);
    if (*end || fd < 0) return -1;
    n->fd = (int)fd;
    if (inet_pton(AF_INET, c2 + 1, &n->addr) != 1) return -1;
    return 0;
}

int main(int argc, char **argv) {
    uint64_t seed = (uint64_t)time(NULL) ^ (uint64_t)getpid() << 32;
    const char *control_path = NULL;
    signal(SIGPIPE, SIG_IGN);
    prctl(PR_SET_TIMERSLACK, 1000UL); /* 1 us: delays of a few ms must not drift by the 50 us default */
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--vnet-hdr") == 0) {
            vnet = 1;
        } else if (strcmp(argv[i], "--seed") == 0 && i + 1 < argc) {
            if (parse_u64(argv[++i], &seed) < 0) return fprintf(stderr, "wanfwd: bad --seed\n"), 2;
        } else if (strcmp(argv[i], "--max-held-bytes") == 0 && i + 1 < argc) {
            if (parse_u64(argv[++i], &max_held) < 0) return fprintf(stderr, "wanfwd: bad --max-held-bytes\n"), 2;
        } else if (strcmp(argv[i], "--control-socket") == 0 && i + 1 < argc) {
            control_path = argv[++i];
        } else if (n_nodes < MAX_NODES && parse_node(argv[i], &nodes[n_nodes]) == 0) {
            n_nodes++;
        } else {
            fprintf(stderr, "wanfwd: bad argument %s (expected NAME:FD:IPV4, at most %d nodes)\n", argv[i],
                    MAX_NODES);
            return 2;
        }
    }
    if (n_nodes < 2) return fprintf(stderr, "wanfwd: need at least two nodes\n"), 2;
    links = calloc((size_t)n_nodes * (size_t)n_nodes, sizeof *links);
    if (!links) return fail("calloc");
    for (int s = 0; s < n_nodes; s++)
        for (int d = 0; d < n_nodes; d++) {
            struct link *l = &links[s * n_nodes + d];
            l->src = s;
            l->dst = d;
            l->up = 1;
            l->queue_bytes = UINT64_MAX;
            l->rng = (seed + 0x9E3779B97F4A7C15ull * (uint64_t)(s * n_nodes + d + 1)) | 1;
        }
    if ((epfd = epoll_create1(EPOLL_CLOEXEC)) < 0) return fail("epoll_create1");
    if ((tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC)) < 0) return fail("timerfd_create");
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = 1000};
    epoll_ctl(epfd, EPOLL_CTL_ADD, tfd, &ev);
    for (int i = 0; i < n_nodes; i++) {
        int fl = fcntl(nodes[i].fd, F_GETFL);
        if (fl < 0 || fcntl(nodes[i].fd, F_SETFL, fl | O_NONBLOCK) < 0) return fail("tun fd");
        ev.data.u64 = (uint64_t)i;
        if (epoll_ctl(epfd, EPOLL_CTL_ADD, nodes[i].fd, &ev) < 0) return fail("epoll_ctl tun");
    }
    for (int i = 0; i <= MAX_CONTROL_CLIENTS; i++) controls[i].fd_in = controls[i].fd_out = -1;
    controls[0].fd_in = 0;
    controls[0].fd_out = 1;
    ev.data.u64 = 3000;
    epoll_ctl(epfd, EPOLL_CTL_ADD, 0, &ev);
    if (control_path) {
        struct sockaddr_un sa = {.sun_family = AF_UNIX};
        if (strlen(control_path) >= sizeof sa.sun_path) return fprintf(stderr, "wanfwd: socket path too long\n"), 2;
        strcpy(sa.sun_path, control_path);
        unlink(control_path);
        listen_fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (listen_fd < 0 || bind(listen_fd, (struct sockaddr *)&sa, sizeof sa) < 0 || listen(listen_fd, 4) < 0)
            return fail("control socket");
        ev.data.u64 = 2000;
        epoll_ctl(epfd, EPOLL_CTL_ADD, listen_fd, &ev);
    }
    reply(&controls[0], "ok ready\n");

    struct epoll_event events[32];
    while (!quitting) {
        int n = epoll_wait(epfd, events, 32, -1);
        if (n < 0) {
            if (errno == EINTR) continue;
            return fail("epoll_wait");
        }
        for (int i = 0; i < n && !quitting; i++) {
            uint64_t tag = events[i].data.u64;
            if (tag < (uint64_t)n_nodes) {
                read_node((int)tag);
            } else if (tag == 1000) {
                uint64_t expirations;
                if (read(tfd, &expirations, sizeof expirations) < 0) { /* spurious wake-up */ }
                armed_ns = 0;
            } else if (tag == 2000) {
                accept_control();
            } else if (tag >= 3000) {
                struct control *c = &controls[tag - 3000];
                if (c->fd_in >= 0 && read_control(c) < 0) {
                    if (c == &controls[0]) quitting = 1; /* owner gone */
                    else close_control(c);
                }
            }
        }
        deliver_due(now_ns());
        arm_timer();
    }
    if (control_path) unlink(control_path);
    return 0;
}
