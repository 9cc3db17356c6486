/*
 * _wgstack.c: the per-packet WireGuard data plane (contract and overview in _wgstack.h).
 *
 * Receive pipeline, in the order of the functions below:
 *   wg_input -> message type -> transport: index table -> keypair -> replay check -> decrypt
 *   -> replay update -> (authenticated) endpoint roaming, counters, keypair confirmation, timers
 *   -> inner IP parse (validated ip_repr) -> cryptokey routing check -> per-protocol handler:
 *      ICMP echo (answered here), TCP (the tcp_stack of _tcp.c), UDP (queued for wg_udp_drain),
 *      IPv6 TCP SYN / UDP (refused with an RST / ICMPv6 unreachable).
 * Send pipeline:
 *   wg_send_inner / wg_udp_send / wg_icmp_unreachable -> route by destination over allowed IPs
 *   -> peer_send_data (also the TCP stack's emit callback, routed by peer id) -> stage when no
 *   usable keypair, else pad, encrypt with the next counter, queue in the output ring.
 * The output ring is drained by wg_next_output (sans-IO) or wg_io_flush (sendmmsg).
 *
 * Single-threaded by design: Python calls in from one thread; nothing here blocks or reads a clock.
 */
#if defined(__linux__)
#define _GNU_SOURCE /* recvmmsg / sendmmsg */
#elif defined(__APPLE__)
#define _DARWIN_C_SOURCE
#endif

#include "_wgstack.h"

#include <errno.h>
#ifdef __GLIBC__
#include <malloc.h>
#endif
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/uio.h>

/* Under AddressSanitizer (fuzz/, scripts/test-asan) the decrypt scratch past the current
 * plaintext is poisoned, so an inner-packet parser reading past a packet's end is reported
 * although the bytes lie inside one large buffer. */
#if defined(__SANITIZE_ADDRESS__)
#define WG_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define WG_ASAN 1
#endif
#endif
#ifdef WG_ASAN
#include <sanitizer/asan_interface.h>
#define SCRATCH_POISON(p, n) ASAN_POISON_MEMORY_REGION(p, n)
#define SCRATCH_UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION(p, n)
#else
#define SCRATCH_POISON(p, n) ((void)(p), (void)(n))
#define SCRATCH_UNPOISON(p, n) ((void)(p), (void)(n))
#endif

/* ---- Protocol constants: whitepaper section 6, wireguard-go device/constants.go ---------- */
#define REKEY_AFTER_MESSAGES (1ULL << 60)
#define REJECT_AFTER_MESSAGES (UINT64_MAX - (1ULL << 13)) /* 2^64 - 2^13 - 1 */
#define REKEY_AFTER_TIME 120.0
#define REJECT_AFTER_TIME 180.0
#define REKEY_TIMEOUT 5.0
#define KEEPALIVE_TIMEOUT 10.0
#define NEW_HANDSHAKE_TIMEOUT (KEEPALIVE_TIMEOUT + REKEY_TIMEOUT)                  /* 15 s */
#define RECV_OLD_KEYPAIR_AGE (REJECT_AFTER_TIME - KEEPALIVE_TIMEOUT - REKEY_TIMEOUT) /* 165 s */
#define ZERO_KEYS_AFTER (REJECT_AFTER_TIME * 3)                                      /* 540 s */

#define MSG_INITIATION 1
#define MSG_RESPONSE 2
#define MSG_COOKIE_REPLY 3
#define MSG_TRANSPORT 4
#define MSG_INITIATION_SIZE 148
#define MSG_RESPONSE_SIZE 92
#define MSG_COOKIE_REPLY_SIZE 64
#define MSG_TRANSPORT_HEADER_SIZE 16
#define AEAD_TAG_SIZE 16
#define MSG_KEEPALIVE_SIZE (MSG_TRANSPORT_HEADER_SIZE + AEAD_TAG_SIZE)
#define PADDING_MULTIPLE 16
#define KEY_SIZE 32

/* Replay window (RFC 6479), as wireguard-go replay/replay.go. */
#define REPLAY_BLOCK_BIT_LOG 6
#define REPLAY_BLOCK_BITS (1u << REPLAY_BLOCK_BIT_LOG)
#define REPLAY_RING_BLOCKS 128u
#define REPLAY_WINDOW_SIZE ((REPLAY_RING_BLOCKS - 1) * REPLAY_BLOCK_BITS) /* 8128 */

/* ---- Implementation limits ---------------------------------------------------------------- */
#define OUTPUT_RING_SIZE 1024u /* datagrams waiting to be sent */
#define EVENT_RING_SIZE 4096u
#define IO_BATCH 64
#define IO_RX_BUF_SIZE 65536u /* a whole UDP datagram, so nothing is silently truncated */
#define MAX_PEERS_LIMIT 65536u
#define MIN_MTU 576u /* also keeps a 148-byte handshake message within an output slot */

#define IPPROTO_ICMP_V4 1
#define ICMP_ECHO_REPLY 0
#define ICMP_ECHO_REQUEST 8
#define ICMP_DEST_UNREACHABLE 3
#define ICMPV6_DEST_UNREACHABLE 1
#define ICMPV6_PORT_UNREACHABLE 4
#define IPV6_MIN_MTU 1280 /* an ICMPv6 error quotes no more than fits in it (RFC 4443 2.4) */
#define REPLY_TTL 64
#define TCP_FLAG_FIN 0x01
#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_RST 0x04
#define TCP_FLAG_ACK 0x10

/* TCP stack defaults (wg_config 0 = these). */
#define TCP_DEFAULT_BUF (256u * 1024u)
#define TCP_DEFAULT_MAX_CONNS 65536u
#define TCP_DEFAULT_MAX_CONNS_PER_PEER 4096u
#define TCP_DEFAULT_MAX_HALF_OPEN_PER_PEER 256u

/* ---- Data structures ---------------------------------------------------------------------- */
typedef struct {
    uint64_t last;
    uint64_t ring[REPLAY_RING_BLOCKS];
} replay_filter;

typedef struct keypair {
    uint8_t send_key[KEY_SIZE];
    uint8_t recv_key[KEY_SIZE];
    uint32_t local_index;
    uint32_t remote_index;
    uint64_t send_counter; /* next counter to use */
    replay_filter replay;
    double created;
    uint32_t peer_id;
    bool is_initiator;
    bool recv_old_signalled; /* NEED_HANDSHAKE(RECV_OLD) already raised for this keypair */
} keypair;

typedef struct {
    uint8_t *data;
    uint16_t len;
} staged_packet;

typedef struct {
    bool active;
    bool in_timer_list;
    uint16_t persistent_keepalive; /* seconds, 0 = off */
    wg_endpoint endpoint;
    keypair *current, *previous, *next;
    /* NEED_HANDSHAKE rate limit: one per REKEY_TIMEOUT unless a keypair is installed. */
    bool need_handshake_signalled;
    double need_handshake_at;
    /* Timer deadlines (0 = disarmed), after wireguard-go timers.go. */
    double t_send_keepalive;
    bool need_another_keepalive;
    double t_new_handshake;
    double t_persistent_keepalive;
    double t_zero_keys;
    /* Inner packets waiting for a keypair: a ring of staged_per_peer entries, allocated lazily. */
    staged_packet *staged;
    uint32_t staged_head, staged_count;
    uint64_t rx_bytes, tx_bytes, rx_packets, tx_packets;
    double last_rx, last_tx;
} peer;

/* Open-addressing hash of local index -> keypair (linear probing, backward-shift delete). */
typedef struct {
    keypair **slots;
    uint32_t mask;
} index_table;

/* Allowed IPs: full-length prefixes (/32, /128) in a hash, shorter ones in a list scanned
 * longest prefix first.  Peers' tunnel addresses are /32, so the hash does the usual work. */
typedef struct {
    uint8_t family; /* 0 = empty slot */
    uint8_t addr[16];
    uint32_t peer_id;
} host_route;

typedef struct {
    uint8_t family;
    uint8_t prefix_len;
    uint8_t addr[16]; /* host bits zero */
    uint32_t peer_id;
} prefix_route;

typedef struct {
    host_route *hosts;
    uint32_t hosts_mask, hosts_used;
    prefix_route *prefixes; /* sorted by prefix_len, longest first */
    uint32_t prefixes_len, prefixes_cap;
} route_table;

typedef struct {
    uint32_t len;
    wg_endpoint dst;
} output_meta;

/* A destination approved for the fast relay (see wg_fast_relay_allow). */
typedef struct {
    uint32_t ip;
    uint16_t port;
    bool used;
    double expires; /* 0 = never */
} fast_relay_entry;

/* TCP events waiting for wg_tcp_events, one entry per TCP table slot: a bit per event type, so
 * the queue can never overflow and a dropped READABLE can never stall a connection. */
typedef struct {
    uint32_t conn_id;
    uint32_t close_arg; /* TCP_EV_CLOSED's arg */
    uint8_t bits;       /* 1 << TCP_EV_* */
    bool queued;        /* the slot sits in the ready FIFO */
} tcp_pending;

struct wg_engine {
    wg_config cfg;
    wg_aead_encrypt_fn enc;
    wg_aead_decrypt_fn dec;
    wg_memzero_fn memzero;

    peer *peers;
    uint32_t *timer_list; /* ids of peers with an armed timer */
    uint32_t timer_list_len;
    double next_deadline; /* earliest armed deadline, may be early (never late); 0 = none */
    double now;           /* the latest time passed in, for stats that have no now argument */

    index_table indices;
    route_table routes;

    /* Output ring: preallocated datagram buffers of out_slot_size bytes. */
    uint8_t *out_bufs;
    output_meta *out_meta;
    size_t out_slot_size;
    uint32_t out_head, out_count;

    wg_event *events;
    uint32_t ev_head, ev_count;

    uint8_t *plain; /* decrypt scratch */
    size_t plain_cap;
    uint8_t *tx_scratch; /* mtu bytes: inner packets the stack builds (ICMP replies) */

    uint64_t drops[WG_DROP__COUNT];
    wg_engine_stats stats;

    int io_fd;
    int io_family;
    uint8_t *io_rx_bufs; /* IO_BATCH * IO_RX_BUF_SIZE, allocated by wg_io_attach */

    tcp_stack *tcp;
    splice_table *splice;     /* NULL if epoll is unavailable */
    tcp_pending *tcp_pending; /* tcp_slots entries */
    uint32_t *tcp_ready;      /* FIFO of slots with pending events; each slot at most once */
    uint32_t tcp_slots, tcp_ready_head, tcp_ready_count;

    fast_relay_entry *fast_relay; /* WG_FAST_RELAY_SLOTS, allocated by the first approval */
    double fast_connect_timeout;
    wg_fast_open *fast_opened;    /* ring of reports for the owner */
    uint32_t fast_head, fast_count, fast_cap;

    wg_udp_meta *udp_meta; /* WG_UDP_QUEUE_MAX entries */
    uint8_t *udp_arena;    /* WG_UDP_ARENA_SIZE bytes */
    uint32_t udp_count, udp_arena_used, udp_arena_high;

    uint16_t ip_id; /* IPv4 identification of the packets built here */
};

