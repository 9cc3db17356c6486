/*
 * _tcp.h: the userspace TCP of the gateway, terminating every TCP connection a WireGuard peer
 * opens, to any destination ip:port.
 *
 * Sans-IO: inner IPv4 segments and the time go in (tcp_process, tcp_tick, the tcp_* calls of
 * the owner), IPv4 packets for the peers and events for the owner come out through two C
 * callbacks.  It never reads a clock, never blocks, makes no system call, never calls Python.
 * Not thread-safe: in the gateway it runs on whichever thread holds the engine (the worker of
 * _worker.c, or the owner's thread under wg_worker_lock).
 *
 * A peer's SYN is peeked, never matched against listeners: it becomes a connection in state
 * TCP_ST_SYN_PENDING and a TCP_EV_SYN event; the owner then calls tcp_accept (SYN-ACK) or
 * tcp_reject (RST), so a relay can connect upstream first and answer the SYN with the truth.
 *
 * Handles: every connection announced by TCP_EV_SYN is owned by the caller until tcp_release.
 * TCP_EV_CLOSED comes exactly once per announced connection (also after tcp_reject/tcp_abort)
 * unless the handle was released first; no event names a released handle.
 *
 * Callbacks run inside tcp_* calls and must not call back into tcp_* (queue instead).
 *
 * Options: MSS (ours = mtu - 40), window scale (RFC 7323) and SACK (RFC 2018) when the peer's
 * SYN offers them; no timestamps.  Loss recovery: RFC 6298 RTO (min 200 ms), fast retransmit,
 * NewReno (RFC 6582) with SACK hole filling, Limited Transmit, Early Retransmit; IW 10.
 *
 * ACK policy: every second full-sized in-order segment, any out-of-order or hole-filling
 * segment, a FIN and a segment outside the window are ACKed at once; any other in-order data
 * is ACKed by tcp_flush (call it at the end of each input batch) or, failing that, by a
 * delayed-ACK timer of TCP_DELACK_MS.  Data is sent at once (no Nagle), but not in slivers:
 * sender silly-window avoidance (RFC 1122 4.2.3.4) holds a segment shorter than the MSS while
 * more data waits behind it, until the window allows a full one or half the largest window the
 * peer offered, or the persist timer fires with nothing in flight.
 *
 * Conventions as _wgstack.h: IPv4 addresses and ports in host byte order, times in seconds
 * (double, the caller's monotonic clock), negative TCP_E* codes on error.  This header is also
 * read as a cffi cdef: no preprocessor lines other than the include guard, #includes, plain
 * integer #defines and the C-only block of `#ifndef UNCLAW_CDEF` (build.py leaves it out).
 */
#ifndef UNCLAW_TCP_H
#define UNCLAW_TCP_H

#include <stdint.h>
#include <stddef.h>

/* Errors (negative return values). */
#define TCP_EINVAL -1   /* bad argument */
#define TCP_ENOCONN -2  /* unknown, stale or released handle */
#define TCP_ESTATE -3   /* not possible in this state (accept twice, write after shutdown...) */
#define TCP_ENOMEM -4
#define TCP_ERESET -5   /* the connection was reset, aborted or timed out */
#define TCP_EAGAIN -11  /* nothing to read yet */

/* Connection states (tcp_conn_info.state). */
#define TCP_ST_SYN_PENDING 1  /* the peer's SYN awaits tcp_accept / tcp_reject */
#define TCP_ST_SYN_RECEIVED 2 /* SYN-ACK sent */
#define TCP_ST_ESTABLISHED 3
#define TCP_ST_FIN_WAIT_1 4
#define TCP_ST_FIN_WAIT_2 5
#define TCP_ST_CLOSE_WAIT 6
#define TCP_ST_CLOSING 7
#define TCP_ST_LAST_ACK 8
#define TCP_ST_TIME_WAIT 9
#define TCP_ST_CLOSED 10

/* Events. */
#define TCP_EV_SYN 1      /* new connection waiting for accept/reject (tcp_get_info for details) */
#define TCP_EV_READABLE 2 /* data (or EOF) to read; raised once, re-armed by the next tcp_read */
#define TCP_EV_WRITABLE 3 /* tcp_write had accepted less than asked; now a quarter is free */
#define TCP_EV_PEER_FIN 4 /* the peer half-closed: after the buffered data, tcp_read returns 0 */
#define TCP_EV_CLOSED 5   /* closed, reset or timed out; arg = TCP_CLOSE_*; handle valid until release */

