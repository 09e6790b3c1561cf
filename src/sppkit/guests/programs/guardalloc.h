/*
 * guardalloc.h - a slab allocator that puts a 128-byte guard sub-page after every
 * buffer, for GuaNary-style overflow detection with SPP (`sppkit guard`).
 *
 * Layout.  A request of n bytes is rounded up to r = n rounded up to 128; its slot
 * is r + 128 bytes: r bytes of buffer area, then one guard sub-page.  Slots of the
 * same size are carved in slabs of about GA_SLAB_BYTES from a page-aligned arena, so
 * every slot and every guard starts on a 128-byte boundary.  The buffer is placed
 * at the END of its area (start = guard - n, rounded down to GA_ALIGN), so with
 * GA_ALIGN 1 the first byte past the buffer is the first byte of its guard: an
 * off-by-one write faults.  (With GA_ALIGN 16, up to 15 bytes of slack before the
 * guard go unnoticed - the usual trade-off of aligned allocators.)  A freed slot is
 * reused for the next request of the same slot size; its guard stays put, so the
 * host never has to unprotect anything.
 *
 * Telling the host.  `guard_table` (a global symbol) lists every slot: buffer start,
 * size, guard address, slot size, state.  ga_guards_ready() does a 32-bit `out` of
 * the entry count to port GA_PORT (0xF6); the host then reads the table and
 * write-protects exactly the guard sub-pages (SPP access-map bit cleared).  Guards
 * of buffers allocated later are protected at the next ga_guards_ready().  The
 * allocator never writes to a guard.
 *
 * Metadata (table, slab list) lives outside the arena, in ordinary .bss pages.
 * Header-only: include it from exactly one .c file.
 */
#ifndef GUARDALLOC_H
#define GUARDALLOC_H

#include "sppkit_rt.h"

#ifndef GA_ARENA_SIZE
#define GA_ARENA_SIZE (1024u * 1024u)
#endif
#ifndef GA_MAX_BUFFERS
#define GA_MAX_BUFFERS 512u
#endif
#ifndef GA_ALIGN
#define GA_ALIGN 1u
#endif
#ifndef GA_SLAB_BYTES
#define GA_SLAB_BYTES 4096u
#endif
#define GA_MAX_SLABS 256u
#define GA_GUARD_SIZE SPPKIT_SUBPAGE_SIZE
#define GA_PORT 0xF6
#define GA_TABLE_MAGIC 0x44524155474b5053ull /* "SPKGUARD" */
#define GA_TABLE_VERSION 1u
#define GA_LIVE 1u
#define GA_FREE 2u

_Static_assert((GA_ALIGN & (GA_ALIGN - 1)) == 0 && GA_ALIGN <= GA_GUARD_SIZE, "GA_ALIGN: a power of two <= 128");
_Static_assert(GA_ARENA_SIZE % SPPKIT_PAGE_SIZE == 0, "GA_ARENA_SIZE: whole pages");

struct ga_buffer {
    u64 start;     /* first byte of the buffer */
    u64 size;      /* bytes requested */
    u64 guard;     /* the guard sub-page: 128-byte aligned, right after the buffer area */
    u32 slot_size; /* area + guard */
    u32 state;     /* GA_LIVE or GA_FREE */
};

struct ga_table {
    u64 magic;       /* GA_TABLE_MAGIC */
    u32 version;     /* GA_TABLE_VERSION */
    u32 capacity;    /* GA_MAX_BUFFERS */
    u32 count;       /* entries used */
    u32 guard_size;  /* 128 */
    u64 arena;       /* arena start */
    u64 arena_size;  /* arena bytes */
    u64 arena_used;  /* bytes carved into slabs */
    struct ga_buffer buf[GA_MAX_BUFFERS];
};
_Static_assert(sizeof(struct ga_buffer) == 32, "host reads 32-byte entries");
_Static_assert(offsetof(struct ga_table, buf) == 48, "host reads a 48-byte header");

struct ga_slab {
    u64 base;
    u32 slot_size;
    u32 nslots;
    u32 used;
};

SPPKIT_PAGE_ALIGNED u8 ga_arena[GA_ARENA_SIZE];
SPPKIT_PAGE_ALIGNED struct ga_table guard_table = {
    .magic = GA_TABLE_MAGIC,
    .version = GA_TABLE_VERSION,
    .capacity = GA_MAX_BUFFERS,
    .guard_size = GA_GUARD_SIZE,
    .arena_size = GA_ARENA_SIZE,
};
static struct ga_slab ga_slabs[GA_MAX_SLABS];
static u32 ga_nslabs;

/* A buffer of n bytes ending right at a guard sub-page, or 0 (n == 0, arena or table full). */
static void *ga_alloc(u64 n)
{
    struct ga_table *t = &guard_table;
    if (n == 0 || n > GA_ARENA_SIZE)
        return 0;
    u64 area = (n + GA_GUARD_SIZE - 1) & ~(u64)(GA_GUARD_SIZE - 1);
    u64 slot = area + GA_GUARD_SIZE;
    struct ga_buffer *e = 0;
    u64 base = 0;

    t->arena = (u64)(uintptr_t)ga_arena;
    for (u32 i = 0; i < t->count; i++) /* a freed slot of this size: reuse it (and its guard) */
        if (t->buf[i].state == GA_FREE && t->buf[i].slot_size == slot) {
            e = &t->buf[i];
            base = e->guard - area;
            break;
        }
    if (!e) {
        if (t->count >= GA_MAX_BUFFERS)
            return 0;
        struct ga_slab *s = 0;
        for (u32 i = 0; i < ga_nslabs; i++)
            if (ga_slabs[i].slot_size == slot && ga_slabs[i].used < ga_slabs[i].nslots) {
                s = &ga_slabs[i];
                break;
            }
        if (!s) {
            u64 nslots = GA_SLAB_BYTES / slot;
            if (nslots == 0)
                nslots = 1;
            if (t->arena_used + nslots * slot > GA_ARENA_SIZE)
                nslots = (GA_ARENA_SIZE - t->arena_used) / slot;
            if (nslots == 0 || ga_nslabs >= GA_MAX_SLABS)
                return 0;
            s = &ga_slabs[ga_nslabs++];
            s->base = t->arena + t->arena_used;
            s->slot_size = (u32)slot;
            s->nslots = (u32)nslots;
            s->used = 0;
            t->arena_used += nslots * slot;
        }
        base = s->base + (u64)s->used++ * slot;
        e = &t->buf[t->count++];
        e->guard = base + area;
        e->slot_size = (u32)slot;
    }
    e->start = (e->guard - n) & ~(u64)(GA_ALIGN - 1);
    e->size = n;
    e->state = GA_LIVE;
    return (void *)(uintptr_t)e->start;
}

/* Return a buffer to its slab; its guard stays protected. */
static void ga_free(void *p)
{
    struct ga_table *t = &guard_table;
    for (u32 i = 0; i < t->count; i++)
        if (t->buf[i].state == GA_LIVE && t->buf[i].start == (u64)(uintptr_t)p) {
            t->buf[i].state = GA_FREE;
            return;
        }
}

/* Ask the host to protect every guard listed so far. */
static inline void ga_guards_ready(void)
{
    outl(GA_PORT, guard_table.count);
}

#endif /* GUARDALLOC_H */
