/*
 * stm32f4-bms: a toy battery-management firmware for an STM32F407.
 *
 * There is no battery on a Discovery board, so the cells live in a small
 * closed-loop model of a series pack in RAM: the load slowly discharges
 * every cell, and a cell whose bleed resistor is switched on (passive
 * balancing) loses a little more.  The model answers like an LTC681x
 * battery-monitor AFE: register groups of three cell voltages, each
 * protected by a PEC15 checksum.  Each tick the firmware
 *
 *   1. reads the cells from the AFE (checking every PEC) and finds the
 *      weakest and strongest,
 *   2. trips the fault output on over- or under-voltage,
 *   3. switches bleed resistors (GPIOE, one pin per cell) on the cells that
 *      sit more than a threshold above the weakest,
 *   4. (since 1.1) stops balancing while the pack is too warm,
 *   5. (since 2.0) estimates the state of charge from an OCV table,
 *   6. toggles the heartbeat LED.
 *
 * Versions are selected with -DFW_VERSION_MAJOR/MINOR/PATCH (see build.sh);
 * the FW_AT_LEAST() gates show which version each piece of code arrived in.
 */
#include <stdint.h>

#include "pec15.h"
#include "stm32f4_regs.h"
#include "uptake_fw_info.h"

/* build_flags bits 0..7: features; bits 8..15: number of cells. */
#define BMS_FWF_PASSIVE_BALANCING  (1u << 0)
#define BMS_FWF_TEMP_DERATING      (1u << 1)
#define BMS_FWF_BALANCE_HYSTERESIS (1u << 2)
#define BMS_FWF_SOC_ESTIMATE       (1u << 3)

#if FW_AT_LEAST(2, 0)
#define BMS_CELLS 16u
#else
#define BMS_CELLS 12u
#endif

#define CELL_OV_MV 4200u /* over-voltage trip */
#define CELL_UV_MV 3000u /* under-voltage trip */

#if FW_AT_LEAST(1, 1)
/* 1.1: tighter balancing window, with hysteresis so bleed FETs don't chatter. */
#define BALANCE_START_MV  8u
#define BALANCE_STOP_MV   4u
#define DERATE_ABOVE_DC 450u /* stop balancing above 45.0 degC ... */
#define DERATE_BELOW_DC 400u /* ... and resume below 40.0 degC */
#define BMS_FEATURES (BMS_FWF_PASSIVE_BALANCING | BMS_FWF_TEMP_DERATING | BMS_FWF_BALANCE_HYSTERESIS)
#else
#define BALANCE_START_MV 10u
#define BMS_FEATURES BMS_FWF_PASSIVE_BALANCING
#endif

#if FW_AT_LEAST(2, 0)
#undef BMS_FEATURES
#define BMS_FEATURES (BMS_FWF_PASSIVE_BALANCING | BMS_FWF_TEMP_DERATING | \
                      BMS_FWF_BALANCE_HYSTERESIS | BMS_FWF_SOC_ESTIMATE)
#endif

_Static_assert(BMS_CELLS <= 16u, "one GPIOE pin per cell");

UPTAKE_FW_INFO_SECTION
const struct uptake_fw_info fw_info = {
    .magic = UPTAKE_FW_INFO_MAGIC,
    .hardware_id = "stm32f4-bms",
    .version = UPTAKE_FW_VERSION_STRING,
    .self_test = UPTAKE_SELFTEST_FAULT,
    .build_flags = BMS_FEATURES | (BMS_CELLS << 8) |
                   (UPTAKE_SELFTEST_FAULT ? UPTAKE_FWF_SELFTEST_FAULT : 0u),
};

/* Pack model: the true cell voltages in mV, slightly unbalanced at start. */
static uint16_t pack_mv[BMS_CELLS] = {
    3912, 3907, 3925, 3903, 3911, 3931, 3905, 3909, 3918, 3902, 3914, 3921,
#if BMS_CELLS == 16u
    3906, 3927, 3910, 3904,
#endif
};

static uint16_t balancing_mask;
static uint32_t tick;
#if FW_AT_LEAST(1, 1)
static uint16_t pack_temp_dc = 250; /* deci-degC */
static uint8_t derated;
#endif

#if FW_AT_LEAST(2, 0)
/* Open-circuit voltage (mV) at 0 %, 10 %, ... 100 % state of charge (NMC cell). */
static const uint16_t ocv_table_mv[11] = {
    3000, 3450, 3560, 3620, 3670, 3730, 3800, 3880, 3970, 4070, 4200,
};

