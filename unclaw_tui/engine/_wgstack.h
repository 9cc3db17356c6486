/*
 * _wgstack.h: the C engine of unclaw-tui, the contract between C and Python.
 *
 * Implemented by the WireGuard data plane (_wg.c: keys, replay, cryptokey routing, timers,
 * encrypt/decrypt, the inner packet's dispatch) and the engine hub (_hub.c: lifecycle, the TCP
 * and UDP queues to Python, splices and the fast relay, wg_tick / wg_collect, the IO helper),
 * over the userspace TCP (_tcp.h), the splices (_splice.h) and the shared wire format (_wire.h).
 *
 * The data plane and the TCP are sans-IO: datagrams and the time go in (wg_input, wg_tick),
 * datagrams to send (wg_next_output) and events for Python (wg_next_event) come out; they never
 * read a clock and never block.  IO is the hub's: the IO helper (wg_io_recv / wg_io_flush) runs
 * the core over a UDP socket that Python owns, with recvmmsg/sendmmsg, and splices (including
 * the fast relay's, opened from within wg_input) move bytes over non-blocking host sockets.
 * Nothing is thread-safe: the engine is used by one thread at a time, the worker of _worker.h
 * (wg_io_recv, wg_splice_service, wg_timers_due, wg_collect) or the owner's thread, which holds
 * wg_worker_lock around every call while a worker runs (or owns the engine alone without one).
 *
 * Python does per-handshake work (Noise IKpsk2, cookies, retransmission policy) and installs the
 * resulting keypairs here; C does per-packet work (transport encrypt/decrypt, replay window,
 * cryptokey routing, inner IP, ICMP echo, keepalives, counters, TCP and UDP).
 *
 * Inner traffic from peers, IPv4 and IPv6 alike: TCP goes to one userspace TCP stack per engine
 * (_tcp.h; Python drives it through wg_engine_tcp + the tcp_* calls and learns what happened
 * from wg_tcp_events); UDP datagrams are queued for wg_udp_drain; ICMP / ICMPv6 echo to the
 * tunnel addresses is answered here.  Everything else is counted as unhandled.
 *
 * Conventions: IPv4 addresses are uint32_t in host byte order; times are seconds (double) on
 * Python's monotonic clock; peer ids are small integers chosen by Python (< max_peers).
 * Functions returning int return 0 (or a count) on success and a negative WG_E* code on error.
 * This header is also read by build.py as the cffi cdef: keep it free of preprocessor
 * conditionals and macros other than the include guard and plain integer #defines.
 */
#ifndef UNCLAW_WGSTACK_H
#define UNCLAW_WGSTACK_H

#include <stdint.h>
#include <stddef.h>

#include "_tcp.h"
#include "_splice.h"

/* libsodium entry points, taken from the libsodium PyNaCl already loaded (no crypto of ours). */
typedef int (*wg_aead_encrypt_fn)(unsigned char *c, unsigned long long *clen_p,
                                  const unsigned char *m, unsigned long long mlen,
                                  const unsigned char *ad, unsigned long long adlen,
                                  const unsigned char *nsec, const unsigned char *npub,
                                  const unsigned char *k);
typedef int (*wg_aead_decrypt_fn)(unsigned char *m, unsigned long long *mlen_p,
                                  unsigned char *nsec, const unsigned char *c,
                                  unsigned long long clen, const unsigned char *ad,
                                  unsigned long long adlen, const unsigned char *npub,
                                  const unsigned char *k);
typedef void (*wg_memzero_fn)(void *pnt, size_t len);

/* Error codes (negative return values). */
#define WG_EINVAL -1
#define WG_ENOPEER -2
#define WG_EEXIST -3
#define WG_ENOSPC -4
#define WG_EINDEX -5
#define WG_EIO -6
#define WG_EMSGSIZE -7 /* a packet to build would exceed the tunnel MTU */
#define WG_ENOMEM -8

/* A UDP endpoint. family is 4 or 6 (0: none); addr holds 4 or 16 bytes in network order.
 * local is our side of it, the address (same family) a datagram from it arrived on and the one
 * a datagram to it leaves from (IP_PKTINFO / IPV6_PKTINFO, as the kernel's WireGuard and
 * wireguard-go do: a client behind NAT or on a connected socket drops replies from another
 * address); all zero: the kernel picks.  ifindex: the interface it arrived on (0: unknown). */
