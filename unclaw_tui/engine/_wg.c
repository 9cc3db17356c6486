/*
 * _wg.c: the WireGuard data plane (contract in _wgstack.h; state in _engine.h).
 *
 * Receive pipeline, in the order of the functions below:
 *   wg_input -> message type -> transport: index table -> keypair -> replay check -> decrypt
 *   -> replay update -> (authenticated) endpoint roaming, counters, keypair confirmation, timers
 *   -> the inner IP header parsed once (wire_ip_parse) -> cryptokey routing check -> dispatch
 *      of the parsed header: ICMP echo (answered here), TCP (tcp_process of _tcp.c), UDP
 *      (hub_udp_input of _hub.c), IPv4 and IPv6 alike; ICMPv6 echo to the IPv6 tunnel address.
 * Send pipeline:
 *   wg_send_inner / dp_route_send -> route by destination over allowed IPs -> dp_peer_send
 *   (also the TCP stack's emit callback) -> stage when no usable keypair, else pad, encrypt with
 *   the next counter, queue in the output ring, drained by wg_next_output or _hub.c's wg_io_flush.
 * Timers: wireguard-go's timers.go hooks arm per-peer deadlines; dp_run_timers runs those due.
 *
 * Sans-IO: time comes in as `now`, nothing blocks, no clock is read.  The one system call is
 * indirect: a full output ring is flushed to the attached UDP socket (wg_io_flush) before a
 * datagram is dropped.  Not thread-safe: it runs on the thread that holds the engine (the
 * worker of _worker.c, or the owner's thread under wg_worker_lock).
 */
#include "_engine.h"

#include <stdlib.h>
#include <string.h>

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

/* Replay window (RFC 6479), as wireguard-go replay/replay.go. */
#define REPLAY_BLOCK_BIT_LOG 6
#define REPLAY_BLOCK_BITS (1u << REPLAY_BLOCK_BIT_LOG)
#define REPLAY_WINDOW_SIZE ((REPLAY_RING_BLOCKS - 1) * REPLAY_BLOCK_BITS) /* 8128 */

/* ---- Implementation limits ---------------------------------------------------------------- */
#define MAX_PEERS_LIMIT 65536u
#define MIN_MTU 576u /* also keeps a 148-byte handshake message within an output slot */

#define ICMP_ECHO_REPLY 0
#define ICMP_ECHO_REQUEST 8
#define ICMPV6_ECHO_REQUEST 128
#define ICMPV6_ECHO_REPLY 129
#define TCP_FLAG_FIN 0x01
#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_RST 0x04
#define TCP_FLAG_ACK 0x10

/* ---- Little helpers ----------------------------------------------------------------------- */
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

static bool endpoint_equal(const wg_endpoint *a, const wg_endpoint *b) {
    if (a->family != b->family || a->port != b->port) return false;
    if (a->family == 0) return true;
    return memcmp(a->addr, b->addr, wire_addr_len(a->family)) == 0;
}

/* Our side of two endpoints is the same (the remote sides are compared by endpoint_equal). */
static bool endpoint_local_equal(const wg_endpoint *a, const wg_endpoint *b) {
    return a->ifindex == b->ifindex && memcmp(a->local, b->local, wire_addr_len(a->family)) == 0;
}

static bool endpoint_has_local(const wg_endpoint *ep) {
    static const uint8_t zero[16];
    return (ep->family == 4 || ep->family == 6) &&
           memcmp(ep->local, zero, wire_addr_len(ep->family)) != 0;
}

