/*
 * sppkit: the Vm's write cache, in C — Vm.write's first step for engines that make
 * guest stores without calling Python (the Unicorn engine's write-protect hook).
 *
 * Each entry is a copy of what Vm.write_permit says of a page: the host address of its
 * frame and the SPP vector the processor's translation cache holds for it (all ones:
 * the cached mapping is writable).  sppkit_vm_cached_write makes a store of 1 to 8
 * bytes within one page when the entry's vector covers the sub-pages it touches (by
 * the processor's own masks) and counts it — exactly what Vm.write does with such a
 * store — and returns false for anything else, which the caller hands to Vm.write.
 * The Vm fills, empties and folds the counts of this table (vmm/write_cache.py).
 *
 * Built on first use by sppkit/_native.py.
 */
#include <stdbool.h>
#include <stdint.h>

#define NPERMIT 256 /* direct-mapped on the guest frame number */

struct permit {
    uint64_t gfn_plus1; /* 0: empty */
    uint64_t host;      /* the host address of the frame's first byte */
    uint64_t vector;    /* the SPP vector (W at bit 2*s), or all ones */
    uint64_t hits;      /* stores made here since the last sppkit_vm_take_counts */
    uint32_t granular;  /* the page holds a protected sub-page (counted page-granular) */
    uint32_t pad;
};

struct write_cache {
    uint64_t pending;     /* stores made since the last sppkit_vm_take_counts */
    uint64_t masks[1024]; /* the processor's SPP masks: [first << 5 | last] */
    struct permit permits[NPERMIT];
};

bool sppkit_vm_cached_write(struct write_cache *c, uint64_t gpa, int size, int64_t value)
{
    uint64_t off = gpa & 0xFFF, gfn = gpa >> 12;
    if (size < 1 || size > 8 || off + (uint64_t)size > 4096)
        return false;
    struct permit *p = &c->permits[gfn & (NPERMIT - 1)];
    if (p->gfn_plus1 != gfn + 1)
        return false;
    uint64_t mask = c->masks[(off >> 7) << 5 | ((off + size - 1) >> 7)];
    if ((p->vector & mask) != mask)
        return false;
    unsigned char *dst = (unsigned char *)(uintptr_t)(p->host + off);
    uint64_t v = (uint64_t)value;
    for (int i = 0; i < size; i++) /* little-endian, whatever the host */
        dst[i] = (unsigned char)(v >> (8 * i));
    p->hits++;
    c->pending++;
    return true;
}

/* Hand over the counts: the (gfn, hits) pairs of the entries with hits on a
   page-granular page into out (up to max pairs), every entry's hits zeroed; returns
   the number of stores made. */
uint64_t sppkit_vm_take_counts(struct write_cache *c, uint64_t *out, int max, int *npairs)
{
    uint64_t total = c->pending;
    int n = 0;
    if (total) {
        for (int i = 0; i < NPERMIT; i++) {
            struct permit *p = &c->permits[i];
            if (p->hits) {
                if (p->granular && n < max) {
                    out[2 * n] = p->gfn_plus1 - 1;
                    out[2 * n + 1] = p->hits;
                    n++;
                }
                p->hits = 0;
            }
        }
        c->pending = 0;
    }
    *npairs = n;
    return total;
}
