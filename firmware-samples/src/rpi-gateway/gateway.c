/*
 * rpi-gateway: the primary ECU's toy firmware, a CAN gateway for an
 * aarch64 Linux board (Raspberry Pi class), built static and libc-free.
 *
 * It runs the power-on self-test, then replays a short trace of CAN frames
 * through its routing table (which bus may see which ids) and prints what
 * it forwarded.  `gateway.elf --selftest` runs only the self-test and exits
 * 0 (pass) or 1 (fail), which is what an OTA health check would execute;
 * `--routes` lists the routing table; `--workshop` (2.0) lets physical UDS
 * requests through to the ECUs.
 *
 * Versions are selected with -DFW_VERSION_MAJOR/MINOR/PATCH (see build.sh);
 * the FW_AT_LEAST() gates show which version each piece of code arrived in.
 */
#include <stddef.h>
#include <stdint.h>

#include "linux_syscalls.h"
#include "uptake_fw_info.h"

/* build_flags bits 0..7: features; bits 8..15: number of routes. */
#define GW_FWF_CAN_ROUTING  (1u << 0)
#define GW_FWF_DENY_LIST    (1u << 1)
#define GW_FWF_DIAG_GATEWAY (1u << 2)
#define GW_FWF_ROUTE_STATS  (1u << 3)

#if FW_AT_LEAST(2, 0)
#define GW_FEATURES (GW_FWF_CAN_ROUTING | GW_FWF_DENY_LIST | GW_FWF_DIAG_GATEWAY | GW_FWF_ROUTE_STATS)
#elif FW_AT_LEAST(1, 1)
#define GW_FEATURES (GW_FWF_CAN_ROUTING | GW_FWF_DENY_LIST)
#else
#define GW_FEATURES GW_FWF_CAN_ROUTING
#endif

enum bus { BUS_POWERTRAIN, BUS_CHASSIS, BUS_BODY, BUS_TELEMATICS, BUS_COUNT };

static const char *const bus_names[BUS_COUNT] = {"powertrain", "chassis", "body", "telematics"};

struct route {
    uint16_t id;   /* CAN id after masking */
    uint16_t mask; /* which id bits must match */
    uint8_t src;
    uint8_t dst;
    const char *name;
};

static const struct route routes[] = {
    {0x0C0, 0x7F0, BUS_POWERTRAIN, BUS_CHASSIS, "motor torque and speed"},
    {0x1A0, 0x7FF, BUS_CHASSIS, BUS_BODY, "vehicle speed for the cluster"},
    {0x1A0, 0x7FF, BUS_CHASSIS, BUS_TELEMATICS, "vehicle speed for the app"},
    {0x2F0, 0x7F8, BUS_BODY, BUS_TELEMATICS, "door and lock status"},
    {0x7DF, 0x7FF, BUS_TELEMATICS, BUS_POWERTRAIN, "OBD functional request"},
    {0x7DF, 0x7FF, BUS_TELEMATICS, BUS_CHASSIS, "OBD functional request"},
#if FW_AT_LEAST(1, 1)
    {0x3C0, 0x7F0, BUS_POWERTRAIN, BUS_TELEMATICS, "BMS pack status for the app"},
#endif
#if FW_AT_LEAST(2, 0)
    {0x7E8, 0x7F8, BUS_POWERTRAIN, BUS_TELEMATICS, "UDS responses (powertrain)"},
    {0x7E8, 0x7F8, BUS_CHASSIS, BUS_TELEMATICS, "UDS responses (chassis)"},
#endif
};

#define ROUTE_COUNT (sizeof(routes) / sizeof(routes[0]))
_Static_assert(ROUTE_COUNT < 256u, "route count must fit build_flags bits 8..15");

UPTAKE_FW_INFO_SECTION
const struct uptake_fw_info fw_info = {
    .magic = UPTAKE_FW_INFO_MAGIC,
    .hardware_id = "rpi-gateway",
    .version = UPTAKE_FW_VERSION_STRING,
    .self_test = UPTAKE_SELFTEST_FAULT,
    .build_flags = GW_FEATURES | ((uint32_t)ROUTE_COUNT << 8) |
                   (UPTAKE_SELFTEST_FAULT ? UPTAKE_FWF_SELFTEST_FAULT : 0u),
};

