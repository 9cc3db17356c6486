/*
 * _tcp.c: userspace TCP for the tunnel side of the gateway (see _tcp.h for the contract).
 *
 * The way of a segment:
 *   tcp_process (the IP header already parsed by the caller into a wire_ip_repr, _wire.h)
 *     -> parse the TCP header once into seg_repr (lengths, checksum, options checked here only)
 *     -> no connection: SYN -> limits -> new entry in SYN-PENDING + TCP_EV_SYN; else RST
 *     -> connection: RFC 9293 3.10.7.4 order: sequence check, RST (RFC 5961 exact match),
 *        SYN (challenge ACK), ACK (window, RTT, NewReno), data (in place into the receive ring,
 *        out-of-order ranges tracked beside it), FIN; then output and the ACK decision.
 * Output: conn_output sends what min(cwnd, peer window) allows, no Nagle; each segment carries
 * the current ACK and window.  Timers (RTO / persist, delayed ACK, state timeouts) are folded
 * into one deadline per connection kept in a min-heap for tcp_tick / tcp_next_deadline.
 *
 * TIME-WAIT lasts time_wait_ms (1 s by default), not RFC 9293's 2 MSL (4 min): the gateway
 * opens thousands of connections a second and 2 MSL of them would not fit the table.  What the
 * 2 MSL protects, old duplicates reaching a new incarnation of the same 4-tuple, is kept by the
 * rules around it: a SYN reopens a 4-tuple in TIME-WAIT only with an initial sequence number
 * above the old connection's last (RFC 1122 4.2.2.13), any other SYN gets a challenge ACK, and an
 * RST never ends TIME-WAIT early (RFC 1337).  And the segments come through an authenticated
 * WireGuard session, whose own replay window drops old duplicates of the tunnel's packets.
 *
 * Memory: a connection is one struct (< 512 bytes); each ring buffer is allocated when data
 * first needs it and freed again when it drains, so idle connections stay small.
 *
 * Sans-IO throughout (no system call, no clock, never blocks), on the engine's thread of the
 * moment: see _tcp.h.
 */
#include "_tcp.h"
#include "_wire.h"

#include <stdlib.h>
#include <string.h>

/* ---- Spec numbers, in one place ------------------------------------------------------------ */
#define RTO_INITIAL 1.0     /* RFC 6298 2.1 */
#define RTO_MIN 0.2         /* below RFC 6298's 1 s, as Linux: tunnel RTTs are short */
#define RTO_MAX 60.0        /* RFC 6298 2.5 */
#define RTO_GRANULARITY 0.001
#define DATA_RETRIES 10     /* RTO back-offs before giving up (~2 min with the 60 s cap) */
#define SYNACK_RETRIES 5    /* 1+2+4+8+16 s */
#define PROBE_RETRIES 10    /* unanswered zero-window probes before giving up (~3 min) */
#define PERSIST_MAX 30.0    /* longest zero-window probe interval */
#define INITIAL_WINDOW_SEGS 10 /* RFC 6928 */
#define DUPACK_THRESHOLD 3  /* RFC 5681 3.2 */
#define DEFAULT_PEER_MSS 536 /* RFC 9293 3.7.1 when the SYN has no MSS option */
#define MAX_WSCALE 14       /* RFC 7323 2.3 */
#define FIN_WAIT_2_RELEASED 60.0 /* a released connection waits this long for the peer's FIN */
#define OOO_MAX 32          /* out-of-order ranges kept per connection (8 bytes each) */
#define SACK_MAX 8          /* SACKed ranges remembered of what we sent */
#define SACK_BLOCKS_OUT 4   /* blocks per ACK we send: 4 fit in 40 option bytes without timestamps */

/* ---- Implementation numbers ---------------------------------------------------------------- */
#define SLOT_BITS 20
#define SLOT_MASK ((1u << SLOT_BITS) - 1)
_Static_assert(SLOT_MASK == TCP_CONN_SLOT_MASK, "conn_id layout is part of _tcp.h");
#define GEN_MASK ((1u << (32 - SLOT_BITS)) - 1)

#define F_FIN 0x01
#define F_SYN 0x02
#define F_RST 0x04
#define F_PSH 0x08
#define F_ACK 0x10

#define SEQ_LT(a, b) ((int32_t)((uint32_t)(a) - (uint32_t)(b)) < 0)
#define SEQ_LEQ(a, b) ((int32_t)((uint32_t)(a) - (uint32_t)(b)) <= 0)
#define SEQ_GT(a, b) SEQ_LT(b, a)
#define SEQ_GEQ(a, b) SEQ_LEQ(b, a)

static uint32_t min_u32(uint32_t a, uint32_t b) { return a < b ? a : b; }
static uint32_t max_u32(uint32_t a, uint32_t b) { return a > b ? a : b; }

struct tcp_conn;
static uint32_t sacked_below(const struct tcp_conn *c, uint32_t upto);
static uint32_t next_hole(const struct tcp_conn *c, uint32_t *seq);

typedef struct {
    uint32_t start, end; /* [start, end) in sequence space */
} seq_range;

typedef struct tcp_conn {
    uint32_t id, peer_id;
    uint32_t src_ip, dst_ip;               /* table keys: the IPv4 address, an IPv6 one's fold */
    uint8_t family;                        /* 4 or 6 */
    uint8_t src_addr[16], dst_addr[16];    /* network order, 4 bytes used for IPv4 */
    uint16_t src_port, dst_port;
    uint8_t state, close_reason;
    uint8_t released, hashed, closed_notified;
    uint8_t fin_queued, fin_sent, fin_rcvd, ooo_fin;
    uint8_t readable_armed, want_writable, in_recovery, persist, timing;
    uint8_t wscale_ok, snd_wscale, rcv_wscale, backoff, ack_listed, nooo;
    uint8_t probes_unanswered; /* zero-window probes since the peer last ACKed anything */
    uint8_t sack_ok, nsacked;
    uint8_t sws_override;      /* the persist timer lets one short segment through */
    uint8_t challenges;        /* challenge ACKs sent in the second from challenge_at */
    uint16_t snd_mss;
    int32_t heap_idx;
    struct tcp_conn *hnext;             /* hash chain; the reap list once unhashed */
    struct tcp_conn *ack_prev, *ack_next; /* connections owing an ACK */
    struct tcp_conn *tw_prev, *tw_next;   /* TIME-WAIT, oldest first */
    double timer_at, rto_at, delack_at, state_at, challenge_at;
    /* send side: the ring holds [snd_una, snd_una + slen) (data only; SYN/FIN are flags) */
    uint32_t iss, snd_una, snd_nxt, snd_max, snd_wnd, snd_wl1, snd_wl2;
    uint32_t max_sndwnd;                /* the largest window the peer offered (SWS avoidance) */
    uint32_t cwnd, ssthresh, recover, dupacks, ca_acked;
    uint32_t rtx_next;                  /* SACK recovery: holes below this were resent */
    seq_range sacked[SACK_MAX];         /* what the peer SACKed above snd_una, sorted */
    uint8_t *sbuf;
    uint32_t scap, shead, slen;
    double srtt, rttvar, rto, rtt_time;
    uint32_t rtt_seq;
    /* receive side: the ring holds rlen readable bytes, then out-of-order data at its offset */
    uint32_t irs, rcv_nxt, rcv_adv, ooo_fin_seq, unacked_bytes;
    uint32_t ooo_recent;                /* start of the latest out-of-order segment: SACK block 1 */
    uint8_t *rbuf;
    uint32_t rcap, rhead, rlen;
    seq_range ooo[OOO_MAX];
    uint64_t bytes_in, bytes_out;
    uint32_t retransmits;
} tcp_conn;

typedef struct {
    uint32_t peer_id, used;
    uint32_t open, half_open;
    uint64_t refused_conns, refused_half_open; /* SYNs refused by the per-peer limits */
} peer_entry;

struct tcp_stack {
    tcp_config cfg;
    tcp_callbacks cb;
    uint16_t mss;
    uint8_t rcv_wscale;
    double time_wait_s, syn_pending_s;
    tcp_conn **slots;
    uint16_t *gens;
    uint32_t *free_fifo; /* free slots, oldest freed first so handles are not reused soon */
    uint32_t free_head, free_count;
    tcp_conn **buckets;
    uint32_t bucket_mask;
    tcp_conn **heap;
    uint32_t heap_len;
    tcp_conn *ack_head;
    tcp_conn *tw_head, *tw_tail;
    tcp_conn *reap;
    peer_entry *peers;
    uint32_t peer_cap, peer_used;
    uint64_t drops[TCP_DROP__COUNT];
    tcp_stats st;
    uint16_t ip_id;
    uint8_t *pkt;
    double now; /* of the public call in progress, for the emit callback */
};

/* ---- Counters ------------------------------------------------------------------------------ */
static const char *const drop_names[TCP_DROP__COUNT] = {
    [TCP_DROP_MALFORMED] = "malformed",
    [TCP_DROP_BAD_CHECKSUM] = "bad_checksum",
    [TCP_DROP_BAD_ADDRESS] = "bad_address",
    [TCP_DROP_NO_CONN] = "no_connection",
    [TCP_DROP_LIMIT_CONNS] = "limit_conns",
    [TCP_DROP_LIMIT_PEER] = "limit_per_peer",
    [TCP_DROP_LIMIT_HALF_OPEN] = "limit_half_open",
    [TCP_DROP_OUT_OF_WINDOW] = "out_of_window",
    [TCP_DROP_BAD_ACK] = "bad_ack",
    [TCP_DROP_RST_IGNORED] = "rst_ignored",
    [TCP_DROP_SYN_DUPLICATE] = "syn_duplicate",
    [TCP_DROP_OOO_FULL] = "ooo_full",
    [TCP_DROP_NOMEM] = "nomem",
    [TCP_DROP_NO_ACK] = "no_ack",
    [TCP_DROP_AFTER_CLOSE] = "after_close",
};

static int drop(tcp_stack *s, int reason) {
    s->drops[reason]++;
    return 1;
}

/* ---- Per-peer counts (open addressing, never deleted: peers are few) ----------------------- */
static uint32_t mix32(uint32_t x) {
    x ^= x >> 16; x *= 0x7feb352dU; x ^= x >> 15; x *= 0x846ca68bU; x ^= x >> 16;
    return x;
}

static peer_entry *peer_find(tcp_stack *s, uint32_t peer_id) {
    if (!s->peer_cap) return NULL;
    uint32_t mask = s->peer_cap - 1;
    for (uint32_t i = mix32(peer_id) & mask;; i = (i + 1) & mask) {
        peer_entry *p = &s->peers[i];
        if (!p->used) return NULL;
        if (p->peer_id == peer_id) return p;
    }
}

