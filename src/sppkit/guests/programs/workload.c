/*
 * workload - ordinary compiled code with an occasional store next to protected data.
 *
 * What a guest kernel's hot path looks like to SPP: hashing, a hash-table insert, a
 * histogram, a ring log, all in unprotected memory, and now and then an update of a
 * statistics counter that shares a page with a structure worth protecting:
 *
 *   shared_page  0x000-0x07F  guarded  u64[16]  the structure to protect (sub-page 0)
 *                0x080-0x0FF  stats    u64[16]  written every `param_stats_every`
 *                                               records (sub-page 1)
 *
 * Per record the loop does about 60 instructions, 9 of them stores (table slot,
 * table value, histogram, four ring words, checksum, record count): a mix of loads,
 * ALU work, branches and stores as compiled by gcc -O2.  Every
 * `param_stats_every` records it adds to stats[] (one store into shared_page), so
 * with a policy protecting `guarded` about 1 store in 9 * param_stats_every + 1
 * goes through the write-protect path and is allowed.  `guarded` is written only
 * when `param_touch_guarded` is non-zero (once, at the end).  The host may patch
 * the param_* words before the run.  Prints the record count and a checksum of
 * everything written, and returns its low byte, so a lost or misplaced store changes
 * the output and the exit code.
 */
#include "sppkit_rt.h"

#define TABLE_SLOTS 4096          /* u64 keys + u64 values: 64 KiB */
#define RING_WORDS  1024
#define HIST_BINS   256

struct shared_page {
    u64 guarded[16];                       /* 0x000: sub-page 0 */
    u64 stats[16] SPPKIT_SUBPAGE_ALIGNED;  /* 0x080: sub-page 1 */
    u8 rest[SPPKIT_PAGE_SIZE - 0x100];
};

_Static_assert(sizeof(struct shared_page) == SPPKIT_PAGE_SIZE, "one page");

/* The shared page sits between two pages the loop never writes: the Unicorn engine
   traps stores to a write-protected page's two neighbours as well (its guard band for
   page-crossing stores), so hot data there would take the write-protect path too. */
struct zone {
    u8 cold_before[SPPKIT_PAGE_SIZE];
    struct shared_page page;
    u8 cold_after[SPPKIT_PAGE_SIZE];
};

struct zone zone SPPKIT_PAGE_ALIGNED;
#define shared_page zone.page
SPPKIT_EXPORT_FIELD(guarded, zone, 0x1000, 0x80);
SPPKIT_EXPORT_FIELD(stats, zone, 0x1080, 0x80);

volatile u64 param_records = 20000;
volatile u64 param_stats_every = 11;
volatile u64 param_touch_guarded = 0;

static u64 table_keys[TABLE_SLOTS] SPPKIT_PAGE_ALIGNED;
static u64 table_vals[TABLE_SLOTS] SPPKIT_PAGE_ALIGNED;
static u64 ring[RING_WORDS] SPPKIT_PAGE_ALIGNED;
static u32 hist[HIST_BINS] SPPKIT_PAGE_ALIGNED;
static volatile u64 checksum;
static volatile u64 records_done;

static inline u64 next_rand(u64 *s)
{
    u64 x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *s = x;
    return x;
}

static inline u64 hash_key(u64 k)
{
    u64 h = 0xcbf29ce484222325ull;
    for (int i = 0; i < 8; i++) {
        h ^= (k >> (8 * i)) & 0xff;
        h *= 0x100000001b3ull;
    }
    return h;
}

int main(void)
{
    u64 n = param_records;
    u64 every = param_stats_every ? param_stats_every : 1;
    u64 seed = 0x9e3779b97f4a7c15ull;
    u64 sum = 0;
    u64 until_stats = every;

    for (u64 i = 0; i < n; i++) {
        u64 key = next_rand(&seed) & 0xffffff;  /* repeats: inserts and updates */
        u64 h = hash_key(key);
        u64 slot = h & (TABLE_SLOTS - 1);
        for (int probe = 0; probe < 8; probe++) {
            u64 k = table_keys[slot];
            if (k == 0 || k == key + 1)
                break;
            slot = (slot + 1) & (TABLE_SLOTS - 1);
        }
        rt_write64(&table_keys[slot], key + 1);
        rt_write64(&table_vals[slot], table_vals[slot] + h);
        rt_write32(&hist[h >> 56], hist[h >> 56] + 1);
        u64 r = (i * 4) & (RING_WORDS - 1);
        rt_write64(&ring[r], key);
        rt_write64(&ring[r + 1], h);
        rt_write64(&ring[r + 2], slot);
        rt_write64(&ring[r + 3], sum);
        sum = sum * 31 + (h ^ slot);
        checksum = sum;
        records_done = i + 1;
        if (--until_stats == 0) {
            until_stats = every;
            rt_write64(&shared_page.stats[i & 15], rt_read64(&shared_page.stats[i & 15]) + 1);
        }
    }
    if (param_touch_guarded)
        rt_write64(&shared_page.guarded[0], sum);

    u64 all = sum;
    for (int i = 0; i < 16; i++)
        all = all * 31 + shared_page.stats[i];
    rt_puts("workload: ");
    rt_put_dec(records_done);
    rt_puts(" records, checksum ");
    rt_put_hex(all);
    rt_putc('\n');
    return (int)((all ^ (all >> 8) ^ (all >> 16)) & 0xff);
}
