/*
 * The two Linux system calls the gateway needs, without a libc, so the
 * image stays a few KiB and has no dynamic dependencies.
 */
#ifndef LINUX_SYSCALLS_H
#define LINUX_SYSCALLS_H

#include <stddef.h>

#define SYS_write 64

static inline long sys_write(int fd, const void *buf, size_t len)
{
    register long x0 __asm__("x0") = fd;
    register long x1 __asm__("x1") = (long)buf;
    register long x2 __asm__("x2") = (long)len;
    register long x8 __asm__("x8") = SYS_write;
    __asm__ volatile("svc #0" : "+r"(x0) : "r"(x1), "r"(x2), "r"(x8) : "memory");
    return x0;
}

#endif /* LINUX_SYSCALLS_H */
