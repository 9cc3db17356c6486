/*
 * dns_fuzz.c: libFuzzer target for the DNS query check (_dns.c), the first thing every query
 * from a peer meets.  Each input is one message.  Besides the sanitizers' findings it asserts
 * the check's bounds: it never looks at more than one label, record or option per byte of the
 * input (so its work is linear and it follows no pointer), and what it passes has the shape it
 * promises (a name within 255 bytes, an ECS option inside the message, nothing after the last
 * record), which is what keeps the parser behind it linear too.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "_dns.h"

#define REQUIRE(cond)                                                     \
    do {                                                                  \
        if (!(cond)) {                                                    \
            fprintf(stderr, "dns_fuzz: %s failed at line %d\n", #cond, __LINE__); \
            abort();                                                      \
        }                                                                 \
    } while (0)

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    dns_query_check q;
    const int verdict = dns_check_query(data, size, &q);
    REQUIRE(verdict <= DNS_OK && verdict >= DNS_E_TRAILING);
    REQUIRE(q.steps <= size);
    if (verdict != DNS_OK) return 0;
    REQUIRE(size >= DNS_HEADER_LEN + 5 && size <= DNS_MAX_QUERY_LEN);
    REQUIRE(q.name_len >= 1 && q.name_len <= DNS_MAX_NAME_LEN);
    REQUIRE(data[DNS_HEADER_LEN + q.name_len - 1] == 0);
    const size_t question_end = DNS_HEADER_LEN + (size_t)q.name_len + 4;
    REQUIRE(q.has_opt ? size >= question_end + 11 : size == question_end);
    REQUIRE((size_t)q.options * 4 <= size);
    if (q.ecs_offset) REQUIRE((size_t)q.ecs_offset + q.ecs_len <= size && q.has_opt);
    return 0;
}
