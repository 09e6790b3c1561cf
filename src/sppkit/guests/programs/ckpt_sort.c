/*
 * ckpt_sort - an in-place heapsort of 4096 u32 (16 KiB, 4 pages) under checkpointing.
 *
 * Phases, each ended by checkpoint_signal(phase) on port 0xF5:
 *
 *   1      fill `data` with pseudo-random values     (dense)
 *   2      build the heap                            (dense)
 *   3..6   four quarters of the sort-down            (dense: sifts touch the whole heap)
 *   7      nudge param_fixups elements by +-1 and restore the order by local
 *          insertion moves                           (sparse)
 *
 * Sorting is the case where 128-byte tracking saves little: nearly every sub-page
 * of the array is rewritten in every phase.  Returns 0 if the array ends sorted,
 * 1 otherwise, and prints a checksum.
 */
#include "sppkit_rt.h"
#include "ckpt_signal.h"

#define N 4096u

SPPKIT_PAGE_ALIGNED u32 data[N];
volatile u64 param_fixups = 8;
u64 sort_phase;

static inline __attribute__((always_inline)) void sift_down(u32 start, u32 end)
{
    u32 root = start;
    for (;;) {
        u32 child = 2 * root + 1;
        if (child >= end)
            return;
        u32 cv = rt_read32(&data[child]);
        if (child + 1 < end) {
            u32 rv = rt_read32(&data[child + 1]);
            if (rv > cv) {
                child++;
                cv = rv;
            }
        }
        u32 r = rt_read32(&data[root]);
        if (r >= cv)
            return;
        rt_write32(&data[root], cv);
        rt_write32(&data[child], r);
        root = child;
    }
}

int main(void)
{
    rt_puts("ckpt_sort: heapsort of ");
    rt_put_dec(N);
    rt_puts(" u32\n");

    for (u32 i = 0; i < N; i++)
        rt_write32(&data[i], (u32)ckpt_mix(i));
    rt_write64(&sort_phase, 1);
    checkpoint_signal(1);

    for (u32 i = N / 2; i-- > 0;)
        sift_down(i, N);
    rt_write64(&sort_phase, 2);
    checkpoint_signal(2);

    u32 end = N;
    for (u32 q = 0; q < 4; q++) {
        for (u32 k = 0; k < N / 4 && end > 1; k++) {
            end--;
            u32 top = rt_read32(&data[0]);
            rt_write32(&data[0], rt_read32(&data[end]));
            rt_write32(&data[end], top);
            sift_down(0, end);
        }
        rt_write64(&sort_phase, 3 + q);
        checkpoint_signal(3 + q);
    }

    /* Sparse fix-ups: nudge a few elements, restore the order with local moves. */
    u64 nf = param_fixups;
    for (u64 j = 0; j < nf; j++) {
        u32 i = (u32)(ckpt_mix(0x5000 + j) % N);
        u32 v = rt_read32(&data[i]);
        v = (j & 1) ? v + 1 : v - (v != 0);
        while (i > 0 && rt_read32(&data[i - 1]) > v) {
            rt_write32(&data[i], rt_read32(&data[i - 1]));
            i--;
        }
        while (i + 1 < N && rt_read32(&data[i + 1]) < v) {
            rt_write32(&data[i], rt_read32(&data[i + 1]));
            i++;
        }
        rt_write32(&data[i], v);
    }
    rt_write64(&sort_phase, 7);
    checkpoint_signal(7);

    u64 sum = 0, unsorted = 0;
    for (u32 i = 0; i < N; i++) {
        u32 v = rt_read32(&data[i]);
        if (i && rt_read32(&data[i - 1]) > v)
            unsorted++;
        sum = sum * 31 + v;
    }
    ckpt_put("ckpt_sort", "checksum", sum);
    ckpt_put("ckpt_sort", "out of order", unsorted);
    rt_puts(unsorted ? "ckpt_sort: NOT SORTED\n" : "ckpt_sort: ok\n");
    return unsorted ? 1 : 0;
}