/* Copy only the meaningful bytes so endpoints compare and print the same way everywhere. */
static void endpoint_copy(wg_endpoint *dst, const wg_endpoint *src) {
    memset(dst, 0, sizeof *dst);
    if (src->family != 4 && src->family != 6) return;
    dst->family = src->family;
    dst->port = src->port;
    memcpy(dst->addr, src->addr, wire_addr_len(src->family));
    memcpy(dst->local, src->local, wire_addr_len(src->family));
    dst->ifindex = src->ifindex;
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

/* The absolute ring position the next event_push takes (see peer.endpoint_ev_pos). */
static uint64_t event_next_pos(const wg_engine *e) { return e->ev_popped + e->ev_count; }

static void raise_owed_handshakes(wg_engine *e);

int wg_next_event(wg_engine *e, wg_event *out) {
    if (e->ev_count == 0) return 0;
    wg_event *ev = &e->events[e->ev_head];
    memcpy(out, ev, offsetof(wg_event, data) + ev->len);
    if (ev->type == WG_EV_HANDSHAKE_PACKET) e->ev_handshakes--;
    e->ev_head = (e->ev_head + 1) % EVENT_RING_SIZE;
    e->ev_count--;
    e->ev_popped++;
    if (e->owed_count) raise_owed_handshakes(e); /* the room just made */
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
    uint32_t i = hash_bytes(addr, wire_addr_len(family)) ^ family;
    i = hash32(i) & r->hosts_mask;
    while (r->hosts[i].family &&
           !(r->hosts[i].family == family && !memcmp(r->hosts[i].addr, addr, wire_addr_len(family))))
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
        uint32_t home = hash32(hash_bytes(r->hosts[j].addr, wire_addr_len(r->hosts[j].family)) ^
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
    size_t alen = wire_addr_len(family);
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
    e->peers[id].need_handshake_owed = 0;
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
    if (event_push(e, WG_EV_NEED_HANDSHAKE, (int32_t)id, reason)) return;
    /* The ring is full: without this the peer would wait REKEY_TIMEOUT for the next try. */
    p->need_handshake_owed = (uint8_t)reason;
    if (!p->owed_listed) {
        p->owed_listed = true;
        e->owed[(e->owed_head + e->owed_count) % e->cfg.max_peers] = id;
        e->owed_count++;
    }
}

static void raise_owed_handshakes(wg_engine *e) {
    while (e->owed_count && e->ev_count < EVENT_RING_SIZE) {
        uint32_t id = e->owed[e->owed_head];
        e->owed_head = (e->owed_head + 1) % e->cfg.max_peers;
        e->owed_count--;
        peer *p = &e->peers[id];
        p->owed_listed = false;
        if (!p->active || !p->need_handshake_owed) continue; /* removed, or a keypair came */
        event_push(e, WG_EV_NEED_HANDSHAKE, (int32_t)id, p->need_handshake_owed);
        p->need_handshake_owed = 0;
        p->need_handshake_at = e->now;
    }
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
    /* a removed peer may still sit in the timer list and the owed FIFO */
    bool in_list = p->in_timer_list, owed_listed = p->owed_listed;
    memset(p, 0, sizeof *p);
    p->in_timer_list = in_list;
    p->owed_listed = owed_listed;
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
    hub_forget_peer(e, peer_id);
    bool in_list = p->in_timer_list, owed_listed = p->owed_listed;
    memset(p, 0, sizeof *p);
    p->in_timer_list = in_list; /* wg_tick drops it from the list */
    p->owed_listed = owed_listed; /* raise_owed_handshakes skips it */
    return 0;
}

int wg_peer_add_allowed_ip(wg_engine *e, uint32_t peer_id, uint8_t family, const uint8_t *addr,
                           uint8_t prefix_len) {
    if (!peer_get(e, peer_id)) return WG_ENOPEER;
    if (!addr || (family != 4 && family != 6) || prefix_len > wire_addr_len(family) * 8) return WG_EINVAL;
    return route_add(&e->routes, peer_id, family, addr, prefix_len);
}

int wg_peer_set_endpoint(wg_engine *e, uint32_t peer_id, const wg_endpoint *ep) {
    peer *p = peer_get(e, peer_id);
    if (!p) return WG_ENOPEER;
    if (!ep || (ep->family != 0 && ep->family != 4 && ep->family != 6)) return WG_EINVAL;
    /* The same remote side without a local one (the owner knew only the address): keep the
     * local side the peer's packets taught us. */
    if (!endpoint_has_local(ep) && endpoint_equal(&p->endpoint, ep)) return 0;
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
    out->udp_share_drops = p->udp_share_drops;
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

int wg_index_in_use(wg_engine *e, uint32_t local_index) {
    return index_lookup(&e->indices, local_index) != NULL;
}

/* ---- Inner packets: the IP header parsed once (wire_ip_repr), then dispatched ------------ */
/* Each handler below returns WG_PASS or the WG_DROP_* reason, which wg_input counts. */

/* ICMPv4: answer echo requests to the gateway's tunnel address. */
static int icmp4_input(wg_engine *e, uint32_t id, const wire_ip_repr *ip, double now) {
    if (rd32be(ip->dst) != e->cfg.tunnel_ip || ip->payload_len < 8 ||
        ip->payload[0] != ICMP_ECHO_REQUEST || ip->payload[1] != 0)
        return WG_DROP_UNHANDLED;
    if (csum_finish(csum_add(0, ip->payload, ip->payload_len)) != 0) return WG_DROP_BAD_IP;
    if (20 + ip->payload_len > e->cfg.mtu) return WG_DROP_UNHANDLED;
    wire_ip_repr reply = wire_ipv4_repr(e->cfg.tunnel_ip, rd32be(ip->src), WIRE_PROTO_ICMP,
                                        ip->payload_len);
    uint8_t *icmp = e->tx_scratch + wire_ip_emit(&reply, e->tx_scratch);
    memcpy(icmp, ip->payload, ip->payload_len); /* same id, sequence and data */
    icmp[0] = ICMP_ECHO_REPLY;
    icmp[2] = icmp[3] = 0;
    wr16be(icmp + 2, csum_finish(csum_add(0, icmp, ip->payload_len)));
    e->stats.icmp_echo_replies++;
    peer_send_data(e, id, e->tx_scratch, 20 + ip->payload_len, now);
    return WG_PASS;
}

/* ICMPv6: answer echo requests to the gateway's IPv6 tunnel address (RFC 4443 4.2). */
static int icmp6_input(wg_engine *e, uint32_t id, const wire_ip_repr *ip, double now) {
    static const uint8_t zero[16];
    if (!memcmp(e->cfg.tunnel_ip6, zero, 16) || memcmp(ip->dst, e->cfg.tunnel_ip6, 16) ||
        ip->payload_len < 8 || ip->payload[0] != ICMPV6_ECHO_REQUEST || ip->payload[1] != 0)
        return WG_DROP_UNHANDLED;
    uint32_t psum = wire_pseudo_sum(6, ip->src, ip->dst, WIRE_PROTO_ICMPV6, ip->payload_len);
    if (csum_finish(csum_add(psum, ip->payload, ip->payload_len)) != 0) return WG_DROP_BAD_IP;
    if (40 + ip->payload_len > e->cfg.mtu) return WG_DROP_UNHANDLED;
    wire_ip_repr reply = wire_ip_repr_of(6, e->cfg.tunnel_ip6, ip->src, WIRE_PROTO_ICMPV6,
                                         ip->payload_len);
    uint8_t *icmp = e->tx_scratch + wire_ip_emit(&reply, e->tx_scratch);
    memcpy(icmp, ip->payload, ip->payload_len); /* same id, sequence and data */
    icmp[0] = ICMPV6_ECHO_REPLY;
    icmp[2] = icmp[3] = 0;
    psum = wire_pseudo_sum(6, reply.src, reply.dst, WIRE_PROTO_ICMPV6, ip->payload_len);
    wr16be(icmp + 2, csum_finish(csum_add(psum, icmp, ip->payload_len)));
    e->stats.icmp_echo_replies++;
    peer_send_data(e, id, e->tx_scratch, 40 + ip->payload_len, now);
    return WG_PASS;
}

static int inner_input(wg_engine *e, uint32_t id, const uint8_t *pkt, size_t len, double now) {
    wire_ip_repr ip;
    if (!wire_ip_parse(pkt, len, &ip)) {
        return ip.error == WIRE_ERR_EXT ? WG_DROP_IPV6_EXT : WG_DROP_BAD_IP;
    }
    /* Cryptokey routing: the source must route back to this very peer. */
    if (route_lookup(&e->routes, ip.family, ip.src) != (int64_t)id) return WG_DROP_SPOOFED_SRC;
    if (ip.fragment) return WG_DROP_FRAGMENT;
    switch (ip.proto) {
    case WIRE_PROTO_ICMP: return ip.family == 4 ? icmp4_input(e, id, &ip, now) : WG_DROP_UNHANDLED;
    case WIRE_PROTO_ICMPV6: return ip.family == 6 ? icmp6_input(e, id, &ip, now) : WG_DROP_UNHANDLED;
    case WIRE_PROTO_TCP: tcp_process(e->tcp, id, &ip, now); return WG_PASS; /* counts its own */
    case WIRE_PROTO_UDP: return hub_udp_input(e, id, &ip);
    default: return WG_DROP_UNHANDLED;
    }
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

/* The peer's ENDPOINT_CHANGED not read yet is brought up to date in place; only a peer
 * without one takes a new slot, so a peer changing source port on every packet (roaming, or
 * on purpose) takes one slot of the ring, not one a packet. */
static void endpoint_changed(wg_engine *e, uint32_t id, const wg_endpoint *src) {
    peer *p = &e->peers[id];
    endpoint_copy(&p->endpoint, src);
    if (p->endpoint_ev_queued && p->endpoint_ev_pos >= e->ev_popped) {
        wg_event *queued = &e->events[p->endpoint_ev_pos % EVENT_RING_SIZE];
        if (queued->type == WG_EV_ENDPOINT_CHANGED && queued->peer_id == (int32_t)id) {
            queued->src = p->endpoint;
            return;
        }
    }
    uint64_t pos = event_next_pos(e);
    wg_event *ev = event_push(e, WG_EV_ENDPOINT_CHANGED, (int32_t)id, 0);
    p->endpoint_ev_queued = ev != NULL;
    if (ev) {
        ev->src = p->endpoint;
        p->endpoint_ev_pos = pos;
    }
}

static int transport_input(wg_engine *e, const uint8_t *data, size_t len, const wg_endpoint *src,
                           double now) {
    if (len < MSG_KEEPALIVE_SIZE) return WG_DROP_TRUNCATED;
    size_t clen = len - MSG_TRANSPORT_HEADER_SIZE;
    if (clen - AEAD_TAG_SIZE > e->plain_cap) return WG_DROP_BAD_SIZE;
    keypair *kp = index_lookup(&e->indices, rd32le(data + 4));
    if (!kp) return WG_DROP_UNKNOWN_INDEX;
    uint64_t counter = rd64le(data + 8);
    if (now - kp->created >= REJECT_AFTER_TIME || counter >= REJECT_AFTER_MESSAGES)
        return WG_DROP_KEY_EXPIRED;
    if (!replay_check(&kp->replay, counter)) return WG_DROP_REPLAY;
    uint8_t nonce[12] = {0};
    wr64le(nonce + 4, counter);
    unsigned long long plain_len = 0;
    SCRATCH_UNPOISON(e->plain, e->plain_cap);
    if (e->dec(e->plain, &plain_len, NULL, data + MSG_TRANSPORT_HEADER_SIZE, clen, NULL, 0, nonce,
               kp->recv_key) != 0)
        return WG_DROP_DECRYPT;
    if (!replay_update(&kp->replay, counter)) return WG_DROP_REPLAY;

    /* Authenticated from here on. */
    uint32_t id = kp->peer_id;
    peer *p = &e->peers[id];
    if (!endpoint_equal(&p->endpoint, src))
        endpoint_changed(e, id, src);
    else if (!endpoint_local_equal(&p->endpoint, src))
        endpoint_copy(&p->endpoint, src); /* the peer now writes to another of our addresses */
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
    if (plain_len == 0) return WG_PASS; /* keepalive */
    timers_data_received(e, id, now);
    SCRATCH_POISON(e->plain + plain_len, e->plain_cap - (size_t)plain_len);
    return inner_input(e, id, e->plain, (size_t)plain_len, now);
}

static int datagram_input(wg_engine *e, const uint8_t *data, size_t len, const wg_endpoint *src,
                          double now) {
    if (!data || !src || len < 4) return WG_DROP_TRUNCATED;
    if (data[1] || data[2] || data[3]) return WG_DROP_BAD_TYPE;
    size_t want;
    switch (data[0]) {
    case MSG_TRANSPORT: return transport_input(e, data, len, src, now);
    case MSG_INITIATION: want = MSG_INITIATION_SIZE; break;
    case MSG_RESPONSE: want = MSG_RESPONSE_SIZE; break;
    case MSG_COOKIE_REPLY: want = MSG_COOKIE_REPLY_SIZE; break;
    default: return WG_DROP_BAD_TYPE;
    }
    if (len != want) return WG_DROP_BAD_SIZE;
    if (e->ev_handshakes >= EVENT_RING_HANDSHAKE_MAX) return WG_DROP_HANDSHAKE_FLOOD;
    wg_event *ev = event_push(e, WG_EV_HANDSHAKE_PACKET, -1, 0);
    if (ev) {
        e->ev_handshakes++;
        endpoint_copy(&ev->src, src);
        ev->len = (uint32_t)len;
        memcpy(ev->data, data, len);
    }
    return WG_PASS;
}

int wg_input(wg_engine *e, const uint8_t *data, size_t len, const wg_endpoint *src, double now) {
    e->now = now;
    e->stats.rx_datagrams++;
    e->stats.rx_bytes += len;
    int reason = datagram_input(e, data, len, src, now);
    if (reason != WG_PASS) count_drop(e, reason);
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
    dp_route_send(e, family, dst, packet, len, now);
    return 0;
}

bool dp_route_send(wg_engine *e, uint8_t family, const uint8_t *dst, const uint8_t *pkt,
                   size_t len, double now) {
    int64_t id = route_lookup(&e->routes, family, dst);
    if (id < 0) {
        count_drop(e, WG_DROP_NO_ROUTE);
        return false;
    }
    peer_send_data(e, (uint32_t)id, pkt, len, now);
    return true;
}

void dp_peer_send(void *ctx, uint32_t peer_id, const uint8_t *pkt, size_t len, double now) {
    wg_engine *e = ctx;
    if (!peer_get(e, peer_id)) { /* tcp_remove_peer runs with wg_peer_remove: cannot happen */
        count_drop(e, WG_DROP_NO_ROUTE);
        return;
    }
    peer_send_data(e, peer_id, pkt, len, now);
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

void dp_run_timers(wg_engine *e, double now) {
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

/* ---- Lifecycle (called by wg_engine_new / wg_engine_free) ---------------------------------- */
static uint32_t pow2_at_least(uint32_t n) {
    uint32_t v = 16;
    while (v < n) v <<= 1;
    return v;
}

bool dp_init(wg_engine *e) {
    const wg_config *cfg = &e->cfg;
    if (cfg->max_peers == 0 || cfg->max_peers > MAX_PEERS_LIMIT || cfg->mtu < MIN_MTU ||
        cfg->staged_per_peer == 0 || cfg->staged_per_peer > 65536 || cfg->tunnel_prefix_len > 32)
        return false;
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
    e->owed = calloc(cfg->max_peers, sizeof *e->owed);
    e->plain_cap = 65536;
    e->plain = malloc(e->plain_cap);
    e->tx_scratch = malloc(cfg->mtu);
    return e->peers && e->timer_list && e->indices.slots && e->routes.hosts && e->out_bufs &&
           e->out_meta && e->events && e->owed && e->plain && e->tx_scratch;
}

void dp_free(wg_engine *e) {
    if (e->peers) {
        for (uint32_t id = 0; id < e->cfg.max_peers; id++) {
            if (!e->peers[id].active) continue;
            peer_zero_keys(e, id, false);
            staged_clear(e, &e->peers[id]);
            free(e->peers[id].staged);
        }
    }
    if (e->plain) {
        SCRATCH_UNPOISON(e->plain, e->plain_cap);
        e->memzero(e->plain, e->plain_cap); /* last decrypted plaintext */
    }
    free(e->peers);
    free(e->timer_list);
    free(e->indices.slots);
    free(e->routes.hosts);
    free(e->routes.prefixes);
    free(e->out_bufs);
    free(e->out_meta);
    free(e->events);
    free(e->owed);
    free(e->plain);
    free(e->tx_scratch);
}
