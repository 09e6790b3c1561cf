/*
 * ckpt_kvstore - an open-addressing hash table under memory checkpointing.
 *
 * `table` is 2048 entries of 32 bytes (64 KiB, 16 pages, 4 entries per 128-byte
 * sub-page), linear probing, keys generated from an index by a mixer (nothing but
 * the table and `kv_stats` lives in memory).  Phases, each ended by
 * checkpoint_signal(phase) on port 0xF5:
 *
 *   1  insert param_inserts keys                 (dense: most sub-pages dirty)
 *   2  update param_updates random keys          (sparse: 1 sub-page per update)
 *   3  delete param_deletes random keys          (sparse: tombstones)
 *   4  insert param_reinserts new keys           (sparse: reuse tombstones / probe)
 *
 * then every key is looked up and a checksum printed.  Returns 0 if every lookup
 * agrees with what the phases did, 1 otherwise.  The host may patch param_* before
 * the run.
 */
#include "sppkit_rt.h"
#include "ckpt_signal.h"

#define SLOTS 2048u /* a power of two */
#define EMPTY 0u
#define LIVE 1u
#define DEAD 2u

struct entry {
    u64 key;
    u64 value;
    u32 version;
    u32 state;
    u64 pad;
};
_Static_assert(sizeof(struct entry) == 32, "4 entries per sub-page");

struct kv_stats {
    u64 inserts, updates, deletes, probes, live;
};

SPPKIT_PAGE_ALIGNED struct entry table[SLOTS];
SPPKIT_SUBPAGE_ALIGNED struct kv_stats kv_stats;

volatile u64 param_inserts = 1200;
volatile u64 param_updates = 48;
volatile u64 param_deletes = 24;
volatile u64 param_reinserts = 24;

static inline u64 key_of(u64 i) { return ckpt_mix(i * 2 + 1) | 1; } /* never 0 */

static inline u32 find_slot(u64 key, int for_insert)
{
    u32 h = (u32)(ckpt_mix(key) & (SLOTS - 1));
    for (u32 n = 0; n < SLOTS; n++) {
        u32 s = (h + n) & (SLOTS - 1);
        u32 st = rt_read32(&table[s].state);
        kv_stats.probes++;
        if (st == EMPTY)
            return for_insert ? s : SLOTS;
        if (st == LIVE && rt_read64(&table[s].key) == key)
            return s;
        if (st == DEAD && for_insert)
            return s;
    }
    return SLOTS;
}

static inline void put(u64 key, u64 value)
{
    u32 s = find_slot(key, 1);
    if (s == SLOTS)
        return;
    rt_write64(&table[s].key, key);
    rt_write64(&table[s].value, value);
    rt_write32(&table[s].version, 1);
    rt_write32(&table[s].state, LIVE);
    kv_stats.inserts++;
    kv_stats.live++;
}

int main(void)
{
    u64 n = param_inserts, nu = param_updates, nd = param_deletes, nr = param_reinserts;
    if (n > SLOTS * 3 / 4)
        n = SLOTS * 3 / 4;

    rt_puts("ckpt_kvstore: ");
    rt_put_dec(n);
    rt_puts(" inserts, ");
    rt_put_dec(nu);
    rt_puts(" updates, ");
    rt_put_dec(nd);
    rt_puts(" deletes, ");
    rt_put_dec(nr);
    rt_puts(" re-inserts\n");

    for (u64 i = 0; i < n; i++)
        put(key_of(i), i * 3);
    checkpoint_signal(1);

    for (u64 j = 0; j < nu; j++) {
        u64 i = ckpt_mix(0x1000 + j) % n;
        u32 s = find_slot(key_of(i), 0);
        if (s != SLOTS) {
            rt_write64(&table[s].value, rt_read64(&table[s].value) + 1000 + j);
            rt_write32(&table[s].version, rt_read32(&table[s].version) + 1);
            kv_stats.updates++;
        }
    }
    checkpoint_signal(2);

    for (u64 j = 0; j < nd; j++) {
        u64 i = ckpt_mix(0x2000 + j) % n;
        u32 s = find_slot(key_of(i), 0);
        if (s != SLOTS) {
            rt_write32(&table[s].state, DEAD);
            kv_stats.deletes++;
            kv_stats.live--;
        }
    }
    checkpoint_signal(3);

    for (u64 j = 0; j < nr; j++)
        put(key_of(n + j), 0x7000 + j);
    checkpoint_signal(4);

    /* Verify: every key is present or deleted, as the phases said. */
    u64 sum = 0, found = 0, bad = 0;
    for (u64 i = 0; i < n + nr; i++) {
        u32 s = find_slot(key_of(i), 0);
        if (s == SLOTS)
            continue;
        found++;
        u64 v = rt_read64(&table[s].value);
        if (i >= n ? v != 0x7000 + (i - n) : v < i * 3)
            bad++;
        sum = ckpt_mix(sum ^ v ^ ((u64)rt_read32(&table[s].version) << 40));
    }
    if (found != kv_stats.live)
        bad++;
    ckpt_put("ckpt_kvstore", "live keys", found);
    ckpt_put("ckpt_kvstore", "checksum", sum);
    rt_puts(bad ? "ckpt_kvstore: MISMATCH\n" : "ckpt_kvstore: ok\n");
    return bad ? 1 : 0;
}
