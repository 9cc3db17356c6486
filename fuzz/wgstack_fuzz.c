/*
 * wgstack_fuzz.c: libFuzzer target for the C engine (_wg.c + _hub.c + _wire.c + _tcp.c + _splice.c).
 *
 * Each input builds a fresh engine with three peers and runs a program of operations over it:
 * raw datagrams into wg_input (the untrusted UDP side), inner packets that the harness encrypts
 * with a peer's installed keypair before wg_input (so the fuzzer reaches IPv4/IPv6, TCP, UDP and
 * ICMP behind a valid session), structured TCP segments whose sequence and acknowledgement
 * numbers follow what the stack last sent (so handshakes complete and data flows), the owner's
 * tcp_* calls on live handles, timer ticks, sends towards peers and keypair changes.  Outputs are
 * decrypted with the harness's copy of the keys to learn the stack's sequence numbers.  At the
 * end every handle is released and the engine freed, so LeakSanitizer sees any leak.
 *
 * Splices reach real sockets, on loopback only: the harness listens on two ports of 127.0.0.1
 * (its "host").  The first is approved for the fast relay in every engine, so SYNs to it
 * (TCPSEG flow&0x40) are spliced by the engine itself; the owner's splice_connect (TCPOP) goes
 * to the second.  The host accepts, reads and discards, answers once, and closes (or resets)
 * when DRAIN says; every drain also services the splices and pops their reports.
 *
 * Input format (little endian), repeated until the input ends; fuzz/make_corpus.py writes it:
 *   op byte % 10, then
 *   0 RAW     src:u8 len:u16 bytes            wg_input of an arbitrary datagram
 *   1 INNER   flags:u8 len:u16 bytes          encrypted for peer (flags&1); flags&2 fix checksums,
 *                                             flags&4 reuse the previous counter (replay),
 *                                             flags&8 from another source endpoint (roaming)
 *   2 TCPSEG  flags:u8 flow:u8 tcpflags:u8 seq_delta:i16 ack_delta:i16 win:u16
 *             optlen:u8 opts paylen:u16 payload
 *                                             flow&0x40: to the fast-relay destination (below)
 *   3 TICK    step:u8                         high bit: (step&127)*10 s, else step*5 ms
 *   4 TCPOP   handle:u8 action:u8 arg:u16     accept/reject/read/write/shutdown/abort/release/info,
 *                                             splice to the harness's host, abort a splice, counts
 *   5 DRAIN   mode:u8                         drain everything; mode&1 toggles auto-draining outputs,
 *                                             mode&2 closes the host's accepted sockets (mode&4: RST)
 *   6 SEND    kind:u8 len:u16 bytes           wg_udp_send / wg_icmp_unreachable / wg_send_inner / wg_send_raw
 *   7 KEYS    peer:u8 action:u8               new keypair (initiator / responder), remove + re-add,
 *                                             drop staged, set endpoint, end the peer's flows
 *                                             (wg_peer_abort_flows; action&0x10: under pressure)
 *   8 FLUSH                                   tcp_flush
 *   9 QUERY                                   stats, deadlines, counters
 */
#define _GNU_SOURCE /* accept4 */
#include <netinet/in.h>
#include <sodium.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "_splice.h"
#include "_wgstack.h"

#define NPEERS 3      /* peer 2 never gets a keypair: its traffic is staged */
#define MAX_HANDLES 64
#define MAX_KEYPAIRS 32
#define MAX_FLOWS 32
#define TUNNEL_IP 0x0a4d0001u /* 10.77.0.1 */
#define LOOPBACK 0x7f000001u  /* 127.0.0.1: the harness's host, the only place splices reach */
#define MAX_ACCEPTED 32
#define MAX_SPLICED 64

typedef struct {
    uint32_t peer_id, local_index, remote_index;
    uint8_t send_key[32], recv_key[32]; /* the engine's: we encrypt with recv, decrypt with send */
    uint64_t next_counter;
    bool live;
} fz_keypair;

typedef struct {
    uint32_t peer_id, server_ip;
    uint16_t client_port, server_port;
    uint32_t their_next, their_ack; /* learned from the stack's segments */
    bool known;
} fz_flow;