static const char *const drop_reason_names[WG_DROP__COUNT] = {
    [WG_DROP_TRUNCATED] = "truncated",
    [WG_DROP_BAD_SIZE] = "bad_size",
    [WG_DROP_BAD_TYPE] = "bad_type",
    [WG_DROP_UNKNOWN_INDEX] = "unknown_index",
    [WG_DROP_REPLAY] = "replay",
    [WG_DROP_DECRYPT] = "decrypt",
    [WG_DROP_KEY_EXPIRED] = "key_expired",
    [WG_DROP_BAD_IP] = "bad_ip",
    [WG_DROP_SPOOFED_SRC] = "spoofed_src",
    [WG_DROP_NO_ROUTE] = "no_route",
    [WG_DROP_STAGED_FULL] = "staged_full",
    [WG_DROP_UNHANDLED] = "unhandled",
    [WG_DROP_EVENT_OVERFLOW] = "event_overflow",
    [WG_DROP_OUTPUT_OVERFLOW] = "output_overflow",
    [WG_DROP_FRAGMENT] = "fragment",
    [WG_DROP_SEND_ERROR] = "send_error",
    [WG_DROP_UDP_OVERFLOW] = "udp_overflow",
};

static void count_drop(wg_engine *e, int reason) { e->drops[reason]++; }

/* ---- Little helpers ----------------------------------------------------------------------- */
static uint16_t rd16be(const uint8_t *p) { return (uint16_t)((p[0] << 8) | p[1]); }
static uint32_t rd32be(const uint8_t *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}
static uint32_t rd32le(const uint8_t *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}
static uint64_t rd64le(const uint8_t *p) {
    return (uint64_t)rd32le(p) | ((uint64_t)rd32le(p + 4) << 32);
}
static void wr16be(uint8_t *p, uint16_t v) {
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}
static void wr32be(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}
static void wr32le(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
    p[2] = (uint8_t)(v >> 16);
    p[3] = (uint8_t)(v >> 24);
}
static void wr64le(uint8_t *p, uint64_t v) {
    wr32le(p, (uint32_t)v);
    wr32le(p + 4, (uint32_t)(v >> 32));
}

static uint32_t hash32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7feb352dU;
    x ^= x >> 15;
    x *= 0x846ca68bU;
    x ^= x >> 16;
    return x;
}

static uint32_t hash_bytes(const uint8_t *p, size_t n) {
    uint32_t h = 2166136261u; /* FNV-1a, then mixed */
    for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 16777619u;
    return hash32(h);
}

static size_t addr_len(uint8_t family) { return family == 4 ? 4 : 16; }

/* RFC 1071 ones' complement sum, folded but not inverted. */
static uint32_t csum_add(uint32_t sum, const uint8_t *p, size_t n) {
    while (n > 1) {
        sum += rd16be(p);
        p += 2;
        n -= 2;
    }
    if (n) sum += (uint32_t)p[0] << 8;
    return sum;
}
static uint16_t csum_finish(uint32_t sum) {
    while (sum >> 16) sum = (sum & 0xffff) + (sum >> 16);
    return (uint16_t)~sum;
}

static bool endpoint_equal(const wg_endpoint *a, const wg_endpoint *b) {
    if (a->family != b->family || a->port != b->port) return false;
    if (a->family == 0) return true;
    return memcmp(a->addr, b->addr, addr_len(a->family)) == 0;
}

/* Copy only the meaningful bytes so endpoints compare and print the same way everywhere. */
static void endpoint_copy(wg_endpoint *dst, const wg_endpoint *src) {
    memset(dst, 0, sizeof *dst);
    if (src->family != 4 && src->family != 6) return;
    dst->family = src->family;
    dst->port = src->port;
    memcpy(dst->addr, src->addr, addr_len(src->family));
}

/* ---- Events ------------------------------------------------------------------------------- */
static wg_event *event_push(wg_engine *e, uint32_t type, int32_t peer_id, uint32_t arg) {
    if (e->ev_count == EVENT_RING_SIZE) {
        count_drop(e, WG_DROP_EVENT_OVERFLOW);
        return NULL;
    }
    wg_event *ev = &e->events[(e->ev_head + e->ev_count) % EVENT_RING_SIZE];
    e->ev_count++;
    memset(ev, 0, offsetof(wg_event, data));
    ev->type = type;
    ev->peer_id = peer_id;
    ev->arg = arg;
    return ev;
}

int wg_next_event(wg_engine *e, wg_event *out) {
    if (e->ev_count == 0) return 0;
    wg_event *ev = &e->events[e->ev_head];
    memcpy(out, ev, offsetof(wg_event, data) + ev->len);
    e->ev_head = (e->ev_head + 1) % EVENT_RING_SIZE;
    e->ev_count--;
    return 1;
}

/* ---- Output ring -------------------------------------------------------------------------- */
/* A free slot's buffer (out_slot_size bytes), flushing to the socket first if the ring is full. */
static uint8_t *output_reserve(wg_engine *e) {
    if (e->out_count == OUTPUT_RING_SIZE && e->io_fd >= 0) wg_io_flush(e);
    if (e->out_count == OUTPUT_RING_SIZE) {
        count_drop(e, WG_DROP_OUTPUT_OVERFLOW);
        return NULL;
    }
    uint32_t slot = (e->out_head + e->out_count) % OUTPUT_RING_SIZE;
    return e->out_bufs + (size_t)slot * e->out_slot_size;
}

static void output_commit(wg_engine *e, size_t len, const wg_endpoint *dst) {
    uint32_t slot = (e->out_head + e->out_count) % OUTPUT_RING_SIZE;
    e->out_meta[slot].len = (uint32_t)len;
    endpoint_copy(&e->out_meta[slot].dst, dst);
    e->out_count++;
    e->stats.tx_datagrams++;
    e->stats.tx_bytes += len;
}

static void output_pop(wg_engine *e) {
    e->out_head = (e->out_head + 1) % OUTPUT_RING_SIZE;
    e->out_count--;
}

int wg_next_output(wg_engine *e, uint8_t *buf, size_t cap, wg_endpoint *dst) {
    if (e->out_count == 0) return 0;
    const output_meta *m = &e->out_meta[e->out_head];
    if (cap < m->len) return WG_ENOSPC;
    memcpy(buf, e->out_bufs + (size_t)e->out_head * e->out_slot_size, m->len);
    *dst = m->dst;
    int len = (int)m->len;
    output_pop(e);
    return len;
}

/* ---- Replay window (RFC 6479, wireguard-go replay.go), split so the check runs before the
 * (expensive) decryption and the update only after authentication. ---------------------------- */
static bool replay_check(const replay_filter *f, uint64_t counter) {
    if (counter >= REJECT_AFTER_MESSAGES) return false;
    if (counter > f->last) return true;
    if (f->last - counter > REPLAY_WINDOW_SIZE) return false;
    uint64_t block = (counter >> REPLAY_BLOCK_BIT_LOG) & (REPLAY_RING_BLOCKS - 1);
    return !(f->ring[block] & (1ULL << (counter & (REPLAY_BLOCK_BITS - 1))));
}

static bool replay_update(replay_filter *f, uint64_t counter) {
    if (!replay_check(f, counter)) return false;
    uint64_t index_block = counter >> REPLAY_BLOCK_BIT_LOG;
    if (counter > f->last) {
        uint64_t current = f->last >> REPLAY_BLOCK_BIT_LOG;
        uint64_t diff = index_block - current;
        if (diff > REPLAY_RING_BLOCKS) diff = REPLAY_RING_BLOCKS;
        for (uint64_t i = current + 1; i <= current + diff; i++)
            f->ring[i & (REPLAY_RING_BLOCKS - 1)] = 0;
        f->last = counter;
    }
    f->ring[index_block & (REPLAY_RING_BLOCKS - 1)] |= 1ULL << (counter & (REPLAY_BLOCK_BITS - 1));
    return true;
}

/* ---- Index table -------------------------------------------------------------------------- */
static keypair *index_lookup(const index_table *t, uint32_t idx) {
    for (uint32_t i = hash32(idx) & t->mask;; i = (i + 1) & t->mask) {
        keypair *kp = t->slots[i];
        if (!kp) return NULL;
        if (kp->local_index == idx) return kp;
    }
}

/* The table holds at most 3 * max_peers entries in at least twice that many slots: never full. */
static void index_insert(index_table *t, keypair *kp) {
    uint32_t i = hash32(kp->local_index) & t->mask;
    while (t->slots[i]) i = (i + 1) & t->mask;
    t->slots[i] = kp;
}

static void index_remove(index_table *t, uint32_t idx) {
    uint32_t i = hash32(idx) & t->mask;
    while (t->slots[i] && t->slots[i]->local_index != idx) i = (i + 1) & t->mask;
    if (!t->slots[i]) return;
    /* Backward-shift deletion keeps probe chains intact without tombstones. */
    for (uint32_t j = (i + 1) & t->mask; t->slots[j]; j = (j + 1) & t->mask) {
        uint32_t home = hash32(t->slots[j]->local_index) & t->mask;
        if (((j - home) & t->mask) >= ((j - i) & t->mask)) {
            t->slots[i] = t->slots[j];
            i = j;
        }
    }
    t->slots[i] = NULL;
}

/* ---- Allowed IPs (cryptokey routing) ------------------------------------------------------ */
static uint32_t host_slot(const route_table *r, uint8_t family, const uint8_t *addr) {
    uint32_t i = hash_bytes(addr, addr_len(family)) ^ family;
    i = hash32(i) & r->hosts_mask;
    while (r->hosts[i].family &&
           !(r->hosts[i].family == family && !memcmp(r->hosts[i].addr, addr, addr_len(family))))
        i = (i + 1) & r->hosts_mask;
    return i;
}

static int hosts_grow(route_table *r) {
    route_table grown = *r;
    grown.hosts_mask = r->hosts_mask * 2 + 1;
    grown.hosts = calloc((size_t)grown.hosts_mask + 1, sizeof(host_route));
    if (!grown.hosts) return WG_ENOSPC;
    for (uint32_t i = 0; i <= r->hosts_mask; i++) {
        if (!r->hosts[i].family) continue;
        grown.hosts[host_slot(&grown, r->hosts[i].family, r->hosts[i].addr)] = r->hosts[i];
    }
    free(r->hosts);
    r->hosts = grown.hosts;
    r->hosts_mask = grown.hosts_mask;
    return 0;
}

static void hosts_remove_slot(route_table *r, uint32_t i) {
    for (uint32_t j = (i + 1) & r->hosts_mask; r->hosts[j].family; j = (j + 1) & r->hosts_mask) {
        uint32_t home = hash32(hash_bytes(r->hosts[j].addr, addr_len(r->hosts[j].family)) ^
                               r->hosts[j].family) &
                        r->hosts_mask;
        if (((j - home) & r->hosts_mask) >= ((j - i) & r->hosts_mask)) {
            r->hosts[i] = r->hosts[j];
            i = j;
        }
    }
    memset(&r->hosts[i], 0, sizeof r->hosts[i]);
    r->hosts_used--;
}

