/*
 * worker_stress.c: the engine's thread (_worker.c) against an owner thread, for
 * ThreadSanitizer.  `scripts/test-tsan` builds it with the engine's sources and
 * -fsanitize=thread and runs it; a data race, a lock-order inversion or a wrong count fails it.
 *
 * The Python owner cannot run under TSan here, so this program plays it, by the same contract:
 * every engine call between wg_worker_lock and wg_worker_unlock, woken by the notify eventfd.
 *
 *   client thread   a WireGuard peer over loopback UDP: transport messages (sealed with the
 *                   keys this program installed) carrying ICMP echoes (answered in C), SYNs to
 *                   an approved destination (spliced by the worker: the fast relay) and their
 *                   resets, SYNs nobody approved (the owner rejects them), UDP datagrams (the
 *                   owner drains them), and garbage (dropped, counted)
 *   acceptor thread the destination: accepts and closes
 *   worker          the engine's thread
 *   main            the owner: drains events, TCP events, datagrams and reports, clears and
 *                   renews the approval, reads stats, all under the lock
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <sodium.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "_worker.h"

#define ROUNDS 3000 /* each: an echo, a fast-relayed SYN + RST, a rejected SYN, a UDP */
#define GATEWAY_IP 0x0a4d0001u /* 10.77.0.1 */
#define PEER_IP 0x0a4d0002u    /* 10.77.0.2 */
#define LOOPBACK 0x7f000001u
#define UNAPPROVED 0x7f000002u /* 127.0.0.2: never approved, so the owner decides */
#define LOCAL_INDEX 0x100
#define REMOTE_INDEX 0x200
#define DEADLINE_S 60.0

static uint8_t key_to_peer[32], key_to_gateway[32];
static int gateway_fd, client_fd, listen_fd;
static uint16_t listen_port;
static atomic_bool client_done, stop_acceptor;
/* UDP datagrams the owner has drained: one per round, so the client's pace.  Loopback UDP
 * drops what a full socket buffer cannot take, and under TSan the worker is slow: the client
 * stays at most WINDOW rounds ahead, so nothing is lost and every count can add up. */
static atomic_uint_fast64_t owner_datagrams;
#define WINDOW 16

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void fail(const char *what) {
    fprintf(stderr, "worker_stress: %s\n", what);
    exit(1);
}

/* ---- Packets ------------------------------------------------------------------------------ */
static void put16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)(v >> 8), p[1] = (uint8_t)v; }
static void put32(uint8_t *p, uint32_t v) { put16(p, (uint16_t)(v >> 16)), put16(p + 2, (uint16_t)v); }

static uint16_t checksum(uint32_t sum, const uint8_t *p, size_t n) {
    for (; n > 1; n -= 2, p += 2) sum += (uint32_t)(p[0] << 8 | p[1]);
    if (n) sum += (uint32_t)p[0] << 8;
    while (sum >> 16) sum = (sum & 0xffff) + (sum >> 16);
    return (uint16_t)~sum;
}

/* An IPv4 packet from the peer to dst with l4 (whose checksum field sits at csum_at) filled in. */
static size_t ipv4(uint8_t *pkt, uint32_t dst, uint8_t proto, const uint8_t *l4, size_t len,
                   size_t csum_at) {
    memset(pkt, 0, 20);
    pkt[0] = 0x45, pkt[8] = 64, pkt[9] = proto;
    put16(pkt + 2, (uint16_t)(20 + len));
    put32(pkt + 12, PEER_IP), put32(pkt + 16, dst);
    put16(pkt + 10, checksum(0, pkt, 20));
    memcpy(pkt + 20, l4, len);
    uint32_t pseudo = 0;
    if (proto != 1) { /* TCP and UDP checksums cover the pseudo header */
        pseudo = (PEER_IP >> 16) + (PEER_IP & 0xffff) + (dst >> 16) + (dst & 0xffff);
        pseudo += proto + (uint32_t)len;
    }
    put16(pkt + 20 + csum_at, checksum(pseudo, pkt + 20, len));
    return 20 + len;
}