typedef struct {
    uint8_t family;
    uint8_t addr[16];
    uint16_t port; /* host byte order */
    uint8_t local[16];
    uint32_t ifindex;
} wg_endpoint;

typedef struct {
    uint32_t tunnel_ip;        /* the gateway's tunnel address, e.g. 10.77.0.1 */
    uint8_t tunnel_prefix_len; /* e.g. 24 */
    uint8_t tunnel_ip6[16];    /* its IPv6 tunnel address, e.g. fd77::1 (network order; zero: none) */
    uint16_t mtu;              /* inner MTU (1420) */
    uint32_t max_peers;        /* peer ids are 0 .. max_peers-1 */
    uint32_t staged_per_peer;  /* inner packets queued per peer while waiting for a handshake (128) */
    /* The TCP stack (0 = default): per-connection buffers each way (256 KiB), connection table
     * size (65536), connections per peer (4096), half-open connections per peer (256). */
    uint32_t tcp_rcvbuf, tcp_sndbuf;
    uint32_t tcp_max_conns, tcp_max_conns_per_peer, tcp_max_half_open_per_peer;
    uint64_t tcp_iss_seed; /* random, mixed into TCP initial sequence numbers */
} wg_config;

/* Events for Python, read with wg_next_event after wg_input / wg_io_recv / wg_tick. */
/* Handshake messages (unauthenticated) take at most half the event ring; a NEED_HANDSHAKE the
 * full ring refused is raised again as soon as wg_next_event makes room; a peer's
 * ENDPOINT_CHANGED not yet read is updated in place by a newer one. */
#define WG_EV_HANDSHAKE_PACKET 1 /* a message of type 1, 2 or 3: data/len/src. peer_id unknown (-1) */
#define WG_EV_NEED_HANDSHAKE 2   /* peer_id: the data path wants a new handshake; arg = WG_NEED_* */
#define WG_EV_KEYPAIR_CONFIRMED 3 /* peer_id: a responder keypair (arg = local index) became current */
#define WG_EV_KEYPAIR_FREED 4    /* peer_id: keypair with local index arg was dropped (rotated out or expired) */
#define WG_EV_ENDPOINT_CHANGED 5 /* peer_id: an authenticated packet came from a new endpoint (src) */
#define WG_EV_KEYS_EXPIRED 6     /* peer_id: no handshake for 540 s, every key of the peer was zeroed */

#define WG_NEED_NO_KEY 1         /* data to send but no usable keypair (packets staged) */
#define WG_NEED_REKEY_TIME 2     /* our initiator keypair is older than REKEY_AFTER_TIME */
#define WG_NEED_REKEY_MESSAGES 3 /* send counter passed REKEY_AFTER_MESSAGES */
#define WG_NEED_NO_RESPONSE 4    /* data sent, nothing received for KEEPALIVE + REKEY_TIMEOUT */
#define WG_NEED_RECV_OLD 5       /* receiving on our initiator keypair older than 165 s */

typedef struct {
    uint32_t type;
    int32_t peer_id;
    uint32_t arg;
    wg_endpoint src;
    uint32_t len;
    uint8_t data[148]; /* handshake message bytes for WG_EV_HANDSHAKE_PACKET */
} wg_event;

/* Reasons a datagram or inner packet is dropped; each is counted (wg_drop_count). */
#define WG_DROP_TRUNCATED 0        /* shorter than its type requires */
#define WG_DROP_BAD_SIZE 1         /* handshake message of the wrong size, or an oversized datagram */
#define WG_DROP_BAD_TYPE 2         /* unknown message type or nonzero reserved bytes */
#define WG_DROP_UNKNOWN_INDEX 3    /* receiver index matches no keypair */
#define WG_DROP_REPLAY 4           /* counter already seen or behind the window */
#define WG_DROP_DECRYPT 5          /* authentication tag did not verify */
#define WG_DROP_KEY_EXPIRED 6      /* keypair past REJECT_AFTER_TIME / MESSAGES */
#define WG_DROP_BAD_IP 7           /* inner packet: bad version, header, length or checksum */
#define WG_DROP_SPOOFED_SRC 8      /* inner source not in the peer's allowed IPs */
#define WG_DROP_NO_ROUTE 9         /* outgoing inner packet matches no peer */
#define WG_DROP_STAGED_FULL 10     /* per-peer queue waiting for a handshake is full */
#define WG_DROP_UNHANDLED 11       /* inner packet the stack does not handle (yet) */
#define WG_DROP_EVENT_OVERFLOW 12  /* event queue full */
#define WG_DROP_OUTPUT_OVERFLOW 13 /* output queue full and no socket to flush to */
#define WG_DROP_FRAGMENT 14        /* inner IPv4 fragment */
#define WG_DROP_SEND_ERROR 15      /* the socket refused a datagram (error other than EAGAIN) */
#define WG_DROP_UDP_OVERFLOW 16    /* UDP datagram queue (count or payload arena) full */
#define WG_DROP_UDP_TOO_LARGE 17   /* a datagram for a peer larger than the tunnel MTU allows */
#define WG_DROP_UDP_PEER_SHARE 18  /* UDP datagram from a peer that holds its share of the queue */
#define WG_DROP_HANDSHAKE_FLOOD 19 /* handshake message while they hold their half of the events */
#define WG_DROP_IPV6_EXT 20        /* inner IPv6: extension headers truncated, misplaced or too many */
#define WG_DROP__COUNT 21