static peer_entry *peer_get(tcp_stack *s, uint32_t peer_id) {
    peer_entry *p = peer_find(s, peer_id);
    if (p) return p;
    if ((s->peer_used + 1) * 4 > s->peer_cap * 3) {
        uint32_t ncap = s->peer_cap ? s->peer_cap * 2 : 16;
        peer_entry *old = s->peers;
        uint32_t ocap = s->peer_cap;
        peer_entry *np = calloc(ncap, sizeof *np);
        if (!np) return NULL;
        s->peers = np;
        s->peer_cap = ncap;
        for (uint32_t i = 0; i < ocap; i++) {
            if (!old[i].used) continue;
            uint32_t j = mix32(old[i].peer_id) & (ncap - 1);
            while (np[j].used) j = (j + 1) & (ncap - 1);
            np[j] = old[i];
        }
        free(old);
    }
    uint32_t mask = s->peer_cap - 1;
    uint32_t i = mix32(peer_id) & mask;
    while (s->peers[i].used) i = (i + 1) & mask;
    p = &s->peers[i];
    p->used = 1;
    p->peer_id = peer_id;
    p->open = p->half_open = 0;
    p->refused_conns = p->refused_half_open = 0;
    s->peer_used++;
    return p;
}

/* ---- State bookkeeping --------------------------------------------------------------------- */
static int st_half_open(int st) { return st == TCP_ST_SYN_PENDING || st == TCP_ST_SYN_RECEIVED; }
static int st_open(int st) { return st != TCP_ST_TIME_WAIT && st != TCP_ST_CLOSED; }

static void set_state(tcp_stack *s, tcp_conn *c, int st) {
    peer_entry *p = peer_find(s, c->peer_id); /* created with the connection */
    int old = c->state;
    if (st_open(old)) { s->st.open--; if (p) p->open--; }
    if (st_half_open(old)) { s->st.half_open--; if (p) p->half_open--; }
    if (old == TCP_ST_TIME_WAIT) s->st.time_wait--;
    c->state = (uint8_t)st;
    if (st_open(st)) { s->st.open++; if (p) p->open++; }
    if (st_half_open(st)) { s->st.half_open++; if (p) p->half_open++; }
    if (st == TCP_ST_TIME_WAIT) s->st.time_wait++;
}

static void raise_event(tcp_stack *s, tcp_conn *c, uint32_t type, uint32_t arg) {
    if (c->released || !s->cb.event) return;
    tcp_event ev = {type, c->id, arg};
    s->cb.event(s->cb.ctx, &ev);
}

static void raise_readable(tcp_stack *s, tcp_conn *c) {
    if (c->readable_armed) return;
    c->readable_armed = 1;
    raise_event(s, c, TCP_EV_READABLE, 0);
}

/* ---- Timer heap: one deadline per connection, the earliest of its timers -------------------- */
static void heap_swap(tcp_stack *s, uint32_t a, uint32_t b) {
    tcp_conn *t = s->heap[a];
    s->heap[a] = s->heap[b];
    s->heap[b] = t;
    s->heap[a]->heap_idx = (int32_t)a;
    s->heap[b]->heap_idx = (int32_t)b;
}
static void heap_up(tcp_stack *s, uint32_t i) {
    while (i > 0) {
        uint32_t parent = (i - 1) / 2;
        if (s->heap[parent]->timer_at <= s->heap[i]->timer_at) break;
        heap_swap(s, i, parent);
        i = parent;
    }
}
static void heap_down(tcp_stack *s, uint32_t i) {
    for (;;) {
        uint32_t l = 2 * i + 1, r = l + 1, m = i;
        if (l < s->heap_len && s->heap[l]->timer_at < s->heap[m]->timer_at) m = l;
        if (r < s->heap_len && s->heap[r]->timer_at < s->heap[m]->timer_at) m = r;
        if (m == i) return;
        heap_swap(s, i, m);
        i = m;
    }
}
static void heap_remove(tcp_stack *s, tcp_conn *c) {
    if (c->heap_idx < 0) return;
    uint32_t i = (uint32_t)c->heap_idx;
    c->heap_idx = -1;
    s->heap_len--;
    if (i == s->heap_len) return;
    s->heap[i] = s->heap[s->heap_len];
    s->heap[i]->heap_idx = (int32_t)i;
    heap_up(s, i);
    heap_down(s, (uint32_t)s->heap[i]->heap_idx);
}

static void timers_changed(tcp_stack *s, tcp_conn *c) {
    double t = 0;
    double cand[3] = {c->rto_at, c->delack_at, c->state_at};
    for (int i = 0; i < 3; i++)
        if (cand[i] > 0 && (t == 0 || cand[i] < t)) t = cand[i];
    c->timer_at = t;
    if (t == 0) {
        heap_remove(s, c);
    } else if (c->heap_idx < 0) {
        c->heap_idx = (int32_t)s->heap_len;
        s->heap[s->heap_len++] = c;
        heap_up(s, (uint32_t)c->heap_idx);
    } else {
        uint32_t i = (uint32_t)c->heap_idx;
        heap_up(s, i);
        heap_down(s, (uint32_t)c->heap_idx);
    }
}

/* ---- Connection table ---------------------------------------------------------------------- */
static uint32_t tuple_hash(const tcp_stack *s, uint32_t peer_id, uint32_t src_ip, uint16_t sport,
                           uint32_t dst_ip, uint16_t dport) {
    uint32_t h = (uint32_t)s->cfg.iss_seed;
    h = mix32(h ^ peer_id);
    h = mix32(h ^ src_ip);
    h = mix32(h ^ dst_ip);
    h = mix32(h ^ ((uint32_t)sport << 16 | dport));
    return h & s->bucket_mask;
}

/* The table key of an address: IPv4's own 32 bits, or a fold of IPv6's 128 (lookups compare
 * the whole address after the key). */
static uint32_t addr_key(uint8_t family, const uint8_t *a) {
    if (family == 4) return rd32be(a);
    return mix32(rd32be(a) ^ mix32(rd32be(a + 4) ^ mix32(rd32be(a + 8) ^ mix32(rd32be(a + 12)))));
}

static tcp_conn *conn_lookup(tcp_stack *s, uint32_t peer_id, uint8_t family, const uint8_t *src,
                             uint32_t src_ip, uint16_t sport, const uint8_t *dst, uint32_t dst_ip,
                             uint16_t dport) {
    tcp_conn *c = s->buckets[tuple_hash(s, peer_id, src_ip, sport, dst_ip, dport)];
    size_t alen = wire_addr_len(family);
    for (; c; c = c->hnext)
        if (c->peer_id == peer_id && c->src_ip == src_ip && c->dst_ip == dst_ip &&
            c->src_port == sport && c->dst_port == dport && c->family == family &&
            (family == 4 || (!memcmp(c->src_addr, src, alen) && !memcmp(c->dst_addr, dst, alen))))
            return c;
    return NULL;
}

static void conn_unhash(tcp_stack *s, tcp_conn *c) {
    if (!c->hashed) return;
    tcp_conn **pp = &s->buckets[tuple_hash(s, c->peer_id, c->src_ip, c->src_port, c->dst_ip,
                                           c->dst_port)];
    while (*pp && *pp != c) pp = &(*pp)->hnext;
    if (*pp) *pp = c->hnext;
    c->hnext = NULL;
    c->hashed = 0;
}

static tcp_conn *conn_by_id(tcp_stack *s, uint32_t id) {
    if (!s) return NULL;
    uint32_t slot = id & SLOT_MASK;
    if (slot == 0 || slot > s->cfg.max_conns) return NULL;
    tcp_conn *c = s->slots[slot - 1];
    if (!c || c->id != id || c->released) return NULL;
    return c;
}

static void free_buffers(tcp_stack *s, tcp_conn *c, int send, int recv) {
    if (send && c->sbuf) {
        free(c->sbuf);
        c->sbuf = NULL;
        s->st.mem -= c->scap;
        c->slen = c->shead = 0;
    }
    if (recv && c->rbuf) {
        free(c->rbuf);
        c->rbuf = NULL;
        s->st.mem -= c->rcap;
        c->rlen = c->rhead = 0;
        c->nooo = 0;
    }
}

static void conn_free(tcp_stack *s, tcp_conn *c) {
    uint32_t slot = (c->id & SLOT_MASK) - 1;
    free_buffers(s, c, 1, 1);
    s->slots[slot] = NULL;
    s->free_fifo[(s->free_head + s->free_count) % s->cfg.max_conns] = slot;
    s->free_count++;
    s->st.conns--;
    s->st.mem -= sizeof *c;
    free(c);
}

static void reap(tcp_stack *s) {
    while (s->reap) {
        tcp_conn *c = s->reap;
        s->reap = c->hnext;
        conn_free(s, c);
    }
}

static void ack_unlist(tcp_stack *s, tcp_conn *c) {
    if (!c->ack_listed) return;
    if (c->ack_prev) c->ack_prev->ack_next = c->ack_next;
    else s->ack_head = c->ack_next;
    if (c->ack_next) c->ack_next->ack_prev = c->ack_prev;
    c->ack_prev = c->ack_next = NULL;
    c->ack_listed = 0;
}

static void tw_unlist(tcp_stack *s, tcp_conn *c) {
    if (c->state != TCP_ST_TIME_WAIT) return;
    if (c->tw_prev) c->tw_prev->tw_next = c->tw_next;
    else s->tw_head = c->tw_next;
    if (c->tw_next) c->tw_next->tw_prev = c->tw_prev;
    else s->tw_tail = c->tw_prev;
    c->tw_prev = c->tw_next = NULL;
}

/* The end of a connection: unhashed, timers off, one CLOSED event.  The struct lives on until
 * the owner releases the handle (freed by reap at the end of the public call). */
static void conn_closed(tcp_stack *s, tcp_conn *c, int reason) {
    if (c->state == TCP_ST_CLOSED) return;
    tw_unlist(s, c);
    set_state(s, c, TCP_ST_CLOSED);
    if (!c->close_reason) c->close_reason = (uint8_t)reason;
    conn_unhash(s, c);
    ack_unlist(s, c);
    c->rto_at = c->delack_at = c->state_at = 0;
    timers_changed(s, c);
    free_buffers(s, c, 1, c->close_reason != TCP_CLOSE_NORMAL);
    if (!c->closed_notified) {
        c->closed_notified = 1;
        raise_event(s, c, TCP_EV_CLOSED, c->close_reason);
    }
    if (c->released) {
        c->hnext = s->reap;
        s->reap = c;
    }
}

/* ---- Output -------------------------------------------------------------------------------- */
static void emit_packet(tcp_stack *s, uint32_t peer_id, uint8_t family, const uint8_t *src,
                        uint16_t sport, const uint8_t *dst, uint16_t dport, uint32_t seq,
                        uint32_t ack, uint8_t flags, uint16_t wnd, const uint8_t *opt,
                        uint32_t optlen, const tcp_conn *c, uint32_t data_off, uint32_t dlen) {
    uint8_t *p = s->pkt;
    uint32_t thl = 20 + optlen;
    wire_ip_repr ip = wire_ip_repr_of(family, src, dst, WIRE_PROTO_TCP, thl + dlen);
    ip.id = s->ip_id++;
    ip.dont_fragment = true; /* the tunnel MTU is known, MSS fits it */
    size_t hlen = wire_ip_emit(&ip, p);
    uint32_t tot = (uint32_t)hlen + thl + dlen;
    uint8_t *t = p + hlen;
    wr16be(t, sport);
    wr16be(t + 2, dport);
    wr32be(t + 4, seq);
    wr32be(t + 8, ack);
    t[12] = (uint8_t)((thl / 4) << 4);
    t[13] = flags;
    wr16be(t + 14, wnd);
    wr16be(t + 16, 0);
    wr16be(t + 18, 0);
    if (optlen) memcpy(t + 20, opt, optlen);
    if (dlen) {
        uint32_t pos = (c->shead + data_off) % c->scap;
        uint32_t first = min_u32(dlen, c->scap - pos);
        memcpy(t + thl, c->sbuf + pos, first);
        memcpy(t + thl + first, c->sbuf, dlen - first);
    }
    uint32_t sum = wire_pseudo_sum(family, ip.src, ip.dst, WIRE_PROTO_TCP, thl + dlen);
    wr16be(t + 16, csum_finish(csum_add(sum, t, thl + dlen)));
    s->st.segs_out++;
    if (flags & F_RST) s->st.rsts_out++;
    if (s->cb.emit) s->cb.emit(s->cb.ctx, peer_id, p, tot, s->now);
}