/* Published for the CAN task / debugger: what the pack looks like now. */
struct bms_status {
    uint16_t min_mv;
    uint16_t max_mv;
    uint16_t balancing_mask;
    uint16_t soc_permille;
    uint32_t faults;
};
volatile struct bms_status bms_status;

static uint16_t soc_from_ocv(uint16_t mv)
{
    if (mv <= ocv_table_mv[0]) {
        return 0;
    }
    for (unsigned i = 1; i < 11u; i++) {
        if (mv < ocv_table_mv[i]) {
            uint32_t lo = ocv_table_mv[i - 1u];
            uint32_t span = ocv_table_mv[i] - lo;
            return (uint16_t)((i - 1u) * 100u + ((uint32_t)(mv - lo) * 100u) / span);
        }
    }
    return 1000;
}
#endif

/* ---- AFE: the pack model answers "read cell voltage register group" ---- */

#define AFE_CELLS_PER_GROUP 3u
#define AFE_GROUPS ((BMS_CELLS + AFE_CELLS_PER_GROUP - 1u) / AFE_CELLS_PER_GROUP)
#define AFE_MAX_PEC_ERRORS 3u

static uint16_t cell_mv[BMS_CELLS];
static uint32_t afe_pec_errors;

/* Where the SPI DMA leaves the AFE's reply (volatile: hardware writes it). */
static volatile uint8_t afe_rx[8];

/* The model side of "RDCVx": six data bytes (three cells, 100 uV units,
 * little-endian) then the PEC, big-endian, as an LTC6811 answers. */
static void afe_model_answer(unsigned group)
{
    uint8_t reply[6];
    for (unsigned c = 0; c < AFE_CELLS_PER_GROUP; c++) {
        unsigned cell = group * AFE_CELLS_PER_GROUP + c;
        uint16_t raw = cell < BMS_CELLS ? (uint16_t)(pack_mv[cell] * 10u) : 0xFFFFu;
        reply[2u * c] = (uint8_t)raw;
        reply[2u * c + 1u] = (uint8_t)(raw >> 8);
    }
    uint16_t pec = pec15(reply, 6);
    for (unsigned i = 0; i < 6u; i++) {
        afe_rx[i] = reply[i];
    }
    afe_rx[6] = (uint8_t)(pec >> 8);
    afe_rx[7] = (uint8_t)pec;
}

/* Refresh cell_mv from the AFE; groups with a bad PEC keep their last value.
 * Returns non-zero once PEC errors pile up (a broken isoSPI link). */
static int read_cells(void)
{
    uint8_t reply[8];
    for (unsigned group = 0; group < AFE_GROUPS; group++) {
        afe_model_answer(group);
        for (unsigned i = 0; i < 8u; i++) {
            reply[i] = afe_rx[i];
        }
        uint16_t pec = (uint16_t)((reply[6] << 8) | reply[7]);
        if (pec != pec15(reply, 6)) {
            afe_pec_errors++;
            continue;
        }
        for (unsigned c = 0; c < AFE_CELLS_PER_GROUP; c++) {
            unsigned cell = group * AFE_CELLS_PER_GROUP + c;
            if (cell < BMS_CELLS) {
                uint16_t raw = (uint16_t)(reply[2u * c] | (reply[2u * c + 1u] << 8));
                cell_mv[cell] = (uint16_t)(raw / 10u);
            }
        }
    }
    return afe_pec_errors >= AFE_MAX_PEC_ERRORS;
}

static void delay(uint32_t loops)
{
    for (volatile uint32_t i = 0; i < loops; i++) {
    }
}

static void gpio_init(void)
{
    RCC_AHB1ENR |= RCC_AHB1ENR_GPIODEN | RCC_AHB1ENR_GPIOEEN;
    /* PD12..PD14 outputs (LEDs); PE0..PE15 outputs (bleed-resistor FETs). */
    GPIO_MODER(GPIOD_BASE) = (GPIO_MODER(GPIOD_BASE) & ~(0x3Fu << 24)) | (0x15u << 24);
    GPIO_MODER(GPIOE_BASE) = 0x55555555u;
    GPIO_ODR(GPIOE_BASE) = 0;
}

static void led(unsigned pin, int on)
{
    GPIO_BSRR(GPIOD_BASE) = on ? (1u << pin) : (1u << (pin + 16u));
}

/*
 * Power-on self-test: the build-time fault switch, a RAM pattern test, a
 * clean AFE read, plausible cell voltages.  Returns 0 or a failure code
 * (same codes as the fwinfo self_test field): 0x0101 RAM, 0x0102 AFE
 * link, 0x0103 implausible cells, or the injected UPTAKE_SELFTEST_FAULT.
 */