static bool prefix_contains(const prefix_route *p, uint8_t family, const uint8_t *addr) {
    if (p->family != family) return false;
    unsigned full = p->prefix_len / 8, rest = p->prefix_len % 8;
    if (memcmp(p->addr, addr, full)) return false;
    if (!rest) return true;
    uint8_t mask = (uint8_t)(0xff << (8 - rest));
    return (addr[full] & mask) == p->addr[full];
}

/* Longest-prefix match: the peer owning addr, or -1. */
static int64_t route_lookup(const route_table *r, uint8_t family, const uint8_t *addr) {
    const host_route *h = &r->hosts[host_slot(r, family, addr)];
    if (h->family) return h->peer_id;
    for (uint32_t i = 0; i < r->prefixes_len; i++)
        if (prefix_contains(&r->prefixes[i], family, addr)) return r->prefixes[i].peer_id;
    return -1;
}

/* As in wireguard-go, adding a prefix another peer holds moves it to the new peer. */
static int route_add(route_table *r, uint32_t peer_id, uint8_t family, const uint8_t *addr,
                     uint8_t prefix_len) {
    size_t alen = addr_len(family);
    uint8_t masked[16] = {0};
    memcpy(masked, addr, prefix_len / 8);
    if (prefix_len % 8) masked[prefix_len / 8] = addr[prefix_len / 8] & (uint8_t)(0xff << (8 - prefix_len % 8));
    if (prefix_len == alen * 8) {
        if ((r->hosts_used + 1) * 2 > r->hosts_mask + 1 && hosts_grow(r)) return WG_ENOSPC;
        host_route *h = &r->hosts[host_slot(r, family, masked)];
        if (!h->family) r->hosts_used++;
        h->family = family;
        memcpy(h->addr, masked, 16);
        h->peer_id = peer_id;
        return 0;
    }
    for (uint32_t i = 0; i < r->prefixes_len; i++) {
        prefix_route *p = &r->prefixes[i];
        if (p->family == family && p->prefix_len == prefix_len && !memcmp(p->addr, masked, 16)) {
            p->peer_id = peer_id;
            return 0;
        }
    }
    if (r->prefixes_len == r->prefixes_cap) {
        uint32_t cap = r->prefixes_cap ? r->prefixes_cap * 2 : 16;
        prefix_route *grown = realloc(r->prefixes, cap * sizeof *grown);
        if (!grown) return WG_ENOSPC;
        r->prefixes = grown;
        r->prefixes_cap = cap;
    }
    uint32_t at = 0;
    while (at < r->prefixes_len && r->prefixes[at].prefix_len >= prefix_len) at++;
    memmove(&r->prefixes[at + 1], &r->prefixes[at], (r->prefixes_len - at) * sizeof *r->prefixes);
    r->prefixes[at] = (prefix_route){.family = family, .prefix_len = prefix_len, .peer_id = peer_id};
    memcpy(r->prefixes[at].addr, masked, 16);
    r->prefixes_len++;
    return 0;
}

static void route_remove_peer(route_table *r, uint32_t peer_id) {
    for (uint32_t i = 0; i <= r->hosts_mask;) {
        /* Removal may shift a later entry into slot i: look at it again. */
        if (r->hosts[i].family && r->hosts[i].peer_id == peer_id)
            hosts_remove_slot(r, i);
        else
            i++;
    }
    uint32_t kept = 0;
    for (uint32_t i = 0; i < r->prefixes_len; i++)
        if (r->prefixes[i].peer_id != peer_id) r->prefixes[kept++] = r->prefixes[i];
    r->prefixes_len = kept;
}

/* ---- Timers (after wireguard-go timers.go; deadlines are absolute, 0 = disarmed) ----------- */
static void timer_arm(wg_engine *e, uint32_t peer_id, double *timer, double deadline) {
    peer *p = &e->peers[peer_id];
    *timer = deadline;
    if (!p->in_timer_list) {
        p->in_timer_list = true;
        e->timer_list[e->timer_list_len++] = peer_id;
    }
    if (e->next_deadline == 0 || deadline < e->next_deadline) e->next_deadline = deadline;
}

/* Disarming leaves the cached deadline early at worst: wg_tick then finds nothing and re-caches. */
static void timer_disarm(double *timer) { *timer = 0; }

static void timers_data_sent(wg_engine *e, uint32_t id, double now) {
    peer *p = &e->peers[id];
    if (p->t_new_handshake == 0) timer_arm(e, id, &p->t_new_handshake, now + NEW_HANDSHAKE_TIMEOUT);
}

static void timers_data_received(wg_engine *e, uint32_t id, double now) {
    peer *p = &e->peers[id];
    if (p->t_send_keepalive == 0)
        timer_arm(e, id, &p->t_send_keepalive, now + KEEPALIVE_TIMEOUT);
    else
        p->need_another_keepalive = true;
}

static void timers_any_authenticated_packet_sent(wg_engine *e, uint32_t id) {
    timer_disarm(&e->peers[id].t_send_keepalive);
}

static void timers_any_authenticated_packet_received(wg_engine *e, uint32_t id) {
    timer_disarm(&e->peers[id].t_new_handshake);
}

static void timers_any_authenticated_packet_traversal(wg_engine *e, uint32_t id, double now) {
    peer *p = &e->peers[id];
    if (p->persistent_keepalive)
        timer_arm(e, id, &p->t_persistent_keepalive, now + p->persistent_keepalive);
}

static void timers_session_derived(wg_engine *e, uint32_t id, double now) {
    timer_arm(e, id, &e->peers[id].t_zero_keys, now + ZERO_KEYS_AFTER);
}

static void timers_handshake_complete(wg_engine *e, uint32_t id) {
    /* Handshake retransmission lives in Python; here it only lifts the NEED_HANDSHAKE limit. */
    e->peers[id].need_handshake_signalled = false;
}

/* ---- Peers and keypairs ------------------------------------------------------------------- */
static peer *peer_get(wg_engine *e, uint32_t peer_id) {
    if (peer_id >= e->cfg.max_peers || !e->peers[peer_id].active) return NULL;
    return &e->peers[peer_id];
}

static void need_handshake(wg_engine *e, uint32_t id, uint32_t reason, double now) {
    peer *p = &e->peers[id];
    if (p->need_handshake_signalled && now - p->need_handshake_at < REKEY_TIMEOUT) return;
    p->need_handshake_signalled = true;
    p->need_handshake_at = now;
    event_push(e, WG_EV_NEED_HANDSHAKE, (int32_t)id, reason);
}

static void keypair_destroy(wg_engine *e, keypair *kp, bool announce) {
    if (!kp) return;
    index_remove(&e->indices, kp->local_index);
    if (announce) event_push(e, WG_EV_KEYPAIR_FREED, (int32_t)kp->peer_id, kp->local_index);
    e->memzero(kp, sizeof *kp);
    free(kp);
}

static bool keypair_usable_for_send(const keypair *kp, double now) {
    return kp && now - kp->created < REJECT_AFTER_TIME && kp->send_counter < REJECT_AFTER_MESSAGES;
}

static void staged_clear(wg_engine *e, peer *p) {
    while (p->staged_count) {
        staged_packet *s = &p->staged[p->staged_head];
        free(s->data);
        s->data = NULL;
        p->staged_head = (p->staged_head + 1) % e->cfg.staged_per_peer;
        p->staged_count--;
    }
    p->staged_head = 0;
}

static void stage_packet(wg_engine *e, peer *p, const uint8_t *pkt, size_t len) {
    if (!p->staged) p->staged = calloc(e->cfg.staged_per_peer, sizeof *p->staged);
    if (!p->staged || p->staged_count == e->cfg.staged_per_peer) {
        count_drop(e, WG_DROP_STAGED_FULL);
        return;
    }
    uint8_t *copy = malloc(len ? len : 1);
    if (!copy) {
        count_drop(e, WG_DROP_STAGED_FULL);
        return;
    }
    memcpy(copy, pkt, len);
    staged_packet *s = &p->staged[(p->staged_head + p->staged_count) % e->cfg.staged_per_peer];
    s->data = copy;
    s->len = (uint16_t)len;
    p->staged_count++;
}

/* Encrypt one inner packet (len 0: keepalive) with kp and queue it for the peer's endpoint. */
static void peer_send_encrypted(wg_engine *e, uint32_t id, keypair *kp, const uint8_t *pkt,
                                size_t len, double now) {
    peer *p = &e->peers[id];
    if (!p->endpoint.family) {
        count_drop(e, WG_DROP_NO_ROUTE);
        return;
    }
    uint8_t *buf = output_reserve(e);
    if (!buf) return;
    /* Callers pass len <= mtu, so the padded length never drops below len. */
    size_t padded = (len + PADDING_MULTIPLE - 1) / PADDING_MULTIPLE * PADDING_MULTIPLE;
    if (padded > e->cfg.mtu) padded = e->cfg.mtu;
    uint64_t counter = kp->send_counter++;
    wr32le(buf, MSG_TRANSPORT);
    wr32le(buf + 4, kp->remote_index);
    wr64le(buf + 8, counter);
    uint8_t *body = buf + MSG_TRANSPORT_HEADER_SIZE;
    if (len) memcpy(body, pkt, len);
    memset(body + len, 0, padded - len);
    uint8_t nonce[12] = {0};
    wr64le(nonce + 4, counter);
    unsigned long long clen = 0;
    e->enc(body, &clen, body, padded, NULL, 0, NULL, nonce, kp->send_key);
    size_t total = MSG_TRANSPORT_HEADER_SIZE + (size_t)clen;
    output_commit(e, total, &p->endpoint);
    p->tx_bytes += total;
    p->tx_packets++;
    p->last_tx = now;

    timers_any_authenticated_packet_traversal(e, id, now);
    timers_any_authenticated_packet_sent(e, id);
    if (len) timers_data_sent(e, id, now);

    /* wireguard-go keepKeyFreshSending */
    if (counter > REKEY_AFTER_MESSAGES)
        need_handshake(e, id, WG_NEED_REKEY_MESSAGES, now);
    else if (kp->is_initiator && now - kp->created > REKEY_AFTER_TIME)
        need_handshake(e, id, WG_NEED_REKEY_TIME, now);
}

/* Send an inner packet to a peer, or stage it until a handshake gives us a usable keypair. */
static void peer_send_data(wg_engine *e, uint32_t id, const uint8_t *pkt, size_t len, double now) {
    peer *p = &e->peers[id];
    if (!keypair_usable_for_send(p->current, now)) {
        stage_packet(e, p, pkt, len);
        need_handshake(e, id, WG_NEED_NO_KEY, now);
        return;
    }
    peer_send_encrypted(e, id, p->current, pkt, len, now);
}

static void peer_send_keepalive(wg_engine *e, uint32_t id, double now) {
    peer *p = &e->peers[id];
    if (!keypair_usable_for_send(p->current, now)) {
        need_handshake(e, id, WG_NEED_NO_KEY, now);
        return;
    }
    peer_send_encrypted(e, id, p->current, NULL, 0, now);
}