/* The window we offer.  Receiver SWS avoidance (RFC 9293 3.8.6.2.2): the right edge only moves
 * by a useful amount; it never moves left. */
static uint16_t window_field(tcp_stack *s, tcp_conn *c) {
    uint32_t space = c->rcap - c->rlen;
    uint32_t edge = c->rcv_nxt + space;
    uint32_t cur = SEQ_GT(c->rcv_adv, c->rcv_nxt) ? c->rcv_adv - c->rcv_nxt : 0;
    uint32_t wnd = cur;
    if ((int32_t)(edge - c->rcv_adv) >= (int32_t)min_u32(c->rcap / 2, s->mss)) wnd = space;
    uint32_t field = wnd >> c->rcv_wscale;
    if (field > 0xffff) field = 0xffff;
    uint32_t adv = c->rcv_nxt + (field << c->rcv_wscale);
    if (SEQ_GT(adv, c->rcv_adv)) c->rcv_adv = adv;
    return (uint16_t)field;
}

static void conn_emit(tcp_stack *s, tcp_conn *c, uint32_t seq, uint8_t flags, uint32_t data_off,
                      uint32_t dlen) {
    uint16_t wnd = window_field(s, c);
    uint8_t opt[4 + 8 * SACK_BLOCKS_OUT];
    uint32_t optlen = 0;
    if (c->sack_ok && c->nooo && dlen == 0 && (flags & F_ACK) && !(flags & F_RST)) {
        /* SACK blocks (RFC 2018 4): the one holding the latest segment first, then the rest */
        uint32_t first = 0, nb = 0;
        for (uint32_t i = 0; i < c->nooo; i++)
            if (SEQ_LEQ(c->ooo[i].start, c->ooo_recent) && SEQ_LT(c->ooo_recent, c->ooo[i].end))
                first = i;
        opt[0] = 1;
        opt[1] = 1;
        opt[2] = 5;
        for (uint32_t k = 0; k < c->nooo && nb < SACK_BLOCKS_OUT; k++) {
            uint32_t i = k == 0 ? first : (k <= first ? k - 1 : k);
            wr32be(opt + 4 + 8 * nb, c->ooo[i].start);
            wr32be(opt + 8 + 8 * nb, c->ooo[i].end);
            nb++;
        }
        opt[3] = (uint8_t)(2 + 8 * nb);
        optlen = 4 + 8 * nb;
    }
    emit_packet(s, c->peer_id, c->family, c->dst_addr, c->dst_port, c->src_addr, c->src_port, seq,
                (flags & F_ACK) ? c->rcv_nxt : 0, flags, wnd, optlen ? opt : NULL, optlen, c,
                data_off, dlen);
    if (flags & F_ACK) {
        /* every segment carries the current ACK: nothing is owed any more */
        ack_unlist(s, c);
        c->unacked_bytes = 0;
        if (c->delack_at) {
            c->delack_at = 0;
            timers_changed(s, c);
        }
    }
}

static void send_ack(tcp_stack *s, tcp_conn *c) { conn_emit(s, c, c->snd_nxt, F_ACK, 0, 0); }

/* May the connection answer an unacceptable segment now?  At most TCP_CHALLENGE_ACKS_PER_S a
 * second each (RFC 5961 7), so a flood of bad segments is not answered one for one. */
static int challenge_allowed(tcp_stack *s, tcp_conn *c, double now) {
    if (now - c->challenge_at >= 1.0 || now < c->challenge_at) {
        c->challenge_at = now;
        c->challenges = 0;
    }
    if (c->challenges >= TCP_CHALLENGE_ACKS_PER_S) {
        s->st.challenge_acks_limited++;
        return 0;
    }
    c->challenges++;
    s->st.challenge_acks++;
    return 1;
}

static void challenge_ack(tcp_stack *s, tcp_conn *c, double now) {
    if (challenge_allowed(s, c, now)) send_ack(s, c);
}

static void ack_later(tcp_stack *s, tcp_conn *c, double now) {
    if (c->ack_listed) return;
    c->ack_listed = 1;
    c->ack_prev = NULL;
    c->ack_next = s->ack_head;
    if (s->ack_head) s->ack_head->ack_prev = c;
    s->ack_head = c;
    c->delack_at = now + TCP_DELACK_MS / 1000.0;
    timers_changed(s, c);
}

static void send_synack(tcp_stack *s, tcp_conn *c) {
    uint8_t opt[12];
    uint32_t optlen = 4;
    opt[0] = 2; /* MSS */
    opt[1] = 4;
    wr16be(opt + 2, (uint16_t)(s->mss - (c->family == 6 ? 20 : 0))); /* IPv6's header is 20 longer */
    if (c->wscale_ok) {
        opt[optlen++] = 1; /* NOP */
        opt[optlen++] = 3; /* window scale */
        opt[optlen++] = 3;
        opt[optlen++] = c->rcv_wscale;
    }
    if (c->sack_ok) {
        opt[optlen++] = 1;
        opt[optlen++] = 1;
        opt[optlen++] = 4; /* SACK permitted */
        opt[optlen++] = 2;
    }
    /* the window in a SYN is never scaled (RFC 7323 2.2) */
    uint32_t wnd = min_u32(c->rcap, 0xffff);
    c->rcv_adv = c->rcv_nxt + wnd;
    emit_packet(s, c->peer_id, c->family, c->dst_addr, c->dst_port, c->src_addr, c->src_port, c->iss, c->rcv_nxt,
                F_SYN | F_ACK, (uint16_t)wnd, opt, optlen, c, 0, 0);
}

static void send_rst_reply(tcp_stack *s, uint32_t peer_id, uint8_t family, const uint8_t *src,
                           uint16_t sport, const uint8_t *dst, uint16_t dport, uint32_t seq,
                           uint32_t ack, uint8_t flags) {
    /* src/dst as in the incoming segment; the reply swaps them */
    emit_packet(s, peer_id, family, dst, dport, src, sport, seq, ack, flags, 0, NULL, 0, NULL, 0, 0);
}

static double rto_now(const tcp_conn *c) {
    double r = c->rto * (double)(1u << c->backoff);
    return r > RTO_MAX ? RTO_MAX : r;
}

static void arm_rto(tcp_stack *s, tcp_conn *c, double now) {
    c->rto_at = now + rto_now(c);
    timers_changed(s, c);
}

/* Send what the windows allow, from snd_nxt on.  No Nagle: a short tail goes out at once. */
static void conn_output(tcp_stack *s, tcp_conn *c, double now) {
    int st = c->state;
    if (st != TCP_ST_ESTABLISHED && st != TCP_ST_CLOSE_WAIT && st != TCP_ST_FIN_WAIT_1 &&
        st != TCP_ST_CLOSING && st != TCP_ST_LAST_ACK)
        return;
    uint32_t fin_seq = c->snd_una + c->slen;
    int sws_wait = 0;
    if (c->snd_wnd > c->max_sndwnd) c->max_sndwnd = c->snd_wnd;
    for (;;) {
        uint32_t limit = 0xffffffffu; /* resending after an RTO: stop at the next SACKed range */
        if (c->nsacked && SEQ_LT(c->snd_nxt, c->snd_max)) {
            for (uint32_t i = 0; i < c->nsacked; i++) {
                const seq_range *r = &c->sacked[i];
                if (SEQ_GEQ(c->snd_nxt, r->start) && SEQ_LT(c->snd_nxt, r->end))
                    c->snd_nxt = SEQ_LT(r->end, c->snd_max) ? r->end : c->snd_max;
                else if (SEQ_LT(c->snd_nxt, r->start)) {
                    limit = r->start - c->snd_nxt;
                    break;
                }
            }
        }
        uint32_t off = c->snd_nxt - c->snd_una;
        uint32_t flight = off - sacked_below(c, c->snd_nxt); /* what is really in the network */
        uint32_t cwnd = c->cwnd;
        /* Limited Transmit (RFC 3042): a new segment for each of the first two dup ACKs keeps
         * the ACK clock going when the window is small */
        if (!c->in_recovery && c->dupacks && c->dupacks < DUPACK_THRESHOLD)
            cwnd += c->dupacks * (uint32_t)c->snd_mss;
        uint32_t wnd = min_u32(c->snd_wnd, cwnd);
        uint32_t sent_data = min_u32(off, c->slen);
        uint32_t avail = c->slen - sent_data;
        uint32_t usable = wnd > flight ? wnd - flight : 0;
        if (c->snd_wnd < off) usable = 0; /* the peer's window counts from snd_una, SACK or not */
        else usable = min_u32(usable, c->snd_wnd - off);
        uint32_t n = min_u32(min_u32(min_u32(avail, usable), c->snd_mss), limit);
        /* Sender SWS avoidance (RFC 1122 4.2.3.4): new data goes as a full segment, or as all
         * that waits, or as at least half the largest window offered; a sliver of a window waits
         * for the window to open (or, nothing in flight, for the persist timer below). */
        if (n < c->snd_mss && n < avail && n < c->max_sndwnd / 2 && !c->sws_override &&
            SEQ_GEQ(c->snd_nxt, c->snd_max)) {
            sws_wait = 1;
            break;
        }
        int fin = c->fin_queued && n == avail && c->snd_nxt + n == fin_seq;
        if (n == 0 && !fin) break;
        uint8_t flags = F_ACK;
        if (fin) flags |= F_FIN;
        if (n == avail) flags |= F_PSH;
        if (SEQ_LT(c->snd_nxt, c->snd_max)) {
            c->retransmits++;
            s->st.retransmits++;
        } else if (!c->timing && n) {
            c->timing = 1;
            c->rtt_seq = c->snd_nxt + n;
            c->rtt_time = now;
        }
        conn_emit(s, c, c->snd_nxt, flags, sent_data, n);
        c->snd_nxt += n + (fin ? 1 : 0);
        if (fin) c->fin_sent = 1;
        if (SEQ_GT(c->snd_nxt, c->snd_max)) c->snd_max = c->snd_nxt;
        c->persist = 0;
        if (!c->rto_at) arm_rto(s, c, now);
        c->sws_override = 0;
        if (fin) break;
    }
    /* The peer's window is closed (or a sliver, held back above) with data waiting and nothing
     * in flight to be ACKed: probe, or send the sliver when the timer fires. */
    if ((c->snd_wnd == 0 || sws_wait) && c->snd_nxt == c->snd_una &&
        (c->slen > 0 || c->fin_queued) && !c->rto_at) {
        c->persist = 1;
        arm_rto(s, c, now);
    }
}