typedef struct {
    wg_endpoint endpoint;
    uint64_t rx_bytes;   /* WireGuard datagram bytes received (authenticated) */
    uint64_t tx_bytes;   /* WireGuard datagram bytes sent */
    uint64_t rx_packets;
    uint64_t tx_packets;
    double last_rx;      /* time of the last authenticated packet, 0 = never */
    double last_tx;      /* time of the last sent transport packet, 0 = never */
    double current_created; /* time the current keypair was installed, 0 = none */
    uint32_t has_current;   /* a current keypair usable for sending */
    uint32_t staged;        /* inner packets waiting for a handshake */
    uint64_t udp_share_drops; /* its UDP datagrams refused for holding its queue share */
} wg_peer_stats;

typedef struct {
    uint64_t rx_datagrams;
    uint64_t tx_datagrams;
    uint64_t rx_bytes;
    uint64_t tx_bytes;
    uint64_t icmp_echo_replies;
    uint64_t udp_rx;          /* UDP datagrams queued for wg_udp_drain */
    uint64_t udp_tx;          /* UDP datagrams sent by wg_udp_send */
    uint64_t icmp_unreachables; /* ICMP destination unreachable sent by wg_icmp_unreachable */
    uint64_t ipv6_refused;    /* (no longer counted: IPv6 is carried like IPv4) */
    uint64_t fast_relayed;    /* SYNs spliced by the engine itself (wg_fast_relay_allow) */
} wg_engine_stats;

typedef struct wg_engine wg_engine;

/* Lifecycle.  Returns NULL on bad config or out of memory. */
wg_engine *wg_engine_new(const wg_config *cfg, wg_aead_encrypt_fn enc, wg_aead_decrypt_fn dec,
                         wg_memzero_fn memzero);
void wg_engine_free(wg_engine *e); /* zeroes every key */

/* Peers.  Changes take effect for the next packet. */
int wg_peer_add(wg_engine *e, uint32_t peer_id, uint16_t persistent_keepalive_s);
int wg_peer_remove(wg_engine *e, uint32_t peer_id); /* zeroes keys, drops staged, frees its indices */
int wg_peer_add_allowed_ip(wg_engine *e, uint32_t peer_id, uint8_t family, const uint8_t *addr,
                           uint8_t prefix_len); /* addr: 4 or 16 bytes, network order */
int wg_peer_set_endpoint(wg_engine *e, uint32_t peer_id, const wg_endpoint *ep);
/* Install a keypair from a completed handshake.  Initiator: it becomes current at once (the old
 * current becomes previous), staged packets are sent, or a keepalive if none were staged.
 * Responder: it becomes next and is promoted to current on the first packet received with it
 * (WG_EV_KEYPAIR_CONFIRMED).  A keypair pushed out of the three slots is zeroed and its index
 * freed (WG_EV_KEYPAIR_FREED).  Returns WG_EINDEX if local_index is already in use. */
int wg_peer_install_keypair(wg_engine *e, uint32_t peer_id, uint32_t local_index,
                            uint32_t remote_index, const uint8_t *send_key,
                            const uint8_t *recv_key, int is_initiator, double now);