static void peer_send_staged(wg_engine *e, uint32_t id, double now) {
    peer *p = &e->peers[id];
    while (p->staged_count && keypair_usable_for_send(p->current, now)) {
        staged_packet s = p->staged[p->staged_head];
        p->staged[p->staged_head].data = NULL;
        p->staged_head = (p->staged_head + 1) % e->cfg.staged_per_peer;
        p->staged_count--;
        peer_send_encrypted(e, id, p->current, s.data, s.len, now);
        free(s.data);
    }
}

static void peer_zero_keys(wg_engine *e, uint32_t id, bool announce) {
    peer *p = &e->peers[id];
    keypair_destroy(e, p->previous, announce);
    keypair_destroy(e, p->current, announce);
    keypair_destroy(e, p->next, announce);
    p->previous = p->current = p->next = NULL;
}

int wg_peer_add(wg_engine *e, uint32_t peer_id, uint16_t persistent_keepalive_s) {
    if (peer_id >= e->cfg.max_peers) return WG_EINVAL;
    peer *p = &e->peers[peer_id];
    if (p->active) return WG_EEXIST;
    bool in_list = p->in_timer_list; /* a removed peer may still sit in the timer list */
    memset(p, 0, sizeof *p);
    p->in_timer_list = in_list;
    p->active = true;
    p->persistent_keepalive = persistent_keepalive_s;
    return 0;
}

int wg_peer_remove(wg_engine *e, uint32_t peer_id) {
    peer *p = peer_get(e, peer_id);
    if (!p) return WG_ENOPEER;
    peer_zero_keys(e, peer_id, false);
    staged_clear(e, p);
    free(p->staged);
    p->staged = NULL;
    route_remove_peer(&e->routes, peer_id);
    tcp_remove_peer(e->tcp, peer_id, e->now); /* CLOSED (PEER_REMOVED) events, nothing sent */
    bool in_list = p->in_timer_list;
    memset(p, 0, sizeof *p);
    p->in_timer_list = in_list; /* wg_tick drops it from the list */
    return 0;
}

int wg_peer_add_allowed_ip(wg_engine *e, uint32_t peer_id, uint8_t family, const uint8_t *addr,
                           uint8_t prefix_len) {
    if (!peer_get(e, peer_id)) return WG_ENOPEER;
    if (!addr || (family != 4 && family != 6) || prefix_len > addr_len(family) * 8) return WG_EINVAL;
    return route_add(&e->routes, peer_id, family, addr, prefix_len);
}

int wg_peer_set_endpoint(wg_engine *e, uint32_t peer_id, const wg_endpoint *ep) {
    peer *p = peer_get(e, peer_id);
    if (!p) return WG_ENOPEER;
    if (!ep || (ep->family != 0 && ep->family != 4 && ep->family != 6)) return WG_EINVAL;
    endpoint_copy(&p->endpoint, ep);
    return 0;
}

int wg_peer_install_keypair(wg_engine *e, uint32_t peer_id, uint32_t local_index,
                            uint32_t remote_index, const uint8_t *send_key,
                            const uint8_t *recv_key, int is_initiator, double now) {
    peer *p = peer_get(e, peer_id);
    if (!p) return WG_ENOPEER;
    if (!send_key || !recv_key) return WG_EINVAL;
    if (index_lookup(&e->indices, local_index)) return WG_EINDEX;
    e->now = now;
    keypair *kp = calloc(1, sizeof *kp);
    if (!kp) return WG_ENOSPC;
    memcpy(kp->send_key, send_key, KEY_SIZE);
    memcpy(kp->recv_key, recv_key, KEY_SIZE);
    kp->local_index = local_index;
    kp->remote_index = remote_index;
    kp->created = now;
    kp->peer_id = peer_id;
    kp->is_initiator = is_initiator != 0;
    index_insert(&e->indices, kp);

    /* Slot rotation as wireguard-go BeginSymmetricSession. */
    if (kp->is_initiator) {
        if (p->next) {
            keypair_destroy(e, p->previous, true);
            p->previous = p->next;
            p->next = NULL;
            keypair_destroy(e, p->current, true);
        } else {
            keypair_destroy(e, p->previous, true);
            p->previous = p->current;
        }
        p->current = kp;
    } else {
        keypair_destroy(e, p->next, true);
        p->next = kp;
        keypair_destroy(e, p->previous, true);
        p->previous = NULL;
    }

    timers_session_derived(e, peer_id, now);
    timers_handshake_complete(e, peer_id);
    if (kp->is_initiator) {
        /* The responder needs a packet on this keypair to confirm it: staged data or a keepalive. */
        if (p->staged_count)
            peer_send_staged(e, peer_id, now);
        else
            peer_send_keepalive(e, peer_id, now);
    }
    return 0;
}

int wg_peer_drop_staged(wg_engine *e, uint32_t peer_id) {
    peer *p = peer_get(e, peer_id);
    if (!p) return WG_ENOPEER;
    staged_clear(e, p);
    return 0;
}

int wg_peer_get_stats(wg_engine *e, uint32_t peer_id, wg_peer_stats *out) {
    peer *p = peer_get(e, peer_id);
    if (!p) return WG_ENOPEER;
    memset(out, 0, sizeof *out);
    out->endpoint = p->endpoint;
    out->rx_bytes = p->rx_bytes;
    out->tx_bytes = p->tx_bytes;
    out->rx_packets = p->rx_packets;
    out->tx_packets = p->tx_packets;
    out->last_rx = p->last_rx;
    out->last_tx = p->last_tx;
    out->current_created = p->current ? p->current->created : 0;
    out->has_current = keypair_usable_for_send(p->current, e->now);
    out->staged = p->staged_count;
    return 0;
}

int wg_peers_get_stats(wg_engine *e, const uint32_t *peer_ids, int n, wg_peer_stats *out) {
    if (!peer_ids || !out || n < 0) return WG_EINVAL;
    int known = 0;
    for (int i = 0; i < n; i++) {
        if (wg_peer_get_stats(e, peer_ids[i], &out[i]) == 0) known++;
        else memset(&out[i], 0, sizeof out[i]);
    }
    return known;
}

void wg_all_drop_counts(wg_engine *e, uint64_t *out) {
    for (int i = 0; i < WG_DROP__COUNT; i++) out[i] = e->drops[i];
    for (int i = 0; i < TCP_DROP__COUNT; i++) out[WG_DROP__COUNT + i] = tcp_drop_count(e->tcp, i);
}

int wg_index_in_use(wg_engine *e, uint32_t local_index) {
    return index_lookup(&e->indices, local_index) != NULL;
}

/* ---- Inner packets: parse once into ip_repr, then dispatch per protocol -------------------- */
typedef struct {
    uint8_t version; /* 4 or 6 */
    uint8_t family;  /* route-table family, same as version */
    uint8_t proto;   /* IPv4 protocol / IPv6 next header */
    bool fragment;
    const uint8_t *src, *dst; /* 4 or 16 bytes inside the packet */
    const uint8_t *payload;
    size_t payload_len;
} ip_repr;

/* Validates the IP header of a plaintext; returns -1 on success or a WG_DROP_* reason. */
static int ip_parse(const uint8_t *pkt, size_t len, ip_repr *ip) {
    if (len < 1) return WG_DROP_BAD_IP;
    uint8_t version = pkt[0] >> 4;
    if (version == 4) {
        if (len < 20) return WG_DROP_BAD_IP;
        size_t ihl = (size_t)(pkt[0] & 0x0f) * 4;
        size_t total = rd16be(pkt + 2);
        if (ihl < 20 || total < ihl || total > len) return WG_DROP_BAD_IP;
        if (csum_finish(csum_add(0, pkt, ihl)) != 0) return WG_DROP_BAD_IP;
        uint16_t frag = rd16be(pkt + 6);
        ip->version = ip->family = 4;
        ip->proto = pkt[9];
        ip->fragment = (frag & 0x2000) || (frag & 0x1fff);
        ip->src = pkt + 12;
        ip->dst = pkt + 16;
        ip->payload = pkt + ihl;
        ip->payload_len = total - ihl; /* WireGuard's zero padding trimmed */
        return -1;
    }
    if (version == 6) {
        if (len < 40) return WG_DROP_BAD_IP;
        size_t payload_len = rd16be(pkt + 4);
        if (40 + payload_len > len) return WG_DROP_BAD_IP;
        ip->version = ip->family = 6;
        ip->proto = pkt[6];
        ip->fragment = false;
        ip->src = pkt + 8;
        ip->dst = pkt + 24;
        ip->payload = pkt + 40;
        ip->payload_len = payload_len;
        return -1;
    }
    return WG_DROP_BAD_IP;
}

/* ICMPv4: answer echo requests to the gateway's tunnel address. */
static void icmp4_handle(wg_engine *e, uint32_t id, const ip_repr *ip, double now) {
    if (rd32be(ip->dst) != e->cfg.tunnel_ip || ip->payload_len < 8 ||
        ip->payload[0] != ICMP_ECHO_REQUEST || ip->payload[1] != 0) {
        count_drop(e, WG_DROP_UNHANDLED);
        return;
    }
    if (csum_finish(csum_add(0, ip->payload, ip->payload_len)) != 0) {
        count_drop(e, WG_DROP_BAD_IP);
        return;
    }
    size_t total = 20 + ip->payload_len;
    if (total > e->cfg.mtu) {
        count_drop(e, WG_DROP_UNHANDLED);
        return;
    }
    uint8_t *reply = e->tx_scratch;
    memset(reply, 0, 20);
    reply[0] = 0x45;
    wr16be(reply + 2, (uint16_t)total);
    reply[8] = REPLY_TTL;
    reply[9] = IPPROTO_ICMP_V4;
    wr32be(reply + 12, e->cfg.tunnel_ip);
    memcpy(reply + 16, ip->src, 4);
    wr16be(reply + 10, csum_finish(csum_add(0, reply, 20)));
    uint8_t *icmp = reply + 20;
    memcpy(icmp, ip->payload, ip->payload_len); /* same id, sequence and data */
    icmp[0] = ICMP_ECHO_REPLY;
    icmp[2] = icmp[3] = 0;
    wr16be(icmp + 2, csum_finish(csum_add(0, icmp, ip->payload_len)));
    e->stats.icmp_echo_replies++;
    peer_send_data(e, id, reply, total, now);
}

/* Sum of the IPv4 pseudo-header (RFC 768 / RFC 9293 3.1). */
static uint32_t pseudo4_sum(const uint8_t *src, const uint8_t *dst, uint8_t proto, size_t len) {
    uint32_t sum = csum_add(csum_add(0, src, 4), dst, 4);
    return sum + proto + (uint32_t)len;
}

/* Sum of the IPv6 pseudo-header (RFC 8200 8.1). */
static uint32_t pseudo6_sum(const uint8_t *src, const uint8_t *dst, uint8_t proto, size_t len) {
    uint32_t sum = csum_add(csum_add(0, src, 16), dst, 16);
    return sum + (uint32_t)(len >> 16) + (uint32_t)(len & 0xffff) + proto;
}

/* A 20-byte IPv4 header with its checksum. */
static void ipv4_header_emit(wg_engine *e, uint8_t *p, uint32_t src, uint32_t dst, uint8_t proto,
                             size_t total) {
    memset(p, 0, 20);
    p[0] = 0x45;
    wr16be(p + 2, (uint16_t)total);
    wr16be(p + 4, e->ip_id++);
    p[8] = REPLY_TTL;
    p[9] = proto;
    wr32be(p + 12, src);
    wr32be(p + 16, dst);
    wr16be(p + 10, csum_finish(csum_add(0, p, 20)));
}

