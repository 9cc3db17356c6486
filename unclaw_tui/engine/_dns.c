/* _dns.c: the query shape check (see _dns.h). */
#include "_dns.h"

#include <string.h>

#include "_wire.h"

/* The additional record: an OPT with the root name, its fixed fields and its options. */
static int check_opt(const uint8_t *msg, size_t len, size_t *off, dns_query_check *out) {
    size_t p = *off;
    if (p + 11 > len) return DNS_E_TRUNCATED;
    if (msg[p] != 0 || rd16be(msg + p + 1) != DNS_OPT_TYPE) return DNS_E_ADDITIONAL;
    out->has_opt = 1;
    out->opt_udp_size = rd16be(msg + p + 3);
    out->opt_version = msg[p + 6];
    out->opt_flags = rd16be(msg + p + 7);
    size_t rdlen = rd16be(msg + p + 9);
    p += 11;
    if (p + rdlen > len) return DNS_E_TRUNCATED;
    const size_t end = p + rdlen;
    while (p < end) {
        out->steps++;
        if (p + 4 > end) return DNS_E_ADDITIONAL;
        const uint16_t code = rd16be(msg + p), optlen = rd16be(msg + p + 2);
        p += 4;
        if (p + optlen > end) return DNS_E_ADDITIONAL;
        if (code == DNS_OPTION_ECS && out->ecs_offset == 0) {
            out->ecs_offset = (uint16_t)p;
            out->ecs_len = optlen;
        }
        out->options++;
        p += optlen;
    }
    *off = p;
    return DNS_OK;
}

int dns_check_query(const uint8_t *msg, size_t len, dns_query_check *out) {
    memset(out, 0, sizeof *out);
    if (len < DNS_HEADER_LEN) return DNS_E_SHORT;
    out->id = rd16be(msg);
    out->flags = rd16be(msg + 2);
    if (len > DNS_MAX_QUERY_LEN) return DNS_E_LONG;
    if (out->flags & 0x8000) return DNS_E_RESPONSE;
    if ((out->flags >> 11) & 0xF) return DNS_E_OPCODE;
    const uint16_t additional = rd16be(msg + 10);
    if (rd16be(msg + 4) != 1 || rd16be(msg + 6) != 0 || rd16be(msg + 8) != 0 || additional > 1)
        return DNS_E_COUNTS;

    size_t off = DNS_HEADER_LEN;
    for (;;) {
        out->steps++;
        if (off >= len) return DNS_E_TRUNCATED;
        const uint8_t label = msg[off];
        if (label == 0) break;
        if (label & 0xC0) return DNS_E_NAME; /* a pointer (0xC0) or a reserved label type */
        if (off + 1 + label > len) return DNS_E_TRUNCATED;
        off += 1 + (size_t)label;
        if (off + 1 - DNS_HEADER_LEN > DNS_MAX_NAME_LEN) return DNS_E_NAME;
    }
    off++;
    out->name_len = (uint16_t)(off - DNS_HEADER_LEN);
    if (off + 4 > len) return DNS_E_TRUNCATED;
    out->qtype = rd16be(msg + off);
    out->qclass = rd16be(msg + off + 2);
    off += 4;

    if (additional) {
        out->steps++;
        const int verdict = check_opt(msg, len, &off, out);
        if (verdict != DNS_OK) return verdict;
    }
    return off == len ? DNS_OK : DNS_E_TRAILING;
}