/* The first unacknowledged segment again (fast retransmit, NewReno partial ACK). */
static void retransmit_head(tcp_stack *s, tcp_conn *c) {
    c->rtx_next = c->snd_una + min_u32(min_u32(c->slen, c->snd_mss), c->snd_max - c->snd_una);
    uint32_t outstanding = c->snd_max - c->snd_una;
    uint32_t n = min_u32(min_u32(c->slen, c->snd_mss), outstanding);
    uint8_t flags = F_ACK;
    if (c->fin_sent && n == c->slen && outstanding == c->slen + 1) flags |= F_FIN;
    if (n == 0 && !(flags & F_FIN)) return;
    c->retransmits++;
    s->st.retransmits++;
    c->timing = 0; /* Karn */
    conn_emit(s, c, c->snd_una, flags, 0, n);
}

/* Up to max_segs holes the peer's SACK blocks reveal, from rtx_next on; returns how many. */
static int sack_retransmit(tcp_stack *s, tcp_conn *c, int max_segs) {
    int sent = 0;
    uint32_t seq = 0, n;
    while (sent < max_segs && (n = next_hole(c, &seq)) != 0) {
        conn_emit(s, c, seq, F_ACK, seq - c->snd_una, n);
        c->rtx_next = seq + n;
        c->retransmits++;
        s->st.retransmits++;
        sent++;
    }
    if (sent) c->timing = 0; /* Karn */
    return sent;
}

/* ---- RTT (RFC 6298 2.2, 2.3) --------------------------------------------------------------- */
static void rtt_sample(tcp_conn *c, double r) {
    if (r < 0) r = 0;
    if (c->srtt == 0) {
        c->srtt = r > 0 ? r : 1e-6;
        c->rttvar = r / 2;
    } else {
        double err = c->srtt - r;
        c->rttvar = 0.75 * c->rttvar + 0.25 * (err < 0 ? -err : err);
        c->srtt = 0.875 * c->srtt + 0.125 * r;
    }
    double var = 4 * c->rttvar;
    c->rto = c->srtt + (var > RTO_GRANULARITY ? var : RTO_GRANULARITY);
    if (c->rto < RTO_MIN) c->rto = RTO_MIN;
    if (c->rto > RTO_MAX) c->rto = RTO_MAX;
}

/* ---- Lifecycle ------------------------------------------------------------------------------ */
static void enter_time_wait(tcp_stack *s, tcp_conn *c, double now) {
    set_state(s, c, TCP_ST_TIME_WAIT);
    c->close_reason = TCP_CLOSE_NORMAL;
    c->rto_at = 0;
    c->state_at = now + s->time_wait_s;
    timers_changed(s, c);
    free_buffers(s, c, 1, 0);
    c->tw_prev = s->tw_tail;
    c->tw_next = NULL;
    if (s->tw_tail) s->tw_tail->tw_next = c;
    else s->tw_head = c;
    s->tw_tail = c;
    if (!c->closed_notified) {
        c->closed_notified = 1;
        raise_event(s, c, TCP_EV_CLOSED, TCP_CLOSE_NORMAL);
    }
    while (s->st.time_wait > s->cfg.time_wait_max && s->tw_head) conn_closed(s, s->tw_head, 0);
}

static void on_fin_acked(tcp_stack *s, tcp_conn *c, double now) {
    switch (c->state) {
    case TCP_ST_FIN_WAIT_1:
        set_state(s, c, TCP_ST_FIN_WAIT_2);
        if (c->released) {
            c->state_at = now + FIN_WAIT_2_RELEASED;
            timers_changed(s, c);
        }
        break;
    case TCP_ST_CLOSING:
        enter_time_wait(s, c, now);
        break;
    case TCP_ST_LAST_ACK:
        conn_closed(s, c, TCP_CLOSE_NORMAL);
        break;
    default:
        break;
    }
}

static void on_fin_received(tcp_stack *s, tcp_conn *c, double now) {
    c->rcv_nxt++;
    c->fin_rcvd = 1;
    c->ooo_fin = 0;
    raise_event(s, c, TCP_EV_PEER_FIN, 0);
    switch (c->state) {
    case TCP_ST_ESTABLISHED:
        set_state(s, c, TCP_ST_CLOSE_WAIT);
        break;
    case TCP_ST_FIN_WAIT_1:
        if (c->fin_sent && c->snd_una == c->snd_max) enter_time_wait(s, c, now);
        else set_state(s, c, TCP_ST_CLOSING);
        break;
    case TCP_ST_FIN_WAIT_2:
        enter_time_wait(s, c, now);
        break;
    default:
        break;
    }
}

/* ---- Input: parse once ---------------------------------------------------------------------- */
typedef struct {
    uint32_t src_ip, dst_ip; /* keys (addr_key) */
    uint8_t family;
    const uint8_t *src, *dst; /* the IP header's addresses */
    uint16_t sport, dport;
    uint32_t seq, ack;
    uint8_t flags;
    uint16_t wnd;
    uint16_t mss;    /* 0: no MSS option */
    int wscale;      /* -1: no window scale option */
    uint8_t sack_permitted, nsack;
    seq_range sack[4];
    const uint8_t *data;
    uint32_t dlen;
} seg_repr;

/* The TCP header of a segment whose IP header the caller parsed (ip_repr); the TCP checksum,
 * lengths and options are checked here only. */
static int parse_segment(tcp_stack *s, const wire_ip_repr *ip, seg_repr *g) {
    const uint8_t *t = ip->payload;
    uint32_t tlen = (uint32_t)ip->payload_len;
    if ((ip->family != 4 && ip->family != 6) || tlen < 20) return drop(s, TCP_DROP_MALFORMED);
    uint32_t doff = (uint32_t)(t[12] >> 4) * 4;
    if (doff < 20 || doff > tlen) return drop(s, TCP_DROP_MALFORMED);
    g->family = ip->family;
    g->src = ip->src;
    g->dst = ip->dst;
    g->src_ip = addr_key(ip->family, ip->src);
    g->dst_ip = addr_key(ip->family, ip->dst);
    uint32_t psum = wire_pseudo_sum(ip->family, ip->src, ip->dst, WIRE_PROTO_TCP, tlen);
    if (csum_finish(csum_add(psum, t, tlen)) != 0) return drop(s, TCP_DROP_BAD_CHECKSUM);
    g->sport = rd16be(t);
    g->dport = rd16be(t + 2);
    if (g->sport == 0 || g->dport == 0 || !wire_addr_unicast(ip->family, ip->src) ||
        !wire_addr_unicast(ip->family, ip->dst))
        return drop(s, TCP_DROP_BAD_ADDRESS);
    g->seq = rd32be(t + 4);
    g->ack = rd32be(t + 8);
    g->flags = t[13] & 0x3f;
    g->wnd = rd16be(t + 14);
    g->mss = 0;
    g->wscale = -1;
    g->sack_permitted = 0;
    g->nsack = 0;
    g->data = t + doff;
    g->dlen = tlen - doff;
    /* options: a malformed one ends the parse, the segment stays usable */
    for (uint32_t i = 20; i < doff;) {
        uint8_t kind = t[i];
        if (kind == 0) break;
        if (kind == 1) { i++; continue; }
        if (i + 1 >= doff) break;
        uint32_t olen = t[i + 1];
        if (olen < 2 || i + olen > doff) break;
        if (kind == 2 && olen == 4) g->mss = rd16be(t + i + 2);
        if (kind == 3 && olen == 3) g->wscale = t[i + 2] > MAX_WSCALE ? MAX_WSCALE : t[i + 2];
        if (kind == 4 && olen == 2) g->sack_permitted = 1;
        if (kind == 5 && olen >= 10 && (olen - 2) % 8 == 0) {
            for (uint32_t b = 0; b < (olen - 2) / 8 && b < 4; b++) {
                g->sack[b].start = rd32be(t + i + 2 + 8 * b);
                g->sack[b].end = rd32be(t + i + 6 + 8 * b);
                g->nsack = (uint8_t)(b + 1);
            }
        }
        i += olen;
    }
    return 0;
}

static void reply_rst(tcp_stack *s, uint32_t peer_id, const seg_repr *g) {
    if (g->flags & F_RST) return;
    if (g->flags & F_ACK) {
        send_rst_reply(s, peer_id, g->family, g->src, g->sport, g->dst, g->dport, g->ack, 0, F_RST);
    } else {
        uint32_t seglen = g->dlen + ((g->flags & F_SYN) ? 1 : 0) + ((g->flags & F_FIN) ? 1 : 0);
        send_rst_reply(s, peer_id, g->family, g->src, g->sport, g->dst, g->dport, 0, g->seq + seglen,
                       F_RST | F_ACK);
    }
}

static uint32_t make_iss(tcp_stack *s, const tcp_conn *c, double now) {
    /* Not a security boundary: every segment is authenticated by WireGuard before it gets here.
     * A 4 us clock plus a keyed mix of the tuple keeps incarnations apart (RFC 9293 3.4.1). */
    uint64_t x = s->cfg.iss_seed ^ ((uint64_t)c->src_ip << 32 | c->dst_ip) ^
                 ((uint64_t)c->src_port << 48 | (uint64_t)c->dst_port << 32 | c->peer_id);
    x ^= x >> 30; x *= 0xbf58476d1ce4e5b9ULL; x ^= x >> 27; x *= 0x94d049bb133111ebULL; x ^= x >> 31;
    return (uint32_t)x + (uint32_t)(uint64_t)(now * 250000.0);
}

