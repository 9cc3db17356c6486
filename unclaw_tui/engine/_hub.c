/*
 * _hub.c: the engine hub around the WireGuard data plane of _wg.c (contract in _wgstack.h,
 * shared state in _engine.h): the engine's lifecycle; the userspace TCP's glue (its event
 * callback, the per-connection event queue of wg_tcp_events); splices and the fast relay;
 * the UDP queue to Python and the UDP / ICMP errors Python sends; wg_tick and wg_collect over
 * all the parts; counters; allocator tuning; and the IO helper, recvmmsg / sendmmsg over the
 * UDP socket that Python owns.
 *
 * What does IO: the IO helper (wg_io_recv, wg_io_flush) and, through _splice.c, the splices'
 * sockets (epoll, connect, readv / sendmsg): wg_io_recv, wg_splice_service, wg_tick,
 * wg_timers_due and wg_collect run splice_run, and a SYN the fast relay takes opens a socket
 * (splice_connect) in the middle of wg_input.  The rest is sans-IO, with time passed in as
 * `now`; nothing blocks (every socket is non-blocking).  Not thread-safe: everything runs on
 * the thread that holds the engine, the worker of _worker.c (wg_io_recv, wg_splice_service,
 * wg_timers_due, wg_collect) or the owner's thread, under wg_worker_lock while a worker runs.
 */
#define _GNU_SOURCE /* recvmmsg / sendmmsg: Linux only, as epoll in _splice.c */

#include "_engine.h"

#include <errno.h>
#ifdef __GLIBC__
#include <malloc.h>
#endif
#include <stdlib.h>
#include <string.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/uio.h>

#define IO_BATCH 64
/* Room for one IP_PKTINFO or IPV6_PKTINFO (the larger), with a spare: a datagram's ancillary
 * data; a cmsg that does not fit is cut off (MSG_CTRUNC) and only costs the local address. */
#define IO_CMSG_SPACE (CMSG_SPACE(sizeof(struct in6_pktinfo)) + CMSG_SPACE(sizeof(struct in_pktinfo)))
#define IO_RX_BUF_SIZE 65536u /* a whole UDP datagram, so nothing is silently truncated */
#define ICMP_DEST_UNREACHABLE 3

/* TCP stack defaults (wg_config 0 = these). */
#define TCP_DEFAULT_BUF (256u * 1024u)
#define TCP_DEFAULT_MAX_CONNS 65536u
#define TCP_DEFAULT_MAX_CONNS_PER_PEER 4096u
#define TCP_DEFAULT_MAX_HALF_OPEN_PER_PEER 256u

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
    [WG_DROP_UDP_TOO_LARGE] = "udp_too_large",
    [WG_DROP_UDP_PEER_SHARE] = "udp_peer_share",
    [WG_DROP_HANDSHAKE_FLOOD] = "handshake_flood",
    [WG_DROP_IPV6_EXT] = "ipv6_ext",
};

/* ---- Fast relay: SYNs to approved destinations spliced without the owner ------------------ */
static uint32_t fast_relay_slot(uint32_t peer_id, uint32_t ip, uint16_t port) {
    uint32_t h = (ip ^ ((uint32_t)port * 0x9e3779b1u) ^ (peer_id * 0xc2b2ae35u)) * 0x85ebca6bu;
    return (h ^ (h >> 15)) & (WG_FAST_RELAY_SLOTS - 1);
}

int wg_fast_relay_allow(wg_engine *e, uint32_t peer_id, uint32_t ip, uint16_t port,
                        double expires, double connect_timeout) {
    if (ip == 0 || port == 0 || !(connect_timeout >= 0)) return WG_EINVAL;
    if (peer_id >= e->cfg.max_peers) return WG_ENOPEER;
    if (!e->fast_relay) {
        e->fast_relay = calloc(WG_FAST_RELAY_SLOTS, sizeof *e->fast_relay);
        if (!e->fast_relay) return WG_ENOMEM;
    }
    e->fast_relay[fast_relay_slot(peer_id, ip, port)] = (fast_relay_entry){
        .peer_id = peer_id, .ip = ip, .port = port, .used = true, .expires = expires};
    e->fast_connect_timeout = connect_timeout;
    return 0;
}