/* End a peer's TCP connections and splices at once, reported as usual (TCP_EV_CLOSED with
 * reason, splice_results with tcp_close = reason): every one of a peer that went away
 * (TCP_CLOSE_PEER_GONE: nothing is sent, it would not arrive), or, to free its resources under
 * pressure, those its zero window holds open (TCP_CLOSE_PRESSURE, RFC 6429: an RST each).
 * The peer stays.
 * Returns how many connections ended; WG_ENOPEER, or WG_EINVAL for another reason. */
int wg_peer_abort_flows(wg_engine *e, uint32_t peer_id, uint32_t reason, double now);
/* Python gave up on handshaking (REKEY_ATTEMPT_TIME): drop the staged packets. */
int wg_peer_drop_staged(wg_engine *e, uint32_t peer_id);
int wg_peer_get_stats(wg_engine *e, uint32_t peer_id, wg_peer_stats *out);
/* wg_peer_get_stats for n peers in one call (a console's snapshot of every peer); an unknown id
 * leaves its entry zeroed.  Returns how many ids were known. */
int wg_peers_get_stats(wg_engine *e, const uint32_t *peer_ids, int n, wg_peer_stats *out);
int wg_index_in_use(wg_engine *e, uint32_t local_index); /* 1 if a keypair holds it */

/* The sans-IO core. */
/* One datagram received from src.  Returns 0 (processed or dropped and counted). */
int wg_input(wg_engine *e, const uint8_t *data, size_t len, const wg_endpoint *src, double now);
/* Queue a raw datagram (a handshake message built in Python) for dst. */
int wg_send_raw(wg_engine *e, const uint8_t *data, size_t len, const wg_endpoint *dst);
/* Route an inner IP packet to the peer whose allowed IPs hold its destination, encrypt, queue. */
int wg_send_inner(wg_engine *e, const uint8_t *packet, size_t len, double now);
/* Run the timers due at now: keepalives, NEED_HANDSHAKE after silence, key zeroing. */
void wg_tick(wg_engine *e, double now);
/* Earliest time wg_tick has something to do; 0 if nothing is armed. */
double wg_next_deadline(wg_engine *e);
/* Pop the next datagram to send: copies it into buf, fills dst, returns its length; 0 if none;
 * WG_ENOSPC if cap is too small. */
int wg_next_output(wg_engine *e, uint8_t *buf, size_t cap, wg_endpoint *dst);
/* Pop the next event: returns 1 and fills out, or 0 if none. */
int wg_next_event(wg_engine *e, wg_event *out);

/* TCP.  The engine owns one stack: tcp_process gets every IPv4 TCP segment from a peer, its IP
 * header parsed once by the data plane (after the allowed-IPs and fragment checks), its packets
 * go to peers like wg_send_inner's (staged while a peer has no keypair), wg_io_recv calls
 * tcp_flush at the end of each batch (sans-IO callers call tcp_flush themselves after a batch
 * of wg_input), wg_tick runs tcp_tick and wg_next_deadline includes tcp_next_deadline.  Python calls tcp_accept / tcp_read / tcp_write
 * ... on wg_engine_tcp(e) directly, then wg_io_flush.
 * wg_peer_remove closes the peer's connections without sending anything: each connection
 * Python still holds gets TCP_EV_CLOSED with TCP_CLOSE_PEER_REMOVED and must still be released. */
tcp_stack *wg_engine_tcp(wg_engine *e);
/* Pop up to max TCP events, oldest connection first; returns the count.  Events never overflow:
 * they are kept as per-connection pending bits, so several of one kind raised for a connection
 * before a drain come out once, and a connection's pending events come out in the order SYN,
 * READABLE, WRITABLE, PEER_FIN, CLOSED.  Events of released handles are discarded. */
int wg_tcp_events(wg_engine *e, tcp_event *out, int max);

/* Splices (_splice.h): relayed connections joined in C to a host socket.  The engine owns one
 * table over its TCP stack: TCP events of spliced connections never reach wg_tcp_events,
 * wg_io_recv and wg_tick run splice_run (before their tcp_flush / with their timers) and
 * wg_next_deadline includes connect deadlines.  Python calls splice_connect / splice_results /
 * splice_abort on wg_engine_splice(e) directly, and answers splice_fd's readability with
 * wg_splice_service.  NULL only if epoll is unavailable (then nothing is spliced). */
splice_table *wg_engine_splice(wg_engine *e);
/* splice_poll, then the ACKs and packets it produced go out (tcp_flush, wg_io_flush).
 * Returns the number of results waiting in splice_results. */
int wg_splice_service(wg_engine *e, double now);

