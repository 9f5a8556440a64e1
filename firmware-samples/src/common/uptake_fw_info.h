/*
 * Firmware-info block embedded in every Uptake sample image.
 *
 * A bootloader or an OTA health check reads this block straight from the
 * image file (it scans for the magic), so it can tell which hardware the
 * image is for, which version it is and whether its power-on self-test
 * passes, without executing it.  uptake/firmware_info.py is the reader.
 *
 * Layout: 64 bytes, little-endian, no padding.  Exactly one block per image.
 */
#ifndef UPTAKE_FW_INFO_H
#define UPTAKE_FW_INFO_H

#include <stdint.h>

struct uptake_fw_info {
    char     magic[8];        /* "UPTKFWI1" (no NUL) */
    char     hardware_id[32]; /* NUL padded */
    char     version[16];     /* NUL padded, e.g. "1.1.0" */
    uint32_t self_test;       /* 0 = power-on self-test passes; non-zero = failure code */
    uint32_t build_flags;     /* UPTAKE_FWF_* bits below */
};

_Static_assert(sizeof(struct uptake_fw_info) == 64, "fwinfo block must be 64 bytes");

/* Spelled as an initializer list, not a string literal, so that the magic
 * bytes appear exactly once in the image (inside the block itself). */
#define UPTAKE_FW_INFO_MAGIC {'U', 'P', 'T', 'K', 'F', 'W', 'I', '1'}

/*
 * build_flags.  Bits 0..15 are features compiled into the image (their
 * meaning is per hardware id, see each program); bits 16..31 are common.
 */
#define UPTAKE_FWF_SELFTEST_FAULT (1u << 31) /* built with UPTAKE_SELFTEST_FAULT */

/*
 * UPTAKE_SELFTEST_FAULT: the demo's "broken release" switch.  Building with
 * -DUPTAKE_SELFTEST_FAULT=<code> (non-zero) makes the image's power-on
 * self-test fail with that code, both when run and in its fwinfo block, so
 * an OTA agent installs it, sees the health check fail and rolls back.
 */
#ifndef UPTAKE_SELFTEST_FAULT
#define UPTAKE_SELFTEST_FAULT 0u
#endif

#define UPTAKE_FW_INFO_SECTION __attribute__((used, section(".fwinfo")))

#define UPTAKE_STR2(x) #x
#define UPTAKE_STR(x) UPTAKE_STR2(x)
/* "MAJOR.MINOR.PATCH" from -DFW_VERSION_MAJOR=... etc. */
#define UPTAKE_FW_VERSION_STRING \
    UPTAKE_STR(FW_VERSION_MAJOR) "." UPTAKE_STR(FW_VERSION_MINOR) "." UPTAKE_STR(FW_VERSION_PATCH)
/* Feature gates: code that appeared in version MAJOR.MINOR. */
#define FW_AT_LEAST(major, minor) \
    (FW_VERSION_MAJOR > (major) || (FW_VERSION_MAJOR == (major) && FW_VERSION_MINOR >= (minor)))

#endif /* UPTAKE_FW_INFO_H */