/* Multicast, limited broadcast or the tunnel subnet's broadcast: nothing here answers those. */
static bool ipv4_is_group(const wg_engine *e, uint32_t addr) {
    if ((addr >> 28) == 0xe || addr == 0xffffffffu) return true;
    uint8_t plen = e->cfg.tunnel_prefix_len;
    if (plen == 0 || plen >= 31) return false;
    uint32_t mask = ~0u << (32 - plen);
    return addr == ((e->cfg.tunnel_ip & mask) | ~mask);
}

/* Send an inner IPv4 packet the engine built to the peer owning dst (cryptokey routing). */
static bool route_send4(wg_engine *e, uint32_t dst, const uint8_t *pkt, size_t len, double now) {
    uint8_t addr[4];
    wr32be(addr, dst);
    int64_t id = route_lookup(&e->routes, 4, addr);
    if (id < 0) {
        count_drop(e, WG_DROP_NO_ROUTE);
        return false;
    }
    peer_send_data(e, (uint32_t)id, pkt, len, now);
    return true;
}

/* UDP over IPv4: validate, then queue for wg_udp_drain. */
static void udp4_handle(wg_engine *e, uint32_t id, const ip_repr *ip) {
    const uint8_t *udp = ip->payload;
    if (ip->payload_len < 8) {
        count_drop(e, WG_DROP_BAD_IP);
        return;
    }
    size_t udp_len = rd16be(udp + 4);
    if (udp_len < 8 || udp_len > ip->payload_len || rd16be(udp + 2) == 0) {
        count_drop(e, WG_DROP_BAD_IP);
        return;
    }
    if (rd16be(udp + 6) != 0 && /* zero: no checksum (RFC 768) */
        csum_finish(csum_add(pseudo4_sum(ip->src, ip->dst, IPPROTO_UDP, udp_len), udp, udp_len))) {
        count_drop(e, WG_DROP_BAD_IP);
        return;
    }
    uint32_t dst = rd32be(ip->dst);
    if (ipv4_is_group(e, dst)) { /* mDNS, SSDP, broadcasts: no flow to relay */
        count_drop(e, WG_DROP_UNHANDLED);
        return;
    }
    uint32_t payload_len = (uint32_t)(udp_len - 8);
    if (e->udp_count == WG_UDP_QUEUE_MAX || payload_len > WG_UDP_ARENA_SIZE - e->udp_arena_used) {
        count_drop(e, WG_DROP_UDP_OVERFLOW);
        return;
    }
    wg_udp_meta *m = &e->udp_meta[e->udp_count++];
    m->peer_id = (int32_t)id;
    m->src_ip = rd32be(ip->src);
    m->dst_ip = dst;
    m->src_port = rd16be(udp);
    m->dst_port = rd16be(udp + 2);
    m->offset = e->udp_arena_used;
    m->len = payload_len;
    memcpy(e->udp_arena + e->udp_arena_used, udp + 8, payload_len);
    e->udp_arena_used += payload_len;
    if (e->udp_arena_used > e->udp_arena_high) e->udp_arena_high = e->udp_arena_used;
    e->stats.udp_rx++;
}

/* IPv6 inside the tunnel, until the stack speaks it: a TCP SYN gets an RST+ACK and a UDP
 * datagram an ICMPv6 port unreachable, so a dual-stack client falls back to IPv4 at once
 * instead of waiting for its own timeouts. */
static void ipv6_refuse(wg_engine *e, uint32_t id, const uint8_t *pkt, const ip_repr *ip,
                        double now) {
    if (ip->dst[0] == 0xff) { /* never answer multicast (RFC 4443 2.4 e) */
        count_drop(e, WG_DROP_UNHANDLED);
        return;
    }
    const uint8_t *l4 = ip->payload;
    size_t l4_len = ip->payload_len;
    uint8_t *out = e->tx_scratch;
    size_t total;
    if (ip->proto == IPPROTO_TCP) {
        size_t thl = l4_len >= 20 ? (size_t)(l4[12] >> 4) * 4 : 0;
        if (thl < 20 || thl > l4_len ||
            csum_finish(csum_add(pseudo6_sum(ip->src, ip->dst, IPPROTO_TCP, l4_len), l4, l4_len))) {
            count_drop(e, WG_DROP_BAD_IP);
            return;
        }
        uint8_t flags = l4[13];
        if ((flags & (TCP_FLAG_SYN | TCP_FLAG_ACK | TCP_FLAG_RST)) != TCP_FLAG_SYN) {
            count_drop(e, WG_DROP_UNHANDLED);
            return;
        }
        /* RFC 9293 3.10.7.1: <SEQ=0><ACK=SEG.SEQ+SEG.LEN><CTL=RST,ACK> */
        uint32_t seg_len = (uint32_t)(l4_len - thl) + 1 + (flags & TCP_FLAG_FIN ? 1 : 0);
        total = 40 + 20;
        uint8_t *tcp = out + 40;
        memset(tcp, 0, 20);
        memcpy(tcp, l4 + 2, 2); /* source port = their destination port */
        memcpy(tcp + 2, l4, 2);
        wr32be(tcp + 8, rd32be(l4 + 4) + seg_len);
        tcp[12] = 5 << 4;
        tcp[13] = TCP_FLAG_RST | TCP_FLAG_ACK;
        wr16be(tcp + 16, csum_finish(csum_add(pseudo6_sum(ip->dst, ip->src, IPPROTO_TCP, 20), tcp, 20)));
        out[6] = IPPROTO_TCP;
    } else if (ip->proto == IPPROTO_UDP) {
        size_t udp_len = l4_len >= 8 ? rd16be(l4 + 4) : 0;
        /* IPv6 UDP must carry a checksum (RFC 8200 8.1): zero is invalid too. */
        if (udp_len < 8 || udp_len > l4_len || rd16be(l4 + 6) == 0 ||
            csum_finish(csum_add(pseudo6_sum(ip->src, ip->dst, IPPROTO_UDP, udp_len), l4, udp_len))) {
            count_drop(e, WG_DROP_BAD_IP);
            return;
        }
        size_t quote = 40 + l4_len, room = (e->cfg.mtu < IPV6_MIN_MTU ? e->cfg.mtu : IPV6_MIN_MTU) - 48;
        if (quote > room) quote = room;
        total = 48 + quote;
        uint8_t *icmp = out + 40;
        icmp[0] = ICMPV6_DEST_UNREACHABLE;
        icmp[1] = ICMPV6_PORT_UNREACHABLE;
        memset(icmp + 2, 0, 6);
        memcpy(icmp + 8, pkt, quote);
        wr16be(icmp + 2, csum_finish(csum_add(pseudo6_sum(ip->dst, ip->src, IPPROTO_ICMPV6, 8 + quote),
                                              icmp, 8 + quote)));
        out[6] = IPPROTO_ICMPV6;
    } else {
        count_drop(e, WG_DROP_UNHANDLED);
        return;
    }
    out[0] = 6 << 4;
    out[1] = out[2] = out[3] = 0;
    wr16be(out + 4, (uint16_t)(total - 40));
    out[7] = REPLY_TTL;
    memcpy(out + 8, ip->dst, 16); /* as if from the destination they tried */
    memcpy(out + 24, ip->src, 16);
    e->stats.ipv6_refused++;
    peer_send_data(e, id, out, total, now);
}

/* An authenticated inner packet from peer id.  Protocol handlers hang off the switch. */
static void inner_dispatch(wg_engine *e, uint32_t id, const uint8_t *pkt, size_t len, double now) {
    ip_repr ip;
    int reason = ip_parse(pkt, len, &ip);
    if (reason >= 0) {
        count_drop(e, reason);
        return;
    }
    /* Cryptokey routing: the source must route back to this very peer. */
    if (route_lookup(&e->routes, ip.family, ip.src) != (int64_t)id) {
        count_drop(e, WG_DROP_SPOOFED_SRC);
        return;
    }
    if (ip.fragment) {
        count_drop(e, WG_DROP_FRAGMENT);
        return;
    }
    if (ip.version == 6) {
        ipv6_refuse(e, id, pkt, &ip, now);
        return;
    }
    switch (ip.proto) {
    case IPPROTO_ICMP_V4: icmp4_handle(e, id, &ip, now); return;
    case IPPROTO_TCP:
        /* the IPv4 total length, without WireGuard's padding; tcp_input counts its own drops */
        tcp_input(e->tcp, id, pkt, (size_t)(ip.payload - pkt) + ip.payload_len, now);
        return;
    case IPPROTO_UDP: udp4_handle(e, id, &ip); return;
    default: count_drop(e, WG_DROP_UNHANDLED); return;
    }
}

/* ---- TCP glue: the stack's callbacks and its event queue ------------------------------------ */
static void tcp_emit_cb(void *ctx, uint32_t peer_id, const uint8_t *pkt, size_t len, double now) {
    wg_engine *e = ctx;
    if (!peer_get(e, peer_id)) { /* tcp_remove_peer runs with wg_peer_remove: cannot happen */
        count_drop(e, WG_DROP_NO_ROUTE);
        return;
    }
    peer_send_data(e, peer_id, pkt, len, now);
}

/* ---- Fast relay: SYNs to approved destinations spliced without the owner ------------------ */
static uint32_t fast_relay_slot(uint32_t ip, uint16_t port) {
    uint32_t h = (ip ^ ((uint32_t)port * 0x9e3779b1u)) * 0x85ebca6bu;
    return (h ^ (h >> 15)) & (WG_FAST_RELAY_SLOTS - 1);
}

int wg_fast_relay_allow(wg_engine *e, uint32_t ip, uint16_t port, double expires,
                        double connect_timeout) {
    if (ip == 0 || port == 0 || !(connect_timeout >= 0)) return WG_EINVAL;
    if (!e->fast_relay) {
        e->fast_relay = calloc(WG_FAST_RELAY_SLOTS, sizeof *e->fast_relay);
        if (!e->fast_relay) return WG_ENOMEM;
    }
    e->fast_relay[fast_relay_slot(ip, port)] =
        (fast_relay_entry){.ip = ip, .port = port, .used = true, .expires = expires};
    e->fast_connect_timeout = connect_timeout;
    return 0;
}

void wg_fast_relay_clear(wg_engine *e) {
    if (e->fast_relay) memset(e->fast_relay, 0, WG_FAST_RELAY_SLOTS * sizeof *e->fast_relay);
}

static bool fast_relay_approved(wg_engine *e, uint32_t ip, uint16_t port) {
    const fast_relay_entry *f = &e->fast_relay[fast_relay_slot(ip, port)];
    return f->used && f->ip == ip && f->port == port && (f->expires == 0 || e->now < f->expires);
}