static size_t tcp_segment(uint8_t *pkt, uint32_t dst, uint16_t sport, uint16_t dport,
                          uint32_t seq, uint8_t flags) {
    uint8_t tcp[20] = {0};
    put16(tcp, sport), put16(tcp + 2, dport), put32(tcp + 4, seq);
    tcp[12] = 5 << 4, tcp[13] = flags;
    put16(tcp + 14, 65535);
    return ipv4(pkt, dst, 6, tcp, sizeof tcp, 16);
}

static size_t echo_request(uint8_t *pkt, uint16_t seq) {
    uint8_t icmp[16] = {8, 0, 0, 0, 0x12, 0x34};
    put16(icmp + 6, seq);
    return ipv4(pkt, GATEWAY_IP, 1, icmp, sizeof icmp, 2);
}

static size_t udp_datagram(uint8_t *pkt, uint16_t sport) {
    uint8_t udp[8 + 12] = {0};
    put16(udp, sport), put16(udp + 2, 9999), put16(udp + 4, sizeof udp);
    memcpy(udp + 8, "stress-test!", 12);
    return ipv4(pkt, 0x0a000009u /* 10.0.0.9 */, 17, udp, sizeof udp, 6);
}

/* Seal an inner packet as the peer's transport message and send it to the gateway. */
static void send_sealed(const uint8_t *inner, size_t len, uint64_t *counter) {
    uint8_t msg[16 + 128 + 16];
    if (len > 128) fail("inner packet too large");
    msg[0] = 4, msg[1] = msg[2] = msg[3] = 0;
    for (int i = 0; i < 4; i++) msg[4 + i] = (uint8_t)((unsigned)LOCAL_INDEX >> (8 * i));
    for (int i = 0; i < 8; i++) msg[8 + i] = (uint8_t)(*counter >> (8 * i));
    uint8_t nonce[12] = {0};
    memcpy(nonce + 4, msg + 8, 8);
    unsigned long long clen = 0;
    crypto_aead_chacha20poly1305_ietf_encrypt(msg + 16, &clen, inner, len, NULL, 0, NULL, nonce,
                                              key_to_gateway);
    (*counter)++;
    while (send(client_fd, msg, 16 + (size_t)clen, 0) < 0) {
        if (errno != EAGAIN) fail("client send");
        struct pollfd p = {.fd = client_fd, .events = POLLOUT};
        poll(&p, 1, 10); /* the socket's buffer is full: wait for room rather than lose it */
    }
}

static void drain_client(void) {
    uint8_t buf[2048];
    while (recv(client_fd, buf, sizeof buf, MSG_DONTWAIT) > 0) {
    }
}

/* ---- Threads ------------------------------------------------------------------------------ */
static void *client_main(void *arg) {
    (void)arg;
    uint64_t counter = 0;
    uint8_t pkt[128];
    send_sealed(pkt, 0, &counter); /* a keepalive: confirms the responder keypair */
    for (uint16_t i = 0; i < ROUNDS; i++) {
        send_sealed(pkt, echo_request(pkt, i), &counter);
        uint16_t sport = (uint16_t)(20000 + i);
        send_sealed(pkt, tcp_segment(pkt, LOOPBACK, sport, listen_port, 1000, 0x02), &counter);
        send_sealed(pkt, tcp_segment(pkt, UNAPPROVED, sport, 80, 1000, 0x02), &counter);
        send_sealed(pkt, udp_datagram(pkt, sport), &counter);
        uint8_t junk[64];
        randombytes_buf(junk, sizeof junk);
        if (send(client_fd, junk, 1 + junk[0] % sizeof junk, 0) < 0 && errno != EAGAIN)
            fail("client send");
        if (i % 8 == 7) { /* the peer gives up on the last connections: resets end them */
            for (uint16_t j = (uint16_t)(i - 7); j <= i; j++)
                send_sealed(pkt, tcp_segment(pkt, LOOPBACK, (uint16_t)(20000 + j), listen_port,
                                             1001, 0x04),
                            &counter);
            usleep(500);
        }
        drain_client();
        double waited_since = now_s();
        while (i >= WINDOW + atomic_load(&owner_datagrams) && now_s() - waited_since < DEADLINE_S) {
            usleep(200);
            drain_client();
        }
    }
    atomic_store(&client_done, true);
    return NULL;
}

