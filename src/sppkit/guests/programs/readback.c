/*
 * readback - write a pattern across `target` and check every write by reading it back.
 *
 * `target` is 4 page-aligned pages (16 KiB).  In every 128-byte sub-page the guest
 * does 8 stores: 1, 2, 4 and 8 bytes naturally aligned, 2, 4 and 8 bytes unaligned,
 * and one 8-byte store crossing into the next sub-page (at the last sub-page of
 * pages 0-2 that store crosses a 4 KiB page boundary; at the very end of `target`
 * it is a 4-byte store kept inside).  Each store is read back at once.  Before
 * each store the current contents are read, and the pattern is inverted if it
 * already matches, so a dropped store is always detected.
 *
 * Prints the tally (per size too) and the first few failures as target+offset,
 * and returns the number of writes that did NOT stick: 0 with no protection.
 *
 * Exported: target (object, 16384 B, page aligned), result_total, result_stuck,
 * result_failed (objects, u32), for the host to read after the run.
 */
#include "sppkit_rt.h"

#define TARGET_PAGES  4
#define TARGET_SIZE   (TARGET_PAGES * SPPKIT_PAGE_SIZE)
#define MAX_REPORTED  8

SPPKIT_PAGE_ALIGNED u8 target[TARGET_SIZE];
u32 result_total;
u32 result_stuck;
u32 result_failed;

struct probe {
    u16 offset; /* within the sub-page; may run past its end */
    u8 size;
};

/* The stores done in every sub-page, in order. */
static const struct probe probes[] = {
    {0, 1}, {2, 2}, {4, 4}, {8, 8},      /* aligned */
    {17, 2}, {21, 4}, {35, 8},           /* unaligned, inside the sub-page */
    {124, 8},                            /* crosses into the next sub-page (or page) */
};
#define NPROBES (sizeof(probes) / sizeof(probes[0]))

static u32 failed_by_size[9];
static u32 total_by_size[9];

static u64 pattern(u32 k, unsigned size)
{
    /* Every byte non-zero, distinct per write index. */
    u64 v = 0x0101010101010101ull * ((k % 0xfd) + 1);
    v ^= (u64)k * 0x9e3779b97f4a7c15ull;
    v |= 0x0101010101010101ull;
    if (size < 8)
        v &= (1ull << (size * 8)) - 1;
    return v;
}

int main(void)
{
    u32 k = 0, reported = 0;

    rt_puts("readback: target at ");
    rt_put_hex((u64)(uintptr_t)target);
    rt_puts(", ");
    rt_put_dec(TARGET_PAGES);
    rt_puts(" pages\n");

    for (u32 sp = 0; sp < TARGET_PAGES * SPPKIT_SUBPAGES; sp++) {
        for (u32 j = 0; j < NPROBES; j++, k++) {
            u32 off = sp * SPPKIT_SUBPAGE_SIZE + probes[j].offset;
            unsigned size = probes[j].size;
            if (off + size > TARGET_SIZE) { /* last sub-page: stay inside target */
                off = TARGET_SIZE - 8;
                size = 4;
            }
            u8 *p = &target[off];
            u64 want = pattern(k, size);
            if (rt_read(p, size) == want)
                want = ~want & (size < 8 ? (1ull << (size * 8)) - 1 : ~0ull);
            rt_write(p, size, want);
            u64 got = rt_read(p, size);
            total_by_size[size]++;
            if (got != want) {
                failed_by_size[size]++;
                rt_write32(&result_failed, rt_read32(&result_failed) + 1);
                if (reported++ < MAX_REPORTED) {
                    rt_puts("readback: did not stick: target+");
                    rt_put_hex(off);
                    rt_puts(" (");
                    rt_put_dec(size);
                    rt_puts(" bytes) wrote ");
                    rt_put_hex(want);
                    rt_puts(" read ");
                    rt_put_hex(got);
                    rt_putc('\n');
                }
            } else {
                rt_write32(&result_stuck, rt_read32(&result_stuck) + 1);
            }
            rt_write32(&result_total, rt_read32(&result_total) + 1);
        }
    }

    for (unsigned size = 1; size <= 8; size *= 2) {
        rt_puts("readback: size ");
        rt_put_dec(size);
        rt_puts(": ");
        rt_put_dec(total_by_size[size]);
        rt_puts(" writes, ");
        rt_put_dec(failed_by_size[size]);
        rt_puts(" did not stick\n");
    }
    rt_puts("readback: ");
    rt_put_dec(result_total);
    rt_puts(" writes, ");
    rt_put_dec(result_stuck);
    rt_puts(" stuck, ");
    rt_put_dec(result_failed);
    rt_puts(" did not stick\n");
    return (int)result_failed;
}