#if FW_AT_LEAST(2, 0)
/* UDS physical addressing: request id 0x7E0 + n goes to the ECU on this bus. */
static const uint8_t diag_ecu_bus[8] = {
    BUS_POWERTRAIN, BUS_POWERTRAIN, BUS_CHASSIS, BUS_CHASSIS,
    BUS_BODY, BUS_BODY, BUS_POWERTRAIN, BUS_CHASSIS,
};
static uint32_t route_hits[ROUTE_COUNT];
#endif

struct frame {
    uint8_t bus;
    uint16_t id;
};

/* A recorded slice of bus traffic, replayed at start-up. */
static const struct frame trace[] = {
    {BUS_POWERTRAIN, 0x0C1}, {BUS_CHASSIS, 0x1A0},    {BUS_BODY, 0x2F2},
    {BUS_POWERTRAIN, 0x3C4}, {BUS_TELEMATICS, 0x7DF}, {BUS_POWERTRAIN, 0x0C7},
    {BUS_CHASSIS, 0x1A0},    {BUS_TELEMATICS, 0x0C1}, {BUS_BODY, 0x2F5},
    {BUS_TELEMATICS, 0x7E0}, {BUS_POWERTRAIN, 0x7E8}, {BUS_TELEMATICS, 0x7E2},
    {BUS_CHASSIS, 0x7EA},    {BUS_BODY, 0x300},       {BUS_POWERTRAIN, 0x3C0},
    {BUS_TELEMATICS, 0x050}, {BUS_CHASSIS, 0x1A0},    {BUS_POWERTRAIN, 0x0CF},
};

#define TRACE_COUNT (sizeof(trace) / sizeof(trace[0]))

/* ---- output: a tiny line buffer, since there is no printf ---- */

struct line {
    char buf[160];
    size_t len;
};

static void put_str(struct line *l, const char *s)
{
    while (*s && l->len < sizeof(l->buf)) {
        l->buf[l->len++] = *s++;
    }
}

static void put_uint(struct line *l, uint32_t v)
{
    char digits[10];
    int n = 0;
    do {
        digits[n++] = (char)('0' + v % 10u);
        v /= 10u;
    } while (v);
    while (n && l->len < sizeof(l->buf)) {
        l->buf[l->len++] = digits[--n];
    }
}

static void put_hex(struct line *l, uint32_t v, int width)
{
    static const char hex[] = "0123456789abcdef";
    put_str(l, "0x");
    for (int shift = (width - 1) * 4; shift >= 0 && l->len < sizeof(l->buf); shift -= 4) {
        l->buf[l->len++] = hex[(v >> shift) & 0xFu];
    }
}

static void emit(int fd, struct line *l)
{
    put_str(l, "\n");
    sys_write(fd, l->buf, l->len);
    l->len = 0;
}

/* ---- self-test ---- */

/*
 * Returns 0 or a failure code (same codes as the fwinfo self_test field):
 * 0x0201 routing table inconsistent, 0x0202 fwinfo block damaged, or the
 * injected UPTAKE_SELFTEST_FAULT (2.0.0 uses 0x0203, "CAN controller did
 * not come up").
 */
static uint32_t power_on_self_test(void)
{
    /* The build-time fault switch, read from the fwinfo block at run time
     * (volatile: the broken build must still contain the whole firmware). */
    uint32_t injected = *(const volatile uint32_t *)&fw_info.self_test;
    if (injected != 0u) {
        return injected;
    }
    for (size_t i = 0; i < ROUTE_COUNT; i++) {
        const struct route *r = &routes[i];
        if (r->src >= BUS_COUNT || r->dst >= BUS_COUNT || r->src == r->dst ||
            (r->id & (uint16_t)~r->mask) != 0u) {
            return 0x0201u;
        }
    }
    if (fw_info.hardware_id[0] != 'r' || fw_info.version[0] == '\0') {
        return 0x0202u;
    }
    return 0;
}

/* ---- routing ---- */

#if FW_AT_LEAST(1, 1)
/* Ids below 0x100 are safety-relevant control frames: never accepted from
 * the telematics side, whatever the routing table says. */
static int denied(const struct frame *f)
{
    return f->bus == BUS_TELEMATICS && f->id < 0x100u;
}
#endif

