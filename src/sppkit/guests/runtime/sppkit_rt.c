/*
 * sppkit_rt.c - the few out-of-line functions a freestanding GCC build needs.
 *
 * GCC may emit calls to memcpy, memmove, memset and memcmp even with
 * -ffreestanding (struct copies, zero-initialisation of large locals).  They are
 * byte loops here - general-purpose registers only, one plain store per byte -
 * and compiled without the pattern recognition that would turn them back into
 * calls to themselves.
 */
#include "sppkit_rt.h"

#define RT_LIBFUNC __attribute__((used, optimize("no-tree-loop-distribute-patterns")))

RT_LIBFUNC void *memset(void *dst, int c, size_t n)
{
    volatile u8 *d = dst;
    while (n--)
        *d++ = (u8)c;
    return dst;
}

RT_LIBFUNC void *memcpy(void *restrict dst, const void *restrict src, size_t n)
{
    volatile u8 *d = dst;
    const u8 *s = src;
    while (n--)
        *d++ = *s++;
    return dst;
}

RT_LIBFUNC void *memmove(void *dst, const void *src, size_t n)
{
    volatile u8 *d = dst;
    const u8 *s = src;
    if (d == s || n == 0)
        return dst;
    if ((uintptr_t)d < (uintptr_t)s) {
        while (n--)
            *d++ = *s++;
    } else {
        d += n;
        s += n;
        while (n--)
            *--d = *--s;
    }
    return dst;
}

RT_LIBFUNC int memcmp(const void *a, const void *b, size_t n)
{
    const u8 *x = a, *y = b;
    for (; n; n--, x++, y++)
        if (*x != *y)
            return *x < *y ? -1 : 1;
    return 0;
}