static void *acceptor_main(void *arg) {
    (void)arg;
    while (!atomic_load(&stop_acceptor)) {
        struct pollfd p = {.fd = listen_fd, .events = POLLIN};
        if (poll(&p, 1, 10) <= 0) continue;
        int fd;
        while ((fd = accept(listen_fd, NULL, NULL)) >= 0) close(fd);
    }
    return NULL;
}

static int udp_socket(struct sockaddr_in *bound) {
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK, 0);
    struct sockaddr_in sin = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(LOOPBACK)};
    socklen_t len = sizeof sin;
    if (fd < 0 || bind(fd, (struct sockaddr *)&sin, sizeof sin) != 0 ||
        getsockname(fd, (struct sockaddr *)bound, &len) != 0)
        fail("udp socket");
    return fd;
}

int main(void) {
    if (sodium_init() < 0) fail("sodium_init");
    randombytes_buf(key_to_peer, sizeof key_to_peer);
    randombytes_buf(key_to_gateway, sizeof key_to_gateway);

    wg_config cfg = {.tunnel_ip = GATEWAY_IP, .tunnel_prefix_len = 24, .mtu = 1420,
                     .max_peers = 4, .staged_per_peer = 16, .tcp_max_conns = 1024,
                     .tcp_max_half_open_per_peer = 1024, .tcp_iss_seed = 42};
    wg_engine *e = wg_engine_new(&cfg, crypto_aead_chacha20poly1305_ietf_encrypt,
                                 crypto_aead_chacha20poly1305_ietf_decrypt, sodium_memzero);
    if (!e) fail("wg_engine_new");
    double t0 = now_s();

    struct sockaddr_in gw_addr, cl_addr;
    gateway_fd = udp_socket(&gw_addr);
    client_fd = udp_socket(&cl_addr);
    if (connect(client_fd, (struct sockaddr *)&gw_addr, sizeof gw_addr) != 0) fail("connect");
    listen_fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    struct sockaddr_in lsin = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(LOOPBACK)};
    socklen_t llen = sizeof lsin;
    if (listen_fd < 0 || bind(listen_fd, (struct sockaddr *)&lsin, sizeof lsin) != 0 ||
        listen(listen_fd, 1024) != 0 || getsockname(listen_fd, (struct sockaddr *)&lsin, &llen) != 0)
        fail("listener");
    listen_port = ntohs(lsin.sin_port);

    uint8_t peer_net[4] = {10, 77, 0, 2};
    wg_endpoint ep = {.family = 4, .port = ntohs(cl_addr.sin_port)};
    memcpy(ep.addr, &cl_addr.sin_addr, 4);
    if (wg_peer_add(e, 0, 0) != 0 || wg_peer_add_allowed_ip(e, 0, 4, peer_net, 32) != 0 ||
        wg_peer_set_endpoint(e, 0, &ep) != 0 ||
        wg_peer_install_keypair(e, 0, LOCAL_INDEX, REMOTE_INDEX, key_to_peer, key_to_gateway,
                                false, t0) != 0 ||
        wg_io_attach(e, gateway_fd, 4) != 0 ||
        wg_fast_relay_allow(e, 0, LOOPBACK, listen_port, 0, 5.0) != 0)
        fail("engine setup");

    int notify_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    wg_worker *w = wg_worker_start(e, notify_fd);
    if (!w) fail("wg_worker_start");
    pthread_t client, acceptor;
    pthread_create(&acceptor, NULL, acceptor_main, NULL);
    pthread_create(&client, NULL, client_main, NULL);

    uint64_t rejected = 0, fast_opened = 0, fast_ended = 0, datagrams = 0, turns = 0;
    wg_fast_open opened[64];
    splice_result results[64];
    tcp_event tevs[64];
    wg_udp_meta metas[WG_UDP_QUEUE_MAX];
    wg_event ev;
    wg_pending pending;
    wg_peer_stats pst;
    wg_engine_stats est = {0};
    /* Until every SYN was answered, every fast-relayed connection ended (the client reset
     * each), every datagram drained and every echo answered. */
    for (;;) {
        bool done = atomic_load(&client_done) && fast_opened + rejected == 2 * ROUNDS &&
                    fast_ended == fast_opened && datagrams == ROUNDS &&
                    est.icmp_echo_replies == ROUNDS;
        if (done) break;
        if (now_s() - t0 > DEADLINE_S) {
            fprintf(stderr, "worker_stress: stuck: %llu rejected, %llu fast-relayed opened, "
                    "%llu ended, %llu datagrams, %llu echo replies of %d rounds\n",
                    (unsigned long long)rejected, (unsigned long long)fast_opened,
                    (unsigned long long)fast_ended, (unsigned long long)datagrams,
                    (unsigned long long)est.icmp_echo_replies, ROUNDS);
            return 1;
        }
        struct pollfd p = {.fd = notify_fd, .events = POLLIN};
        poll(&p, 1, 5);
        uint64_t count;
        if (read(notify_fd, &count, sizeof count) < 0 && errno != EAGAIN) fail("eventfd");
        wg_worker_lock(w);
        double now = now_s();
        turns++;
        wg_collect(e, now, &pending);
        while (wg_next_event(e, &ev) > 0) {
        }
        int n;
        while ((n = wg_tcp_events(e, tevs, 64)) > 0) {
            for (int i = 0; i < n; i++) {
                if (tevs[i].type == TCP_EV_SYN) {
                    tcp_reject(wg_engine_tcp(e), tevs[i].conn_id, now);
                    tcp_release(wg_engine_tcp(e), tevs[i].conn_id, now);
                    rejected++;
                }
            }
        }
        const uint8_t *arena;
        datagrams += (uint64_t)wg_udp_drain(e, metas, WG_UDP_QUEUE_MAX, &arena);
        atomic_store(&owner_datagrams, datagrams);
        while ((n = wg_fast_relay_opened(e, opened, 64)) > 0) fast_opened += (uint64_t)n;
        while ((n = splice_results(wg_engine_splice(e), results, 64)) > 0) fast_ended += (uint64_t)n;
        if (turns % 16 == 0) { /* the owner's rules changed: approvals go, and come back */
            wg_fast_relay_clear(e);
            wg_fast_relay_allow(e, 0, LOOPBACK, listen_port, 0, 5.0);
        }
        wg_peer_get_stats(e, 0, &pst);
        wg_engine_get_stats(e, &est);
        wg_io_flush(e);
        wg_worker_unlock(w);
        for (int i = 0; i < 8; i++) { /* single calls, each under the lock, as Python makes them */
            wg_worker_lock(w);
            wg_engine_get_stats(e, &est);
            wg_worker_unlock(w);
        }
    }
    pthread_join(client, NULL);
    atomic_store(&stop_acceptor, true);
    pthread_join(acceptor, NULL);
    wg_worker_stats ws;
    wg_worker_get_stats(w, &ws);
    wg_worker_stop(w);
    wg_engine_get_stats(e, &est);
    printf("worker_stress: %d rounds in %.2f s: %llu echo replies, %llu fast-relayed (%llu "
           "reported, %llu ended), %llu rejected by the owner, %llu UDP datagrams, %llu drops "
           "of garbage; worker %llu wake-ups, %llu notifications, owner %llu turns\n",
           ROUNDS, now_s() - t0, (unsigned long long)est.icmp_echo_replies,
           (unsigned long long)est.fast_relayed, (unsigned long long)fast_opened,
           (unsigned long long)fast_ended, (unsigned long long)rejected,
           (unsigned long long)datagrams,
           (unsigned long long)(wg_drop_count(e, WG_DROP_TRUNCATED) +
                                wg_drop_count(e, WG_DROP_BAD_TYPE) +
                                wg_drop_count(e, WG_DROP_BAD_SIZE) +
                                wg_drop_count(e, WG_DROP_UNKNOWN_INDEX)),
           (unsigned long long)ws.wakeups, (unsigned long long)ws.notifications,
           (unsigned long long)turns);
    /* Every SYN was answered one way or the other, and nothing went missing between threads.
     * A SYN arriving while the approval was cleared goes to the owner instead: both count. */
    bool ok = est.icmp_echo_replies == ROUNDS && fast_opened == est.fast_relayed &&
              fast_ended == fast_opened && fast_opened + rejected == 2 * ROUNDS &&
              datagrams == ROUNDS;
    wg_engine_free(e);
    close(notify_fd);
    close(gateway_fd);
    close(client_fd);
    close(listen_fd);
    if (!ok) fail("counts do not add up");
    return 0;
}
