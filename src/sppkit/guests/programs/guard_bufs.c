/*
 * guard_bufs - buffers of many sizes from guardalloc.h, one injected overflow.
 *
 *   init     allocate param_nbuffers buffers (1 B .. 6000 B, 40 sizes), fill each
 *            exactly to its last byte, then ga_guards_ready(): the host protects
 *            the guard sub-page after every buffer
 *   work     rewrite every buffer completely (in bounds: the last byte of each lies
 *            right before its guard), free and reallocate four of them (their slots
 *            and guards are reused), ga_guards_ready() again
 *   overflow copy size + param_overflow_by bytes into buffer #param_overflow_index
 *            (an off-by-N length), byte by byte; param_overflow_by = 0: none
 *
 * Prints a checksum of all buffers; returns 0 (2 if an allocation failed).  The host
 * may patch the param_* words before the run.  With the guards protected and the
 * decision STOP the run ends at the first byte written past the buffer.
 */
#include "sppkit_rt.h"
#include "guardalloc.h"

volatile u64 param_nbuffers = 64;
volatile u64 param_overflow_index = 22; /* a 129-byte buffer */
volatile u64 param_overflow_by = 3;

static const u32 sizes[] = {
    1, 7, 8, 13, 16, 24, 31, 32, 40, 48, 63, 64, 72, 96, 100, 127, 128, 129, 160, 200,
    255, 256, 257, 300, 384, 500, 511, 512, 640, 700, 1000, 1024, 1500, 2000, 2048, 3000,
    4000, 4096, 5000, 6000,
};
#define NSIZES (sizeof(sizes) / sizeof(sizes[0]))

static u8 *bufs[GA_MAX_BUFFERS];
static u64 lens[GA_MAX_BUFFERS];
u64 overflow_written;

static u64 size_of(u64 i) { return sizes[(i * 17 + 3) % NSIZES]; }

/* Fill [p, p+n) - 8-byte stores, then bytes; never a byte past p+n-1. */
static void fill(u8 *p, u64 n, u64 seed)
{
    u64 k = 0;
    for (; k + 8 <= n; k += 8)
        rt_write64(p + k, seed * 0x9e3779b97f4a7c15ull + k);
    for (; k < n; k++)
        rt_write8(p + k, (u8)(seed + k));
}

static u64 checksum(void)
{
    u64 sum = 0;
    for (u64 i = 0; i < param_nbuffers && i < GA_MAX_BUFFERS; i++)
        for (u64 k = 0; k < lens[i]; k++)
            sum = sum * 131 + rt_read8(bufs[i] + k);
    return sum;
}

int main(void)
{
    u64 n = param_nbuffers;
    if (n > GA_MAX_BUFFERS)
        n = GA_MAX_BUFFERS;

    for (u64 i = 0; i < n; i++) {
        lens[i] = size_of(i);
        bufs[i] = ga_alloc(lens[i]);
        if (!bufs[i]) {
            rt_puts("guard_bufs: allocation failed\n");
            return 2;
        }
        fill(bufs[i], lens[i], i);
    }
    rt_puts("guard_bufs: ");
    rt_put_dec(n);
    rt_puts(" buffers, arena used ");
    rt_put_dec(guard_table.arena_used);
    rt_puts(" bytes\n");
    ga_guards_ready();

    for (u64 i = 0; i < n; i++)
        fill(bufs[i], lens[i], i ^ 0x55);
    for (u64 i = 0; i < n && i < 4; i++) {
        u64 j = (i * 13 + 5) % n;
        ga_free(bufs[j]);
        lens[j] = lens[j] > 1 ? lens[j] - 1 : 1; /* same slot size: the slot is reused */
        bufs[j] = ga_alloc(lens[j]);
        if (!bufs[j])
            return 2;
        fill(bufs[j], lens[j], j + 1000);
    }
    ga_guards_ready();
    u64 sum = checksum();

    u64 by = param_overflow_by, idx = param_overflow_index;
    if (by && idx < n) {
        rt_puts("guard_bufs: copying ");
        rt_put_dec(lens[idx] + by);
        rt_puts(" bytes into buffer #");
        rt_put_dec(idx);
        rt_puts(" of ");
        rt_put_dec(lens[idx]);
        rt_puts(" bytes\n");
        u8 *b = bufs[idx];
        for (u64 k = 0; k < lens[idx] + by; k++) {
            rt_write8(b + k, (u8)('A' + k % 26));
            overflow_written++;
        }
    }
    rt_puts("guard_bufs: checksum ");
    rt_put_hex(sum);
    rt_puts(", overflow bytes written ");
    rt_put_dec(overflow_written);
    rt_putc('\n');
    return 0;
}