typedef struct {
    wg_engine *e;
    double now;
    uint32_t handles[MAX_HANDLES];
    int nhandles;
    fz_keypair kps[MAX_KEYPAIRS];
    int nkps;
    int current[NPEERS]; /* index into kps of the keypair we send with, -1 none */
    fz_flow flows[MAX_FLOWS];
    uint32_t gen;
    bool auto_drain_outputs;
    uint32_t spliced[MAX_SPLICED]; /* conn_ids the splice table owns (results not yet seen) */
    int nspliced;
    uint64_t spliced_up, spliced_down; /* of the results seen, for FUZZ_VERBOSE */
    int accepted[MAX_ACCEPTED]; /* the host's ends of spliced connections */
    bool answered[MAX_ACCEPTED];
    int naccepted;
    uint8_t scratch[65536 + 64];
} fz_state;

/* The harness's host: [0] approved for the fast relay, [1] for the owner's splice_connect. */
static int host_fd[2] = {-1, -1};
static uint16_t host_port[2];

static const uint32_t peer_ip[NPEERS] = {0x0a4d0002u, 0x0a4d0003u, 0x0a4d0004u};
static const uint8_t peer_ip6[NPEERS][16] = {
    {0xfd, 0x77, [15] = 2}, {0xfd, 0x77, [15] = 3}, {0xfd, 0x77, [15] = 4}};
static const uint32_t server_ips[4] = {0x5db8d822u /* 93.184.216.34 */, 0x0a4d0001u /* gateway */,
                                       0x0a4d0003u /* peer 1 */, 0xffffffffu /* broadcast */};
static const uint16_t server_ports[4] = {80, 443, 53, 0};

/* ---- Input reader ------------------------------------------------------------------------ */
typedef struct {
    const uint8_t *p;
    size_t n;
} reader;

static uint8_t rd_u8(reader *r) {
    if (!r->n) return 0;
    r->n--;
    return *r->p++;
}
static uint16_t rd_u16(reader *r) {
    uint16_t lo = rd_u8(r);
    return (uint16_t)(lo | (rd_u8(r) << 8));
}
static const uint8_t *rd_bytes(reader *r, size_t *len) {
    if (*len > r->n) *len = r->n;
    const uint8_t *p = r->p;
    r->p += *len;
    r->n -= *len;
    return p;
}

/* ---- Packet helpers ---------------------------------------------------------------------- */
static void put16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)(v >> 8), p[1] = (uint8_t)v; }
static void put32(uint8_t *p, uint32_t v) { put16(p, (uint16_t)(v >> 16)), put16(p + 2, (uint16_t)v); }
static uint16_t get16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }
static uint32_t get32(const uint8_t *p) { return (uint32_t)get16(p) << 16 | get16(p + 2); }
static void le32(uint8_t *p, uint32_t v) { for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i)); }
static void le64(uint8_t *p, uint64_t v) { for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i)); }
static uint32_t rdle32(const uint8_t *p) { return p[0] | p[1] << 8 | p[2] << 16 | (uint32_t)p[3] << 24; }

static uint32_t sum16(uint32_t s, const uint8_t *p, size_t n) {
    for (; n > 1; n -= 2, p += 2) s += get16(p);
    if (n) s += (uint32_t)p[0] << 8;
    return s;
}
static uint16_t fold(uint32_t s) {
    while (s >> 16) s = (s & 0xffff) + (s >> 16);
    return (uint16_t)~s;
}

/* Recompute the IPv4 header checksum and, for an unfragmented TCP/UDP/ICMP packet, the L4 one
 * (over what the header claims, clipped to the buffer), so mutated packets get past checksums. */
static void fix_checksums(uint8_t *pkt, size_t len) {
    if (len < 1) return;
    if (pkt[0] >> 4 == 4 && len >= 20) {
        size_t ihl = (size_t)(pkt[0] & 15) * 4;
        if (ihl < 20 || ihl > len) return;
        put16(pkt + 10, 0);
        put16(pkt + 10, fold(sum16(0, pkt, ihl)));
        size_t total = get16(pkt + 2);
        if (total > len || total < ihl || (get16(pkt + 6) & 0x3fff)) return;
        uint8_t *l4 = pkt + ihl;
        size_t l4len = total - ihl;
        uint8_t proto = pkt[9];
        size_t off = proto == 6 ? 16 : proto == 17 ? 6 : proto == 1 ? 2 : 0;
        if (!off || l4len < off + 2) return;
        put16(l4 + off, 0);
        uint32_t s = 0;
        if (proto != 1) {
            s = sum16(s, pkt + 12, 8);
            s += proto + (uint32_t)l4len;
        }
        uint16_t c = fold(sum16(s, l4, l4len));
        if (proto == 17 && c == 0) c = 0xffff;
        put16(l4 + off, c);
    } else if (pkt[0] >> 4 == 6 && len >= 40) {
        size_t plen = get16(pkt + 4);
        if (40 + plen > len) return;
        uint8_t nh = pkt[6];
        size_t off = nh == 6 ? 16 : nh == 17 ? 6 : nh == 58 ? 2 : 0;
        if (!off || plen < off + 2) return;
        uint8_t *l4 = pkt + 40;
        put16(l4 + off, 0);
        uint32_t s = sum16(0, pkt + 8, 32) + nh + (uint32_t)plen;
        put16(l4 + off, fold(sum16(s, l4, plen)));
    }
}