static int new_connection(tcp_stack *s, uint32_t peer_id, const seg_repr *g, double now) {
    peer_entry *p = peer_get(s, peer_id);
    if (!p) return drop(s, TCP_DROP_NOMEM);
    if (p->half_open >= s->cfg.max_half_open_per_peer) {
        p->refused_half_open++;
        reply_rst(s, peer_id, g);
        return drop(s, TCP_DROP_LIMIT_HALF_OPEN);
    }
    if (p->open >= s->cfg.max_conns_per_peer) {
        p->refused_conns++;
        reply_rst(s, peer_id, g);
        return drop(s, TCP_DROP_LIMIT_PEER);
    }
    if (s->free_count == 0 && s->tw_head) {
        /* Table full: the oldest TIME-WAIT gives way (freed now if already released). */
        conn_closed(s, s->tw_head, 0);
        reap(s);
    }
    if (s->free_count == 0) {
        reply_rst(s, peer_id, g);
        return drop(s, TCP_DROP_LIMIT_CONNS);
    }
    tcp_conn *c = calloc(1, sizeof *c);
    if (!c) return drop(s, TCP_DROP_NOMEM);
    uint32_t slot = s->free_fifo[s->free_head];
    s->free_head = (s->free_head + 1) % s->cfg.max_conns;
    s->free_count--;
    s->gens[slot] = (uint16_t)((s->gens[slot] + 1) & GEN_MASK);
    c->id = (slot + 1) | (uint32_t)s->gens[slot] << SLOT_BITS;
    s->slots[slot] = c;
    s->st.conns++;
    s->st.mem += sizeof *c;
    c->peer_id = peer_id;
    c->src_ip = g->src_ip;
    c->dst_ip = g->dst_ip;
    c->family = g->family;
    memcpy(c->src_addr, g->src, wire_addr_len(g->family));
    memcpy(c->dst_addr, g->dst, wire_addr_len(g->family));
    c->src_port = g->sport;
    c->dst_port = g->dport;
    c->heap_idx = -1;
    c->irs = g->seq;
    c->rcv_nxt = g->seq + 1;
    c->rcap = s->cfg.rcvbuf;
    c->scap = s->cfg.sndbuf;
    c->snd_mss = (uint16_t)min_u32(g->mss ? g->mss : DEFAULT_PEER_MSS,
                                   s->mss - (g->family == 6 ? 20u : 0u));
    if (c->snd_mss < 64) c->snd_mss = 64; /* a silly MSS option must not make us send 1-byte segments */
    c->sack_ok = g->sack_permitted;
    if (g->wscale >= 0) {
        c->wscale_ok = 1;
        c->snd_wscale = (uint8_t)g->wscale;
        c->rcv_wscale = s->rcv_wscale;
    }
    c->snd_wnd = g->wnd;
    c->snd_wl1 = g->seq;
    c->rto = RTO_INITIAL;
    c->hnext = s->buckets[tuple_hash(s, peer_id, c->src_ip, c->src_port, c->dst_ip, c->dst_port)];
    s->buckets[tuple_hash(s, peer_id, c->src_ip, c->src_port, c->dst_ip, c->dst_port)] = c;
    c->hashed = 1;
    c->state = 0;
    s->st.open++; /* set_state moves counts from the "open, not half-open" pseudo state 0 */
    p->open++;
    set_state(s, c, TCP_ST_SYN_PENDING);
    c->state_at = now + s->syn_pending_s;
    timers_changed(s, c);
    s->st.syns++;
    raise_event(s, c, TCP_EV_SYN, 0);
    return 0;
}

/* [start, end) joins a sorted list of disjoint ranges (merging what it touches).  -1 when
 * the list is full and nothing merged. */
static int ranges_add(seq_range *r, uint8_t *count, uint32_t cap, uint32_t start, uint32_t end) {
    uint32_t i = 0, n = *count;
    while (i < n && SEQ_LT(r[i].end, start)) i++;
    uint32_t j = i;
    while (j < n && SEQ_LEQ(r[j].start, end)) {
        if (SEQ_LT(r[j].start, start)) start = r[j].start;
        if (SEQ_GT(r[j].end, end)) end = r[j].end;
        j++;
    }
    if (j == i && n == cap) return -1;
    memmove(&r[i + 1], &r[j], (n - j) * sizeof r[0]);
    r[i].start = start;
    r[i].end = end;
    *count = (uint8_t)(n - (j - i) + 1);
    return 0;
}

static int ooo_add(tcp_conn *c, uint32_t start, uint32_t end) {
    return ranges_add(c->ooo, &c->nooo, OOO_MAX, start, end);
}

/* ---- SACK scoreboard of what we sent (RFC 2018, recovery in the spirit of RFC 6675) -------- */
static void sack_prune(tcp_conn *c) {
    uint32_t k = 0;
    for (uint32_t i = 0; i < c->nsacked; i++) {
        seq_range r = c->sacked[i];
        if (SEQ_LEQ(r.end, c->snd_una)) continue;
        if (SEQ_LT(r.start, c->snd_una)) r.start = c->snd_una;
        c->sacked[k++] = r;
    }
    c->nsacked = (uint8_t)k;
}

/* SACKed bytes in [snd_una, upto): not in flight any more. */
static uint32_t sacked_below(const tcp_conn *c, uint32_t upto) {
    uint32_t total = 0;
    for (uint32_t i = 0; i < c->nsacked; i++) {
        const seq_range *r = &c->sacked[i];
        if (SEQ_GEQ(r->start, upto)) break;
        total += (SEQ_LT(r->end, upto) ? r->end : upto) - r->start;
    }
    return total;
}

/* The next un-SACKed piece below the highest SACKed byte, from rtx_next on: its length, or 0. */
static uint32_t next_hole(const tcp_conn *c, uint32_t *seq) {
    uint32_t from = SEQ_GT(c->rtx_next, c->snd_una) ? c->rtx_next : c->snd_una;
    for (uint32_t i = 0; i < c->nsacked; i++) {
        if (SEQ_LT(from, c->sacked[i].start)) {
            uint32_t data_end = c->snd_una + c->slen;
            uint32_t end = SEQ_LT(c->sacked[i].start, data_end) ? c->sacked[i].start : data_end;
            if (SEQ_LEQ(end, from)) return 0;
            *seq = from;
            return min_u32(end - from, c->snd_mss);
        }
        if (SEQ_LT(from, c->sacked[i].end)) from = c->sacked[i].end;
    }
    return 0;
}

static void ring_put(uint8_t *buf, uint32_t cap, uint32_t pos, const uint8_t *src, uint32_t n) {
    pos %= cap;
    uint32_t first = min_u32(n, cap - pos);
    memcpy(buf + pos, src, first);
    memcpy(buf, src + first, n - first);
}

/* Dup ACK handling, RFC 5681 3.2 + RFC 6582 3.2. */
static void on_dupack(tcp_stack *s, tcp_conn *c, double now) {
    c->dupacks++;
    uint32_t threshold = DUPACK_THRESHOLD;
    uint32_t outstanding = c->snd_max - c->snd_una;
    uint32_t unsent = c->slen > outstanding ? c->slen - outstanding : 0;
    uint32_t segs = (outstanding + c->snd_mss - 1) / c->snd_mss;
    /* Early Retransmit (RFC 5827): with under four segments out and nothing new to send,
     * three dup ACKs can never come */
    if (segs < 4 && unsent == 0 && segs >= 2) threshold = segs - 1;
    if (c->dupacks == threshold && !c->in_recovery) {
        /* After an RTO, duplicates of the go-back-N resend are no loss signal (RFC 6582 4.1);
         * SACK blocks above a hole are, and waiting for the next RTO would cascade. */
        if (SEQ_LT(c->snd_una, c->recover) && !c->nsacked) return;
        uint32_t flight = c->snd_max - c->snd_una;
        c->ssthresh = max_u32(flight / 2, 2u * c->snd_mss);
        c->recover = c->snd_max;
        c->in_recovery = 1;
        s->st.fast_retransmits++;
        retransmit_head(s, c);
        c->cwnd = c->ssthresh + 3u * c->snd_mss;
        arm_rto(s, c, now);
    } else if (c->in_recovery && c->dupacks > threshold) {
        c->cwnd += c->snd_mss; /* each dup ACK means a segment left the network */
        sack_retransmit(s, c, 1);
    }
}

/* A new cumulative ACK: returns 1 if the connection closed. */
static int on_new_ack(tcp_stack *s, tcp_conn *c, uint32_t ack, double now) {
    uint32_t acked = ack - c->snd_una;
    uint32_t data_acked = min_u32(acked, c->slen);
    int fin_acked = c->fin_sent && ack == c->snd_una + c->slen + 1;
    if (data_acked) {
        c->shead = (c->shead + data_acked) % c->scap;
        c->slen -= data_acked;
        c->bytes_out += data_acked;
    }
    c->snd_una = ack;
    if (SEQ_LT(c->snd_nxt, c->snd_una)) c->snd_nxt = c->snd_una;
    sack_prune(c);
    if (c->timing && SEQ_GEQ(ack, c->rtt_seq)) {
        c->timing = 0;
        rtt_sample(c, now - c->rtt_time);
    }
    c->backoff = 0;
    if (c->in_recovery) {
        if (SEQ_GEQ(ack, c->recover)) {
            /* full ACK (RFC 6582 3.2 step 3) */
            c->in_recovery = 0;
            c->dupacks = 0;
            c->cwnd = min_u32(c->ssthresh, max_u32(c->snd_max - c->snd_una, c->snd_mss) + c->snd_mss);
        } else {
            /* partial ACK: the next hole(s), deflate by what left, keep the ACK clock going */
            sack_prune(c);
            if (!sack_retransmit(s, c, 2) && SEQ_GEQ(c->snd_una, c->rtx_next)) retransmit_head(s, c);
            c->cwnd = (c->cwnd > acked ? c->cwnd - acked : 0);
            if (acked >= c->snd_mss) c->cwnd += c->snd_mss;
            if (c->cwnd < c->snd_mss) c->cwnd = c->snd_mss;
        }
    } else {
        c->dupacks = 0;
        if (c->cwnd < c->ssthresh) {
            c->cwnd += min_u32(acked, 2u * c->snd_mss); /* slow start, RFC 3465 L = 2 */
        } else {
            c->ca_acked += acked;
            if (c->ca_acked >= c->cwnd) {
                c->ca_acked -= c->cwnd;
                c->cwnd += c->snd_mss;
            }
        }
        if (c->cwnd > (1u << 30)) c->cwnd = 1u << 30;
    }
    if (c->snd_una == c->snd_max) {
        c->rto_at = 0;
        timers_changed(s, c);
    } else {
        arm_rto(s, c, now);
    }
    if (c->slen == 0 && c->sbuf) free_buffers(s, c, 1, 0);
    if (c->want_writable && c->scap - c->slen >= c->scap / 4) {
        c->want_writable = 0;
        raise_event(s, c, TCP_EV_WRITABLE, 0);
    }
    if (fin_acked) {
        on_fin_acked(s, c, now);
        if (c->state == TCP_ST_CLOSED) return 1;
    }
    return 0;
}

/* Place in-window data; returns 1 when the ACK should go at once. */
static int receive_data(tcp_stack *s, tcp_conn *c, uint32_t seq, const uint8_t *data,
                        uint32_t dlen) {
    if (!c->rbuf) {
        c->rbuf = malloc(c->rcap);
        if (!c->rbuf) {
            drop(s, TCP_DROP_NOMEM);
            return 0;
        }
        s->st.mem += c->rcap;
        c->rhead = 0;
    }
    uint32_t off = seq - c->rcv_nxt;
    if (off > 0) {
        if (ooo_add(c, seq, seq + dlen) < 0) {
            drop(s, TCP_DROP_OOO_FULL);
            return 1;
        }
        ring_put(c->rbuf, c->rcap, c->rhead + c->rlen + off, data, dlen);
        c->ooo_recent = seq;
        return 1; /* a gap: the duplicate ACK drives the peer's fast retransmit */
    }
    ring_put(c->rbuf, c->rcap, c->rhead + c->rlen, data, dlen);
    c->rcv_nxt += dlen;
    c->rlen += dlen;
    c->bytes_in += dlen;
    c->unacked_bytes += dlen;
    int now_ack = 0;
    while (c->nooo && SEQ_LEQ(c->ooo[0].start, c->rcv_nxt)) {
        if (SEQ_GT(c->ooo[0].end, c->rcv_nxt)) {
            uint32_t more = c->ooo[0].end - c->rcv_nxt;
            c->rcv_nxt += more;
            c->rlen += more;
            c->bytes_in += more;
        }
        memmove(&c->ooo[0], &c->ooo[1], (c->nooo - 1u) * sizeof c->ooo[0]);
        c->nooo--;
        now_ack = 1; /* a hole filled: tell the peer at once (RFC 5681 4.2) */
    }
    if (c->unacked_bytes >= 2u * min_u32(c->snd_mss, s->mss)) now_ack = 1;
    if (c->released) {
        /* nobody will read: consume so the window stays open while the close finishes */
        drop(s, TCP_DROP_AFTER_CLOSE);
        c->rhead = (c->rhead + c->rlen) % c->rcap;
        c->rlen = 0;
    } else {
        raise_readable(s, c);
    }
    return now_ack;
}