static uint32_t power_on_self_test(void)
{
    static volatile uint32_t ram_probe[4];
    static const uint32_t patterns[4] = {0x00000000u, 0xFFFFFFFFu, 0xAAAAAAAAu, 0x55555555u};

    /* The build-time fault switch, read from the fwinfo block at run time
     * (volatile: the broken build must still contain the whole firmware). */
    uint32_t injected = *(const volatile uint32_t *)&fw_info.self_test;
    if (injected != 0u) {
        return injected;
    }
    for (unsigned i = 0; i < 4u; i++) {
        ram_probe[i] = patterns[i];
    }
    for (unsigned i = 0; i < 4u; i++) {
        if (ram_probe[i] != patterns[i]) {
            return 0x0101u; /* RAM test failed */
        }
    }
    if (read_cells() || afe_pec_errors != 0u) {
        return 0x0102u; /* AFE does not answer cleanly */
    }
    for (unsigned i = 0; i < BMS_CELLS; i++) {
        if (cell_mv[i] <= CELL_UV_MV || cell_mv[i] >= CELL_OV_MV) {
            return 0x0103u; /* implausible cell reading at start-up */
        }
    }
    return 0;
}

static void pack_model_step(void)
{
    for (unsigned i = 0; i < BMS_CELLS; i++) {
        uint16_t drop = (tick % 16u == 0u) ? 1u : 0u; /* load current */
        if (balancing_mask & (1u << i)) {
            drop += 1u; /* bleed resistor */
        }
        pack_mv[i] = (uint16_t)(pack_mv[i] - drop);
    }
#if FW_AT_LEAST(1, 1)
    /* Each bleed resistor warms the pack; it cools towards 25 degC. */
    pack_temp_dc = (uint16_t)(pack_temp_dc + 3u * (uint16_t)__builtin_popcount(balancing_mask));
    if (pack_temp_dc > 250u) {
        pack_temp_dc = (uint16_t)(pack_temp_dc - 2u);
    }
#endif
}

static uint16_t select_cells_to_balance(uint16_t min_mv)
{
    uint16_t mask = 0;
#if FW_AT_LEAST(1, 1)
    if (derated) {
        if (pack_temp_dc > DERATE_BELOW_DC) {
            return 0;
        }
        derated = 0;
    } else if (pack_temp_dc > DERATE_ABOVE_DC) {
        derated = 1;
        return 0;
    }
#endif
    for (unsigned i = 0; i < BMS_CELLS; i++) {
        uint16_t above = (uint16_t)(cell_mv[i] - min_mv);
#if FW_AT_LEAST(1, 1)
        int was_on = (balancing_mask >> i) & 1u;
        if (above > BALANCE_START_MV || (was_on && above > BALANCE_STOP_MV)) {
            mask |= (uint16_t)(1u << i);
        }
#else
        if (above > BALANCE_START_MV) {
            mask |= (uint16_t)(1u << i);
        }
#endif
    }
    return mask;
}

int main(void)
{
    gpio_init();

    uint32_t post = power_on_self_test();
    if (post != 0u) {
        /* Fail safe: no balancing, fault LED on, wait for the watchdog. */
        led(LED_FAULT, 1);
        for (;;) {
        }
    }

    for (;;) {
        int afe_fault = read_cells();
        uint16_t min_mv = 0xFFFF;
        uint16_t max_mv = 0;
        for (unsigned i = 0; i < BMS_CELLS; i++) {
            if (cell_mv[i] < min_mv) {
                min_mv = cell_mv[i];
            }
            if (cell_mv[i] > max_mv) {
                max_mv = cell_mv[i];
            }
        }

        int fault = afe_fault || max_mv >= CELL_OV_MV || min_mv <= CELL_UV_MV;
        balancing_mask = fault ? 0u : select_cells_to_balance(min_mv);
        GPIO_ODR(GPIOE_BASE) = balancing_mask;
        led(LED_FAULT, fault);
        led(LED_BALANCING, balancing_mask != 0u);
        led(LED_HEARTBEAT, (int)(tick & 1u));

#if FW_AT_LEAST(2, 0)
        bms_status.min_mv = min_mv;
        bms_status.max_mv = max_mv;
        bms_status.balancing_mask = balancing_mask;
        bms_status.soc_permille = soc_from_ocv(min_mv);
        bms_status.faults = (uint32_t)fault;
#endif

        pack_model_step();
        tick++;
        delay(400000u);
    }
}