void wg_fast_relay_clear(wg_engine *e) {
    if (e->fast_relay) memset(e->fast_relay, 0, WG_FAST_RELAY_SLOTS * sizeof *e->fast_relay);
}

void wg_fast_relay_bound(wg_engine *e, uint32_t per_peer, uint32_t total) {
    e->fast_max_per_peer = per_peer;
    e->fast_max_total = total;
}

/* Within wg_fast_relay_bound's bounds: past them the owner decides the SYN. */
static bool fast_relay_room(wg_engine *e, uint32_t peer_id) {
    if (e->fast_max_per_peer) {
        uint32_t open = 0, half_open = 0;
        if (tcp_peer_counts(e->tcp, peer_id, &open, &half_open) != 0 || open > e->fast_max_per_peer)
            return false;
    }
    if (e->fast_max_total) {
        tcp_stats st;
        tcp_get_stats(e->tcp, &st);
        if (st.open > e->fast_max_total) return false;
    }
    return true;
}

void hub_forget_peer(wg_engine *e, uint32_t peer_id) {
    for (uint32_t i = 0; e->fast_relay && i < WG_FAST_RELAY_SLOTS; i++)
        if (e->fast_relay[i].used && e->fast_relay[i].peer_id == peer_id)
            e->fast_relay[i] = (fast_relay_entry){0};
}