/* Fast relay: SYNs from a peer to destinations (ip:port) the owner already approved for that
 * peer are spliced by the engine itself (splice_connect, connect_timeout as given with the approval) instead of being
 * raised as TCP_EV_SYN, so a new connection to a known-good destination needs no owner turn.
 * Each is reported afterwards through wg_fast_relay_opened and ends like any splice, in
 * splice_results.  Approvals are a bounded cache (WG_FAST_RELAY_SLOTS, direct-mapped: a
 * collision forgets the older one) that lapse at their expiry (the caller's clock; 0 = never);
 * wg_fast_relay_clear forgets them all, for when the owner's rules change.  A SYN the engine
 * cannot start itself (no socket, WG_FAST_RELAY_QUEUE_MAX reports unread) is raised as usual. */
#define WG_FAST_RELAY_SLOTS 4096
#define WG_FAST_RELAY_QUEUE_MAX 65536
typedef struct {
    uint32_t conn_id;
    uint32_t peer_id;
    uint32_t src_ip, dst_ip;     /* src = the peer's tunnel-side address, as tcp_conn_info */
    uint16_t src_port, dst_port;
    double opened_at;            /* when the SYN was taken (the caller's clock) */
} wg_fast_open;
/* WG_EINVAL for a zero ip or port or a negative timeout; WG_ENOPEER for a peer id out of
 * range; WG_ENOMEM; 0 when approved.  A removed peer's approvals are forgotten. */
int wg_fast_relay_allow(wg_engine *e, uint32_t peer_id, uint32_t ip, uint16_t port,
                        double expires, double connect_timeout);
void wg_fast_relay_clear(wg_engine *e);
/* The fast relay takes a SYN only while its peer has at most per_peer open connections and the
 * engine at most total (this SYN's included; 0 = no bound); past either the SYN is raised as
 * usual, so the owner decides it against its own budget (of descriptors) and can say why. */
void wg_fast_relay_bound(wg_engine *e, uint32_t per_peer, uint32_t total);
/* Pop up to max reports of connections the engine spliced itself, oldest first. */
int wg_fast_relay_opened(wg_engine *e, wg_fast_open *out, int max);
/* Reports waiting for the owner: wg_fast_relay_opened's plus splice_results'. */
uint32_t wg_reports_waiting(wg_engine *e);

/* UDP from peers.  Each datagram (valid header, length and checksum when nonzero; not to a
 * multicast or broadcast address) is queued with its payload in an arena.  The queue is shared
 * fairly: between drains, while k peers have datagrams queued, each may hold at most 1/(k+1)
 * of the datagrams and of the arena (WG_DROP_UDP_PEER_SHARE past it), which always leaves a
 * newcomer its own share, however hard the others flood. */
typedef struct {
    int32_t peer_id;
    uint32_t src_ip, dst_ip;     /* src = the peer's tunnel-side address, dst = where it was sent (IPv4; 0 for IPv6) */
    uint16_t src_port, dst_port;
    uint32_t offset, len;        /* payload bytes at arena + offset */
    uint32_t family;             /* 4 or 6 */
    uint8_t src_addr[16], dst_addr[16]; /* the same addresses, network order (4 bytes used for IPv4) */
} wg_udp_meta;
#define WG_UDP_QUEUE_MAX 8192          /* datagrams queued between drains */
#define WG_UDP_ARENA_SIZE 4194304      /* payload bytes queued between drains */
/* Copy up to max queued datagrams (oldest first) into out, point *arena at the payloads and
 * empty the queue (datagrams beyond max are discarded: pass max >= WG_UDP_QUEUE_MAX).  The
 * payloads stay valid until the next wg_input / wg_io_recv.  Returns the count. */
int wg_udp_drain(wg_engine *e, wg_udp_meta *out, int max, const uint8_t **arena);
/* Send one UDP datagram to a peer's tunnel address dst_ip (routed by allowed IPs, like
 * wg_send_inner) as if from src_ip:src_port; the IPv4 and UDP checksums are filled in.
 * WG_EMSGSIZE if it would not fit in the MTU (no fragmentation); no route: dropped, counted. */
int wg_udp_send(wg_engine *e, uint32_t src_ip, uint16_t src_port, uint32_t dst_ip,
                uint16_t dst_port, const uint8_t *data, size_t len, double now);
