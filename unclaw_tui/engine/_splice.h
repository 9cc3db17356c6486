/*
 * _splice.h: relayed TCP connections joined in C.  One side is a peer's connection in the
 * userspace TCP stack (_tcp.h), the other a kernel TCP socket to the destination; the bytes of a
 * relayed flow never pass through Python.
 *
 * Python decides (router, egress policy) when a peer's SYN arrives and calls splice_connect.
 * From then on the table owns the TCP handle and the socket: it waits for the connect (up to a
 * deadline), answers the SYN with the truth (SYN-ACK once connected, RST if the destination
 * refused or did not answer), copies both ways straight between the TCP rings and the socket
 * (readv/sendmsg on the rings' spans, no copy of ours), passes each EOF on as a half-close, and
 * applies back-pressure both ways: a full peer send ring stops reads from the socket (the
 * kernel's window closes), a socket that takes no more stops reads from the peer (our window
 * closes).  An error either side resets both.  Each connection is reported once, when it ends
 * (splice_results), with its byte counts.
 *
 * The sockets are watched, edge-triggered, through one epoll fd (splice_fd) that the owner adds
 * to its event loop and answers with splice_poll.  TCP events of spliced connections are taken
 * by splice_claim_event (the engine's event callback calls it first) and handled at the next
 * splice_run; the engine runs it after each input batch and each tick.
 *
 * Not sans-IO: splice_connect, splice_poll, splice_gather, splice_run and splice_abort make
 * system calls on non-blocking sockets (never blocking), with the time passed in.  Not
 * thread-safe: it runs on the thread that holds the engine (the worker of _worker.c, or the
 * owner's thread under wg_worker_lock).
 *
 * Conventions as _tcp.h.  Read as a cffi cdef: no preprocessor lines beyond the include guard,
 * #includes and plain integer #defines.
 */
#ifndef UNCLAW_SPLICE_H
#define UNCLAW_SPLICE_H

#include <stdint.h>
#include <stddef.h>

#include "_tcp.h"

/* How a spliced connection ended (splice_result.outcome). */
#define SPLICE_OK 0              /* EOF both ways, both sides closed cleanly */
#define SPLICE_FAIL_CONNECT 1    /* the destination was not reached: error = errno (ETIMEDOUT at
                                    the deadline); the peer's SYN got an RST */
#define SPLICE_FAIL_PEER 2       /* the peer's side ended abnormally: tcp_close = TCP_CLOSE_*;
                                    the destination got an RST */
#define SPLICE_FAIL_HOST 3       /* the destination's side failed: error = errno; the peer got an RST */
#define SPLICE_FAIL_PEER_GONE 4  /* the peer's connection ended before the connect completed:
                                    tcp_close = TCP_CLOSE_* */
#define SPLICE_FAIL_ABORTED 5    /* splice_abort: both sides reset */

typedef struct {
    uint32_t conn_id;
    uint32_t outcome;    /* SPLICE_OK or SPLICE_FAIL_* */
    int32_t error;       /* errno, for SPLICE_FAIL_CONNECT and SPLICE_FAIL_HOST */
    uint32_t tcp_close;  /* TCP_CLOSE_*, for SPLICE_FAIL_PEER and SPLICE_FAIL_PEER_GONE */
    uint64_t bytes_up;   /* peer -> destination, taken by the destination's socket */
    uint64_t bytes_down; /* destination -> peer, taken by the peer's send ring */
    double ended_at;     /* when it ended (the caller's clock) */
} splice_result;

typedef struct {
    uint32_t conn_id;
    uint64_t bytes_up, bytes_down;
} splice_progress;

typedef struct splice_table splice_table;

/* slots: the TCP stack's max_conns (conn_id slot numbers index the table).  NULL when out of
 * memory or when epoll is not available. */
splice_table *splice_table_new(tcp_stack *tcp, uint32_t slots);
/* Resets every spliced connection (both sides) and closes the sockets and the epoll fd. */
void splice_table_free(splice_table *t, double now);

/* Connect to ip:port (host byte order) for the peer's connection conn_id, still in
 * TCP_ST_SYN_PENDING; give up at deadline (the caller's clock).  0 on success: the table owns
 * the handle from now on (no more TCP events for it reach the owner, nor must the owner call
 * tcp_* on it).  A negative errno if the socket could not even be started (the caller still
 * owns the handle and answers the SYN itself), TCP_ENOCONN / TCP_ESTATE for a bad handle. */
int splice_connect(splice_table *t, uint32_t conn_id, uint32_t ip, uint16_t port,
                   double deadline, double now);
/* As splice_connect, for a socket the owner connected itself (fd: a connected TCP socket, made
 * non-blocking here): the SYN is answered at the next poll.  0: the table owns fd and the
 * handle; else the caller keeps both. */
int splice_attach(splice_table *t, uint32_t conn_id, int fd, double now);
/* As splice_attach, for a connection the owner already accepted and read from (ESTABLISHED, or
 * CLOSE_WAIT after the peer's FIN): whatever the owner read from the peer it has sent to fd
 * itself, and nothing it wrote to the peer is still queued.  From the next splice_run on, the
 * bytes still in the receive ring and all that follow move in C.  0: the table owns fd and the
 * handle; else the caller keeps both. */
int splice_adopt(splice_table *t, uint32_t conn_id, int fd, double now);
/* 1 if ev is about a spliced connection (taken, handled at the next splice_run), else 0. */
int splice_claim_event(splice_table *t, const tcp_event *ev);
/* The epoll fd: readable when a spliced socket has news; answer with splice_poll. */
int splice_fd(splice_table *t);
/* Collect the sockets' news without waiting, then splice_run.  Returns the results waiting. */
int splice_poll(splice_table *t, double now);
/* Only collect the sockets' news (for the next splice_run); returns how many had some. */
int splice_gather(splice_table *t);
/* Move what can move for every connection with news, end those that are done, time out
 * connects past their deadline. */
void splice_run(splice_table *t, double now);
double splice_next_deadline(splice_table *t); /* 0 = nothing armed */
/* Pop up to max results of ended connections, oldest first; returns the count. */
int splice_results(splice_table *t, splice_result *out, int max);
/* Live byte counts of a spliced connection; TCP_ENOCONN if it is not (or no longer) spliced. */
int splice_bytes(splice_table *t, uint32_t conn_id, uint64_t *up, uint64_t *down);
/* Live byte counts of the spliced connections whose bytes moved at or after since (the
 * caller's clock): up to max, returns the count.  For a console's per-connection counters. */
int splice_list_active(splice_table *t, double since, splice_progress *out, int max);
/* Reset both sides now (result SPLICE_FAIL_ABORTED); TCP_ENOCONN if not spliced. */
int splice_abort(splice_table *t, uint32_t conn_id, double now);
uint32_t splice_active(splice_table *t); /* connections spliced now (connecting included) */
uint32_t splice_results_waiting(splice_table *t); /* results splice_results would return */

#endif