static bool fast_report_room(wg_engine *e) {
    if (e->fast_count < e->fast_cap) return true;
    if (e->fast_cap >= WG_FAST_RELAY_QUEUE_MAX) return false;
    uint32_t cap = e->fast_cap ? e->fast_cap * 2 : 64;
    wg_fast_open *grown = malloc(cap * sizeof *grown);
    if (!grown) return false;
    for (uint32_t i = 0; i < e->fast_count; i++)
        grown[i] = e->fast_opened[(e->fast_head + i) % e->fast_cap];
    free(e->fast_opened);
    e->fast_opened = grown;
    e->fast_cap = cap;
    e->fast_head = 0;
    return true;
}

/* A new connection's SYN: splice it here if its destination is approved.  Runs inside the TCP
 * stack's input (the SYN event is the last thing it raises), which splice_connect allows: it
 * only reads the connection and opens a socket; the SYN is answered later, by splice_run. */
static bool fast_relay_take(wg_engine *e, uint32_t conn_id) {
    tcp_conn_info info;
    if (tcp_get_info(e->tcp, conn_id, &info) != 0) return false;
    if (!fast_relay_approved(e, info.dst_ip, info.dst_port) || !fast_report_room(e)) return false;
    if (splice_connect(e->splice, conn_id, info.dst_ip, info.dst_port,
                       e->now + e->fast_connect_timeout, e->now) != 0)
        return false; /* the owner decides, and answers, as for any SYN */
    e->fast_opened[(e->fast_head + e->fast_count) % e->fast_cap] = (wg_fast_open){
        .conn_id = conn_id,
        .peer_id = info.peer_id,
        .src_ip = info.src_ip,
        .dst_ip = info.dst_ip,
        .src_port = info.src_port,
        .dst_port = info.dst_port,
        .opened_at = e->now,
    };
    e->fast_count++;
    e->stats.fast_relayed++;
    return true;
}

int wg_fast_relay_opened(wg_engine *e, wg_fast_open *out, int max) {
    if (!out || max < 0) return WG_EINVAL;
    int n = 0;
    while (n < max && e->fast_count) {
        out[n++] = e->fast_opened[e->fast_head];
        e->fast_head = (e->fast_head + 1) % e->fast_cap;
        e->fast_count--;
    }
    return n;
}

uint32_t wg_reports_waiting(wg_engine *e) {
    return e->fast_count + splice_results_waiting(e->splice);
}

static void tcp_event_cb(void *ctx, const tcp_event *ev) {
    wg_engine *e = ctx;
    if (e->splice && splice_claim_event(e->splice, ev)) return; /* handled in C */
    if (ev->type == TCP_EV_SYN && e->fast_relay && e->splice && fast_relay_take(e, ev->conn_id))
        return;
    uint32_t slot = (ev->conn_id & TCP_CONN_SLOT_MASK) - 1;
    if (slot >= e->tcp_slots || ev->type < TCP_EV_SYN || ev->type > TCP_EV_CLOSED) return;
    tcp_pending *p = &e->tcp_pending[slot];
    if (p->conn_id != ev->conn_id) { /* the slot's previous handle was released: forget it */
        p->conn_id = ev->conn_id;
        p->bits = 0;
    }
    p->bits |= (uint8_t)(1u << ev->type);
    if (ev->type == TCP_EV_CLOSED) p->close_arg = ev->arg;
    if (!p->queued) {
        p->queued = true;
        e->tcp_ready[(e->tcp_ready_head + e->tcp_ready_count) % e->tcp_slots] = slot;
        e->tcp_ready_count++;
    }
}

tcp_stack *wg_engine_tcp(wg_engine *e) { return e->tcp; }

splice_table *wg_engine_splice(wg_engine *e) { return e->splice; }

int wg_splice_service(wg_engine *e, double now) {
    if (!e->splice) return 0;
    e->now = now;
    int waiting = splice_poll(e->splice, now);
    tcp_flush(e->tcp, now);
    if (e->io_fd >= 0) wg_io_flush(e);
    return waiting;
}

int wg_tcp_events(wg_engine *e, tcp_event *out, int max) {
    if (!out || max < 0) return WG_EINVAL;
    int n = 0;
    tcp_conn_info info;
    while (n < max && e->tcp_ready_count) {
        uint32_t slot = e->tcp_ready[e->tcp_ready_head];
        tcp_pending *p = &e->tcp_pending[slot];
        if (p->bits && tcp_get_info(e->tcp, p->conn_id, &info) != 0) p->bits = 0; /* released */
        for (uint32_t type = TCP_EV_SYN; type <= TCP_EV_CLOSED && p->bits && n < max; type++) {
            if (!(p->bits & (1u << type))) continue;
            p->bits &= (uint8_t)~(1u << type);
            out[n++] = (tcp_event){type, p->conn_id, type == TCP_EV_CLOSED ? p->close_arg : 0};
        }
        if (p->bits) break; /* out is full: the rest of this slot comes next time */
        p->queued = false;
        e->tcp_ready_head = (e->tcp_ready_head + 1) % e->tcp_slots;
        e->tcp_ready_count--;
    }
    return n;
}

/* ---- UDP and ICMP errors out, the UDP queue --------------------------------------------------- */
int wg_udp_drain(wg_engine *e, wg_udp_meta *out, int max, const uint8_t **arena) {
    if (!out || !arena || max < 0) return WG_EINVAL;
    int n = (int)e->udp_count < max ? (int)e->udp_count : max;
    memcpy(out, e->udp_meta, (size_t)n * sizeof *out);
    *arena = e->udp_arena;
    e->udp_count = 0;
    e->udp_arena_used = 0;
    return n;
}

int wg_udp_send(wg_engine *e, uint32_t src_ip, uint16_t src_port, uint32_t dst_ip,
                uint16_t dst_port, const uint8_t *data, size_t len, double now) {
    if (!data && len) return WG_EINVAL;
    if (len > (size_t)e->cfg.mtu - 28) return WG_EMSGSIZE;
    e->now = now;
    size_t total = 28 + len;
    uint8_t *pkt = e->tx_scratch;
    ipv4_header_emit(e, pkt, src_ip, dst_ip, IPPROTO_UDP, total);
    uint8_t *udp = pkt + 20;
    wr16be(udp, src_port);
    wr16be(udp + 2, dst_port);
    wr16be(udp + 4, (uint16_t)(8 + len));
    wr16be(udp + 6, 0);
    if (len) memcpy(udp + 8, data, len);
    uint16_t sum = csum_finish(csum_add(pseudo4_sum(pkt + 12, pkt + 16, IPPROTO_UDP, 8 + len), udp, 8 + len));
    wr16be(udp + 6, sum ? sum : 0xffff); /* a computed zero is sent as all ones (RFC 768) */
    if (route_send4(e, dst_ip, pkt, total, now)) e->stats.udp_tx++;
    return 0;
}

int wg_icmp_unreachable(wg_engine *e, uint32_t peer_ip, uint16_t peer_port, uint32_t dst_ip,
                        uint16_t dst_port, uint8_t proto, uint8_t code, double now) {
    if (code > 15) return WG_EINVAL;
    e->now = now;
    size_t total = 20 + 8 + 28;
    uint8_t *pkt = e->tx_scratch;
    ipv4_header_emit(e, pkt, dst_ip, peer_ip, IPPROTO_ICMP_V4, total);
    uint8_t *icmp = pkt + 20;
    memset(icmp, 0, 8);
    icmp[0] = ICMP_DEST_UNREACHABLE;
    icmp[1] = code;
    /* The datagram that "failed": the client's own packet as it would have looked. */
    uint8_t *orig = icmp + 8;
    size_t l4_len = proto == IPPROTO_TCP ? 20 : 8;
    memset(orig, 0, 28);
    orig[0] = 0x45;
    wr16be(orig + 2, (uint16_t)(20 + l4_len));
    wr16be(orig + 6, 0x4000);
    orig[8] = REPLY_TTL;
    orig[9] = proto;
    wr32be(orig + 12, peer_ip);
    wr32be(orig + 16, dst_ip);
    wr16be(orig + 10, csum_finish(csum_add(0, orig, 20)));
    wr16be(orig + 20, peer_port);
    wr16be(orig + 22, dst_port);
    if (proto == IPPROTO_UDP) wr16be(orig + 24, 8); /* length; checksum 0 = none */
    wr16be(icmp + 2, csum_finish(csum_add(0, icmp, 8 + 28)));
    if (route_send4(e, peer_ip, pkt, total, now)) e->stats.icmp_unreachables++;
    return 0;
}

/* ---- Receive ------------------------------------------------------------------------------ */
static void keypair_confirmed(wg_engine *e, uint32_t id, double now) {
    /* wireguard-go ReceivedWithKeypair: next -> current -> previous, old previous freed. */
    peer *p = &e->peers[id];
    keypair_destroy(e, p->previous, true);
    p->previous = p->current;
    p->current = p->next;
    p->next = NULL;
    event_push(e, WG_EV_KEYPAIR_CONFIRMED, (int32_t)id, p->current->local_index);
    timers_handshake_complete(e, id);
    peer_send_staged(e, id, now);
}

static void transport_input(wg_engine *e, const uint8_t *data, size_t len, const wg_endpoint *src,
                            double now) {
    if (len < MSG_KEEPALIVE_SIZE) {
        count_drop(e, WG_DROP_TRUNCATED);
        return;
    }
    size_t clen = len - MSG_TRANSPORT_HEADER_SIZE;
    if (clen - AEAD_TAG_SIZE > e->plain_cap) {
        count_drop(e, WG_DROP_BAD_SIZE);
        return;
    }
    keypair *kp = index_lookup(&e->indices, rd32le(data + 4));
    if (!kp) {
        count_drop(e, WG_DROP_UNKNOWN_INDEX);
        return;
    }
    uint64_t counter = rd64le(data + 8);
    if (now - kp->created >= REJECT_AFTER_TIME || counter >= REJECT_AFTER_MESSAGES) {
        count_drop(e, WG_DROP_KEY_EXPIRED);
        return;
    }
    if (!replay_check(&kp->replay, counter)) {
        count_drop(e, WG_DROP_REPLAY);
        return;
    }
    uint8_t nonce[12] = {0};
    wr64le(nonce + 4, counter);
    unsigned long long plain_len = 0;
    SCRATCH_UNPOISON(e->plain, e->plain_cap);
    if (e->dec(e->plain, &plain_len, NULL, data + MSG_TRANSPORT_HEADER_SIZE, clen, NULL, 0, nonce,
               kp->recv_key) != 0) {
        count_drop(e, WG_DROP_DECRYPT);
        return;
    }
    if (!replay_update(&kp->replay, counter)) {
        count_drop(e, WG_DROP_REPLAY);
        return;
    }

    /* Authenticated from here on. */
    uint32_t id = kp->peer_id;
    peer *p = &e->peers[id];
    if (!endpoint_equal(&p->endpoint, src)) {
        endpoint_copy(&p->endpoint, src);
        wg_event *ev = event_push(e, WG_EV_ENDPOINT_CHANGED, (int32_t)id, 0);
        if (ev) ev->src = p->endpoint;
    }
    p->rx_bytes += len;
    p->rx_packets++;
    p->last_rx = now;
    if (kp == p->next) keypair_confirmed(e, id, now);
    /* wireguard-go keepKeyFreshReceiving */
    if (kp->is_initiator && !kp->recv_old_signalled && now - kp->created > RECV_OLD_KEYPAIR_AGE) {
        kp->recv_old_signalled = true;
        need_handshake(e, id, WG_NEED_RECV_OLD, now);
    }
    timers_any_authenticated_packet_traversal(e, id, now);
    timers_any_authenticated_packet_received(e, id);
    if (plain_len == 0) return; /* keepalive */
    timers_data_received(e, id, now);
    SCRATCH_POISON(e->plain + plain_len, e->plain_cap - (size_t)plain_len);
    inner_dispatch(e, id, e->plain, (size_t)plain_len, now);
}