static int conn_input(tcp_stack *s, tcp_conn *c, uint32_t peer_id, seg_repr *g, double now) {
    uint8_t fl = g->flags;

    if (c->state == TCP_ST_SYN_PENDING) {
        if ((fl & F_RST) && g->seq == c->rcv_nxt) {
            conn_closed(s, c, TCP_CLOSE_RESET);
            return 0;
        }
        /* the peer repeating its SYN while the owner decides: absorbed */
        return drop(s, (fl & F_SYN) ? TCP_DROP_SYN_DUPLICATE : TCP_DROP_NO_ACK);
    }
    if (c->state == TCP_ST_TIME_WAIT && (fl & F_SYN) && !(fl & (F_ACK | F_RST)) &&
        SEQ_GT(g->seq, c->rcv_nxt)) {
        /* a new incarnation of the same tuple (RFC 9293 3.6.1) */
        conn_closed(s, c, TCP_CLOSE_NORMAL);
        return new_connection(s, peer_id, g, now);
    }
    if (c->state == TCP_ST_TIME_WAIT && (fl & F_RST))
        return drop(s, TCP_DROP_RST_IGNORED); /* RFC 1337: no TIME-WAIT assassination */
    if ((fl & F_SYN) && !(fl & F_RST)) {
        if (c->state == TCP_ST_SYN_RECEIVED && g->seq == c->irs) {
            if (challenge_allowed(s, c, now)) send_synack(s, c); /* our SYN-ACK was lost */
            return drop(s, TCP_DROP_SYN_DUPLICATE);
        }
        challenge_ack(s, c, now); /* RFC 5961 4.2 */
        return drop(s, TCP_DROP_SYN_DUPLICATE);
    }

    /* Sequence check (RFC 9293 3.10.7.4 first), against the space we really have. */
    uint32_t wnd = c->fin_rcvd ? 0 : c->rcap - c->rlen;
    uint32_t seglen = g->dlen + ((fl & F_FIN) ? 1 : 0);
    uint32_t rel = g->seq - c->rcv_nxt;
    int ok;
    if (seglen == 0) {
        ok = wnd == 0 ? g->seq == c->rcv_nxt : rel < wnd;
        /* A pure ACK overtaken by a later segment (reordering): take its ACK without answering,
         * so reordering does not become duplicate ACKs at the peer.  Not rcv_nxt - 1: that is a
         * zero-window probe or keepalive, which must be answered (below). */
        if (!ok && !(fl & F_RST) && SEQ_LT(g->seq, c->rcv_nxt - 1) &&
            c->rcv_nxt - g->seq <= c->rcap)
            ok = 1;
    } else
        ok = wnd != 0 && (rel < wnd || (uint32_t)(g->seq + seglen - 1 - c->rcv_nxt) < wnd);
    int probe = 0;
    if (!ok) {
        if (!(fl & F_RST) && g->seq == c->rcv_nxt && wnd == 0) {
            probe = 1; /* zero-window probe: process the ACK, answer with our window */
        } else if (!(fl & F_RST) && c->fin_rcvd && g->seq + seglen == c->rcv_nxt) {
            probe = 1; /* the peer's FIN again (our ACK was lost): ACK it */
        } else {
            if (fl & F_RST) return drop(s, TCP_DROP_RST_IGNORED);
            challenge_ack(s, c, now);
            return drop(s, TCP_DROP_OUT_OF_WINDOW);
        }
    }
    if (fl & F_RST) {
        if (g->seq == c->rcv_nxt) {
            conn_closed(s, c, TCP_CLOSE_RESET);
            return 0;
        }
        challenge_ack(s, c, now); /* RFC 5961 3.2: in window but not exact */
        return drop(s, TCP_DROP_RST_IGNORED);
    }
    if (!(fl & F_ACK)) return drop(s, TCP_DROP_NO_ACK);

    int ack_now = probe;
    uint32_t seq = g->seq, dlen = g->dlen;
    const uint8_t *data = g->data;
    int fin = (fl & F_FIN) != 0;
    if (probe) {
        dlen = 0;
        fin = 0;
    }
    /* Trim to the window: the old part on the left, what does not fit on the right. */
    if (SEQ_LT(seq, c->rcv_nxt)) {
        uint32_t d = c->rcv_nxt - seq;
        if (d > dlen) { /* all data old; the FIN too unless it sits at rcv_nxt */
            fin = 0;
            d = dlen;
        }
        seq += d;
        data += d;
        dlen -= d;
        if (d || fin) ack_now = 1; /* a duplicate: the peer missed our ACK */
    }
    if (dlen && (uint32_t)(seq + dlen - c->rcv_nxt) > wnd) {
        dlen = c->rcv_nxt + wnd - seq;
        fin = 0;
    }

    /* ACK */
    if (c->state == TCP_ST_SYN_RECEIVED) {
        if (!(SEQ_GT(g->ack, c->snd_una) && SEQ_LEQ(g->ack, c->snd_max))) {
            send_rst_reply(s, peer_id, g->family, g->src, g->sport, g->dst, g->dport, g->ack, 0, F_RST);
            return drop(s, TCP_DROP_BAD_ACK);
        }
        if (c->backoff == 0) rtt_sample(c, now - c->rtt_time);
        c->snd_una = c->iss + 1;
        c->backoff = 0;
        c->rto_at = 0;
        timers_changed(s, c);
        c->snd_wnd = (uint32_t)g->wnd << c->snd_wscale;
        c->snd_wl1 = g->seq;
        c->snd_wl2 = g->ack;
        set_state(s, c, c->fin_queued ? TCP_ST_FIN_WAIT_1 : TCP_ST_ESTABLISHED);
        s->st.established++;
    }
    if (SEQ_GT(g->ack, c->snd_max)) {
        challenge_ack(s, c, now);
        return drop(s, TCP_DROP_BAD_ACK);
    }
    if (SEQ_GEQ(g->ack, c->snd_una)) {
        c->probes_unanswered = 0; /* an acceptable ACK: the peer is there */
        if (c->sack_ok) {
            for (uint32_t b = 0; b < g->nsack; b++) {
                uint32_t bs = g->sack[b].start, be = g->sack[b].end;
                if (!SEQ_LT(bs, be) || SEQ_LEQ(be, g->ack) || SEQ_GT(be, c->snd_max)) continue;
                if (SEQ_LT(bs, g->ack)) bs = g->ack;
                ranges_add(c->sacked, &c->nsacked, SACK_MAX, bs, be);
            }
        }
        uint32_t new_wnd = (uint32_t)g->wnd << c->snd_wscale;
        int wnd_changed = new_wnd != c->snd_wnd;
        if (SEQ_LT(c->snd_wl1, g->seq) || (c->snd_wl1 == g->seq && SEQ_LEQ(c->snd_wl2, g->ack))) {
            c->snd_wnd = new_wnd;
            c->snd_wl1 = g->seq;
            c->snd_wl2 = g->ack;
            if (new_wnd && c->persist) {
                c->persist = 0;
                c->backoff = 0;
                if (c->snd_una == c->snd_max) {
                    c->rto_at = 0;
                    timers_changed(s, c);
                }
            }
        }
        if (SEQ_GT(g->ack, c->snd_una)) {
            if (on_new_ack(s, c, g->ack, now)) return 0;
        } else if (g->dlen == 0 && !(fl & F_FIN) && (!wnd_changed || g->nsack) &&
                   c->snd_max != c->snd_una) {
            /* a duplicate ACK; one with SACK blocks counts even if the window moved (RFC 6675),
             * as receivers that autotune their buffer grow the window on every ACK */
            on_dupack(s, c, now);
        }
    }

    /* Data and FIN, while the peer may still send. */
    int st = c->state;
    if (st == TCP_ST_ESTABLISHED || st == TCP_ST_FIN_WAIT_1 || st == TCP_ST_FIN_WAIT_2) {
        if (dlen && receive_data(s, c, seq, data, dlen)) ack_now = 1;
        if (fin) {
            uint32_t fin_seq = seq + dlen;
            if (fin_seq == c->rcv_nxt) {
                on_fin_received(s, c, now);
                ack_now = 1;
            } else if (SEQ_GT(fin_seq, c->rcv_nxt)) {
                c->ooo_fin = 1;
                c->ooo_fin_seq = fin_seq;
                ack_now = 1;
            }
        }
        if (c->ooo_fin && c->ooo_fin_seq == c->rcv_nxt && !c->fin_rcvd) {
            on_fin_received(s, c, now);
            ack_now = 1;
        }
    }
    if (c->state == TCP_ST_CLOSED) return 0;
    if (c->state == TCP_ST_TIME_WAIT) {
        if (ack_now || fin) send_ack(s, c);
        return 0;
    }

    conn_output(s, c, now);
    if (ack_now) send_ack(s, c);
    else if (c->unacked_bytes) ack_later(s, c, now);
    return 0;
}

/* ---- Public API ---------------------------------------------------------------------------- */
tcp_stack *tcp_stack_new(const tcp_config *cfg_in, const tcp_callbacks *cb) {
    if (!cfg_in || !cb) return NULL;
    tcp_config cfg = *cfg_in;
    if (!cfg.rcvbuf) cfg.rcvbuf = 256 * 1024;
    if (!cfg.sndbuf) cfg.sndbuf = 256 * 1024;
    if (!cfg.mtu) cfg.mtu = 1420;
    if (!cfg.max_conns) cfg.max_conns = 4096;
    if (!cfg.max_conns_per_peer) cfg.max_conns_per_peer = cfg.max_conns;
    if (!cfg.max_half_open_per_peer) cfg.max_half_open_per_peer = 64;
    if (!cfg.time_wait_max) cfg.time_wait_max = 1024;
    if (!cfg.time_wait_ms) cfg.time_wait_ms = 1000;
    if (!cfg.syn_pending_ms) cfg.syn_pending_ms = 30000;
    if (cfg.mtu < 576 || cfg.max_conns >= SLOT_MASK || cfg.rcvbuf < 1024 || cfg.sndbuf < 1024 ||
        cfg.rcvbuf > (1u << 30) || cfg.sndbuf > (1u << 30))
        return NULL;
    tcp_stack *s = calloc(1, sizeof *s);
    if (!s) return NULL;
    s->cfg = cfg;
    s->cb = *cb;
    s->mss = (uint16_t)(cfg.mtu - 40);
    while (s->rcv_wscale < MAX_WSCALE && (cfg.rcvbuf >> s->rcv_wscale) > 0xffff) s->rcv_wscale++;
    s->time_wait_s = cfg.time_wait_ms / 1000.0;
    s->syn_pending_s = cfg.syn_pending_ms / 1000.0;
    uint32_t nb = 16;
    while (nb < cfg.max_conns) nb <<= 1;
    s->bucket_mask = nb - 1;
    s->slots = calloc(cfg.max_conns, sizeof *s->slots);
    s->gens = calloc(cfg.max_conns, sizeof *s->gens);
    s->free_fifo = calloc(cfg.max_conns, sizeof *s->free_fifo);
    s->buckets = calloc(nb, sizeof *s->buckets);
    s->heap = calloc(cfg.max_conns, sizeof *s->heap);
    s->pkt = malloc((size_t)cfg.mtu + 64);
    if (!s->slots || !s->gens || !s->free_fifo || !s->buckets || !s->heap || !s->pkt) {
        tcp_stack_free(s);
        return NULL;
    }
    for (uint32_t i = 0; i < cfg.max_conns; i++) s->free_fifo[i] = i;
    s->free_count = cfg.max_conns;
    return s;
}