static bool fast_relay_approved(wg_engine *e, uint32_t peer_id, uint32_t ip, uint16_t port) {
    const fast_relay_entry *f = &e->fast_relay[fast_relay_slot(peer_id, ip, port)];
    return f->used && f->peer_id == peer_id && f->ip == ip && f->port == port &&
           (f->expires == 0 || e->now < f->expires);
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
    if (info.family != 4) return false; /* approvals are of IPv4 destinations (yet) */
    if (!fast_relay_approved(e, info.peer_id, info.dst_ip, info.dst_port) ||
        !fast_relay_room(e, info.peer_id) || !fast_report_room(e))
        return false;
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

/* ---- TCP glue: the stack's event callback and its event queue ------------------------- */
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

int wg_peer_abort_flows(wg_engine *e, uint32_t peer_id, uint32_t reason, double now) {
    if (peer_id >= e->cfg.max_peers || !e->peers[peer_id].active) return WG_ENOPEER;
    if (reason != TCP_CLOSE_PEER_GONE && reason != TCP_CLOSE_PRESSURE) return WG_EINVAL;
    e->now = now;
    /* Spliced connections hear of it through their CLOSED event (splice_claim_event); the run
     * right after closes their sockets and queues their results with tcp_close = reason. */
    int n = tcp_abort_peer(e->tcp, peer_id, reason, now);
    splice_run(e->splice, now);
    tcp_flush(e->tcp, now);
    if (e->io_fd >= 0) wg_io_flush(e);
    return n;
}

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

/* ---- UDP: the queue to Python, datagrams and ICMP errors from Python ------------------- */
/* Multicast, limited broadcast or the tunnel subnet's broadcast: nothing here answers those. */
static bool ipv4_is_group(const wg_engine *e, uint32_t addr) {
    if ((addr >> 28) == 0xe || addr == 0xffffffffu) return true;
    uint8_t plen = e->cfg.tunnel_prefix_len;
    if (plen == 0 || plen >= 31) return false;
    uint32_t mask = ~0u << (32 - plen);
    return addr == ((e->cfg.tunnel_ip & mask) | ~mask);
}

int hub_udp_input(wg_engine *e, uint32_t id, const wire_ip_repr *ip) {
    const uint8_t *udp = ip->payload;
    size_t udp_len = ip->payload_len >= 8 ? rd16be(udp + 4) : 0;
    bool v6 = ip->family == 6;
    if (udp_len < 8 || udp_len > ip->payload_len || rd16be(udp + 2) == 0) return WG_DROP_BAD_IP;
    if (v6 && rd16be(udp + 6) == 0) return WG_DROP_BAD_IP; /* IPv6 UDP must carry one (RFC 8200 8.1) */
    if (rd16be(udp + 6) != 0 && /* zero: no checksum (RFC 768) */
        csum_finish(csum_add(wire_pseudo_sum(ip->family, ip->src, ip->dst, ip->proto, udp_len), udp, udp_len)))
        return WG_DROP_BAD_IP;
    uint32_t dst = v6 ? 0 : rd32be(ip->dst);
    /* mDNS, SSDP, broadcasts, IPv6 multicast: no flow */
    if (v6 ? !wire_addr_unicast(6, ip->dst) : ipv4_is_group(e, dst)) return WG_DROP_UNHANDLED;
    uint32_t payload_len = (uint32_t)(udp_len - 8);
    if (e->udp_count == WG_UDP_QUEUE_MAX || payload_len > WG_UDP_ARENA_SIZE - e->udp_arena_used)
        return WG_DROP_UDP_OVERFLOW;
    /* Fair share: with k peers queuing (this one among them), each holds at most 1/(k+1) of
     * the queue, so k * 1/(k+1) is the most they hold together and a newcomer always finds
     * its 1/(k+2).  Two multiplications, no division, per datagram. */
    peer *p = &e->peers[id];
    uint64_t parts = (uint64_t)e->udp_peers + (p->udp_queued ? 1 : 2);
    if ((uint64_t)(p->udp_queued + 1) * parts > WG_UDP_QUEUE_MAX ||
        (uint64_t)(p->udp_bytes + payload_len) * parts > WG_UDP_ARENA_SIZE) {
        p->udp_share_drops++;
        return WG_DROP_UDP_PEER_SHARE;
    }
    if (!p->udp_queued) e->udp_peers++;
    p->udp_queued++;
    p->udp_bytes += payload_len;
    wg_udp_meta *m = &e->udp_meta[e->udp_count++];
    m->peer_id = (int32_t)id;
    m->family = ip->family;
    m->src_ip = v6 ? 0 : rd32be(ip->src);
    m->dst_ip = dst;
    memset(m->src_addr, 0, sizeof m->src_addr);
    memset(m->dst_addr, 0, sizeof m->dst_addr);
    memcpy(m->src_addr, ip->src, wire_addr_len(ip->family));
    memcpy(m->dst_addr, ip->dst, wire_addr_len(ip->family));
    m->src_port = rd16be(udp);
    m->dst_port = rd16be(udp + 2);
    m->offset = e->udp_arena_used;
    m->len = payload_len;
    memcpy(e->udp_arena + e->udp_arena_used, udp + 8, payload_len);
    e->udp_arena_used += payload_len;
    if (e->udp_arena_used > e->udp_arena_high) e->udp_arena_high = e->udp_arena_used;
    e->stats.udp_rx++;
    return WG_PASS;
}

/* An IPv4 packet the engine builds (the next identification) to the peer owning dst. */
static bool ipv4_send(wg_engine *e, wire_ip_repr *ip, uint8_t *pkt, double now) {
    ip->id = e->ip_id++;
    wire_ip_emit(ip, pkt);
    return dp_route_send(e, 4, ip->dst, pkt, 20 + ip->payload_len, now);
}

int wg_udp_drain(wg_engine *e, wg_udp_meta *out, int max, const uint8_t **arena) {
    if (!out || !arena || max < 0) return WG_EINVAL;
    int n = (int)e->udp_count < max ? (int)e->udp_count : max;
    memcpy(out, e->udp_meta, (size_t)n * sizeof *out);
    *arena = e->udp_arena;
    for (uint32_t i = 0; i < e->udp_count; i++) { /* every share starts again */
        peer *p = &e->peers[e->udp_meta[i].peer_id];
        p->udp_queued = p->udp_bytes = 0;
    }
    e->udp_peers = 0;
    e->udp_count = 0;
    e->udp_arena_used = 0;
    return n;
}

/* An IPv6 packet the engine builds to the peer owning its destination. */
static bool ipv6_send(wg_engine *e, wire_ip_repr *ip, uint8_t *pkt, double now) {
    wire_ip_emit(ip, pkt);
    return dp_route_send(e, 6, ip->dst, pkt, 40 + ip->payload_len, now);
}

int wg_udp_send_addr(wg_engine *e, uint8_t family, const uint8_t *src, uint16_t src_port,
                     const uint8_t *dst, uint16_t dst_port, const uint8_t *data, size_t len,
                     double now) {
    if ((!data && len) || !src || !dst || (family != 4 && family != 6)) return WG_EINVAL;
    size_t hlen = family == 4 ? 20 : 40;
    if (len > (size_t)e->cfg.mtu - hlen - 8) {
        count_drop(e, WG_DROP_UDP_TOO_LARGE);
        return WG_EMSGSIZE;
    }
    e->now = now;
    wire_ip_repr ip = wire_ip_repr_of(family, src, dst, WIRE_PROTO_UDP, 8 + len);
    uint8_t *udp = e->tx_scratch + hlen;
    wr16be(udp, src_port);
    wr16be(udp + 2, dst_port);
    wr16be(udp + 4, (uint16_t)(8 + len));
    wr16be(udp + 6, 0);
    if (len) memcpy(udp + 8, data, len);
    uint16_t sum = csum_finish(csum_add(wire_pseudo_sum(family, ip.src, ip.dst, WIRE_PROTO_UDP, 8 + len), udp, 8 + len));
    wr16be(udp + 6, sum ? sum : 0xffff); /* a computed zero is sent as all ones (RFC 768) */
    bool sent = family == 4 ? ipv4_send(e, &ip, e->tx_scratch, now) : ipv6_send(e, &ip, e->tx_scratch, now);
    if (sent) e->stats.udp_tx++;
    return 0;
}

int wg_udp_send(wg_engine *e, uint32_t src_ip, uint16_t src_port, uint32_t dst_ip,
                uint16_t dst_port, const uint8_t *data, size_t len, double now) {
    uint8_t src[4], dst[4];
    wr32be(src, src_ip);
    wr32be(dst, dst_ip);
    return wg_udp_send_addr(e, 4, src, src_port, dst, dst_port, data, len, now);
}

int wg_icmp_unreachable(wg_engine *e, uint32_t peer_ip, uint16_t peer_port, uint32_t dst_ip,
                        uint16_t dst_port, uint8_t proto, uint8_t code, double now) {
    if (code > 15) return WG_EINVAL;
    e->now = now;
    wire_ip_repr ip = wire_ipv4_repr(dst_ip, peer_ip, WIRE_PROTO_ICMP, 8 + 28);
    uint8_t *icmp = e->tx_scratch + 20;
    memset(icmp, 0, 8 + 28);
    icmp[0] = ICMP_DEST_UNREACHABLE;
    icmp[1] = code;
    /* The datagram that "failed": the client's own packet as it would have looked. */
    wire_ip_repr orig = wire_ipv4_repr(peer_ip, dst_ip, proto, proto == WIRE_PROTO_TCP ? 20 : 8);
    orig.dont_fragment = true;
    uint8_t *ports = icmp + 8 + wire_ip_emit(&orig, icmp + 8);
    wr16be(ports, peer_port);
    wr16be(ports + 2, dst_port);
    if (proto == WIRE_PROTO_UDP) wr16be(ports + 4, 8); /* length; checksum 0 = none */
    wr16be(icmp + 2, csum_finish(csum_add(0, icmp, 8 + 28)));
    if (ipv4_send(e, &ip, e->tx_scratch, now)) e->stats.icmp_unreachables++;
    return 0;
}

#define ICMPV6_DEST_UNREACHABLE 1

int wg_icmp_unreachable_addr(wg_engine *e, uint8_t family, const uint8_t *peer_ip,
                             uint16_t peer_port, const uint8_t *dst_ip, uint16_t dst_port,
                             uint8_t proto, uint8_t code, double now) {
    if (!peer_ip || !dst_ip) return WG_EINVAL;
    if (family == 4)
        return wg_icmp_unreachable(e, rd32be(peer_ip), peer_port, rd32be(dst_ip), dst_port, proto,
                                   code, now);
    if (family != 6) return WG_EINVAL;
    uint8_t code6; /* RFC 4443 3.1 for RFC 792's */
    switch (code) {
    case 3: code6 = 4; break;  /* port unreachable */
    case 13: code6 = 1; break; /* administratively prohibited */
    case 1: code6 = 3; break;  /* host / address unreachable */
    default: return WG_EINVAL;
    }
    e->now = now;
    size_t l4 = proto == WIRE_PROTO_TCP ? 20 : 8;
    wire_ip_repr ip = wire_ip_repr_of(6, dst_ip, peer_ip, WIRE_PROTO_ICMPV6, 8 + 40 + l4);
    uint8_t *icmp = e->tx_scratch + 40;
    memset(icmp, 0, 8 + 40 + l4);
    icmp[0] = ICMPV6_DEST_UNREACHABLE;
    icmp[1] = code6;
    /* The packet that "failed": the client's own, as it would have looked. */
    wire_ip_repr orig = wire_ip_repr_of(6, peer_ip, dst_ip, proto, l4);
    uint8_t *ports = icmp + 8 + wire_ip_emit(&orig, icmp + 8);
    wr16be(ports, peer_port);
    wr16be(ports + 2, dst_port);
    if (proto == WIRE_PROTO_UDP) wr16be(ports + 4, 8);
    uint32_t sum = wire_pseudo_sum(6, ip.src, ip.dst, WIRE_PROTO_ICMPV6, 8 + 40 + l4);
    wr16be(icmp + 2, csum_finish(csum_add(sum, icmp, 8 + 40 + l4)));
    if (ipv6_send(e, &ip, e->tx_scratch, now)) e->stats.icmp_unreachables++;
    return 0;
}

/* ---- Timers and the owner's view, over all the parts ------------------------------------ */
void wg_tick(wg_engine *e, double now) {
    e->now = now;
    tcp_tick(e->tcp, now); /* first: what it sends arms the peers' timers below */
    splice_run(e->splice, now); /* connect deadlines, and what the TCP timers raised */
    dp_run_timers(e, now);
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
wg_engine *wg_engine_new(const wg_config *cfg, wg_aead_encrypt_fn enc, wg_aead_decrypt_fn dec,
                         wg_memzero_fn memzero) {
    if (!cfg || !enc || !dec || !memzero) return NULL;
    wg_engine *e = calloc(1, sizeof *e);
    if (!e) return NULL;
    e->cfg = *cfg;
    e->enc = enc;
    e->dec = dec;
    e->memzero = memzero;
    e->io_fd = -1;
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
    tcp_callbacks tcp_cb = {.ctx = e, .emit = dp_peer_send, .event = tcp_event_cb};
    if (dp_init(e)) e->tcp = tcp_stack_new(&tcp_cfg, &tcp_cb); /* NULL on a bad TCP config */
    e->tcp_slots = c->tcp_max_conns;
    e->tcp_pending = e->tcp ? calloc(e->tcp_slots, sizeof *e->tcp_pending) : NULL;
    e->tcp_ready = e->tcp ? calloc(e->tcp_slots, sizeof *e->tcp_ready) : NULL;
    e->udp_meta = malloc(WG_UDP_QUEUE_MAX * sizeof *e->udp_meta);
    e->udp_arena = malloc(WG_UDP_ARENA_SIZE);
    if (!e->tcp || !e->tcp_pending || !e->tcp_ready || !e->udp_meta || !e->udp_arena) {
        wg_engine_free(e);
        return NULL;
    }
    e->splice = splice_table_new(e->tcp, e->tcp_slots);
    return e;
}

void wg_engine_free(wg_engine *e) {
    if (!e) return;
    splice_table_free(e->splice, e->now); /* first: it resets connections through the stack */
    dp_free(e); /* zeroes every key */
    tcp_stack_free(e->tcp); /* calls no callback */
    if (e->udp_arena) e->memzero(e->udp_arena, e->udp_arena_high); /* decrypted payloads too */
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

void wg_all_drop_counts(wg_engine *e, uint64_t *out) {
    for (int i = 0; i < WG_DROP__COUNT; i++) out[i] = e->drops[i];
    for (int i = 0; i < TCP_DROP__COUNT; i++) out[WG_DROP__COUNT + i] = tcp_drop_count(e->tcp, i);
}

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
    /* Learn each datagram's local address, to answer from it.  Best effort: without it replies
     * leave from the address the route picks, as before. */
    int on = 1;
    if (family == 4) {
        (void)setsockopt(fd, IPPROTO_IP, IP_PKTINFO, &on, sizeof on);
    } else {
        /* IPv4 datagrams on the dual-stack socket come with a v4-mapped IPV6_PKTINFO */
        (void)setsockopt(fd, IPPROTO_IPV6, IPV6_RECVPKTINFO, &on, sizeof on);
    }
    return 0;
}

static const uint8_t v4mapped_prefix[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};

/* ep's local side from a received datagram's ancillary data (IP_PKTINFO / IPV6_PKTINFO). */
static void endpoint_local_from_cmsg(struct msghdr *mh, wg_endpoint *ep) {
    for (struct cmsghdr *c = CMSG_FIRSTHDR(mh); c; c = CMSG_NXTHDR(mh, c)) {
        if (c->cmsg_level == IPPROTO_IP && c->cmsg_type == IP_PKTINFO && ep->family == 4 &&
            c->cmsg_len >= CMSG_LEN(sizeof(struct in_pktinfo))) {
            struct in_pktinfo pi;
            memcpy(&pi, CMSG_DATA(c), sizeof pi);
            memcpy(ep->local, &pi.ipi_addr, 4);
            ep->ifindex = (uint32_t)pi.ipi_ifindex;
            return;
        }
        if (c->cmsg_level == IPPROTO_IPV6 && c->cmsg_type == IPV6_PKTINFO &&
            c->cmsg_len >= CMSG_LEN(sizeof(struct in6_pktinfo))) {
            struct in6_pktinfo pi;
            memcpy(&pi, CMSG_DATA(c), sizeof pi);
            const uint8_t *a = (const uint8_t *)&pi.ipi6_addr;
            bool mapped = !memcmp(a, v4mapped_prefix, 12);
            if ((ep->family == 4) != mapped) return; /* does not match the source's family */
            memcpy(ep->local, mapped ? a + 12 : a, mapped ? 4 : 16);
            ep->ifindex = pi.ipi6_ifindex;
            return;
        }
    }
}

/* The ancillary data that makes a datagram to dst leave from dst's local side: writes it at
 * buf (IO_CMSG_SPACE bytes, aligned) and returns its length; 0 when the kernel is to pick. */
static size_t endpoint_local_to_cmsg(const wg_engine *e, const wg_endpoint *dst, uint8_t *buf) {
    static const uint8_t zero[16];
    size_t alen = wire_addr_len(dst->family);
    if (memcmp(dst->local, zero, alen) == 0) return 0;
    struct msghdr mh = {.msg_control = buf, .msg_controllen = IO_CMSG_SPACE};
    struct cmsghdr *c = CMSG_FIRSTHDR(&mh);
    memset(buf, 0, IO_CMSG_SPACE);
    if (e->io_family == 4) {
        struct in_pktinfo pi = {0};
        memcpy(&pi.ipi_spec_dst, dst->local, 4); /* the source; routing still picks the way */
        c->cmsg_level = IPPROTO_IP;
        c->cmsg_type = IP_PKTINFO;
        c->cmsg_len = CMSG_LEN(sizeof pi);
        memcpy(CMSG_DATA(c), &pi, sizeof pi);
        return CMSG_SPACE(sizeof pi);
    }
    struct in6_pktinfo pi = {0};
    uint8_t *a = (uint8_t *)&pi.ipi6_addr;
    if (dst->family == 4) {
        memcpy(a, v4mapped_prefix, 12);
        memcpy(a + 12, dst->local, 4);
    } else {
        memcpy(a, dst->local, 16);
        /* a link-local source is only meaningful on its own link */
        if (a[0] == 0xfe && (a[1] & 0xc0) == 0x80) pi.ipi6_ifindex = dst->ifindex;
    }
    c->cmsg_level = IPPROTO_IPV6;
    c->cmsg_type = IPV6_PKTINFO;
    c->cmsg_len = CMSG_LEN(sizeof pi);
    memcpy(CMSG_DATA(c), &pi, sizeof pi);
    return CMSG_SPACE(sizeof pi);
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
        struct mmsghdr msgs[IO_BATCH];
        struct iovec iov[IO_BATCH];
        struct sockaddr_storage addrs[IO_BATCH];
        _Alignas(struct cmsghdr) uint8_t ctl[IO_BATCH][IO_CMSG_SPACE];
        unsigned n = 0;
        while (n < IO_BATCH && n < e->out_count) {
            uint32_t slot = (e->out_head + n) % OUTPUT_RING_SIZE;
            const wg_endpoint *dst = &e->out_meta[slot].dst;
            socklen_t alen = endpoint_to_sockaddr(e, dst, &addrs[n]);
            if (!alen) break;
            iov[n].iov_base = e->out_bufs + (size_t)slot * e->out_slot_size;
            iov[n].iov_len = e->out_meta[slot].len;
            memset(&msgs[n], 0, sizeof msgs[n]);
            msgs[n].msg_hdr.msg_name = &addrs[n];
            msgs[n].msg_hdr.msg_namelen = alen;
            msgs[n].msg_hdr.msg_iov = &iov[n];
            msgs[n].msg_hdr.msg_iovlen = 1;
            size_t clen = endpoint_local_to_cmsg(e, dst, ctl[n]);
            if (clen) {
                msgs[n].msg_hdr.msg_control = ctl[n];
                msgs[n].msg_hdr.msg_controllen = clen;
            }
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
            wg_endpoint *head = &e->out_meta[e->out_head].dst;
            if ((errno == EINVAL || errno == EADDRNOTAVAIL) && memcmp(head->local, (uint8_t[16]){0}, 16)) {
                /* our address went away (or moved): send it from whatever the route picks */
                memset(head->local, 0, sizeof head->local);
                head->ifindex = 0;
                continue;
            }
            count_drop(e, WG_DROP_SEND_ERROR);
            output_pop(e);
            continue;
        }
        for (int i = 0; i < r; i++) output_pop(e);
        sent += r;
        if (r == 0) break; /* nothing accepted and no error: try again on the next flush */
    }
    return sent;
}

int wg_io_recv(wg_engine *e, double now, int max_datagrams) {
    if (e->io_fd < 0 || !e->io_rx_bufs) return WG_EIO;
    int total = 0, err = 0;
    while (total < max_datagrams) {
        wg_endpoint src;
        struct mmsghdr msgs[IO_BATCH];
        struct iovec iov[IO_BATCH];
        struct sockaddr_storage addrs[IO_BATCH];
        _Alignas(struct cmsghdr) uint8_t ctl[IO_BATCH][IO_CMSG_SPACE];
        unsigned want = (unsigned)(max_datagrams - total < IO_BATCH ? max_datagrams - total : IO_BATCH);
        for (unsigned i = 0; i < want; i++) {
            iov[i].iov_base = e->io_rx_bufs + (size_t)i * IO_RX_BUF_SIZE;
            iov[i].iov_len = IO_RX_BUF_SIZE;
            memset(&msgs[i], 0, sizeof msgs[i]);
            msgs[i].msg_hdr.msg_name = &addrs[i];
            msgs[i].msg_hdr.msg_namelen = sizeof addrs[i];
            msgs[i].msg_hdr.msg_iov = &iov[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
            msgs[i].msg_hdr.msg_control = ctl[i];
            msgs[i].msg_hdr.msg_controllen = IO_CMSG_SPACE;
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
            endpoint_local_from_cmsg(&msgs[i].msg_hdr, &src);
            wg_input(e, iov[i].iov_base, msgs[i].msg_len, &src, now);
        }
        total += r;
        if ((unsigned)r < want) break;
    }
    /* The destinations' news too, while we are here: it often comes with the peers' ACKs, and
     * taking it now spares the owner a wake-up (and a trip through Python) for the epoll fd. */
    splice_gather(e->splice);
    splice_run(e->splice, now); /* the batch's bytes on to the destinations' sockets */
    tcp_flush(e->tcp, now);     /* the ACKs the batch owes, one per connection */
    wg_io_flush(e);
    return total > 0 || !err ? total : err;
}

