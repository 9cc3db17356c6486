/*
 * _dns.h, _dns.c: the shape check every DNS query from a peer passes before any DNS parser sees
 * it.  A stub resolver's query is one question, nothing in the answer and authority sections and
 * at most one additional record, an EDNS OPT (RFC 6891); its name is at the start of the message,
 * so a compression pointer in it can only be hostile.  The check walks the message once, front
 * to back, never follows a pointer, and so costs at most one step per byte.  What passes is a
 * message any parser reads in time linear in its size.
 *
 * Pure function over the caller's bytes: sans-IO, no state, no allocation, any thread.  Python
 * runs it on every query today (services/dns.py); the engine can run the same rules when it
 * answers cached names itself.  Also the cffi cdef (see build.py).
 */
#ifndef UNCLAW_DNS_H
#define UNCLAW_DNS_H

#include <stddef.h>
#include <stdint.h>

#define DNS_HEADER_LEN 12
#define DNS_MAX_QUERY_LEN 512 /* a question (at most 259 bytes) and an OPT with a few options */
#define DNS_MAX_NAME_LEN 255  /* RFC 1035 2.3.4, in wire bytes */
#define DNS_OPT_TYPE 41
#define DNS_OPTION_ECS 8 /* EDNS client subnet, RFC 7871 */

/* Verdicts: 0 is a query of the accepted shape; the rest say why not.  The id and flags in the
 * result are valid from DNS_E_LONG on (the header was read), so a reply can carry them. */
#define DNS_OK 0
#define DNS_E_SHORT -1      /* shorter than the header */
#define DNS_E_LONG -2       /* longer than DNS_MAX_QUERY_LEN */
#define DNS_E_RESPONSE -3   /* QR set: not a query */
#define DNS_E_OPCODE -4     /* not a standard query (opcode 0) */
#define DNS_E_COUNTS -5     /* not one question, no answers, no authority, at most one additional */
#define DNS_E_NAME -6       /* a label over 63 bytes, a pointer or reserved label type, or over 255 bytes */
#define DNS_E_TRUNCATED -7  /* the message ends inside the question or the OPT record */
#define DNS_E_ADDITIONAL -8 /* the additional record is not an OPT with the root name, or its options overrun */
#define DNS_E_TRAILING -9   /* bytes after the last record */

typedef struct dns_query_check {
    uint16_t id;
    uint16_t flags;
    uint16_t qtype;
    uint16_t qclass;
    uint16_t name_len;     /* wire bytes of the question's name, the final zero included */
    uint8_t has_opt;       /* an OPT record follows the question */
    uint8_t opt_version;   /* EDNS version */
    uint16_t opt_udp_size; /* the requester's UDP payload size */
    uint16_t opt_flags;    /* EDNS flags (the DO bit is 0x8000) */
    uint16_t ecs_offset;   /* where the client-subnet option's data starts, 0 if none */
    uint16_t ecs_len;      /* its length */
    uint16_t options;      /* EDNS options read */
    uint32_t steps;        /* labels, records and options looked at: never more than len */
} dns_query_check;

/* Checks msg[0..len) and fills out; returns DNS_OK or a DNS_E_* verdict. */
int dns_check_query(const uint8_t *msg, size_t len, dns_query_check *out);

#endif