/* Why a connection closed (TCP_EV_CLOSED arg, tcp_conn_info.close_reason). */
#define TCP_CLOSE_NORMAL 1       /* FIN both ways, ours acknowledged */
#define TCP_CLOSE_RESET 2        /* the peer sent an RST */
#define TCP_CLOSE_TIMEOUT 3      /* retransmissions (data, FIN or SYN-ACK) gave up */
#define TCP_CLOSE_ABORTED 4      /* tcp_abort */
#define TCP_CLOSE_REJECTED 5     /* tcp_reject */
#define TCP_CLOSE_SYN_TIMEOUT 6  /* the SYN was never accepted nor rejected */
#define TCP_CLOSE_PEER_REMOVED 7 /* tcp_remove_peer */
#define TCP_CLOSE_EVICTED 8      /* released while the peer stayed silent (FIN-WAIT-2 timeout) */
#define TCP_CLOSE_PEER_GONE 9    /* tcp_abort_peer: the peer went away (nothing sent) */
#define TCP_CLOSE_PRESSURE 10    /* tcp_abort_peer: held by a zero window, resources needed (RST, RFC 6429) */

/* Why an input segment was dropped; each is counted (tcp_drop_count). */
#define TCP_DROP_MALFORMED 0       /* IP/TCP header too short or inconsistent */
#define TCP_DROP_BAD_CHECKSUM 1
#define TCP_DROP_BAD_ADDRESS 2     /* port 0, broadcast/multicast destination or source */
#define TCP_DROP_NO_CONN 3         /* no connection for the segment (answered with RST) */
#define TCP_DROP_LIMIT_CONNS 4     /* table full (the SYN got an RST) */
#define TCP_DROP_LIMIT_PEER 5      /* max_conns_per_peer (RST) */
#define TCP_DROP_LIMIT_HALF_OPEN 6 /* max_half_open_per_peer (RST) */
#define TCP_DROP_OUT_OF_WINDOW 7   /* sequence not acceptable (answered with an ACK) */
#define TCP_DROP_BAD_ACK 8         /* acknowledges data never sent */
#define TCP_DROP_RST_IGNORED 9     /* RST outside the window, or in it but not exact (challenge ACK) */
#define TCP_DROP_SYN_DUPLICATE 10  /* SYN retransmission absorbed while pending / in SYN-RECEIVED */
#define TCP_DROP_OOO_FULL 11       /* out-of-order data beyond the bounded reassembly ranges */
#define TCP_DROP_NOMEM 12
#define TCP_DROP_NO_ACK 13         /* a segment without ACK in a synchronized state */
#define TCP_DROP_AFTER_CLOSE 14    /* data for a released connection, discarded */
#define TCP_DROP__COUNT 15

#define TCP_DELACK_MS 5
/* ACKs a connection sends per second in answer to unacceptable segments (out of window, an
 * inexact RST, a SYN, an ACK of unsent data, a repeated SYN): RFC 5961 section 7's limit, per
 * connection so that one peer's flood cannot use up another's. */
#define TCP_CHALLENGE_ACKS_PER_S 10

typedef struct {
    uint32_t conn_id;
    uint32_t peer_id;
    uint32_t src_ip, dst_ip;     /* src = the peer's tunnel-side address, dst = where it wanted to go (IPv4; 0 for IPv6) */
    uint16_t src_port, dst_port;
    uint32_t family;             /* 4 or 6 */
    uint8_t src_addr[16], dst_addr[16]; /* the same addresses, network order (4 bytes used for IPv4) */
    uint32_t state;              /* TCP_ST_* */
    uint32_t close_reason;       /* TCP_CLOSE_* once closed, else 0 */
    uint64_t bytes_in;           /* payload bytes received in order from the peer */
    uint64_t bytes_out;          /* payload bytes the peer acknowledged */
    uint32_t retransmits;        /* segments sent again */
    double srtt, rttvar, rto;    /* seconds; srtt 0 = no sample yet */
    uint32_t cwnd, ssthresh;     /* bytes */
    uint32_t snd_wnd;            /* the peer's window, bytes (scaled) */
    uint32_t rcv_wnd;            /* the window we offer, bytes */
    uint32_t snd_mss;            /* segment size we send */
    uint8_t snd_wscale, rcv_wscale, wscale_ok, sack_ok;
    uint32_t rcv_queued;         /* bytes readable now */
    uint32_t snd_queued;         /* bytes written but not yet acknowledged */
    uint32_t mem;                /* heap bytes held by this connection, struct included */
} tcp_conn_info;

