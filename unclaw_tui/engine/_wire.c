/* _wire.c: checksums and the IP header's parse and emit (contract in _wire.h). */
#include "_wire.h"

uint32_t csum_add(uint32_t sum, const uint8_t *p, size_t n) {
    /* 32 bits hold the sum of any packet up to 64 KiB */
    for (; n > 1; p += 2, n -= 2) sum += rd16be(p);
    if (n) sum += (uint32_t)p[0] << 8;
    return sum;
}

uint16_t csum_finish(uint32_t sum) {
    while (sum >> 16) sum = (sum & 0xffff) + (sum >> 16);
    return (uint16_t)~sum;
}

uint32_t wire_pseudo_sum(uint8_t family, const uint8_t *src, const uint8_t *dst, uint8_t proto,
                         size_t len) {
    size_t alen = wire_addr_len(family);
    return csum_add(csum_add(0, src, alen), dst, alen) + proto + (uint32_t)(len >> 16) +
           (uint32_t)(len & 0xffff);
}

/* Follows the IPv6 extension headers after the fixed header: ip->proto and ip->payload(_len)
 * end as the upper layer's.  False (WIRE_ERR_EXT) on a truncated or misplaced header or a
 * chain longer than WIRE_IP6_MAX_EXT. */
static bool ipv6_ext_walk(wire_ip_repr *ip) {
    const uint8_t *p = ip->payload;
    size_t left = ip->payload_len;
    for (int n = 0;; n++) {
        uint8_t nh = ip->proto;
        size_t hlen;
        if (nh == 0 || nh == 43 || nh == 60) { /* hop-by-hop, routing, destination options */
            if (nh == 0 && n > 0) return false; /* hop-by-hop only right after the header */
            if (left < 8) return false;
            hlen = ((size_t)p[1] + 1) * 8;
        } else if (nh == 44) { /* fragment */
            if (left < 8) return false;
            hlen = 8;
            if (rd16be(p + 2) != 0) ip->fragment = true; /* an offset or more to come */
        } else {
            return true; /* the upper layer, or a header we do not follow (AH, ESP, none) */
        }
        if (n >= WIRE_IP6_MAX_EXT || hlen > left) return false;
        ip->proto = p[0];
        p += hlen;
        left -= hlen;
        ip->payload = p;
        ip->payload_len = left;
    }
}

bool wire_ip_parse(const uint8_t *pkt, size_t len, wire_ip_repr *ip) {
    ip->error = WIRE_ERR_HEADER;
    if (len < 1) return false;
    size_t hlen;
    ip->family = pkt[0] >> 4;
    if (ip->family == 4) {
        if (len < 20) return false;
        hlen = (size_t)(pkt[0] & 0x0f) * 4;
        size_t total = rd16be(pkt + 2);
        if (hlen < 20 || total < hlen || total > len) return false;
        if (csum_finish(csum_add(0, pkt, hlen)) != 0) return false;
        ip->fragment = (rd16be(pkt + 6) & 0x3fff) != 0; /* MF or an offset */
        ip->ttl = pkt[8];
        ip->proto = pkt[9];
        memcpy(ip->src, pkt + 12, 4);
        memcpy(ip->dst, pkt + 16, 4);
        ip->payload_len = total - hlen;
    } else if (ip->family == 6) {
        if (len < 40) return false;
        hlen = 40;
        ip->payload_len = rd16be(pkt + 4);
        if (40 + ip->payload_len > len) return false;
        ip->fragment = false;
        ip->proto = pkt[6];
        ip->ttl = pkt[7];
        memcpy(ip->src, pkt + 8, 16);
        memcpy(ip->dst, pkt + 24, 16);
        ip->header = pkt;
        ip->payload = pkt + hlen;
        if (!ipv6_ext_walk(ip)) {
            ip->error = WIRE_ERR_EXT;
            return false;
        }
        ip->error = 0;
        return true;
    } else {
        return false;
    }
    ip->header = pkt;
    ip->payload = pkt + hlen;
    ip->error = 0;
    return true;
}

wire_ip_repr wire_ip_repr_of(uint8_t family, const uint8_t *src, const uint8_t *dst, uint8_t proto,
                             size_t payload_len) {
    wire_ip_repr ip = {.family = family, .proto = proto, .ttl = WIRE_TTL, .payload_len = payload_len};
    memcpy(ip.src, src, wire_addr_len(family));
    memcpy(ip.dst, dst, wire_addr_len(family));
    return ip;
}

bool wire_addr_unicast(uint8_t family, const uint8_t *a) {
    if (family == 4) {
        uint32_t v = rd32be(a);
        return v != 0 && v < 0xe0000000u; /* not 0, multicast, class E or broadcast */
    }
    static const uint8_t zero[16];
    return a[0] != 0xff && memcmp(a, zero, 16) != 0; /* not multicast, not unspecified */
}

wire_ip_repr wire_ipv4_repr(uint32_t src, uint32_t dst, uint8_t proto, size_t payload_len) {
    wire_ip_repr ip = {.family = 4, .proto = proto, .ttl = WIRE_TTL, .payload_len = payload_len};
    wr32be(ip.src, src);
    wr32be(ip.dst, dst);
    return ip;
}

size_t wire_ip_emit(const wire_ip_repr *ip, uint8_t *buf) {
    if (ip->family == 6) {
        buf[0] = 6 << 4;
        buf[1] = buf[2] = buf[3] = 0;
        wr16be(buf + 4, (uint16_t)ip->payload_len);
        buf[6] = ip->proto;
        buf[7] = ip->ttl;
        memcpy(buf + 8, ip->src, 16);
        memcpy(buf + 24, ip->dst, 16);
        return 40;
    }
    buf[0] = 0x45;
    buf[1] = 0;
    wr16be(buf + 2, (uint16_t)(20 + ip->payload_len));
    wr16be(buf + 4, ip->id);
    wr16be(buf + 6, ip->dont_fragment ? 0x4000 : 0);
    buf[8] = ip->ttl;
    buf[9] = ip->proto;
    buf[10] = buf[11] = 0;
    memcpy(buf + 12, ip->src, 4);
    memcpy(buf + 16, ip->dst, 4);
    wr16be(buf + 10, csum_finish(csum_add(0, buf, 20)));
    return 20;
}