/* ICMP destination unreachable (type 3; code 3 port, 13 administratively prohibited, 1 host...)
 * to peer_ip as if from dst_ip, quoting a synthetic original IPv4 header (peer_ip -> dst_ip,
 * proto) and 8 bytes holding the ports, so the client's stack matches it to its socket.  For
 * UDP (proto 17) this is what a client expects; for TCP prefer tcp_reject (the quoted sequence
 * number is 0 and stacks check it against the connection's).  Routed and counted as wg_udp_send. */
int wg_icmp_unreachable(wg_engine *e, uint32_t peer_ip, uint16_t peer_port, uint32_t dst_ip,
                        uint16_t dst_port, uint8_t proto, uint8_t code, double now);

/* wg_udp_send and wg_icmp_unreachable for either family: addresses of 4 (family 4) or 16 bytes
 * in network order.  Over IPv6 the answer is ICMPv6 destination unreachable (type 1) with code
 * 4 (port) for IPv4's 3, 1 (administratively prohibited) for 13 and 3 (address) for 1; other
 * codes are WG_EINVAL there. */
int wg_udp_send_addr(wg_engine *e, uint8_t family, const uint8_t *src, uint16_t src_port,
                     const uint8_t *dst, uint16_t dst_port, const uint8_t *data, size_t len,
                     double now);
int wg_icmp_unreachable_addr(wg_engine *e, uint8_t family, const uint8_t *peer_ip,
                             uint16_t peer_port, const uint8_t *dst_ip, uint16_t dst_port,
                             uint8_t proto, uint8_t code, double now);

/* Counters. */
uint64_t wg_drop_count(wg_engine *e, int reason);
/* Every drop counter in one call: out[0 .. WG_DROP__COUNT) the engine's, then
 * out[WG_DROP__COUNT .. + TCP_DROP__COUNT) the TCP stack's. */
void wg_all_drop_counts(wg_engine *e, uint64_t *out);
const char *wg_drop_reason_name(int reason);
void wg_engine_get_stats(wg_engine *e, wg_engine_stats *out);

/* What the owner has to do after engine work, in one call (each call from Python is a round
 * trip of the interpreter lock, which a console thread may be holding): run the splices' deferred
 * work, then count what waits for wg_next_event, wg_tcp_events, wg_udp_drain, splice_results and
 * wg_io_flush, and give wg_next_deadline. */
typedef struct {
    uint32_t events;
    uint32_t tcp_events;     /* connections with TCP events */
    uint32_t udp_datagrams;
    uint32_t splice_results;
    uint32_t fast_opened;    /* reports for wg_fast_relay_opened */
    uint32_t outputs;        /* datagrams queued to send */
    double next_deadline;    /* 0 = nothing armed */
} wg_pending;
void wg_collect(wg_engine *e, double now, wg_pending *out);

/* Nonzero when something waits that only the owner handles and that cannot wait: events, TCP
 * events of its own connections, UDP datagrams.  Reports (wg_reports_waiting) can wait a
 * little and be read in batches. */
int wg_owner_work(wg_engine *e);
/* The attached UDP socket, or -1. */
int wg_io_fd(wg_engine *e);
/* If the earliest deadline has passed: wg_tick, then what it produced goes out. */
void wg_timers_due(wg_engine *e, double now);

/* Give the C library's free memory back to the system (glibc's malloc_trim; elsewhere a
 * no-op).  TCP rings come and go with traffic, freed in another order than allocated; without
 * this the process's resident size creeps up with heap fragmentation under long mixed load. */
void wg_trim_memory(void);

/* Process-wide: keep large TCP rings on the heap and stop free() from shrinking it, so that
 * short connections do not cost system calls and page faults (see _hub.c). */
void wg_tune_allocator(void);

/* The IO helper over a non-blocking UDP socket owned by Python. family is 4 (AF_INET socket)
 * or 6 (AF_INET6 socket, dual-stack: IPv4 peers appear as family 4 endpoints). */
int wg_io_attach(wg_engine *e, int fd, int family);
/* Receive until EAGAIN or max_datagrams, feed each to wg_input, tcp_flush, then flush.  Returns the number
 * of datagrams received, or a negative errno on a socket error other than EAGAIN. */
int wg_io_recv(wg_engine *e, double now, int max_datagrams);
/* Send every queued output datagram (sendmmsg).  Returns the number sent; datagrams the
 * socket refuses with EAGAIN stay queued, other errors drop and count them. */
int wg_io_flush(wg_engine *e);

#endif
