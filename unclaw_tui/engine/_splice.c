/*
 * _splice.c: relayed TCP connections joined in C (see _splice.h for the contract).
 *
 * Each spliced connection is a small struct found by its TCP table slot.  News (a TCP event, an
 * epoll edge, a due deadline) puts its slot once on a FIFO; splice_run takes the FIFO and pumps:
 *   up   (peer -> destination): the receive ring's spans -> sendmsg -> tcp_read_consume
 *   down (destination -> peer): readv into the send ring's free spans -> tcp_write_commit
 * Edge-triggered epoll means "readable" and "writable" are remembered per socket until a call
 * returns EAGAIN (or a short count); a side that cannot take more simply leaves the other side's
 * bytes where they are, which is all the back-pressure there is.
 */
#define _GNU_SOURCE
#include "_splice.h"

#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#define PUMP_BUDGET (1u << 20) /* bytes per direction per turn, so one flow cannot starve others */
#define EPOLL_BATCH 256

typedef struct spliced_conn {
    uint32_t conn_id;
    int fd;
    bool connecting;
    bool host_readable, host_writable; /* edge-triggered readiness not yet used up */
    bool host_hup;                     /* the socket reported its EOF or an error: read to it */
    bool host_err;                     /* EPOLLERR or EPOLLHUP came: how a connect fails */
    bool up_done;                      /* the peer's EOF was passed on (shutdown(SHUT_WR)) */
    bool down_done;                    /* the destination's EOF was passed on (FIN queued) */
    bool tcp_closed;                   /* TCP_EV_CLOSED came */
    uint32_t tcp_close;
    double deadline;
    double active_at; /* when bytes last moved */
    uint64_t up, down;
    struct spliced_conn *cprev, *cnext; /* the connecting list */
} spliced_conn;

struct splice_table {
    tcp_stack *tcp;
    uint32_t slots;
    int epfd;
    spliced_conn **by_slot;
    uint8_t *queued; /* per slot: on the ready FIFO */
    uint32_t *ready;
    uint32_t ready_head, ready_count;
    spliced_conn *connecting;
    uint32_t active;
    splice_result *results;
    uint32_t res_head, res_count, res_cap;
};

static uint32_t slot_of(uint32_t conn_id) { return (conn_id & TCP_CONN_SLOT_MASK) - 1; }

static spliced_conn *find(splice_table *t, uint32_t conn_id) {
    uint32_t slot = slot_of(conn_id);
    if (slot >= t->slots) return NULL;
    spliced_conn *sp = t->by_slot[slot];
    return sp && sp->conn_id == conn_id ? sp : NULL;
}

static void mark_ready(splice_table *t, spliced_conn *sp) {
    uint32_t slot = slot_of(sp->conn_id);
    if (t->queued[slot]) return;
    t->queued[slot] = 1;
    t->ready[(t->ready_head + t->ready_count) % t->slots] = slot;
    t->ready_count++;
}

static void connecting_unlink(splice_table *t, spliced_conn *sp) {
    if (!sp->connecting) return;
    if (sp->cprev) sp->cprev->cnext = sp->cnext;
    else t->connecting = sp->cnext;
    if (sp->cnext) sp->cnext->cprev = sp->cprev;
    sp->cprev = sp->cnext = NULL;
    sp->connecting = false;
}

/* ---- Lifecycle ------------------------------------------------------------------------------ */
splice_table *splice_table_new(tcp_stack *tcp, uint32_t slots) {
    if (!tcp || slots == 0) return NULL;
    splice_table *t = calloc(1, sizeof *t);
    if (!t) return NULL;
    t->tcp = tcp;
    t->slots = slots;
    t->epfd = epoll_create1(EPOLL_CLOEXEC);
    t->by_slot = calloc(slots, sizeof *t->by_slot);
    t->queued = calloc(slots, 1);
    t->ready = calloc(slots, sizeof *t->ready);
    if (t->epfd < 0 || !t->by_slot || !t->queued || !t->ready) {
        if (t->epfd >= 0) close(t->epfd);
        free(t->by_slot);
        free(t->queued);
        free(t->ready);
        free(t);
        return NULL;
    }
    return t;
}