int wg_input(wg_engine *e, const uint8_t *data, size_t len, const wg_endpoint *src, double now) {
    e->now = now;
    e->stats.rx_datagrams++;
    e->stats.rx_bytes += len;
    if (!data || !src || len < 4) {
        count_drop(e, WG_DROP_TRUNCATED);
        return 0;
    }
    if (data[1] || data[2] || data[3]) {
        count_drop(e, WG_DROP_BAD_TYPE);
        return 0;
    }
    size_t want;
    switch (data[0]) {
    case MSG_TRANSPORT:
        transport_input(e, data, len, src, now);
        return 0;
    case MSG_INITIATION: want = MSG_INITIATION_SIZE; break;
    case MSG_RESPONSE: want = MSG_RESPONSE_SIZE; break;
    case MSG_COOKIE_REPLY: want = MSG_COOKIE_REPLY_SIZE; break;
    default: count_drop(e, WG_DROP_BAD_TYPE); return 0;
    }
    if (len != want) {
        count_drop(e, WG_DROP_BAD_SIZE);
        return 0;
    }
    wg_event *ev = event_push(e, WG_EV_HANDSHAKE_PACKET, -1, 0);
    if (ev) {
        endpoint_copy(&ev->src, src);
        ev->len = (uint32_t)len;
        memcpy(ev->data, data, len);
    }
    return 0;
}

/* ---- Send --------------------------------------------------------------------------------- */
int wg_send_raw(wg_engine *e, const uint8_t *data, size_t len, const wg_endpoint *dst) {
    if (!data || !dst || len == 0 || len > e->out_slot_size || (dst->family != 4 && dst->family != 6))
        return WG_EINVAL;
    uint8_t *buf = output_reserve(e);
    if (!buf) return 0;
    memcpy(buf, data, len);
    output_commit(e, len, dst);
    return 0;
}

int wg_send_inner(wg_engine *e, const uint8_t *packet, size_t len, double now) {
    if (!packet || len == 0 || len > e->cfg.mtu) return WG_EINVAL;
    e->now = now;
    const uint8_t *dst;
    uint8_t family;
    if (packet[0] >> 4 == 4 && len >= 20) {
        family = 4;
        dst = packet + 16;
    } else if (packet[0] >> 4 == 6 && len >= 40) {
        family = 6;
        dst = packet + 24;
    } else {
        return WG_EINVAL;
    }
    int64_t id = route_lookup(&e->routes, family, dst);
    if (id < 0) {
        count_drop(e, WG_DROP_NO_ROUTE);
        return 0;
    }
    peer_send_data(e, (uint32_t)id, packet, len, now);
    return 0;
}

/* ---- Timers: run what is due ------------------------------------------------------------- */
static bool timer_due(double *timer, double now) {
    if (*timer == 0 || *timer > now) return false;
    *timer = 0;
    return true;
}

static void expired_zero_keys(wg_engine *e, uint32_t id) {
    peer *p = &e->peers[id];
    peer_zero_keys(e, id, true);
    staged_clear(e, p);
    timer_disarm(&p->t_send_keepalive);
    timer_disarm(&p->t_new_handshake);
    event_push(e, WG_EV_KEYS_EXPIRED, (int32_t)id, 0);
}

static void peer_run_timers(wg_engine *e, uint32_t id, double now) {
    peer *p = &e->peers[id];
    if (timer_due(&p->t_zero_keys, now)) expired_zero_keys(e, id);
    if (timer_due(&p->t_new_handshake, now)) need_handshake(e, id, WG_NEED_NO_RESPONSE, now);
    if (timer_due(&p->t_send_keepalive, now)) {
        peer_send_keepalive(e, id, now);
        if (p->need_another_keepalive) {
            p->need_another_keepalive = false;
            timer_arm(e, id, &p->t_send_keepalive, now + KEEPALIVE_TIMEOUT);
        }
    }
    if (timer_due(&p->t_persistent_keepalive, now) && p->persistent_keepalive)
        peer_send_keepalive(e, id, now);
}

static double peer_earliest_timer(const peer *p) {
    const double timers[] = {p->t_send_keepalive, p->t_new_handshake, p->t_persistent_keepalive,
                             p->t_zero_keys};
    double earliest = 0;
    for (size_t i = 0; i < sizeof timers / sizeof timers[0]; i++)
        if (timers[i] != 0 && (earliest == 0 || timers[i] < earliest)) earliest = timers[i];
    return earliest;
}

void wg_tick(wg_engine *e, double now) {
    e->now = now;
    tcp_tick(e->tcp, now); /* first: what it sends arms the peers' timers below */
    splice_run(e->splice, now); /* connect deadlines, and what the TCP timers raised */
    if (e->next_deadline == 0 || now < e->next_deadline) return;
    /* Timers fired below may re-arm: recompute the cache from scratch after the pass. */
    e->next_deadline = 0;
    for (uint32_t i = 0; i < e->timer_list_len;) {
        uint32_t id = e->timer_list[i];
        peer *p = &e->peers[id];
        if (p->active) peer_run_timers(e, id, now);
        double earliest = p->active ? peer_earliest_timer(p) : 0;
        if (earliest == 0) {
            p->in_timer_list = false;
            e->timer_list[i] = e->timer_list[--e->timer_list_len];
            continue;
        }
        if (e->next_deadline == 0 || earliest < e->next_deadline) e->next_deadline = earliest;
        i++;
    }
}

double wg_next_deadline(wg_engine *e) {
    double earliest = e->next_deadline;
    double others[2] = {tcp_next_deadline(e->tcp), splice_next_deadline(e->splice)};
    for (int i = 0; i < 2; i++)
        if (others[i] != 0 && (earliest == 0 || others[i] < earliest)) earliest = others[i];
    return earliest;
}

void wg_trim_memory(void) {
#ifdef __GLIBC__
    malloc_trim(0);
#endif
}

void wg_tune_allocator(void) {
#ifdef __GLIBC__
    /* A relayed connection allocates and frees 256 KiB rings.  glibc's defaults serve those
     * from mmap or shrink the heap top on free, which at thousands of connections a second
     * cost ~8 % of the gateway's CPU in brk, munmap and page faults.  Keep rings on the heap
     * and leave the trimming to wg_trim_memory, which the gateway calls every few seconds. */
    mallopt(M_MMAP_THRESHOLD, 4 << 20);
    mallopt(M_TRIM_THRESHOLD, 64 << 20);
#endif
}

int wg_owner_work(wg_engine *e) {
    return e->ev_count || e->tcp_ready_count || e->udp_count;
}

int wg_io_fd(wg_engine *e) { return e->io_fd; }

void wg_timers_due(wg_engine *e, double now) {
    double due = wg_next_deadline(e);
    if (due == 0 || now < due) return;
    wg_tick(e, now);
    tcp_flush(e->tcp, now);
    if (e->io_fd >= 0) wg_io_flush(e);
}

void wg_collect(wg_engine *e, double now, wg_pending *out) {
    e->now = now;
    splice_run(e->splice, now);
    out->events = e->ev_count;
    out->tcp_events = e->tcp_ready_count;
    out->udp_datagrams = e->udp_count;
    out->splice_results = splice_results_waiting(e->splice);
    out->fast_opened = e->fast_count;
    out->outputs = e->out_count;
    out->next_deadline = wg_next_deadline(e);
}

/* ---- Lifecycle ---------------------------------------------------------------------------- */
static uint32_t pow2_at_least(uint32_t n) {
    uint32_t v = 16;
    while (v < n) v <<= 1;
    return v;
}

wg_engine *wg_engine_new(const wg_config *cfg, wg_aead_encrypt_fn enc, wg_aead_decrypt_fn dec,
                         wg_memzero_fn memzero) {
    if (!cfg || !enc || !dec || !memzero) return NULL;
    if (cfg->max_peers == 0 || cfg->max_peers > MAX_PEERS_LIMIT || cfg->mtu < MIN_MTU ||
        cfg->staged_per_peer == 0 || cfg->staged_per_peer > 65536 || cfg->tunnel_prefix_len > 32)
        return NULL;
    wg_engine *e = calloc(1, sizeof *e);
    if (!e) return NULL;
    e->cfg = *cfg;
    e->enc = enc;
    e->dec = dec;
    e->memzero = memzero;
    e->io_fd = -1;
    e->peers = calloc(cfg->max_peers, sizeof *e->peers);
    e->timer_list = calloc(cfg->max_peers, sizeof *e->timer_list);
    e->indices.mask = pow2_at_least(cfg->max_peers * 6) - 1;
    e->indices.slots = calloc((size_t)e->indices.mask + 1, sizeof *e->indices.slots);
    e->routes.hosts_mask = pow2_at_least(64) - 1;
    e->routes.hosts = calloc((size_t)e->routes.hosts_mask + 1, sizeof *e->routes.hosts);
    /* A slot holds a transport message of a full-MTU packet, or a raw handshake message. */
    e->out_slot_size = MSG_TRANSPORT_HEADER_SIZE + cfg->mtu + AEAD_TAG_SIZE;
    e->out_bufs = malloc(OUTPUT_RING_SIZE * e->out_slot_size);
    e->out_meta = calloc(OUTPUT_RING_SIZE, sizeof *e->out_meta);
    e->events = calloc(EVENT_RING_SIZE, sizeof *e->events);
    e->plain_cap = 65536;
    e->plain = malloc(e->plain_cap);
    e->tx_scratch = malloc(cfg->mtu);
    e->udp_meta = malloc(WG_UDP_QUEUE_MAX * sizeof *e->udp_meta);
    e->udp_arena = malloc(WG_UDP_ARENA_SIZE);
    if (!e->tx_scratch || !e->peers || !e->timer_list || !e->indices.slots || !e->routes.hosts || !e->out_bufs ||
        !e->out_meta || !e->events || !e->plain || !e->udp_meta || !e->udp_arena) {
        wg_engine_free(e);
        return NULL;
    }

    wg_config *c = &e->cfg;
    if (!c->tcp_rcvbuf) c->tcp_rcvbuf = TCP_DEFAULT_BUF;
    if (!c->tcp_sndbuf) c->tcp_sndbuf = TCP_DEFAULT_BUF;
    if (!c->tcp_max_conns) c->tcp_max_conns = TCP_DEFAULT_MAX_CONNS;
    if (!c->tcp_max_conns_per_peer) c->tcp_max_conns_per_peer = TCP_DEFAULT_MAX_CONNS_PER_PEER;
    if (!c->tcp_max_half_open_per_peer) c->tcp_max_half_open_per_peer = TCP_DEFAULT_MAX_HALF_OPEN_PER_PEER;
    tcp_config tcp_cfg = {
        .rcvbuf = c->tcp_rcvbuf,
        .sndbuf = c->tcp_sndbuf,
        .mtu = c->mtu,
        .max_conns = c->tcp_max_conns,
        .max_conns_per_peer = c->tcp_max_conns_per_peer,
        .max_half_open_per_peer = c->tcp_max_half_open_per_peer,
        .iss_seed = c->tcp_iss_seed,
    };
    tcp_callbacks tcp_cb = {.ctx = e, .emit = tcp_emit_cb, .event = tcp_event_cb};
    e->tcp = tcp_stack_new(&tcp_cfg, &tcp_cb); /* NULL on a bad TCP config */
    e->tcp_slots = c->tcp_max_conns;
    e->tcp_pending = e->tcp ? calloc(e->tcp_slots, sizeof *e->tcp_pending) : NULL;
    e->tcp_ready = e->tcp ? calloc(e->tcp_slots, sizeof *e->tcp_ready) : NULL;
    if (!e->tcp || !e->tcp_pending || !e->tcp_ready) {
        wg_engine_free(e);
        return NULL;
    }
    e->splice = splice_table_new(e->tcp, e->tcp_slots);
    return e;
}