/* Forward one frame; returns how many buses received it. */
static unsigned route_frame(const struct frame *f, int workshop, uint32_t forwarded[BUS_COUNT])
{
    unsigned copies = 0;
#if FW_AT_LEAST(1, 1)
    if (denied(f)) {
        return 0;
    }
#endif
#if FW_AT_LEAST(2, 0)
    if (f->bus == BUS_TELEMATICS && f->id >= 0x7E0u && f->id <= 0x7E7u) {
        /* Physical UDS requests pass only in workshop mode. */
        if (!workshop) {
            return 0;
        }
        forwarded[diag_ecu_bus[f->id - 0x7E0u]]++;
        return 1;
    }
#else
    (void)workshop;
#endif
    for (size_t i = 0; i < ROUTE_COUNT; i++) {
        const struct route *r = &routes[i];
        if (r->src == f->bus && (f->id & r->mask) == r->id) {
            forwarded[r->dst]++;
            copies++;
#if FW_AT_LEAST(2, 0)
            route_hits[i]++;
#endif
        }
    }
    return copies;
}

static int streq(const char *a, const char *b)
{
    while (*a && *a == *b) {
        a++;
        b++;
    }
    return *a == *b;
}

int gateway_main(long *sp)
{
    int argc = (int)sp[0];
    char **argv = (char **)(sp + 1);
    int selftest_only = 0;
    int list_routes = 0;
    int workshop = 0;
    struct line l = {.len = 0};

    for (int i = 1; i < argc; i++) {
        if (streq(argv[i], "--selftest")) {
            selftest_only = 1;
        } else if (streq(argv[i], "--routes")) {
            list_routes = 1;
        } else if (streq(argv[i], "--workshop")) {
            workshop = 1;
        } else {
            put_str(&l, "usage: gateway.elf [--selftest] [--routes] [--workshop]");
            emit(2, &l);
            return 2;
        }
    }

    put_str(&l, fw_info.hardware_id);
    put_str(&l, " ");
    put_str(&l, fw_info.version);
    put_str(&l, ": ");
    uint32_t post = power_on_self_test();
    if (post != 0u) {
        put_str(&l, "power-on self-test FAILED, code ");
        put_hex(&l, post, 8);
        emit(2, &l);
        return 1;
    }
    put_str(&l, "power-on self-test passed");
    emit(1, &l);
    if (selftest_only) {
        return 0;
    }
    if (list_routes) {
        for (size_t i = 0; i < ROUTE_COUNT; i++) {
            const struct route *r = &routes[i];
            put_str(&l, "  ");
            put_hex(&l, r->id, 3);
            put_str(&l, "/");
            put_hex(&l, r->mask, 3);
            put_str(&l, " ");
            put_str(&l, bus_names[r->src]);
            put_str(&l, " -> ");
            put_str(&l, bus_names[r->dst]);
            put_str(&l, ": ");
            put_str(&l, r->name);
            emit(1, &l);
        }
        return 0;
    }

    uint32_t forwarded[BUS_COUNT] = {0};
    uint32_t dropped = 0;
    for (size_t i = 0; i < TRACE_COUNT; i++) {
        if (route_frame(&trace[i], workshop, forwarded) == 0u) {
            dropped++;
        }
    }
    put_str(&l, "replayed ");
    put_uint(&l, (uint32_t)TRACE_COUNT);
    put_str(&l, " frames, dropped ");
    put_uint(&l, dropped);
    emit(1, &l);
    for (int b = 0; b < BUS_COUNT; b++) {
        put_str(&l, "  to ");
        put_str(&l, bus_names[b]);
        put_str(&l, ": ");
        put_uint(&l, forwarded[b]);
        emit(1, &l);
    }
#if FW_AT_LEAST(2, 0)
    for (size_t i = 0; i < ROUTE_COUNT; i++) {
        put_str(&l, "  ");
        put_str(&l, routes[i].name);
        put_str(&l, ": ");
        put_uint(&l, route_hits[i]);
        emit(1, &l);
    }
#endif
    return 0;
}

/* GCC may emit calls to these even in freestanding code. */
void *memset(void *dst, int c, size_t n)
{
    unsigned char *d = dst;
    while (n--) {
        *d++ = (unsigned char)c;
    }
    return dst;
}

void *memcpy(void *restrict dst, const void *restrict src, size_t n)
{
    unsigned char *d = dst;
    const unsigned char *s = src;
    while (n--) {
        *d++ = *s++;
    }
    return dst;
}