static void push_result(splice_table *t, const spliced_conn *sp, uint32_t outcome, int32_t error,
                        double now) {
    if (t->res_count == t->res_cap) {
        uint32_t cap = t->res_cap ? t->res_cap * 2 : 64;
        splice_result *grown = malloc(cap * sizeof *grown);
        if (!grown) return; /* out of memory: the owner never hears of it; nothing else breaks */
        for (uint32_t i = 0; i < t->res_count; i++)
            grown[i] = t->results[(t->res_head + i) % t->res_cap];
        free(t->results);
        t->results = grown;
        t->res_cap = cap;
        t->res_head = 0;
    }
    t->results[(t->res_head + t->res_count) % t->res_cap] = (splice_result){
        .conn_id = sp->conn_id,
        .outcome = outcome,
        .error = error,
        .tcp_close = sp->tcp_close,
        .bytes_up = sp->up,
        .bytes_down = sp->down,
        .ended_at = now,
    };
    t->res_count++;
}

static void close_socket(int fd, bool reset) {
    if (reset) { /* SO_LINGER 0: close sends an RST, so the destination knows it was cut off */
        struct linger lg = {1, 0};
        setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
    }
    close(fd); /* also leaves the epoll set */
}

/* End a spliced connection: settle both sides, report, forget. */
static void finish(splice_table *t, spliced_conn *sp, uint32_t outcome, int32_t error, double now) {
    uint32_t id = sp->conn_id;
    connecting_unlink(t, sp);
    t->by_slot[slot_of(id)] = NULL; /* first: events raised below are no longer ours */
    switch (outcome) {
    case SPLICE_OK:
        close_socket(sp->fd, false);
        break;
    case SPLICE_FAIL_CONNECT:
        close_socket(sp->fd, false);
        tcp_reject(t->tcp, id, now);
        break;
    case SPLICE_FAIL_HOST:
        close_socket(sp->fd, false);
        tcp_abort(t->tcp, id, now);
        break;
    default: /* the peer's side failed or vanished, or an abort */
        close_socket(sp->fd, true);
        tcp_abort(t->tcp, id, now);
        break;
    }
    tcp_release(t->tcp, id, now); /* after a clean end the stack finishes its FIN on its own */
    push_result(t, sp, outcome, error, now);
    t->active--;
    free(sp);
}

void splice_table_free(splice_table *t, double now) {
    if (!t) return;
    for (uint32_t i = 0; i < t->slots; i++)
        if (t->by_slot[i]) finish(t, t->by_slot[i], SPLICE_FAIL_ABORTED, 0, now);
    close(t->epfd);
    free(t->by_slot);
    free(t->queued);
    free(t->ready);
    free(t->results);
    free(t);
}

/* ---- Starting ------------------------------------------------------------------------------- */
/* Take fd (non-blocking, connecting or connected) for conn_id; on failure fd stays open. */
static int adopt(splice_table *t, uint32_t conn_id, int fd, double deadline) {
    spliced_conn *sp = calloc(1, sizeof *sp);
    if (!sp) return -ENOMEM;
    sp->conn_id = conn_id;
    sp->fd = fd;
    sp->deadline = deadline;
    /* Edge-triggered: the connect's completion (or an adopted socket's writability) is the
     * first edge, so an adopted socket is answered as soon as the owner polls. */
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET,
                             .data.u64 = conn_id};
    if (epoll_ctl(t->epfd, EPOLL_CTL_ADD, fd, &ev) != 0) {
        int err = errno;
        free(sp);
        return -err;
    }
    sp->connecting = true;
    sp->cnext = t->connecting;
    if (t->connecting) t->connecting->cprev = sp;
    t->connecting = sp;
    t->by_slot[slot_of(conn_id)] = sp;
    t->active++;
    return 0;
}

/* 0 if conn_id is a connection in one of the two states given and not spliced yet. */
static int check_state(splice_table *t, uint32_t conn_id, uint32_t state, uint32_t or_state) {
    if (!t) return TCP_EINVAL;
    tcp_conn_info info;
    if (tcp_get_info(t->tcp, conn_id, &info) != 0) return TCP_ENOCONN;
    if ((info.state != state && info.state != or_state) || find(t, conn_id)) return TCP_ESTATE;
    if (slot_of(conn_id) >= t->slots) return TCP_EINVAL;
    return 0;
}

static int check_pending(splice_table *t, uint32_t conn_id) {
    return check_state(t, conn_id, TCP_ST_SYN_PENDING, TCP_ST_SYN_PENDING);
}