/* ---- Keys and encryption ----------------------------------------------------------------- */
static int install_keypair(fz_state *st, uint32_t peer_id, bool initiator) {
    if (st->nkps == MAX_KEYPAIRS) return -1;
    fz_keypair *kp = &st->kps[st->nkps];
    memset(kp, 0, sizeof *kp);
    uint32_t g = ++st->gen;
    kp->peer_id = peer_id;
    kp->local_index = 0x1000 + g;
    kp->remote_index = 0x2000 + g;
    memset(kp->send_key, (int)(0x10 + g), 32);
    memset(kp->recv_key, (int)(0x80 + g), 32);
    if (wg_peer_install_keypair(st->e, peer_id, kp->local_index, kp->remote_index, kp->send_key,
                                kp->recv_key, initiator, st->now) != 0)
        return -1;
    kp->live = true;
    st->current[peer_id] = st->nkps++;
    return 0;
}

static const wg_endpoint *endpoint_of(int which) {
    static wg_endpoint eps[4];
    static bool init;
    if (!init) {
        init = true;
        eps[0] = (wg_endpoint){.family = 4, .addr = {192, 0, 2, 1}, .port = 51820};
        eps[1] = (wg_endpoint){.family = 4, .addr = {192, 0, 2, 2}, .port = 40000};
        eps[2] = (wg_endpoint){.family = 6, .addr = {0x20, 0x01, 0x0d, 0xb8, [15] = 1}, .port = 51820};
        eps[3] = (wg_endpoint){.family = 4, .addr = {198, 51, 100, 7}, .port = 1};
    }
    return &eps[which & 3];
}

/* Encrypt plain as a transport message of peer's current keypair and feed it to wg_input. */
static void input_encrypted(fz_state *st, uint32_t peer_id, const uint8_t *plain, size_t len,
                            bool replay, int src) {
    int k = st->current[peer_id];
    if (k < 0 || len > 65535 - 32) return;
    fz_keypair *kp = &st->kps[k];
    uint64_t counter = replay && kp->next_counter ? kp->next_counter - 1 : kp->next_counter++;
    uint8_t *msg = st->scratch;
    le32(msg, 4);
    le32(msg + 4, kp->local_index);
    le64(msg + 8, counter);
    uint8_t nonce[12] = {0};
    le64(nonce + 4, counter);
    unsigned long long clen = 0;
    crypto_aead_chacha20poly1305_ietf_encrypt(msg + 16, &clen, plain, len, NULL, 0, NULL, nonce,
                                              kp->recv_key);
    wg_input(st->e, msg, 16 + (size_t)clen, endpoint_of(src), st->now);
}

/* ---- Learning from outputs ---------------------------------------------------------------- */
static fz_flow *flow_find(fz_state *st, uint32_t peer_id, uint32_t server_ip, uint16_t server_port,
                          uint16_t client_port, bool create) {
    fz_flow *free_slot = NULL;
    for (int i = 0; i < MAX_FLOWS; i++) {
        fz_flow *f = &st->flows[i];
        if (f->client_port == 0) {
            if (!free_slot) free_slot = f;
            continue;
        }
        if (f->peer_id == peer_id && f->server_ip == server_ip && f->server_port == server_port &&
            f->client_port == client_port)
            return f;
    }
    if (!create || !free_slot) return NULL;
    *free_slot = (fz_flow){.peer_id = peer_id, .server_ip = server_ip, .server_port = server_port,
                           .client_port = client_port};
    return free_slot;
}

/* A flow's server key for an IPv6 server address fd77::N (N = 1..4, from the flow bits):
 * IPv4 flows key on the server's address, IPv6 ones on this. */
static uint32_t server6_key(const uint8_t *addr) { return 0x60000000u | addr[15]; }

