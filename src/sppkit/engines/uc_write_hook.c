/*
 * sppkit: the Unicorn engine's write-protect hook, in C.
 *
 * Unicorn calls it for every guest store to a page mapped read-only (a page whose
 * EPT leaf has W = 0, or a neighbour in the guard band).  It hands the store to the
 * Vm: first to the Vm's write lane (Vm.write's fast path, compiled: see
 * vmm/write_lane.c), which commits and counts the store when the processor's cached
 * mapping permits it; otherwise to the engine's Python hook, which calls Vm.write.
 * The engine decides nothing here.  Two things are the engine's own, as in its
 * Python hook:
 *
 *   - the cover: Unicorn re-reports an unaligned or page-crossing store byte by byte
 *     after the whole access; those re-reports get the whole access's answer;
 *   - 8-byte pieces: Unicorn hands a 16/32-byte vector store over in 8-byte pieces,
 *     which the Python hook decides as one store.  An 8-byte store goes to the lane
 *     only once its instruction is known to store at most 8 bytes.
 *
 * Plain C, no Python headers; built on first use by sppkit/_native.py.  The Unicorn
 * and lane entry points it calls are passed in at run time.
 */
#include <stdbool.h>
#include <stdint.h>

typedef int (*reg_read_fn)(void *uc, int regid, void *value);
typedef bool (*slow_fn)(void *uc, int type, uint64_t address, int size, int64_t value, void *user_data);
typedef int (*lane_write_fn)(void *lane, uint64_t gpa, uint32_t size, uint64_t value);

struct hook {
    reg_read_fn reg_read;
    int32_t rip_reg;
    int32_t use_lane;
    lane_write_fn lane_write;
    void *lane;
    slow_fn slow;
    uint64_t *rips;     /* instructions known to store at most 8 bytes (key rip + 1) */
    uint32_t rip_slots; /* a power of two */
    uint32_t rip_used;
    uint64_t cover_rip, cover_lo, cover_hi;
    int32_t cover_valid, cover_ret;
    uint64_t fast;      /* stores committed by the lane */
};

static inline uint32_t rip_slot(const struct hook *h, uint64_t rip)
{
    return (uint32_t)((rip * 0x9E3779B97F4A7C15ull) >> 32) & (h->rip_slots - 1);
}

static bool rip_known(const struct hook *h, uint64_t rip)
{
    uint32_t i = rip_slot(h, rip);
    for (uint32_t n = 0; n < h->rip_slots; n++, i = (i + 1) & (h->rip_slots - 1)) {
        if (h->rips[i] == rip + 1)
            return true;
        if (h->rips[i] == 0)
            return false;
    }
    return false;
}

/* Remember that the instruction at `rip` stores at most 8 bytes (no-op when the table
   is three-quarters full: such stores keep going to the Python hook). */
void sppkit_uc_add_rip(struct hook *h, uint64_t rip)
{
    if (rip_known(h, rip) || (uint64_t)(h->rip_used + 1) * 4 > (uint64_t)h->rip_slots * 3)
        return;
    uint32_t i = rip_slot(h, rip);
    while (h->rips[i])
        i = (i + 1) & (h->rip_slots - 1);
    h->rips[i] = rip + 1;
    h->rip_used++;
}

bool sppkit_uc_write_prot(void *uc, int type, uint64_t address, int size, int64_t value, void *user_data)
{
    struct hook *h = user_data;
    uint64_t rip;
    if (h->reg_read(uc, h->rip_reg, &rip) != 0)
        return h->slow(uc, type, address, size, value, 0);
    if (h->cover_valid && rip == h->cover_rip && address >= h->cover_lo && address + size <= h->cover_hi
        && (uint64_t)size < h->cover_hi - h->cover_lo)
        return h->cover_ret;
    if (h->use_lane && (size != 8 || rip_known(h, rip))
        && h->lane_write(h->lane, address, (uint32_t)size, (uint64_t)value)) {
        h->fast++;
        h->cover_rip = rip;
        h->cover_lo = address;
        h->cover_hi = address + size;
        h->cover_ret = 1;
        h->cover_valid = 1;
        return true;
    }
    return h->slow(uc, type, address, size, value, 0);
}