static int set_nonblocking(int fd) {
    int flags = fcntl(fd, F_GETFL);
    return flags < 0 || fcntl(fd, F_SETFL, flags | O_NONBLOCK) != 0 ? -errno : 0;
}

int splice_connect(splice_table *t, uint32_t conn_id, uint32_t ip, uint16_t port,
                   double deadline, double now) {
    (void)now;
    int bad = check_pending(t, conn_id);
    if (bad) return bad;
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) return -errno;
    int one = 1; /* the peer's stack already coalesces; delaying again only adds latency */
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct sockaddr_in sin = {.sin_family = AF_INET, .sin_port = htons(port)};
    sin.sin_addr.s_addr = htonl(ip);
    if (connect(fd, (struct sockaddr *)&sin, sizeof sin) != 0 && errno != EINPROGRESS) {
        int err = errno;
        close(fd);
        return -err;
    }
    int adopted = adopt(t, conn_id, fd, deadline);
    if (adopted != 0) close(fd);
    return adopted;
}

int splice_attach(splice_table *t, uint32_t conn_id, int fd, double now) {
    (void)now;
    int bad = check_pending(t, conn_id);
    if (bad) return bad;
    if (fd < 0) return TCP_EINVAL;
    int err = set_nonblocking(fd);
    return err ? err : adopt(t, conn_id, fd, 0);
}

int splice_adopt(splice_table *t, uint32_t conn_id, int fd, double now) {
    (void)now;
    int bad = check_state(t, conn_id, TCP_ST_ESTABLISHED, TCP_ST_CLOSE_WAIT);
    if (bad) return bad;
    if (fd < 0) return TCP_EINVAL;
    int err = set_nonblocking(fd);
    if (!err) err = adopt(t, conn_id, fd, 0);
    if (err) return err;
    /* Both sides are up already: no connect to settle, no SYN to answer.  A connected socket
     * takes bytes until a send says otherwise; the ring may hold the peer's next bytes. */
    spliced_conn *sp = t->by_slot[slot_of(conn_id)];
    connecting_unlink(t, sp);
    sp->host_writable = true;
    mark_ready(t, sp);
    return 0;
}

/* ---- News ----------------------------------------------------------------------------------- */
int splice_claim_event(splice_table *t, const tcp_event *ev) {
    if (!t || !ev) return 0;
    spliced_conn *sp = find(t, ev->conn_id);
    if (!sp) return 0;
    if (ev->type == TCP_EV_CLOSED) {
        sp->tcp_closed = true;
        sp->tcp_close = ev->arg;
    }
    mark_ready(t, sp);
    return 1;
}

int splice_fd(splice_table *t) { return t ? t->epfd : -1; }

int splice_gather(splice_table *t) {
    if (!t || t->active == 0) return 0;
    struct epoll_event evs[EPOLL_BATCH];
    int marked = 0;
    for (int round = 0; round < 64; round++) { /* bounded: the sockets' news, not a loop forever */
        int n = epoll_wait(t->epfd, evs, EPOLL_BATCH, 0);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) break;
        for (int i = 0; i < n; i++) {
            spliced_conn *sp = find(t, (uint32_t)evs[i].data.u64);
            if (!sp) continue;
            uint32_t e = evs[i].events;
            if (e & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) sp->host_readable = true;
            if (e & (EPOLLRDHUP | EPOLLHUP | EPOLLERR)) sp->host_hup = true;
            if (e & (EPOLLOUT | EPOLLHUP | EPOLLERR)) sp->host_writable = true;
            if (e & (EPOLLHUP | EPOLLERR)) sp->host_err = true;
            mark_ready(t, sp);
            marked++;
        }
        if (n < EPOLL_BATCH) break;
    }
    return marked;
}

int splice_poll(splice_table *t, double now) {
    if (!t) return 0;
    splice_gather(t);
    splice_run(t, now);
    return (int)t->res_count;
}

/* ---- Pumping -------------------------------------------------------------------------------- */
static bool is_again(int err) { return err == EAGAIN || err == EWOULDBLOCK; }

