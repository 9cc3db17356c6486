/*
 * _engine.h: what the engine's two halves share, private to the C files (not in the cffi cdef).
 *
 *   _wg.c   the WireGuard data plane: keypairs, replay, index table, allowed IPs, timers,
 *           encrypt/decrypt, the inner packet's parse and dispatch, the event and output rings.
 *   _hub.c  the engine hub: lifecycle, the TCP stack's glue and event queue, splices and the
 *           fast relay, the UDP queue, wg_tick / wg_collect, counters, allocator tuning, and the
 *           IO helper (recvmmsg / sendmmsg on the UDP socket Python owns).
 *
 * One struct wg_engine holds both halves' state; the data plane's types below are touched by
 * _wg.c only.  The functions declared here are sans-IO.  Nothing is thread-safe: all runs on the
 * thread that holds the engine (the worker of _worker.c, or the owner under wg_worker_lock).
 */
#ifndef UNCLAW_ENGINE_H
#define UNCLAW_ENGINE_H

#include <stdbool.h>

#include "_wgstack.h"
#include "_wire.h"

#define KEY_SIZE 32
#define REPLAY_RING_BLOCKS 128u /* replay window (RFC 6479): 64-bit blocks */
#define OUTPUT_RING_SIZE 1024u  /* datagrams waiting to be sent */
#define EVENT_RING_SIZE 4096u
/* Handshake datagrams (unauthenticated: anyone can send them) may hold at most half the event
 * ring, so a flood of them never leaves the peers' authenticated events without room. */
#define EVENT_RING_HANDSHAKE_MAX (EVENT_RING_SIZE / 2)

/* ---- The data plane's state (_wg.c) ------------------------------------------------------- */
typedef struct {
    uint64_t last;
    uint64_t ring[REPLAY_RING_BLOCKS];
} replay_filter;

typedef struct keypair {
    uint8_t send_key[KEY_SIZE], recv_key[KEY_SIZE];
    uint32_t local_index, remote_index;
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
    bool active, in_timer_list;
    uint16_t persistent_keepalive; /* seconds, 0 = off */
    wg_endpoint endpoint;
    keypair *current, *previous, *next;
    /* NEED_HANDSHAKE rate limit: one per REKEY_TIMEOUT unless a keypair is installed. */
    bool need_handshake_signalled;
    double need_handshake_at;
    /* A NEED_HANDSHAKE the full event ring could not take (its WG_NEED_* reason, 0 = none):
     * raised as soon as wg_next_event makes room, from the engine's owed FIFO. */
    uint8_t need_handshake_owed;
    bool owed_listed;
    /* The peer's ENDPOINT_CHANGED still in the event ring (absolute ring position): a newer
     * endpoint updates it in place, so a peer hopping ports takes one slot, not one a packet. */
    bool endpoint_ev_queued;
    uint64_t endpoint_ev_pos;
    /* Its share of the UDP queue to Python since the last wg_udp_drain (_hub.c). */
    uint32_t udp_queued, udp_bytes;
    uint64_t udp_share_drops; /* datagrams refused because the peer held its share */
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
} output_meta; /* the output ring's: drained by wg_next_output (_wg.c) or wg_io_flush (_hub.c) */

/* ---- The hub's state (_hub.c) ----------------------------------------------------------------- */
/* A destination approved for the fast relay, for one peer (see wg_fast_relay_allow). */
typedef struct {
    uint32_t peer_id;
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

/* ---- The engine: both halves' state -------------------------------------------------------- */
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
    uint32_t ev_handshakes; /* WG_EV_HANDSHAKE_PACKET events in the ring */
    uint64_t ev_popped;     /* events popped so far: the absolute position of ev_head */
    uint32_t *owed;         /* FIFO of peers owed a NEED_HANDSHAKE (max_peers entries) */
    uint32_t owed_head, owed_count;

    uint8_t *plain; /* decrypt scratch */
    size_t plain_cap;
    uint8_t *tx_scratch; /* mtu bytes: inner packets the stack builds (ICMP replies) */

    uint64_t drops[WG_DROP__COUNT];
    wg_engine_stats stats;

    int io_fd, io_family;
    uint8_t *io_rx_bufs; /* IO_BATCH * IO_RX_BUF_SIZE, allocated by wg_io_attach */

    tcp_stack *tcp;
    splice_table *splice;     /* NULL if epoll is unavailable */
    tcp_pending *tcp_pending; /* tcp_slots entries */
    uint32_t *tcp_ready;      /* FIFO of slots with pending events; each slot at most once */
    uint32_t tcp_slots, tcp_ready_head, tcp_ready_count;

    fast_relay_entry *fast_relay; /* WG_FAST_RELAY_SLOTS, allocated by the first approval */
    double fast_connect_timeout;
    uint32_t fast_max_per_peer, fast_max_total; /* wg_fast_relay_bound; 0 = none */
    wg_fast_open *fast_opened;    /* ring of reports for the owner */
    uint32_t fast_head, fast_count, fast_cap;

    wg_udp_meta *udp_meta; /* WG_UDP_QUEUE_MAX entries */
    uint8_t *udp_arena;    /* WG_UDP_ARENA_SIZE bytes */
    uint32_t udp_count, udp_arena_used, udp_arena_high;
    uint32_t udp_peers; /* peers with datagrams in the queue: each may hold 1/(udp_peers+1) */

    uint16_t ip_id; /* IPv4 identification of the packets built here */
};

#define WG_PASS (-1) /* what an input handler returns when it kept the packet, else WG_DROP_* */

static inline void count_drop(wg_engine *e, int reason) { e->drops[reason]++; }

static inline void output_pop(wg_engine *e) {
    e->out_head = (e->out_head + 1) % OUTPUT_RING_SIZE;
    e->out_count--;
}

/* ---- _wg.c for _hub.c ------------------------------------------------------------------------ */
/* The data plane's part of wg_engine_new (e->cfg set and checked) and wg_engine_free. */
bool dp_init(wg_engine *e);
void dp_free(wg_engine *e);
/* An inner packet for peer_id: encrypted and queued, or staged until a handshake (the TCP
 * stack's emit callback, ctx = the engine). */
void dp_peer_send(void *ctx, uint32_t peer_id, const uint8_t *pkt, size_t len, double now);
/* An inner packet to the peer whose allowed IPs hold dst; false (counted) if none does. */
bool dp_route_send(wg_engine *e, uint8_t family, const uint8_t *dst, const uint8_t *pkt,
                   size_t len, double now);
/* The peers' timers due at now (wg_tick's WireGuard part). */
void dp_run_timers(wg_engine *e, double now);

/* ---- _hub.c for _wg.c ------------------------------------------------------------------------ */
/* An IPv4 UDP datagram from peer_id: validated, then queued for wg_udp_drain.  Returns WG_PASS
 * or the reason to count. */
int hub_udp_input(wg_engine *e, uint32_t peer_id, const wire_ip_repr *ip);
/* A peer left: its fast-relay approvals go with it (its id may be given to another). */
void hub_forget_peer(wg_engine *e, uint32_t peer_id);

#endif
