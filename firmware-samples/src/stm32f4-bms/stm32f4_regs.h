/*
 * The few STM32F4 peripheral registers the toy BMS touches
 * (addresses from RM0090, the STM32F405/407 reference manual).
 */
#ifndef STM32F4_REGS_H
#define STM32F4_REGS_H

#include <stdint.h>

#define REG32(addr) (*(volatile uint32_t *)(addr))

#define RCC_BASE       0x40023800u
#define RCC_AHB1ENR    REG32(RCC_BASE + 0x30u)
#define RCC_AHB1ENR_GPIODEN (1u << 3)
#define RCC_AHB1ENR_GPIOEEN (1u << 4)

#define GPIOD_BASE     0x40020C00u
#define GPIOE_BASE     0x40021000u
#define GPIO_MODER(b)  REG32((b) + 0x00u)
#define GPIO_ODR(b)    REG32((b) + 0x14u)
#define GPIO_BSRR(b)   REG32((b) + 0x18u)

/* STM32F4-Discovery LEDs on port D. */
#define LED_HEARTBEAT  12u /* green */
#define LED_BALANCING  13u /* orange */
#define LED_FAULT      14u /* red */

#endif /* STM32F4_REGS_H */
