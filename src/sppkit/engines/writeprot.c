/*
 * sppkit: the Unicorn engine's native write-protect hook.
 *
 * Unicorn calls this for every guest store to a page mapped read-only (a page whose
 * EPT leaf has W = 0, or a neighbour in the guard band).  It is a software TLB in
 * front of the Python hook: for a page the Vm has described with
 * Vm.fast_write_entry() — "a write touching only these sub-pages is committed as is,
 * until the translation epoch moves" — it commits an allowed store itself and counts
 * it; everything else (a store touching a protected sub-page, a page-crossing store,
 * a page or an instruction it does not know yet) goes to the Python hook, which hands
 * it to Vm.write.  The Python side empties the table whenever the Vm's translation
 * epoch moves (INVEPT, EPT change), exactly when the processor model drops its
 * cached mappings, and collects the counts into the Vm's statistics.
 *
 * Built on first use with the host C compiler (see native.py); plain C, no Python
 * headers.  The Unicorn entry point it needs (uc_reg_read) is passed in at run time.
 */
#include <stdbool.h>
#include <stdint.h>
#include <string.h>

typedef int (*reg_read_fn)(void *uc, int regid, void *value);
typedef bool (*slow_fn)(void *uc, int type, uint64_t address, int size, int64_t value, void *user_data);

struct page_entry {
    uint64_t key;       /* gfn + 1; 0 = empty slot */
    uint32_t allowed;   /* bit i = sub-page i may be written */
    uint32_t protected_page; /* counts in the Vm's page_granular */
    uint64_t count;     /* writes committed here since the last collection */
};

struct state {
    /* set by Python */
    uint8_t *ram;       /* host address of guest-physical 0 */
    uint64_t ram_size;
    reg_read_fn reg_read;
    int32_t rip_reg;
    int32_t enabled;    /* 0: every call goes to the slow hook */
    slow_fn slow;
    void *slow_data;
    struct page_entry *pages;
    uint64_t *rips;     /* instructions known to store at most 8 bytes (key rip + 1) */
    uint32_t page_slots; /* powers of two */
    uint32_t rip_slots;
    /* shared with Python: the last whole access decided (Unicorn re-reports the bytes
       of a page-crossing store one by one after the whole store) */
    uint64_t cover_rip, cover_lo, cover_hi;
    int32_t cover_valid, cover_ret;
    /* counters */
    uint64_t pending;   /* writes committed here and not yet collected */
    uint64_t fast;      /* writes committed here, ever */
    uint64_t slow_calls;
    uint32_t page_used, rip_used;
};

static inline uint64_t mix(uint64_t x)
{
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    return x;
}

static struct page_entry *find_page(struct state *s, uint64_t gfn)
{
    uint32_t mask = s->page_slots - 1;
    uint32_t i = (uint32_t)mix(gfn) & mask;
    for (uint32_t n = 0; n < s->page_slots; n++, i = (i + 1) & mask) {
        struct page_entry *e = &s->pages[i];
        if (e->key == gfn + 1)
            return e;
        if (e->key == 0)
            return NULL;
    }
    return NULL;
}

static bool known_rip(struct state *s, uint64_t rip)
{
    uint32_t mask = s->rip_slots - 1;
    uint32_t i = (uint32_t)mix(rip) & mask;
    for (uint32_t n = 0; n < s->rip_slots; n++, i = (i + 1) & mask) {
        if (s->rips[i] == rip + 1)
            return true;
        if (s->rips[i] == 0)
            return false;
    }
    return false;
}

/* Python: describe a page (returns 0, or -1 when the table is full). */
int sppkit_wp_add_page(struct state *s, uint64_t gfn, uint32_t allowed, uint32_t protected_page)
{
    uint32_t mask = s->page_slots - 1;
    uint32_t i = (uint32_t)mix(gfn) & mask;
    if (s->page_used * 4 >= s->page_slots * 3)
        return -1;
    for (;; i = (i + 1) & mask) {
        struct page_entry *e = &s->pages[i];
        if (e->key == gfn + 1 || e->key == 0) {
            if (e->key == 0) {
                s->page_used++;
                e->count = 0;
            }
            e->key = gfn + 1;
            e->allowed = allowed;
            e->protected_page = protected_page;
            return 0;
        }
    }
}

/* Python: an instruction that stores at most 8 bytes at once (not a vector store
   that Unicorn reports in 8-byte pieces). */
int sppkit_wp_add_rip(struct state *s, uint64_t rip)
{
    uint32_t mask = s->rip_slots - 1;
    uint32_t i = (uint32_t)mix(rip) & mask;
    if (s->rip_used * 4 >= s->rip_slots * 3)
        return -1;
    for (;; i = (i + 1) & mask) {
        if (s->rips[i] == rip + 1)
            return 0;
        if (s->rips[i] == 0) {
            s->rips[i] = rip + 1;
            s->rip_used++;
            return 0;
        }
    }
}

/* Python: forget every page (the translation epoch moved).  Counts must have been
   collected first. */
void sppkit_wp_clear_pages(struct state *s)
{
    memset(s->pages, 0, sizeof(struct page_entry) * s->page_slots);
    s->page_used = 0;
    s->pending = 0;
}

/* Python: the writes counted per page since the last call, into gfns/counts/prot
   (at most max entries); returns how many; the counts restart at 0. */
uint32_t sppkit_wp_collect(struct state *s, uint64_t *gfns, uint64_t *counts, uint32_t *prot, uint32_t max)
{
    uint32_t n = 0;
    for (uint32_t i = 0; i < s->page_slots && n < max; i++) {
        struct page_entry *e = &s->pages[i];
        if (e->key && e->count) {
            gfns[n] = e->key - 1;
            counts[n] = e->count;
            prot[n] = e->protected_page;
            e->count = 0;
            n++;
        }
    }
    s->pending = 0;
    return n;
}

/* The UC_HOOK_MEM_WRITE_PROT callback. */
bool sppkit_wp_hook(void *uc, int type, uint64_t address, int size, int64_t value, void *user_data)
{
    struct state *s = (struct state *)user_data;
    uint64_t rip = 0, off = address & 0xFFF;
    struct page_entry *e;
    uint32_t need;

    if (!s->enabled || size < 1 || size > 8 || address + (uint64_t)size > s->ram_size || off + (uint64_t)size > 4096)
        goto slow;
    if (s->reg_read(uc, s->rip_reg, &rip) != 0)
        goto slow;
    if (s->cover_valid && s->cover_rip == rip && s->cover_lo <= address && address + (uint64_t)size <= s->cover_hi
        && (uint64_t)size < s->cover_hi - s->cover_lo)
        return s->cover_ret != 0; /* a piece of a store already decided as a whole */
    if (size == 8 && !known_rip(s, rip))
        goto slow; /* maybe the first 8 bytes of a vector store: Python decides it whole */
    e = find_page(s, address >> 12);
    if (e == NULL)
        goto slow;
    need = (uint32_t)((((uint64_t)2 << ((off + size - 1) >> 7)) - 1) & ~(((uint64_t)1 << (off >> 7)) - 1));
    if ((e->allowed & need) != need)
        goto slow; /* a protected sub-page: an SPP violation, decided by the Vm */
    memcpy(s->ram + address, &value, (size_t)size); /* little-endian host (checked by Python) */
    e->count++;
    s->pending++;
    s->fast++;
    s->cover_rip = rip;
    s->cover_lo = address;
    s->cover_hi = address + (uint64_t)size;
    s->cover_valid = 1;
    s->cover_ret = 1;
    return true;
slow:
    s->slow_calls++;
    return s->slow(uc, type, address, size, value, s->slow_data);
}
