/*
 * sppkit_rt.h - the freestanding runtime of sppkit guest programs.
 *
 * Guests run in 64-bit long mode with identity-mapped paging, at CPL 0 or at
 * CPL 3 with IOPL=3 (so `in`/`out` work).  The host side listens on two ports:
 *
 *   0xE9  debug console: one byte per `outb`
 *   0xF4  isa-debug-exit: a 32-bit `outl` of the exit code ends the run
 *
 * Everything here is static inline and general-purpose-register only: KVM cannot
 * emulate SSE/AVX/x87 stores, cmpxchg16b or fxsave on write-protected pages, so
 * guests are built with -mgeneral-regs-only -mno-sse -mno-mmx -mno-80387.
 *
 * Writes that must reach memory (the whole point of an SPP guest) go through the
 * rt_write{8,16,32,64} helpers: a volatile, possibly unaligned, plain `mov`.
 */
#ifndef SPPKIT_RT_H
#define SPPKIT_RT_H

#include <stddef.h>
#include <stdint.h>

typedef uint8_t u8;
typedef uint16_t u16;
typedef uint32_t u32;
typedef uint64_t u64;
typedef int64_t i64;

#define SPPKIT_PAGE_SIZE      4096
#define SPPKIT_SUBPAGE_SIZE   128
#define SPPKIT_SUBPAGES       32

#define SPPKIT_PORT_CONSOLE   0xE9
#define SPPKIT_PORT_EXIT      0xF4

/* Place an object at the start of a 4 KiB page / a 128-byte sub-page. */
#define SPPKIT_PAGE_ALIGNED     __attribute__((aligned(SPPKIT_PAGE_SIZE)))
#define SPPKIT_SUBPAGE_ALIGNED  __attribute__((aligned(SPPKIT_SUBPAGE_SIZE)))
#define SPPKIT_NOINLINE         __attribute__((noinline))
#define SPPKIT_USED             __attribute__((used))

#define SPPKIT_STR_(x) #x
#define SPPKIT_STR(x)  SPPKIT_STR_(x)

/*
 * Export a global object symbol `alias` = `base` + `offset`, `size` bytes long, so
 * a policy can name a field of a larger structure (offset and size must be integer
 * constant expressions the assembler can evaluate, e.g. plain numbers or macros
 * expanding to them).  Pair it with _Static_assert(offsetof(...) == offset).
 */
#define SPPKIT_EXPORT_FIELD(alias, base, offset, size)                          \
    __asm__(".globl " #alias "\n\t"                                             \
            ".type " #alias ", @object\n\t"                                     \
            ".set " #alias ", " #base " + (" SPPKIT_STR(offset) ")\n\t"         \
            ".size " #alias ", " SPPKIT_STR(size))

/* Compiler barrier: the compiler may not cache memory across it nor move stores over it. */
#define rt_barrier() __asm__ __volatile__("" ::: "memory")

/* Unaligned-capable, aliasing-safe integer types for the access helpers. */
typedef u16 rt_u16u __attribute__((aligned(1), may_alias));
typedef u32 rt_u32u __attribute__((aligned(1), may_alias));
typedef u64 rt_u64u __attribute__((aligned(1), may_alias));

/* One store of exactly the given width (a single `mov`), never optimized away. */
static inline void rt_write8(void *p, u8 v)   { *(volatile u8 *)p = v; }
static inline void rt_write16(void *p, u16 v) { *(volatile rt_u16u *)p = v; }
static inline void rt_write32(void *p, u32 v) { *(volatile rt_u32u *)p = v; }
static inline void rt_write64(void *p, u64 v) { *(volatile rt_u64u *)p = v; }

/* One load of exactly the given width, never cached in a register. */
static inline u8  rt_read8(const void *p)  { return *(const volatile u8 *)p; }
static inline u16 rt_read16(const void *p) { return *(const volatile rt_u16u *)p; }
static inline u32 rt_read32(const void *p) { return *(const volatile rt_u32u *)p; }
static inline u64 rt_read64(const void *p) { return *(const volatile rt_u64u *)p; }

/* A store/load of `size` (1, 2, 4 or 8) bytes; other sizes do nothing / read 0. */
static inline void rt_write(void *p, unsigned size, u64 v)
{
    switch (size) {
    case 1: rt_write8(p, (u8)v); break;
    case 2: rt_write16(p, (u16)v); break;
    case 4: rt_write32(p, (u32)v); break;
    case 8: rt_write64(p, v); break;
    default: break;
    }
}

static inline u64 rt_read(const void *p, unsigned size)
{
    switch (size) {
    case 1: return rt_read8(p);
    case 2: return rt_read16(p);
    case 4: return rt_read32(p);
    case 8: return rt_read64(p);
    default: return 0;
    }
}

/* ---- port I/O ---------------------------------------------------------- */

static inline void outb(u16 port, u8 v)
{
    __asm__ __volatile__("outb %0, %1" : : "a"(v), "Nd"(port) : "memory");
}

static inline void outl(u16 port, u32 v)
{
    __asm__ __volatile__("outl %0, %1" : : "a"(v), "Nd"(port) : "memory");
}

/* ---- console ------------------------------------------------------------ */

static inline void rt_putc(char c) { outb(SPPKIT_PORT_CONSOLE, (u8)c); }

static inline void rt_puts(const char *s)
{
    while (*s)
        rt_putc(*s++);
}

/* "0x" followed by the value in lower-case hex, no leading zeros ("0x0" for 0). */
static inline void rt_put_hex(u64 v)
{
    char buf[16];
    int n = 0;
    rt_putc('0');
    rt_putc('x');
    do {
        buf[n++] = "0123456789abcdef"[v & 0xF];
        v >>= 4;
    } while (v);
    while (n)
        rt_putc(buf[--n]);
}

static inline void rt_put_dec(u64 v)
{
    char buf[20];
    int n = 0;
    do {
        buf[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (n)
        rt_putc(buf[--n]);
}

/* ---- exit ----------------------------------------------------------------- */

/* End the run with `code` as the engine's exit code.  Never returns. */
__attribute__((noreturn)) static inline void rt_exit(u32 code)
{
    outl(SPPKIT_PORT_EXIT, code);
    for (;;)
        __asm__ __volatile__("ud2");
}

#endif /* SPPKIT_RT_H */
