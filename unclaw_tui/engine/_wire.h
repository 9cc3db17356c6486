/*
 * _wire.h, _wire.c: the wire formats the engine's C files share: byte order (inline here), RFC
 * 1071 checksums, and the IP header, parsed once into a validated wire_ip_repr and emitted from
 * one (smoltcp's wire/ Packet vs Repr: the length is checked once, then nothing reads past the
 * packet).  IPv4 and IPv6 sit side by side in the one repr.
 *
 * Pure functions over the caller's bytes: sans-IO, no state, no allocation, any thread.
 * Not in the cffi cdef (build.py reads _wgstack.h and what it includes).
 */
#ifndef UNCLAW_WIRE_H
#define UNCLAW_WIRE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define WIRE_TTL 64 /* TTL / hop limit of every packet the engine builds */
#define WIRE_PROTO_ICMP 1
#define WIRE_PROTO_TCP 6
#define WIRE_PROTO_UDP 17
#define WIRE_PROTO_ICMPV6 58

/* ---- Byte order ----------------------------------------------------------------------------- */
static inline uint16_t rd16be(const uint8_t *p) { return (uint16_t)((p[0] << 8) | p[1]); }
static inline uint32_t rd32be(const uint8_t *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}
static inline uint32_t rd32le(const uint8_t *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}
static inline uint64_t rd64le(const uint8_t *p) {
    return (uint64_t)rd32le(p) | ((uint64_t)rd32le(p + 4) << 32);
}
static inline void wr16be(uint8_t *p, uint16_t v) { p[0] = (uint8_t)(v >> 8); p[1] = (uint8_t)v; }
static inline void wr32be(uint8_t *p, uint32_t v) {
    wr16be(p, (uint16_t)(v >> 16));
    wr16be(p + 2, (uint16_t)v);
}
static inline void wr32le(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); p[2] = (uint8_t)(v >> 16); p[3] = (uint8_t)(v >> 24);
}
static inline void wr64le(uint8_t *p, uint64_t v) {
    wr32le(p, (uint32_t)v);
    wr32le(p + 4, (uint32_t)(v >> 32));
}

/* ---- Checksums (RFC 1071) ------------------------------------------------------------------- */
/* Ones' complement sum of n bytes added to sum, neither folded nor inverted. */
uint32_t csum_add(uint32_t sum, const uint8_t *p, size_t n);
/* Folded and inverted: what goes into a checksum field; 0 when verifying a valid one. */
uint16_t csum_finish(uint32_t sum);

/* ---- The IP header -------------------------------------------------------------------------- */
typedef struct wire_ip_repr {
    uint8_t family;           /* 4 or 6 */
    uint8_t proto;            /* IPv4 protocol / IPv6 next header */
    uint8_t ttl;              /* TTL / hop limit */
    bool fragment;            /* parse: an IPv4 fragment (MF or an offset) */
    bool dont_fragment;       /* emit: IPv4 DF */
    uint16_t id;              /* emit: IPv4 identification */
    uint8_t src[16], dst[16]; /* network order, 4 bytes used for IPv4 */
    uint8_t error;            /* parse: why it was refused (WIRE_ERR_*), 0 when valid */
    uint8_t ext_len_unused;   /* (padding) */
    const uint8_t *header;    /* parse: the packet's first byte */
    const uint8_t *payload;   /* parse: right after the header */
    size_t payload_len;       /* without WireGuard's zero padding */
} wire_ip_repr;

/* Sum of the pseudo-header (IPv4: RFC 768 / RFC 9293 3.1; IPv6: RFC 8200 8.1) of a packet
 * from src to dst (4 or 16 bytes by family) carrying len bytes of proto. */
uint32_t wire_pseudo_sum(uint8_t family, const uint8_t *src, const uint8_t *dst, uint8_t proto,
                         size_t len);
/* Why wire_ip_parse refused a packet. */
#define WIRE_ERR_HEADER 1  /* bad version, header length, total / payload length or checksum */
#define WIRE_ERR_EXT 2     /* IPv6 extension headers: truncated, misplaced, or more than WIRE_IP6_MAX_EXT */
#define WIRE_IP6_MAX_EXT 8 /* extension headers followed before giving up (bounds the walk) */

/* Validates the IP header of a packet of len bytes: IPv4 version, IHL, total length and header
 * checksum; IPv6 version and payload length, then its extension headers (hop-by-hop first
 * only, routing, destination options, fragment) in a walk bounded by WIRE_IP6_MAX_EXT and the
 * payload: proto and payload are then the upper layer's (an IPv6 fragment other than an atomic
 * one sets fragment; AH, ESP and unknown headers end the walk as the proto).  False if invalid
 * (ip->error says why); else fills every field of ip but dont_fragment and id. */
bool wire_ip_parse(const uint8_t *pkt, size_t len, wire_ip_repr *ip);
/* An IPv4 repr from host-order addresses, to emit (TTL WIRE_TTL, id 0, no DF). */
wire_ip_repr wire_ipv4_repr(uint32_t src, uint32_t dst, uint8_t proto, size_t payload_len);
/* Writes ip's header at buf for a payload of ip->payload_len bytes: 20 bytes for IPv4 (with
 * its checksum), 40 for IPv6.  Returns that length. */
size_t wire_ip_emit(const wire_ip_repr *ip, uint8_t *buf);

static inline size_t wire_addr_len(uint8_t family) { return family == 4 ? 4 : 16; }

/* A repr of either family from network-order addresses (4 or 16 bytes), to emit. */
wire_ip_repr wire_ip_repr_of(uint8_t family, const uint8_t *src, const uint8_t *dst, uint8_t proto,
                             size_t payload_len);
/* A unicast address a connection or datagram may use: not unspecified, not multicast (nor
 * IPv4 broadcast or class E). */
bool wire_addr_unicast(uint8_t family, const uint8_t *a);

#endif