/* The connect finished (or failed): answer the peer's SYN.  Returns false if sp ended. */
static bool settle_connect(splice_table *t, spliced_conn *sp, double now) {
    /* A connecting TCP socket reports EPOLLOUT only once established, and EPOLLERR/EPOLLHUP
     * when the connect failed: the edges say it all, and the error costs a system call only
     * when there is one. */
    int err = 0;
    if (sp->host_err) {
        socklen_t len = sizeof err;
        if (getsockopt(sp->fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0) err = errno;
        if (err == 0) err = ECONNREFUSED; /* hung up without saying why */
    } else if (!sp->host_writable) {
        return true; /* a stray edge: still connecting */
    }
    if (err != 0) {
        finish(t, sp, SPLICE_FAIL_CONNECT, err, now);
        return false;
    }
    connecting_unlink(t, sp);
    if (tcp_accept(t->tcp, sp->conn_id, now) != 0) {
        finish(t, sp, SPLICE_FAIL_PEER_GONE, 0, now);
        return false;
    }
    return true;
}

/* Peer -> destination.  Returns false if sp ended; sets *more when the budget ran out. */
static bool pump_up(splice_table *t, spliced_conn *sp, double now, bool *more) {
    uint32_t moved = 0;
    while (!sp->up_done && sp->host_writable) {
        if (moved >= PUMP_BUDGET) {
            *more = true;
            break;
        }
        tcp_span spans[2];
        long avail = tcp_read_spans(t->tcp, sp->conn_id, spans);
        if (avail == TCP_EAGAIN) break;
        if (avail < 0) { /* reset or gone: the CLOSED event says why */
            finish(t, sp, SPLICE_FAIL_PEER, 0, now);
            return false;
        }
        if (avail == 0) {
            /* Half-close: the other way keeps running.  If it has ended too, the close that
             * follows at once sends the FIN, and this system call is spared. */
            if (!sp->down_done) shutdown(sp->fd, SHUT_WR);
            sp->up_done = true;
            break;
        }
        struct iovec iov[2] = {{spans[0].base, spans[0].len}, {spans[1].base, spans[1].len}};
        struct msghdr msg = {.msg_iov = iov, .msg_iovlen = spans[1].len ? 2 : 1};
        ssize_t sent = sendmsg(sp->fd, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (sent < 0) {
            if (errno == EINTR) continue;
            if (is_again(errno)) {
                sp->host_writable = false;
                break;
            }
            finish(t, sp, SPLICE_FAIL_HOST, errno, now);
            return false;
        }
        tcp_read_consume(t->tcp, sp->conn_id, (size_t)sent, now);
        sp->up += (uint64_t)sent;
        sp->active_at = now;
        moved += (uint32_t)sent;
        if (sent < avail) {
            sp->host_writable = false; /* the socket is full: its next edge resumes us */
            break;
        }
    }
    return true;
}

/* Destination -> peer.  Returns false if sp ended; sets *more when the budget ran out. */
static bool pump_down(splice_table *t, spliced_conn *sp, double now, bool *more) {
    uint32_t moved = 0;
    while (!sp->down_done && sp->host_readable) {
        if (moved >= PUMP_BUDGET) {
            *more = true;
            break;
        }
        tcp_span spans[2];
        long space = tcp_write_spans(t->tcp, sp->conn_id, spans);
        if (space == 0) break; /* the peer's ring is full: TCP_EV_WRITABLE resumes us */
        if (space < 0) {
            finish(t, sp, space == TCP_ENOMEM ? SPLICE_FAIL_ABORTED : SPLICE_FAIL_PEER, 0, now);
            return false;
        }
        struct iovec iov[2] = {{spans[0].base, spans[0].len}, {spans[1].base, spans[1].len}};
        ssize_t got = readv(sp->fd, iov, spans[1].len ? 2 : 1);
        if (got < 0) {
            int err = errno;
            tcp_write_commit(t->tcp, sp->conn_id, 0, now);
            if (err == EINTR) continue;
            if (is_again(err)) {
                sp->host_readable = false;
                break;
            }
            finish(t, sp, SPLICE_FAIL_HOST, err, now);
            return false;
        }
        tcp_write_commit(t->tcp, sp->conn_id, (size_t)got, now);
        bool eof = got == 0;
        if (got > 0) {
            sp->down += (uint64_t)got;
            sp->active_at = now;
            moved += (uint32_t)got;
            if (got < space) {
                /* Drained.  If the destination's FIN (and nothing worse) was in before this
                 * read, that short read took everything before it: the EOF needs no read of
                 * its own.  An error that came with the data still has to be read. */
                eof = sp->host_hup && !sp->host_err;
                if (!sp->host_hup) { /* the next arrival is a new edge */
                    sp->host_readable = false;
                    break;
                }
            }
        }
        if (eof) {
            tcp_shutdown_write(t->tcp, sp->conn_id, now); /* FIN after the buffered data */
            sp->down_done = true;
            break;
        }
    }
    return true;
}

static void service(splice_table *t, spliced_conn *sp, double now) {
    if (sp->connecting) {
        if (sp->tcp_closed) { /* the peer gave up (RST, removed) while we connected */
            finish(t, sp, SPLICE_FAIL_PEER_GONE, 0, now);
            return;
        }
        if (!sp->host_writable && !sp->host_readable) return;
        if (!settle_connect(t, sp, now)) return;
    }
    if (sp->tcp_closed && sp->tcp_close != TCP_CLOSE_NORMAL) {
        finish(t, sp, SPLICE_FAIL_PEER, 0, now);
        return;
    }
    bool more = false;
    if (!pump_up(t, sp, now, &more)) return;
    if (!pump_down(t, sp, now, &more)) return;
    if (sp->up_done && sp->down_done) {
        finish(t, sp, SPLICE_OK, 0, now);
        return;
    }
    /* Closed normally means both FINs were exchanged, so our direction is done; what may be
     * left is the peer's last bytes in the ring while the destination's socket is full: they
     * go on when it drains.  Closed with our direction still open cannot carry on. */
    if (sp->tcp_closed && !sp->down_done) {
        finish(t, sp, SPLICE_FAIL_PEER, 0, now);
        return;
    }
    if (more) mark_ready(t, sp);
}

void splice_run(splice_table *t, double now) {
    if (!t) return;
    /* Each entry taken now; entries added while running (budget left over, events raised by our
     * own tcp_* calls) are taken in the same run, up to a bound. */
    for (uint32_t budget = 4 * t->slots; t->ready_count && budget; budget--) {
        uint32_t slot = t->ready[t->ready_head];
        t->ready_head = (t->ready_head + 1) % t->slots;
        t->ready_count--;
        t->queued[slot] = 0;
        spliced_conn *sp = t->by_slot[slot];
        if (sp) service(t, sp, now);
    }
    for (spliced_conn *sp = t->connecting; sp;) {
        spliced_conn *next = sp->cnext;
        if (sp->deadline != 0 && now >= sp->deadline) finish(t, sp, SPLICE_FAIL_CONNECT, ETIMEDOUT, now);
        sp = next;
    }
}

double splice_next_deadline(splice_table *t) {
    double earliest = 0;
    if (!t) return 0;
    for (spliced_conn *sp = t->connecting; sp; sp = sp->cnext)
        if (sp->deadline != 0 && (earliest == 0 || sp->deadline < earliest)) earliest = sp->deadline;
    return earliest;
}

/* ---- Results and control -------------------------------------------------------------------- */
int splice_results(splice_table *t, splice_result *out, int max) {
    if (!t || !out || max < 0) return TCP_EINVAL;
    int n = 0;
    while (n < max && t->res_count) {
        out[n++] = t->results[t->res_head];
        t->res_head = (t->res_head + 1) % t->res_cap;
        t->res_count--;
    }
    return n;
}

int splice_bytes(splice_table *t, uint32_t conn_id, uint64_t *up, uint64_t *down) {
    spliced_conn *sp = t ? find(t, conn_id) : NULL;
    if (!sp) return TCP_ENOCONN;
    if (up) *up = sp->up;
    if (down) *down = sp->down;
    return 0;
}

int splice_list_active(splice_table *t, double since, splice_progress *out, int max) {
    if (!t || !out || max < 0) return TCP_EINVAL;
    int n = 0;
    for (uint32_t i = 0; i < t->slots && n < max; i++) {
        spliced_conn *sp = t->by_slot[i];
        if (sp && (sp->up || sp->down) && sp->active_at >= since)
            out[n++] = (splice_progress){sp->conn_id, sp->up, sp->down};
    }
    return n;
}

int splice_abort(splice_table *t, uint32_t conn_id, double now) {
    spliced_conn *sp = t ? find(t, conn_id) : NULL;
    if (!sp) return TCP_ENOCONN;
    finish(t, sp, SPLICE_FAIL_ABORTED, 0, now);
    return 0;
}

uint32_t splice_active(splice_table *t) { return t ? t->active : 0; }

uint32_t splice_results_waiting(splice_table *t) { return t ? t->res_count : 0; }