/* A conn_id's low bits are its table slot + 1 (< max_conns + 1), the rest a generation: an
 * owner may index per-connection arrays of max_conns entries by (conn_id & mask) - 1. */
#define TCP_CONN_SLOT_MASK 0xfffff

typedef struct {
    uint32_t type;    /* TCP_EV_* */
    uint32_t conn_id;
    uint32_t arg;     /* TCP_CLOSE_* for TCP_EV_CLOSED */
} tcp_event;

typedef struct {
    void *ctx;
    /* An IPv4 packet (valid checksums) for peer_id; the caller encrypts and sends it.  now is
     * the time given to the tcp_* call that produced it. */
    void (*emit)(void *ctx, uint32_t peer_id, const uint8_t *ip_packet, size_t len, double now);
    void (*event)(void *ctx, const tcp_event *ev);
} tcp_callbacks;

typedef struct {
    uint32_t rcvbuf, sndbuf;         /* per connection, bytes; 0 = 256 KiB */
    uint16_t mtu;                    /* tunnel MTU; our MSS = mtu - 40; 0 = 1420 */
    uint32_t max_conns;              /* connection table size (TIME-WAIT included); 0 = 4096 */
    uint32_t max_conns_per_peer;     /* 0 = max_conns */
    uint32_t max_half_open_per_peer; /* SYN-PENDING + SYN-RECEIVED; 0 = 64 */
    uint32_t time_wait_max;          /* TIME-WAIT entries kept; 0 = 1024 */
    uint32_t time_wait_ms;           /* 0 = 1000 */
    uint32_t syn_pending_ms;         /* a SYN unanswered this long gets an RST; 0 = 30000 */
    uint64_t iss_seed;               /* mixed into initial sequence numbers */
} tcp_config;

typedef struct {
    uint64_t segs_in, segs_out;
    uint64_t retransmits, fast_retransmits, rto_expirations, zero_window_probes;
    uint64_t rsts_out;
    uint64_t syns;               /* connections announced */
    uint64_t established;        /* handshakes completed */
    uint32_t conns;              /* table entries in use (any state, TIME-WAIT and closed-unreleased included) */
    uint32_t open;               /* not TIME-WAIT nor closed */
    uint32_t half_open;
    uint32_t time_wait;
    uint64_t mem;                /* heap bytes held by connections (structs + buffers) */
    uint64_t challenge_acks;     /* ACKs answering unacceptable segments (RFC 5961, RFC 9293) */
    uint64_t challenge_acks_limited; /* ... not sent: over TCP_CHALLENGE_ACKS_PER_S */
} tcp_stats;

typedef struct tcp_stack tcp_stack;

/* NULL on a bad config (max_conns > 2^20, mtu < 576...) or out of memory. */
tcp_stack *tcp_stack_new(const tcp_config *cfg, const tcp_callbacks *cb);
void tcp_stack_free(tcp_stack *s);

/* A segment from peer_id whose IP header the caller parsed (wire_ip_parse, _wire.h) and
 * checked: protocol 6, not a fragment.  As smoltcp's process_tcp(ip_repr, payload): the IP
 * header is not read again; this checks the TCP checksum and header (IPv4 only so far).
 * Returns 0 if the segment was used, 1 if it was dropped (and counted). */
#ifndef UNCLAW_CDEF
struct wire_ip_repr;
int tcp_process(tcp_stack *s, uint32_t peer_id, const struct wire_ip_repr *ip, double now);
#endif
/* tcp_process of a whole IPv4 packet (for callers holding bytes: tests); an IP header
 * wire_ip_parse refuses counts as TCP_DROP_MALFORMED.  TCP_EINVAL on NULL. */
