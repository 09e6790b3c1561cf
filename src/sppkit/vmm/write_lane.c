/*
 * sppkit: the write lane — Vm.write's fast path, compiled.
 *
 * Vm.write begins with a fast path: a one-page write that the processor's
 * translation cache permits outright (a writable mapping, or — with cache_spp — an
 * SPP vector cached with the mapping that permits every sub-page the write touches)
 * is committed at once and counted (writes; page_granular for a page holding a
 * protected sub-page).  This file is the same step over a copy of those cached
 * mappings, kept by vmm/write_lane.py: an entry is installed from the processor's
 * cache, and dropped whenever the processor drops or invalidates mappings.  Anything
 * else — a page without an entry, a sub-page the entry does not permit, a write
 * crossing the page — returns 0, and the caller hands the write to Vm.write.
 *
 * Plain C, no Python headers; built on first use by sppkit/_native.py.
 */
#include <stdint.h>
#include <string.h>

struct lane_entry {
    uint64_t key;       /* gfn + 1; 0 = empty slot */
    uint8_t *host;      /* host address of the page's first byte */
    uint32_t mask;      /* bit i: a write may touch sub-page i (0: the entry permits nothing) */
    uint32_t granular;  /* the page holds a protected sub-page: counts in page_granular */
    uint64_t count;     /* writes committed here since the last fold (granular pages) */
};

struct lane {
    struct lane_entry *slots;
    uint32_t nslots;    /* a power of two */
    uint32_t used;
    int32_t first_byte; /* spp_write_check == "first-byte": only the first byte's sub-page counts */
    int32_t enabled;    /* 0: every write goes to Vm.write (a write observer is registered) */
    uint64_t writes;    /* committed here since the last fold */
    uint64_t granular;  /* of which to pages holding a protected sub-page */
};

static inline uint32_t slot_of(const struct lane *l, uint64_t gfn)
{
    uint64_t x = gfn * 0x9E3779B97F4A7C15ull;
    return (uint32_t)(x >> 32) & (l->nslots - 1);
}

static struct lane_entry *find(struct lane *l, uint64_t gfn)
{
    uint32_t i = slot_of(l, gfn);
    for (uint32_t n = 0; n < l->nslots; n++, i = (i + 1) & (l->nslots - 1)) {
        struct lane_entry *e = &l->slots[i];
        if (e->key == gfn + 1)
            return e;
        if (e->key == 0)
            return 0;
    }
    return 0;
}

/* Commit a write of `size` (1..8) bytes of `value` (little-endian) at `gpa` if the
   lane permits it; 1 = committed and counted, 0 = hand it to Vm.write. */
int sppkit_lane_write(struct lane *l, uint64_t gpa, uint32_t size, uint64_t value)
{
    uint32_t off = (uint32_t)(gpa & 0xFFF);
    if (!l->enabled || size == 0 || size > 8 || off + size > 4096)
        return 0;
    struct lane_entry *e = find(l, gpa >> 12);
    if (!e)
        return 0;
    uint32_t s0 = off >> 7, s1 = l->first_byte ? s0 : (off + size - 1) >> 7;
    uint32_t need = (uint32_t)(((2ull << s1) - 1) & ~((1ull << s0) - 1));
    if ((e->mask & need) != need)
        return 0;
    memcpy(e->host + off, &value, size);
    l->writes++;
    if (e->granular) {
        l->granular++;
        e->count++;
    }
    return 1;
}

/* Install or update the entry of `gfn`; returns its slot index, or -1 when the table
   is three-quarters full (the caller folds and clears it). */
int64_t sppkit_lane_put(struct lane *l, uint64_t gfn, uint64_t host, uint32_t mask, uint32_t granular)
{
    struct lane_entry *e = find(l, gfn);
    if (!e) {
        if ((uint64_t)(l->used + 1) * 4 > (uint64_t)l->nslots * 3)
            return -1;
        uint32_t i = slot_of(l, gfn);
        while (l->slots[i].key)
            i = (i + 1) & (l->nslots - 1);
        e = &l->slots[i];
        e->key = gfn + 1;
        e->count = 0;
        l->used++;
    }
    e->host = (uint8_t *)(uintptr_t)host;
    e->mask = mask;
    e->granular = granular;
    return e - l->slots;
}

/* The entry of `gfn` permits nothing from now on (its slot and count stay). */
void sppkit_lane_drop(struct lane *l, uint64_t gfn)
{
    struct lane_entry *e = find(l, gfn);
    if (e)
        e->mask = 0;
}

void sppkit_lane_clear(struct lane *l)
{
    memset(l->slots, 0, sizeof(struct lane_entry) * l->nslots);
    l->used = 0;
}