static void learn_output(fz_state *st, const uint8_t *msg, size_t len) {
    if (len < 32 || rdle32(msg) != 4) return;
    uint32_t remote = rdle32(msg + 4);
    for (int i = 0; i < st->nkps; i++) {
        fz_keypair *kp = &st->kps[i];
        if (!kp->live || kp->remote_index != remote) continue;
        uint8_t nonce[12] = {0};
        memcpy(nonce + 4, msg + 8, 8);
        uint8_t plain[2048];
        unsigned long long plen = 0;
        if (len - 16 > sizeof plain + 16) return;
        if (crypto_aead_chacha20poly1305_ietf_decrypt(plain, &plen, NULL, msg + 16, len - 16, NULL,
                                                      0, nonce, kp->send_key) != 0)
            __builtin_trap(); /* the engine sent something its own keys do not open */
        bool v6 = plen >= 60 && plain[0] >> 4 == 6 && plain[6] == 6;
        if (!v6 && (plen < 40 || plain[0] != 0x45 || plain[9] != 6)) return;
        size_t iphl = v6 ? 40 : 20;
        const uint8_t *tcp = plain + iphl;
        size_t total = v6 ? 40 + (size_t)get16(plain + 4) : get16(plain + 2);
        if (total > plen || total < iphl + 20) return;
        size_t doff = (size_t)(tcp[12] >> 4) * 4;
        if (doff < 20 || iphl + doff > total) return;
        uint32_t server = v6 ? server6_key(plain + 8) : get32(plain + 12);
        fz_flow *f = flow_find(st, kp->peer_id, server, get16(tcp), get16(tcp + 2), true);
        if (!f) return;
        uint8_t fl = tcp[13];
        uint32_t seq = get32(tcp + 4);
        f->their_next = seq + (uint32_t)(total - iphl - doff) + !!(fl & 2) + !!(fl & 1);
        if (fl & 0x10) f->their_ack = get32(tcp + 8);
        f->known = !(fl & 4);
        return;
    }
}

/* ---- The host and the splices ------------------------------------------------------------ */
static void host_listen(void) {
    for (int i = 0; i < 2; i++) {
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(LOOPBACK)};
        socklen_t alen = sizeof a;
        int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof a) != 0 || listen(fd, 256) != 0 ||
            getsockname(fd, (struct sockaddr *)&a, &alen) != 0)
            abort();
        host_fd[i] = fd;
        host_port[i] = ntohs(a.sin_port);
    }
}

static void spliced_add(fz_state *st, uint32_t conn_id) {
    if (st->nspliced < MAX_SPLICED) st->spliced[st->nspliced++] = conn_id;
}

static void spliced_remove(fz_state *st, uint32_t conn_id) {
    for (int i = 0; i < st->nspliced; i++)
        if (st->spliced[i] == conn_id) {
            st->spliced[i] = st->spliced[--st->nspliced];
            return;
        }
}