void tcp_stack_free(tcp_stack *s) {
    if (!s) return;
    if (s->slots)
        for (uint32_t i = 0; i < s->cfg.max_conns; i++)
            if (s->slots[i]) {
                free(s->slots[i]->sbuf);
                free(s->slots[i]->rbuf);
                free(s->slots[i]);
            }
    free(s->slots);
    free(s->gens);
    free(s->free_fifo);
    free(s->buckets);
    free(s->heap);
    free(s->peers);
    free(s->pkt);
    free(s);
}

int tcp_input(tcp_stack *s, uint32_t peer_id, const uint8_t *ip_packet, size_t len, double now) {
    if (!s || !ip_packet) return TCP_EINVAL;
    wire_ip_repr ip;
    if (wire_ip_parse(ip_packet, len, &ip)) return tcp_process(s, peer_id, &ip, now);
    s->st.segs_in++;
    return drop(s, TCP_DROP_MALFORMED);
}

int tcp_process(tcp_stack *s, uint32_t peer_id, const struct wire_ip_repr *ip, double now) {
    s->now = now;
    s->st.segs_in++;
    seg_repr g;
    if (parse_segment(s, ip, &g)) return 1;
    tcp_conn *c = conn_lookup(s, peer_id, g.family, g.src, g.src_ip, g.sport, g.dst, g.dst_ip, g.dport);
    int r;
    if (c) {
        r = conn_input(s, c, peer_id, &g, now);
    } else if ((g.flags & (F_SYN | F_ACK | F_RST)) == F_SYN) {
        r = new_connection(s, peer_id, &g, now);
    } else {
        reply_rst(s, peer_id, &g);
        r = drop(s, TCP_DROP_NO_CONN);
    }
    reap(s);
    return r;
}

void tcp_flush(tcp_stack *s, double now) {
    if (!s) return;
    s->now = now;
    while (s->ack_head) send_ack(s, s->ack_head);
}

int tcp_accept(tcp_stack *s, uint32_t conn_id, double now) {
    tcp_conn *c = conn_by_id(s, conn_id);
    if (!c) return TCP_ENOCONN;
    s->now = now;
    if (c->state != TCP_ST_SYN_PENDING) return TCP_ESTATE;
    c->iss = make_iss(s, c, now);
    c->snd_una = c->iss;
    c->snd_nxt = c->snd_max = c->iss + 1;
    c->recover = c->iss;
    c->cwnd = INITIAL_WINDOW_SEGS * (uint32_t)c->snd_mss;
    c->ssthresh = 0xffffffffu;
    c->state_at = 0;
    set_state(s, c, TCP_ST_SYN_RECEIVED);
    c->rtt_time = now;
    send_synack(s, c);
    arm_rto(s, c, now);
    return 0;
}

int tcp_reject(tcp_stack *s, uint32_t conn_id, double now) {
    tcp_conn *c = conn_by_id(s, conn_id);
    if (!c) return TCP_ENOCONN;
    s->now = now;
    if (c->state != TCP_ST_SYN_PENDING) return TCP_ESTATE;
    send_rst_reply(s, c->peer_id, c->family, c->src_addr, c->src_port, c->dst_addr, c->dst_port, 0, c->rcv_nxt,
                   F_RST | F_ACK);
    conn_closed(s, c, TCP_CLOSE_REJECTED);
    reap(s);
    return 0;
}

/* After n bytes left the receive ring: free it when empty, offer the window when it grew. */
static void after_read(tcp_stack *s, tcp_conn *c, uint32_t n) {
    c->rhead = (c->rhead + n) % c->rcap;
    c->rlen -= n;
    if (c->rlen == 0 && c->nooo == 0) free_buffers(s, c, 0, 1);
    /* window update when the right edge can move by a useful amount */
    int st = c->state;
    if (!c->fin_rcvd &&
        (st == TCP_ST_ESTABLISHED || st == TCP_ST_FIN_WAIT_1 || st == TCP_ST_FIN_WAIT_2)) {
        uint32_t edge = c->rcv_nxt + (c->rcap - c->rlen);
        if ((int32_t)(edge - c->rcv_adv) >= (int32_t)min_u32(c->rcap / 2, 2u * s->mss))
            send_ack(s, c);
    }
}

/* What tcp_read and tcp_read_spans answer before any byte moves: 1 = rlen bytes readable. */
static long read_status(tcp_conn *c) {
    c->readable_armed = 0;
    if (c->state == TCP_ST_CLOSED && c->close_reason != TCP_CLOSE_NORMAL) return TCP_ERESET;
    if (c->rlen == 0) return c->fin_rcvd ? 0 : TCP_EAGAIN;
    return 1;
}

long tcp_read(tcp_stack *s, uint32_t conn_id, uint8_t *buf, size_t cap, double now) {
    tcp_conn *c = conn_by_id(s, conn_id);
    if (!c) return TCP_ENOCONN;
    s->now = now;
    if (!buf && cap) return TCP_EINVAL;
    long status = read_status(c);
    if (status != 1) return status;
    uint32_t n = (uint32_t)(cap < c->rlen ? cap : c->rlen);
    uint32_t first = min_u32(n, c->rcap - c->rhead);
    memcpy(buf, c->rbuf + c->rhead, first);
    memcpy(buf + first, c->rbuf, n - first);
    after_read(s, c, n);
    return (long)n;
}

long tcp_read_spans(tcp_stack *s, uint32_t conn_id, tcp_span spans[2]) {
    tcp_conn *c = conn_by_id(s, conn_id);
    if (!c) return TCP_ENOCONN;
    if (!spans) return TCP_EINVAL;
    spans[0] = spans[1] = (tcp_span){NULL, 0};
    long status = read_status(c);
    if (status != 1) return status;
    uint32_t first = min_u32(c->rlen, c->rcap - c->rhead);
    spans[0] = (tcp_span){c->rbuf + c->rhead, first};
    if (c->rlen > first) spans[1] = (tcp_span){c->rbuf, c->rlen - first};
    return (long)c->rlen;
}

long tcp_read_consume(tcp_stack *s, uint32_t conn_id, size_t n, double now) {
    tcp_conn *c = conn_by_id(s, conn_id);
    if (!c) return TCP_ENOCONN;
    if (n > c->rlen) return TCP_EINVAL;
    s->now = now;
    if (n) after_read(s, c, (uint32_t)n);
    return (long)n;
}

/* What tcp_write and tcp_write_spans check before taking bytes: 0 = may write. */
static long write_status(const tcp_conn *c) {
    int st = c->state;
    if (st == TCP_ST_CLOSED && c->close_reason != TCP_CLOSE_NORMAL) return TCP_ERESET;
    if (c->fin_queued ||
        (st != TCP_ST_SYN_RECEIVED && st != TCP_ST_ESTABLISHED && st != TCP_ST_CLOSE_WAIT))
        return TCP_ESTATE;
    return 0;
}

static int ensure_send_buffer(tcp_stack *s, tcp_conn *c) {
    if (c->sbuf) return 0;
    c->sbuf = malloc(c->scap);
    if (!c->sbuf) return TCP_ENOMEM;
    s->st.mem += c->scap;
    c->shead = 0;
    return 0;
}

long tcp_write(tcp_stack *s, uint32_t conn_id, const uint8_t *data, size_t len, double now) {
    tcp_conn *c = conn_by_id(s, conn_id);
    if (!c) return TCP_ENOCONN;
    s->now = now;
    if (!data && len) return TCP_EINVAL;
    long status = write_status(c);
    if (status != 0) return status;
    if (len == 0) return 0;
    if (ensure_send_buffer(s, c) != 0) return TCP_ENOMEM;
    uint32_t space = c->scap - c->slen;
    uint32_t n = len < space ? (uint32_t)len : space;
    if (n) ring_put(c->sbuf, c->scap, c->shead + c->slen, data, n);
    c->slen += n;
    if (n < len) c->want_writable = 1;
    conn_output(s, c, now);
    reap(s);
    return (long)n;
}

long tcp_write_spans(tcp_stack *s, uint32_t conn_id, tcp_span spans[2]) {
    tcp_conn *c = conn_by_id(s, conn_id);
    if (!c) return TCP_ENOCONN;
    if (!spans) return TCP_EINVAL;
    spans[0] = spans[1] = (tcp_span){NULL, 0};
    long status = write_status(c);
    if (status != 0) return status;
    if (ensure_send_buffer(s, c) != 0) return TCP_ENOMEM;
    uint32_t space = c->scap - c->slen;
    if (space == 0) {
        c->want_writable = 1;
        return 0;
    }
    uint32_t tail = (c->shead + c->slen) % c->scap;
    uint32_t first = min_u32(space, c->scap - tail);
    spans[0] = (tcp_span){c->sbuf + tail, first};
    if (space > first) spans[1] = (tcp_span){c->sbuf, space - first};
    return (long)space;
}

long tcp_write_commit(tcp_stack *s, uint32_t conn_id, size_t n, double now) {
    tcp_conn *c = conn_by_id(s, conn_id);
    if (!c) return TCP_ENOCONN;
    if (!c->sbuf || n > c->scap - c->slen) return n ? TCP_EINVAL : 0;
    s->now = now;
    if (n == 0) {
        if (c->slen == 0) free_buffers(s, c, 1, 0); /* reserved for nothing: stay small */
        return 0;
    }
    c->slen += (uint32_t)n;
    conn_output(s, c, now);
    reap(s);
    return (long)n;
}

static int shutdown_write(tcp_stack *s, tcp_conn *c, double now) {
    if (c->fin_queued) return 0;
    switch (c->state) {
    case TCP_ST_SYN_RECEIVED:
        break; /* FIN-WAIT-1 once the handshake completes */
    case TCP_ST_ESTABLISHED:
        set_state(s, c, TCP_ST_FIN_WAIT_1);
        break;
    case TCP_ST_CLOSE_WAIT:
        set_state(s, c, TCP_ST_LAST_ACK);
        break;
    default:
        return TCP_ESTATE;
    }
    c->fin_queued = 1;
    conn_output(s, c, now);
    return 0;
}

int tcp_shutdown_write(tcp_stack *s, uint32_t conn_id, double now) {
    tcp_conn *c = conn_by_id(s, conn_id);
    if (!c) return TCP_ENOCONN;
    s->now = now;
    return shutdown_write(s, c, now);
}