void wg_engine_free(wg_engine *e) {
    if (!e) return;
    splice_table_free(e->splice, e->now); /* first: it resets connections through the stack */
    if (e->peers) {
        for (uint32_t id = 0; id < e->cfg.max_peers; id++) {
            if (!e->peers[id].active) continue;
            peer_zero_keys(e, id, false);
            staged_clear(e, &e->peers[id]);
            free(e->peers[id].staged);
        }
    }
    tcp_stack_free(e->tcp); /* calls no callback */
    if (e->plain) {
        SCRATCH_UNPOISON(e->plain, e->plain_cap);
        e->memzero(e->plain, e->plain_cap); /* last decrypted plaintext */
    }
    if (e->udp_arena) e->memzero(e->udp_arena, e->udp_arena_high); /* decrypted payloads too */
    free(e->peers);
    free(e->timer_list);
    free(e->indices.slots);
    free(e->routes.hosts);
    free(e->routes.prefixes);
    free(e->out_bufs);
    free(e->out_meta);
    free(e->events);
    free(e->plain);
    free(e->tx_scratch);
    free(e->io_rx_bufs);
    free(e->tcp_pending);
    free(e->tcp_ready);
    free(e->fast_relay);
    free(e->fast_opened);
    free(e->udp_meta);
    free(e->udp_arena);
    free(e);
}

/* ---- Counters ----------------------------------------------------------------------------- */
uint64_t wg_drop_count(wg_engine *e, int reason) {
    if (reason < 0 || reason >= WG_DROP__COUNT) return 0;
    return e->drops[reason];
}

const char *wg_drop_reason_name(int reason) {
    if (reason < 0 || reason >= WG_DROP__COUNT) return NULL;
    return drop_reason_names[reason];
}

void wg_engine_get_stats(wg_engine *e, wg_engine_stats *out) { *out = e->stats; }

/* ---- IO helper ---------------------------------------------------------------------------- */
int wg_io_attach(wg_engine *e, int fd, int family) {
    if (fd < 0) {
        e->io_fd = -1;
        return 0;
    }
    if (family != 4 && family != 6) return WG_EINVAL;
    if (!e->io_rx_bufs) {
        e->io_rx_bufs = malloc((size_t)IO_BATCH * IO_RX_BUF_SIZE);
        if (!e->io_rx_bufs) return WG_ENOSPC;
    }
    e->io_fd = fd;
    e->io_family = family;
    return 0;
}

static bool sockaddr_to_endpoint(const struct sockaddr_storage *ss, wg_endpoint *ep) {
    memset(ep, 0, sizeof *ep);
    if (ss->ss_family == AF_INET) {
        const struct sockaddr_in *sin = (const struct sockaddr_in *)ss;
        ep->family = 4;
        memcpy(ep->addr, &sin->sin_addr, 4);
        ep->port = ntohs(sin->sin_port);
        return true;
    }
    if (ss->ss_family == AF_INET6) {
        const struct sockaddr_in6 *sin6 = (const struct sockaddr_in6 *)ss;
        const uint8_t *a = (const uint8_t *)&sin6->sin6_addr;
        static const uint8_t v4mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
        if (!memcmp(a, v4mapped, 12)) {
            ep->family = 4;
            memcpy(ep->addr, a + 12, 4);
        } else {
            ep->family = 6;
            memcpy(ep->addr, a, 16);
        }
        ep->port = ntohs(sin6->sin6_port);
        return true;
    }
    return false;
}

/* Fills ss for dst as the attached socket's family wants it; 0 when it cannot be reached. */
static socklen_t endpoint_to_sockaddr(const wg_engine *e, const wg_endpoint *dst,
                                      struct sockaddr_storage *ss) {
    memset(ss, 0, sizeof *ss);
    if (e->io_family == 4) {
        if (dst->family != 4) return 0;
        struct sockaddr_in *sin = (struct sockaddr_in *)ss;
        sin->sin_family = AF_INET;
        sin->sin_port = htons(dst->port);
        memcpy(&sin->sin_addr, dst->addr, 4);
        return sizeof *sin;
    }
    struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)ss;
    uint8_t *a = (uint8_t *)&sin6->sin6_addr;
    sin6->sin6_family = AF_INET6;
    sin6->sin6_port = htons(dst->port);
    if (dst->family == 4) {
        a[10] = a[11] = 0xff;
        memcpy(a + 12, dst->addr, 4);
    } else if (dst->family == 6) {
        memcpy(a, dst->addr, 16);
    } else {
        return 0;
    }
    return sizeof *sin6;
}

static bool errno_is_again(int err) { return err == EAGAIN || err == EWOULDBLOCK; }

int wg_io_flush(wg_engine *e) {
    if (e->io_fd < 0) return WG_EIO;
    int sent = 0;
    while (e->out_count) {
#ifdef __linux__
        struct mmsghdr msgs[IO_BATCH];
        struct iovec iov[IO_BATCH];
        struct sockaddr_storage addrs[IO_BATCH];
        unsigned n = 0;
        while (n < IO_BATCH && n < e->out_count) {
            uint32_t slot = (e->out_head + n) % OUTPUT_RING_SIZE;
            socklen_t alen = endpoint_to_sockaddr(e, &e->out_meta[slot].dst, &addrs[n]);
            if (!alen) break;
            iov[n].iov_base = e->out_bufs + (size_t)slot * e->out_slot_size;
            iov[n].iov_len = e->out_meta[slot].len;
            memset(&msgs[n], 0, sizeof msgs[n]);
            msgs[n].msg_hdr.msg_name = &addrs[n];
            msgs[n].msg_hdr.msg_namelen = alen;
            msgs[n].msg_hdr.msg_iov = &iov[n];
            msgs[n].msg_hdr.msg_iovlen = 1;
            n++;
        }
        if (n == 0) { /* the head datagram's address is unusable on this socket */
            count_drop(e, WG_DROP_SEND_ERROR);
            output_pop(e);
            continue;
        }
        int r = sendmmsg(e->io_fd, msgs, n, MSG_DONTWAIT);
        if (r < 0) {
            if (errno == EINTR) continue;
            if (errno_is_again(errno)) break;
            count_drop(e, WG_DROP_SEND_ERROR);
            output_pop(e);
            continue;
        }
        for (int i = 0; i < r; i++) output_pop(e);
        sent += r;
        if (r == 0) break; /* nothing accepted and no error: try again on the next flush */
#else
        uint32_t slot = e->out_head;
        struct sockaddr_storage addr;
        socklen_t alen = endpoint_to_sockaddr(e, &e->out_meta[slot].dst, &addr);
        if (!alen) {
            count_drop(e, WG_DROP_SEND_ERROR);
            output_pop(e);
            continue;
        }
        ssize_t r = sendto(e->io_fd, e->out_bufs + (size_t)slot * e->out_slot_size,
                           e->out_meta[slot].len, MSG_DONTWAIT, (struct sockaddr *)&addr, alen);
        if (r < 0) {
            if (errno == EINTR) continue;
            if (errno_is_again(errno)) break;
            count_drop(e, WG_DROP_SEND_ERROR);
        } else {
            sent++;
        }
        output_pop(e);
#endif
    }
    return sent;
}

int wg_io_recv(wg_engine *e, double now, int max_datagrams) {
    if (e->io_fd < 0 || !e->io_rx_bufs) return WG_EIO;
    int total = 0, err = 0;
    while (total < max_datagrams) {
        wg_endpoint src;
#ifdef __linux__
        struct mmsghdr msgs[IO_BATCH];
        struct iovec iov[IO_BATCH];
        struct sockaddr_storage addrs[IO_BATCH];
        unsigned want = (unsigned)(max_datagrams - total < IO_BATCH ? max_datagrams - total : IO_BATCH);
        for (unsigned i = 0; i < want; i++) {
            iov[i].iov_base = e->io_rx_bufs + (size_t)i * IO_RX_BUF_SIZE;
            iov[i].iov_len = IO_RX_BUF_SIZE;
            memset(&msgs[i], 0, sizeof msgs[i]);
            msgs[i].msg_hdr.msg_name = &addrs[i];
            msgs[i].msg_hdr.msg_namelen = sizeof addrs[i];
            msgs[i].msg_hdr.msg_iov = &iov[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
        }
        int r = recvmmsg(e->io_fd, msgs, want, MSG_DONTWAIT, NULL);
        if (r < 0) {
            if (errno == EINTR) continue;
            if (!errno_is_again(errno)) err = -errno;
            break;
        }
        for (int i = 0; i < r; i++) {
            if (msgs[i].msg_hdr.msg_flags & MSG_TRUNC) {
                count_drop(e, WG_DROP_BAD_SIZE);
                continue;
            }
            if (!sockaddr_to_endpoint(&addrs[i], &src)) continue;
            wg_input(e, iov[i].iov_base, msgs[i].msg_len, &src, now);
        }
        total += r;
        if ((unsigned)r < want) break;
#else
        struct sockaddr_storage addr;
        socklen_t alen = sizeof addr;
        ssize_t r = recvfrom(e->io_fd, e->io_rx_bufs, IO_RX_BUF_SIZE, MSG_DONTWAIT,
                             (struct sockaddr *)&addr, &alen);
        if (r < 0) {
            if (errno == EINTR) continue;
            if (!errno_is_again(errno)) err = -errno;
            break;
        }
        total++;
        if (sockaddr_to_endpoint(&addr, &src)) wg_input(e, e->io_rx_bufs, (size_t)r, &src, now);
#endif
    }
    /* The destinations' news too, while we are here: it often comes with the peers' ACKs, and
     * taking it now spares the owner a wake-up (and a trip through Python) for the epoll fd. */
    splice_gather(e->splice);
    splice_run(e->splice, now); /* the batch's bytes on to the destinations' sockets */
    tcp_flush(e->tcp, now);     /* the ACKs the batch owes, one per connection */
    wg_io_flush(e);
    return total > 0 || !err ? total : err;
}