static void host_close_all(fz_state *st, bool reset) {
    for (int i = 0; i < st->naccepted; i++) {
        if (reset) {
            struct linger lg = {1, 0};
            setsockopt(st->accepted[i], SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
        }
        close(st->accepted[i]);
    }
    st->naccepted = 0;
}

/* Accept what connected, read and discard what arrived, answer each connection once. */
static void host_serve(fz_state *st) {
    for (int i = 0; i < 2; i++) {
        int fd;
        while ((fd = accept4(host_fd[i], NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC)) >= 0) {
            if (st->naccepted == MAX_ACCEPTED) {
                close(fd);
                continue;
            }
            st->answered[st->naccepted] = false;
            st->accepted[st->naccepted++] = fd;
        }
    }
    static uint8_t buf[4096];
    for (int i = 0; i < st->naccepted; i++) {
        while (recv(st->accepted[i], buf, sizeof buf, 0) > 0) {
        }
        if (!st->answered[i]) {
            st->answered[i] = true;
            (void)send(st->accepted[i], "HTTP/1.1 200 OK\r\n\r\nhello", 25, MSG_NOSIGNAL);
        }
    }
}

static void drain_splices(fz_state *st) {
    splice_table *t = wg_engine_splice(st->e);
    if (!t || (!splice_active(t) && !wg_reports_waiting(st->e) && !st->naccepted))
        return; /* nothing spliced: no system calls (most inputs; keeps the fuzzer fast) */
    host_serve(st);
    wg_splice_service(st->e, st->now);
    wg_fast_open opened[16];
    int n;
    while ((n = wg_fast_relay_opened(st->e, opened, 16)) > 0)
        for (int i = 0; i < n; i++) spliced_add(st, opened[i].conn_id);
    splice_result results[16];
    while ((n = splice_results(t, results, 16)) > 0)
        for (int i = 0; i < n; i++) {
            spliced_remove(st, results[i].conn_id);
            st->spliced_up += results[i].bytes_up;
            st->spliced_down += results[i].bytes_down;
        }
}

/* ---- Draining ---------------------------------------------------------------------------- */
static void drain(fz_state *st, bool outputs) {
    wg_event ev;
    while (wg_next_event(st->e, &ev)) {
        if (ev.type == WG_EV_HANDSHAKE_PACKET && ev.len > sizeof ev.data) __builtin_trap();
    }
    tcp_event tev[32];
    int n;
    while ((n = wg_tcp_events(st->e, tev, 32)) > 0) {
        for (int i = 0; i < n; i++) {
            if (tev[i].type == TCP_EV_SYN && st->nhandles < MAX_HANDLES)
                st->handles[st->nhandles++] = tev[i].conn_id;
            else if (tev[i].type == TCP_EV_SYN)
                tcp_reject(wg_engine_tcp(st->e), tev[i].conn_id, st->now); /* CLOSED comes next */
        }
    }
    const uint8_t *arena = NULL;
    static wg_udp_meta big[WG_UDP_QUEUE_MAX];
    n = wg_udp_drain(st->e, big, WG_UDP_QUEUE_MAX, &arena);
    uint32_t sink = 0;
    for (int i = 0; i < n; i++)
        for (uint32_t j = 0; j < big[i].len; j++) sink += arena[big[i].offset + j];
    (void)sink;
    drain_splices(st);
    if (!outputs) return;
    wg_endpoint dst;
    int len;
    while ((len = wg_next_output(st->e, st->scratch, sizeof st->scratch, &dst)) > 0)
        learn_output(st, st->scratch, (size_t)len);
    if (len < 0) __builtin_trap();
}

/* ---- Operations -------------------------------------------------------------------------- */
static void op_tcpseg(fz_state *st, reader *r) {
    uint8_t flags = rd_u8(r), flow = rd_u8(r), tflags = rd_u8(r);
    int16_t seq_delta = (int16_t)rd_u16(r), ack_delta = (int16_t)rd_u16(r);
    uint16_t win = rd_u16(r);
    size_t optlen = rd_u8(r) % 41;
    const uint8_t *opts = rd_bytes(r, &optlen);
    size_t paylen = rd_u16(r) % 1500;
    const uint8_t *payload = rd_bytes(r, &paylen);

    uint32_t peer_id = flags & 1;
    bool v6 = flags & 2;
    uint16_t client_port = (uint16_t)(40000 + (flow & 3));
    uint32_t server_ip = server_ips[(flow >> 2) & 3];
    uint16_t server_port = server_ports[(flow >> 4) & 3];
    if (flow & 0x40) server_ip = LOOPBACK, server_port = host_port[0];
    uint8_t server6[16] = {0xfd, 0x77, [15] = (uint8_t)(1 + ((flow >> 2) & 3))};
    if (v6) server_ip = server6_key(server6); /* fd77::1 (the gateway) .. fd77::4 */
    fz_flow *f = flow_find(st, peer_id, server_ip, server_port, client_port, false);
    uint32_t base_seq = 1000, base_ack = 0;
    if (f && f->known) base_seq = f->their_ack, base_ack = f->their_next;

    size_t optpad = (optlen + 3) & ~(size_t)3;
    size_t tcplen = 20 + optpad + paylen;
    size_t iphl = v6 ? 40 : 20;
    uint8_t pkt[40 + 20 + 40 + 1500]; /* not scratch: input_encrypted builds the message there */
    memset(pkt, 0, iphl + 20 + optpad);
    uint8_t *tcp = pkt + iphl;
    put16(tcp, client_port);
    put16(tcp + 2, server_port);
    put32(tcp + 4, base_seq + (uint32_t)(int32_t)seq_delta);
    put32(tcp + 8, base_ack + (uint32_t)(int32_t)ack_delta);
    tcp[12] = (uint8_t)((20 + optpad) / 4 << 4);
    tcp[13] = tflags;
    put16(tcp + 14, win);
    memcpy(tcp + 20, opts, optlen);
    memcpy(tcp + 20 + optpad, payload, paylen);
    if (v6) {
        pkt[0] = 0x60;
        put16(pkt + 4, (uint16_t)tcplen);
        pkt[6] = 6;
        pkt[7] = 64;
        memcpy(pkt + 8, peer_ip6[peer_id], 16);
        memcpy(pkt + 24, server6, 16);
    } else {
        pkt[0] = 0x45;
        put16(pkt + 2, (uint16_t)(20 + tcplen));
        put16(pkt + 6, 0x4000); /* DF */
        pkt[8] = 64;
        pkt[9] = 6;
        put32(pkt + 12, peer_ip[peer_id]);
        put32(pkt + 16, server_ip);
    }
    fix_checksums(pkt, iphl + tcplen);
    if (flags & 4) tcp[16] ^= 0x5a; /* a bad TCP checksum */
    input_encrypted(st, peer_id, pkt, iphl + tcplen, false, 0);
}

static uint32_t handle_at(fz_state *st, uint8_t which) {
    if (!st->nhandles) return 0x12345; /* a handle that was never valid */
    return st->handles[which % st->nhandles];
}

static void op_tcpop(fz_state *st, reader *r) {
    uint8_t which = rd_u8(r), action = rd_u8(r);
    uint16_t arg = rd_u16(r);
    tcp_stack *t = wg_engine_tcp(st->e);
    uint32_t h = handle_at(st, which);
    static uint8_t buf[65536];
    splice_table *sp = wg_engine_splice(st->e);
    switch (action % 12) {
    case 0: tcp_accept(t, h, st->now); break;
    case 1: tcp_reject(t, h, st->now); break;
    case 2: tcp_read(t, h, buf, arg, st->now); break;
    case 3:
        for (uint32_t i = 0; i < arg; i++) buf[i] = (uint8_t)(i * 7);
        tcp_write(t, h, buf, (size_t)arg * 4, st->now); /* up to 256 KiB, past the send buffer */
        break;
    case 4: tcp_shutdown_write(t, h, st->now); break;
    case 5: tcp_abort(t, h, st->now); break;
    case 6:
        if (tcp_release(t, h, st->now) == 0 && st->nhandles) {
            int i = which % st->nhandles;
            st->handles[i] = st->handles[--st->nhandles];
        }
        break;
    case 7: {
        tcp_conn_info info;
        tcp_get_info(t, h, &info);
        break;
    }
    case 8: tcp_write(t, h, buf, arg % 64, st->now); break;
    case 9: /* the owner splices a SYN it was raised (the table owns the handle from then on) */
        if (sp && splice_connect(sp, h, LOOPBACK, host_port[1], st->now + (arg % 16), st->now) == 0 &&
            st->nhandles) {
            int i = which % st->nhandles;
            st->handles[i] = st->handles[--st->nhandles];
            spliced_add(st, h);
        }
        break;
    case 10:
        if (sp && st->nspliced) splice_abort(sp, st->spliced[which % st->nspliced], st->now);
        break;
    case 11:
        if (sp) {
            uint64_t up, down;
            splice_progress progress[8];
            if (st->nspliced) splice_bytes(sp, st->spliced[which % st->nspliced], &up, &down);
            splice_list_active(sp, st->now - arg, progress, 8);
            (void)splice_active(sp), (void)splice_results_waiting(sp), (void)wg_reports_waiting(st->e);
        }
        break;
    }
}

static void op_send(fz_state *st, reader *r) {
    uint8_t kind = rd_u8(r);
    size_t len = rd_u16(r);
    const uint8_t *data = rd_bytes(r, &len);
    uint32_t dst = peer_ip[(kind >> 2) % NPEERS];
    switch (kind & 3) {
    case 0:
        wg_udp_send(st->e, server_ips[0], 53, dst, 40000, data, len, st->now);
        break;
    case 1:
        wg_icmp_unreachable(st->e, dst, 40000, server_ips[(kind >> 4) & 3], 443,
                            (kind & 0x80) ? 6 : 17, (uint8_t)(kind & 15), st->now);
        break;
    case 2: {
        uint8_t pkt[2048];
        if (len > sizeof pkt) len = sizeof pkt;
        memcpy(pkt, data, len);
        fix_checksums(pkt, len);
        wg_send_inner(st->e, pkt, len, st->now);
        break;
    }
    case 3: wg_send_raw(st->e, data, len, endpoint_of(kind >> 2)); break;
    }
}

static void op_keys(fz_state *st, reader *r) {
    uint32_t peer_id = rd_u8(r) % NPEERS;
    uint8_t action = rd_u8(r);
    if (peer_id == 2 && (action % 6) < 2) return; /* peer 2 stays without keys */
    switch (action % 6) {
    case 0: install_keypair(st, peer_id, true); break;
    case 1: install_keypair(st, peer_id, false); break;
    case 2: {
        wg_peer_remove(st->e, peer_id);
        for (int i = 0; i < st->nkps; i++)
            if (st->kps[i].peer_id == peer_id) st->kps[i].live = false;
        st->current[peer_id] = -1;
        wg_peer_add(st->e, peer_id, (uint16_t)(action >> 4));
        wg_peer_add_allowed_ip(st->e, peer_id, 4, (const uint8_t[]){10, 77, 0, (uint8_t)(2 + peer_id)}, 32);
        wg_peer_add_allowed_ip(st->e, peer_id, 6, peer_ip6[peer_id], 128);
        wg_peer_set_endpoint(st->e, peer_id, endpoint_of(0));
        break;
    }
    case 3: wg_peer_drop_staged(st->e, peer_id); break;
    case 4: wg_peer_set_endpoint(st->e, peer_id, endpoint_of(action >> 3)); break;
    case 5: /* the handles stay the harness's to release; splices report as they end */
        wg_peer_abort_flows(st->e, peer_id, (action & 0x10) ? TCP_CLOSE_PRESSURE : TCP_CLOSE_PEER_GONE,
                            st->now);
        break;
    }
}

static void op_query(fz_state *st) {
    wg_peer_stats ps;
    wg_engine_stats es;
    tcp_stats ts;
    uint32_t open, half;
    uint64_t refused_conns, refused_half_open;
    for (uint32_t id = 0; id < NPEERS + 1; id++) {
        wg_peer_get_stats(st->e, id, &ps);
        tcp_peer_counts(wg_engine_tcp(st->e), id, &open, &half);
        tcp_peer_limit_hits(wg_engine_tcp(st->e), id, &refused_conns, &refused_half_open);
    }
    for (int i = 0; i < st->nkps; i++) (void)wg_index_in_use(st->e, st->kps[i].local_index);
    wg_engine_get_stats(st->e, &es);
    tcp_get_stats(wg_engine_tcp(st->e), &ts);
    (void)wg_next_deadline(st->e);
    for (int i = -1; i <= WG_DROP__COUNT; i++) (void)wg_drop_count(st->e, i), (void)wg_drop_reason_name(i);
    for (int i = -1; i <= TCP_DROP__COUNT; i++)
        (void)tcp_drop_count(wg_engine_tcp(st->e), i), (void)tcp_drop_reason_name(i);
    if (ts.conns < ts.open || ts.open < ts.half_open) __builtin_trap(); /* counters consistent */
}

static fz_state *state_new(void) {
    static fz_state st;
    memset(&st, 0, sizeof st);
    wg_config cfg = {
        .tunnel_ip = TUNNEL_IP,
        .tunnel_prefix_len = 24,
        .tunnel_ip6 = {0xfd, 0x77, [15] = 1},
        .mtu = 1420,
        .max_peers = NPEERS + 1,
        .staged_per_peer = 8,
        .tcp_rcvbuf = 16384,
        .tcp_sndbuf = 16384,
        .tcp_max_conns = 64,
        .tcp_max_conns_per_peer = 24,
        .tcp_max_half_open_per_peer = 8,
        .tcp_iss_seed = 0x1234567890abcdefULL,
    };
    st.e = wg_engine_new(&cfg, crypto_aead_chacha20poly1305_ietf_encrypt,
                         crypto_aead_chacha20poly1305_ietf_decrypt, sodium_memzero);
    if (!st.e) __builtin_trap();
    st.now = 1000.0;
    st.auto_drain_outputs = true;
    for (uint32_t id = 0; id < NPEERS; id++) {
        st.current[id] = -1;
        wg_peer_add(st.e, id, id == 1 ? 25 : 0);
        wg_peer_add_allowed_ip(st.e, id, 4, (const uint8_t[]){10, 77, 0, (uint8_t)(2 + id)}, 32);
        wg_peer_add_allowed_ip(st.e, id, 6, peer_ip6[id], 128);
        wg_peer_set_endpoint(st.e, id, endpoint_of(0));
    }
    wg_peer_add_allowed_ip(st.e, 1, 4, (const uint8_t[]){10, 99, 0, 0}, 16); /* a prefix route */
    install_keypair(&st, 0, true);
    install_keypair(&st, 1, false); /* confirmed by its first packet */
    /* Approved for peers 0 and 1, not 2: a SYN from peer 2 to the same place is the owner's. */
    for (uint32_t id = 0; id < 2; id++)
        if (wg_fast_relay_allow(st.e, id, LOOPBACK, host_port[0], 0, 5.0) != 0) __builtin_trap();
    return &st;
}

static bool verbose; /* FUZZ_VERBOSE=1: what each input reached, to check the seeds */

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc, (void)argv;
    verbose = getenv("FUZZ_VERBOSE") != NULL;
    if (sodium_init() < 0) abort();
    host_listen();
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    fz_state *st = state_new();
    reader r = {data, size};
    static uint8_t plain[65536];
    while (r.n) {
        uint8_t op = rd_u8(&r) % 10;
        switch (op) {
        case 0: {
            uint8_t src = rd_u8(&r);
            size_t len = rd_u16(&r);
            const uint8_t *p = rd_bytes(&r, &len);
            /* a private copy so ASan sees reads past the datagram's end */
            uint8_t *copy = malloc(len ? len : 1);
            memcpy(copy, p, len);
            wg_input(st->e, copy, len, endpoint_of(src), st->now);
            free(copy);
            break;
        }
        case 1: {
            uint8_t flags = rd_u8(&r);
            size_t len = rd_u16(&r);
            const uint8_t *p = rd_bytes(&r, &len);
            memcpy(plain, p, len);
            if (flags & 2) fix_checksums(plain, len);
            input_encrypted(st, flags & 1, plain, len, flags & 4, (flags & 8) ? 1 + (flags >> 4) : 0);
            break;
        }
        case 2: op_tcpseg(st, &r); break;
        case 3: {
            uint8_t step = rd_u8(&r);
            st->now += (step & 0x80) ? (step & 0x7f) * 10.0 : step * 0.005;
            wg_tick(st->e, st->now);
            break;
        }
        case 4: op_tcpop(st, &r); break;
        case 5: {
            uint8_t mode = rd_u8(&r);
            if (mode & 1) st->auto_drain_outputs = !st->auto_drain_outputs;
            drain(st, true);
            if (mode & 2) host_close_all(st, mode & 4);
            break;
        }
        case 6: op_send(st, &r); break;
        case 7: op_keys(st, &r); break;
        case 8: tcp_flush(wg_engine_tcp(st->e), st->now); break;
        case 9: op_query(st); break;
        }
        drain(st, st->auto_drain_outputs);
    }
    if (verbose) {
        tcp_stats ts;
        tcp_get_stats(wg_engine_tcp(st->e), &ts);
        wg_engine_stats es;
        wg_engine_get_stats(st->e, &es);
        fprintf(stderr, "syns %llu established %llu segs in/out %llu/%llu retransmits %llu "
                "icmp %llu udp_rx %llu tx %llu handles %d fast_relayed %llu spliced %d (ended: %llu up %llu down) accepted %d\n",
                (unsigned long long)ts.syns, (unsigned long long)ts.established,
                (unsigned long long)ts.segs_in, (unsigned long long)ts.segs_out,
                (unsigned long long)ts.retransmits, (unsigned long long)es.icmp_echo_replies,
                (unsigned long long)es.udp_rx, (unsigned long long)es.tx_datagrams, st->nhandles,
                (unsigned long long)es.fast_relayed, st->nspliced,
                (unsigned long long)st->spliced_up, (unsigned long long)st->spliced_down,
                st->naccepted);
    }
    /* The owner's duty at shutdown: release every handle it still holds. */
    for (int i = 0; i < st->nhandles; i++) tcp_release(wg_engine_tcp(st->e), st->handles[i], st->now);
    st->nhandles = 0;
    drain(st, true);
    wg_tick(st->e, st->now + 4000.0); /* every timer, TIME-WAIT and FIN-WAIT-2 runs out */
    drain(st, true);
    wg_engine_free(st->e); /* resets what is still spliced */
    /* Nothing of this input stays for the next: the host's sockets and its unaccepted ones. */
    host_serve(st);
    host_close_all(st, true);
    st->nspliced = 0;
    st->spliced_up = st->spliced_down = 0;
    return 0;
}
