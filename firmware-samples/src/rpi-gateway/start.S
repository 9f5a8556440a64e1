/*
 * Process entry for the freestanding gateway: the kernel leaves argc at
 * [sp] and argv at sp+8.  Hand sp to gateway_main and exit with its result.
 */
    .text
    .global _start
    .type _start, %function
_start:
    mov     x29, #0
    mov     x30, #0
    mov     x0, sp
    bl      gateway_main
    mov     x8, #94         /* exit_group */
    svc     #0
    .size _start, . - _start

    .section .note.GNU-stack, "", %progbits