int tcp_input(tcp_stack *s, uint32_t peer_id, const uint8_t *ip_packet, size_t len, double now);
/* Send every pending ACK at once; call after each batch of tcp_process / tcp_input. */
void tcp_flush(tcp_stack *s, double now);

int tcp_accept(tcp_stack *s, uint32_t conn_id, double now); /* SYN-ACK */
int tcp_reject(tcp_stack *s, uint32_t conn_id, double now); /* RST+ACK of the SYN, then CLOSED */
/* > 0 bytes, 0 EOF, TCP_EAGAIN when empty, TCP_ERESET after a reset.  Sends a window update
 * when the window grew meaningfully. */
long tcp_read(tcp_stack *s, uint32_t conn_id, uint8_t *buf, size_t cap, double now);
/* Bytes accepted (less than len when the send buffer is full: wait for TCP_EV_WRITABLE).
 * Allowed from SYN-RECEIVED on (sent once established). */
long tcp_write(tcp_stack *s, uint32_t conn_id, const uint8_t *data, size_t len, double now);
int tcp_shutdown_write(tcp_stack *s, uint32_t conn_id, double now); /* FIN after buffered data */
int tcp_abort(tcp_stack *s, uint32_t conn_id, double now);          /* RST, then CLOSED */
/* The caller is done with the handle.  Open connection: unread data -> RST; else FIN after the
 * buffered data, later input discarded, the stack finishes (or times out) on its own. */
int tcp_release(tcp_stack *s, uint32_t conn_id, double now);
/* Closes every connection of peer_id without sending anything; returns how many. */
int tcp_remove_peer(tcp_stack *s, uint32_t peer_id, double now);
/* TCP_CLOSE_PEER_GONE: ends every connection of peer_id (TIME-WAIT and released ones included),
 * sending nothing.  TCP_CLOSE_PRESSURE: ends, with an RST each, only those the peer's zero
 * window holds open (RFC 6429).  Returns how many. */
int tcp_abort_peer(tcp_stack *s, uint32_t peer_id, uint32_t reason, double now);
int tcp_get_info(tcp_stack *s, uint32_t conn_id, tcp_conn_info *out);

/* Zero-copy access for an owner that moves bytes between a connection and a socket (the
 * splice, _splice.h): the rings themselves, as at most two spans each.  tcp_read_spans gives
 * the readable bytes (> 0), 0 at EOF, TCP_EAGAIN when empty (READABLE re-armed, as tcp_read) or
 * TCP_ERESET; tcp_read_consume(n) then takes n of them (window update as tcp_read).
 * tcp_write_spans gives the free send space (0 arms TCP_EV_WRITABLE) or tcp_write's errors;
 * tcp_write_commit(n) then sends the n bytes the owner put at the start of those spans. */
typedef struct {
    uint8_t *base;
    size_t len;
} tcp_span;
long tcp_read_spans(tcp_stack *s, uint32_t conn_id, tcp_span spans[2]);
long tcp_read_consume(tcp_stack *s, uint32_t conn_id, size_t n, double now);
long tcp_write_spans(tcp_stack *s, uint32_t conn_id, tcp_span spans[2]);
long tcp_write_commit(tcp_stack *s, uint32_t conn_id, size_t n, double now);


void tcp_tick(tcp_stack *s, double now);
double tcp_next_deadline(tcp_stack *s); /* 0 = nothing armed */

uint64_t tcp_drop_count(tcp_stack *s, int reason);
const char *tcp_drop_reason_name(int reason);
void tcp_get_stats(tcp_stack *s, tcp_stats *out);
/* Open (not TIME-WAIT or closed) and half-open connections of a peer. */
int tcp_peer_counts(tcp_stack *s, uint32_t peer_id, uint32_t *open, uint32_t *half_open);
/* SYNs of a peer refused (with an RST) by max_conns_per_peer and by max_half_open_per_peer,
 * since the stack began.  Owners poll it only when tcp_drop_count of TCP_DROP_LIMIT_PEER or
 * TCP_DROP_LIMIT_HALF_OPEN moved, so a limit being hit costs no per-packet work. */
int tcp_peer_limit_hits(tcp_stack *s, uint32_t peer_id, uint64_t *conns, uint64_t *half_open);

#endif