static void abort_conn(tcp_stack *s, tcp_conn *c, int reason) {
    if (c->state == TCP_ST_CLOSED) return;
    if (c->state == TCP_ST_SYN_PENDING)
        send_rst_reply(s, c->peer_id, c->family, c->src_addr, c->src_port, c->dst_addr, c->dst_port, 0,
                       c->rcv_nxt, F_RST | F_ACK);
    else if (c->state != TCP_ST_TIME_WAIT)
        emit_packet(s, c->peer_id, c->family, c->dst_addr, c->dst_port, c->src_addr, c->src_port, c->snd_nxt,
                    c->rcv_nxt, F_RST | F_ACK, 0, NULL, 0, NULL, 0, 0);
    conn_closed(s, c, reason);
}

int tcp_abort(tcp_stack *s, uint32_t conn_id, double now) {
    tcp_conn *c = conn_by_id(s, conn_id);
    if (!c) return TCP_ENOCONN;
    s->now = now;
    abort_conn(s, c, TCP_CLOSE_ABORTED);
    reap(s);
    return 0;
}

int tcp_release(tcp_stack *s, uint32_t conn_id, double now) {
    tcp_conn *c = conn_by_id(s, conn_id);
    if (!c) return TCP_ENOCONN;
    s->now = now;
    c->released = 1;
    switch (c->state) {
    case TCP_ST_CLOSED:
        c->hnext = s->reap;
        s->reap = c;
        break;
    case TCP_ST_TIME_WAIT:
        free_buffers(s, c, 1, 1); /* the struct lives on until the TIME-WAIT ends */
        break;
    case TCP_ST_SYN_PENDING:
        abort_conn(s, c, TCP_CLOSE_REJECTED);
        break;
    default:
        if (c->rlen > 0) {
            abort_conn(s, c, TCP_CLOSE_ABORTED); /* unread data: like close(2), RST */
            break;
        }
        free_buffers(s, c, 0, 1);
        if (c->state == TCP_ST_FIN_WAIT_2) {
            c->state_at = now + FIN_WAIT_2_RELEASED;
            timers_changed(s, c);
        }
        shutdown_write(s, c, now);
        break;
    }
    reap(s);
    return 0;
}

int tcp_remove_peer(tcp_stack *s, uint32_t peer_id, double now) {
    if (!s) return TCP_EINVAL;
    s->now = now;
    int n = 0;
    for (uint32_t i = 0; i < s->cfg.max_conns; i++) {
        tcp_conn *c = s->slots[i];
        if (c && c->peer_id == peer_id && c->state != TCP_ST_CLOSED) {
            conn_closed(s, c, TCP_CLOSE_PEER_REMOVED);
            n++;
        }
    }
    reap(s);
    return n;
}

int tcp_abort_peer(tcp_stack *s, uint32_t peer_id, uint32_t reason, double now) {
    if (!s || (reason != TCP_CLOSE_PEER_GONE && reason != TCP_CLOSE_PRESSURE)) return TCP_EINVAL;
    s->now = now;
    int n = 0;
    for (uint32_t i = 0; i < s->cfg.max_conns; i++) {
        tcp_conn *c = s->slots[i];
        if (!c || c->peer_id != peer_id || c->state == TCP_ST_CLOSED) continue;
        if (reason == TCP_CLOSE_PRESSURE) {
            /* RFC 6429: only what the peer's zero window holds open (it answers our probes, so
             * RFC 1122 4.2.2.17 would keep it forever); its other connections stay. */
            if (!c->persist || c->snd_wnd) continue;
            abort_conn(s, c, (int)reason);
        } else {
            conn_closed(s, c, (int)reason);
        }
        n++;
    }
    reap(s);
    return n;
}

int tcp_get_info(tcp_stack *s, uint32_t conn_id, tcp_conn_info *out) {
    tcp_conn *c = conn_by_id(s, conn_id);
    if (!c) return TCP_ENOCONN;
    if (!out) return TCP_EINVAL;
    memset(out, 0, sizeof *out);
    out->conn_id = c->id;
    out->peer_id = c->peer_id;
    out->family = c->family;
    out->src_ip = c->family == 4 ? c->src_ip : 0;
    out->dst_ip = c->family == 4 ? c->dst_ip : 0;
    memcpy(out->src_addr, c->src_addr, sizeof out->src_addr);
    memcpy(out->dst_addr, c->dst_addr, sizeof out->dst_addr);
    out->src_port = c->src_port;
    out->dst_port = c->dst_port;
    out->state = c->state;
    out->close_reason = c->state == TCP_ST_CLOSED || c->state == TCP_ST_TIME_WAIT ? c->close_reason : 0;
    out->bytes_in = c->bytes_in;
    out->bytes_out = c->bytes_out;
    out->retransmits = c->retransmits;
    out->srtt = c->srtt;
    out->rttvar = c->rttvar;
    out->rto = rto_now(c);
    out->cwnd = c->cwnd;
    out->ssthresh = c->ssthresh;
    out->snd_wnd = c->snd_wnd;
    out->rcv_wnd = SEQ_GT(c->rcv_adv, c->rcv_nxt) ? c->rcv_adv - c->rcv_nxt : 0;
    out->snd_mss = c->snd_mss;
    out->snd_wscale = c->snd_wscale;
    out->rcv_wscale = c->rcv_wscale;
    out->wscale_ok = c->wscale_ok;
    out->sack_ok = c->sack_ok;
    out->rcv_queued = c->rlen;
    out->snd_queued = c->slen;
    out->mem = (uint32_t)sizeof *c + (c->sbuf ? c->scap : 0) + (c->rbuf ? c->rcap : 0);
    return 0;
}

static void on_rto(tcp_stack *s, tcp_conn *c, double now) {
    if (c->state == TCP_ST_SYN_RECEIVED) {
        if (c->backoff >= SYNACK_RETRIES) {
            abort_conn(s, c, TCP_CLOSE_TIMEOUT);
            return;
        }
        c->backoff++;
        c->retransmits++;
        s->st.retransmits++;
        send_synack(s, c);
        arm_rto(s, c, now);
        return;
    }
    if (c->persist && c->snd_wnd > 0) {
        /* A window too small to fill (SWS avoidance held it): the override timeout of RFC 1122
         * 4.2.3.4 sends what fits, and the RTO (with its retry limit) takes over. */
        c->persist = 0;
        c->sws_override = 1;
        conn_output(s, c, now);
        c->sws_override = 0;
        return;
    }
    if (c->persist) {
        /* RFC 1122 4.2.2.17 keeps the connection while the peer answers; one that stopped
         * answering would hold it (and its buffers) forever. */
        if (c->probes_unanswered >= PROBE_RETRIES) {
            abort_conn(s, c, TCP_CLOSE_TIMEOUT);
            return;
        }
        c->probes_unanswered++;
        /* zero-window probe: an old sequence number makes the peer answer with its window */
        s->st.zero_window_probes++;
        conn_emit(s, c, c->snd_una - 1, F_ACK, 0, 0);
        if (c->backoff < 16 && rto_now(c) < PERSIST_MAX) c->backoff++;
        c->rto_at = now + (rto_now(c) < PERSIST_MAX ? rto_now(c) : PERSIST_MAX);
        timers_changed(s, c);
        return;
    }
    if (c->snd_una == c->snd_max) return; /* nothing outstanding */
    if (c->backoff >= DATA_RETRIES) {
        abort_conn(s, c, TCP_CLOSE_TIMEOUT);
        return;
    }
    s->st.rto_expirations++;
    uint32_t flight = c->snd_max - c->snd_una;
    c->ssthresh = max_u32(flight / 2, 2u * c->snd_mss);
    c->cwnd = c->snd_mss; /* loss window, RFC 5681 3.1 */
    c->in_recovery = 0;
    c->recover = c->snd_max;
    c->dupacks = 0;
    c->ca_acked = 0;
    c->timing = 0; /* Karn: no sample from a retransmitted segment */
    c->backoff++;
    if (c->backoff >= 2) c->nsacked = 0; /* in case the peer dropped what it SACKed (reneging) */
    c->rtx_next = c->snd_una;
    c->snd_nxt = c->snd_una; /* go back: resend from the first hole */
    conn_output(s, c, now);
    if (c->snd_nxt == c->snd_una && !c->persist) {
        /* nothing could go (peer window shut): retransmit the head anyway to learn the window */
        retransmit_head(s, c);
    }
    arm_rto(s, c, now);
}

static void on_state_timer(tcp_stack *s, tcp_conn *c) {
    switch (c->state) {
    case TCP_ST_SYN_PENDING:
        abort_conn(s, c, TCP_CLOSE_SYN_TIMEOUT);
        break;
    case TCP_ST_TIME_WAIT:
        conn_closed(s, c, TCP_CLOSE_NORMAL);
        break;
    case TCP_ST_FIN_WAIT_2:
        abort_conn(s, c, TCP_CLOSE_EVICTED);
        break;
    default:
        break;
    }
}

void tcp_tick(tcp_stack *s, double now) {
    if (!s) return;
    s->now = now;
    while (s->heap_len && s->heap[0]->timer_at <= now) {
        tcp_conn *c = s->heap[0];
        if (c->delack_at && c->delack_at <= now) send_ack(s, c);
        if (c->state != TCP_ST_CLOSED && c->rto_at && c->rto_at <= now) {
            c->rto_at = 0;
            on_rto(s, c, now);
        }
        if (c->state != TCP_ST_CLOSED && c->state_at && c->state_at <= now) {
            c->state_at = 0;
            on_state_timer(s, c);
        }
        if (c->state != TCP_ST_CLOSED) timers_changed(s, c);
        if (s->heap_len && s->heap[0] == c && c->timer_at <= now) {
            c->rto_at = c->delack_at = c->state_at = 0; /* cannot happen; never spin */
            timers_changed(s, c);
        }
    }
    reap(s);
}

double tcp_next_deadline(tcp_stack *s) {
    if (!s || !s->heap_len) return 0;
    return s->heap[0]->timer_at;
}

uint64_t tcp_drop_count(tcp_stack *s, int reason) {
    if (!s || reason < 0 || reason >= TCP_DROP__COUNT) return 0;
    return s->drops[reason];
}

const char *tcp_drop_reason_name(int reason) {
    if (reason < 0 || reason >= TCP_DROP__COUNT) return "unknown";
    return drop_names[reason];
}

void tcp_get_stats(tcp_stack *s, tcp_stats *out) {
    if (!s || !out) return;
    *out = s->st;
}

int tcp_peer_counts(tcp_stack *s, uint32_t peer_id, uint32_t *open, uint32_t *half_open) {
    if (!s || !open || !half_open) return TCP_EINVAL;
    peer_entry *p = peer_find(s, peer_id);
    *open = p ? p->open : 0;
    *half_open = p ? p->half_open : 0;
    return 0;
}

int tcp_peer_limit_hits(tcp_stack *s, uint32_t peer_id, uint64_t *conns, uint64_t *half_open) {
    if (!s || !conns || !half_open) return TCP_EINVAL;
    peer_entry *p = peer_find(s, peer_id);
    *conns = p ? p->refused_conns : 0;
    *half_open = p ? p->refused_half_open : 0;
    return 0;
}
