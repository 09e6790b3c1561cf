/*
 * ckpt_log - a log-structured store under checkpointing: batches of appends, each
 * batch ended by a commit record and checkpoint_signal(batch) on port 0xF5.
 *
 *   log_area   48 KiB, records appended at log_hdr.head: {u32 len, u32 seq,
 *              u64 sum} then `len` payload bytes, 8-byte aligned
 *   log_index  u32 offset of each record (4 KiB)
 *   log_hdr    head, count, checksum, commits (its own sub-page)
 *
 * Every append writes the record at the tail, one index slot and the header: a
 * checkpoint holds the new tail bytes plus one sub-page each of index and header,
 * where 4-KiB dirty logging takes whole pages.  param_batches batches of
 * param_per_batch records (16..136 payload bytes).  At the end the log is re-read
 * and every record checked; returns 0 if all are intact, 1 otherwise.
 */
#include "sppkit_rt.h"
#include "ckpt_signal.h"

#define LOG_BYTES (48u * 1024u)
#define MAX_RECORDS 1024u

struct rec_hdr {
    u32 len;
    u32 seq;
    u64 sum;
};

struct log_hdr {
    u64 head;
    u64 count;
    u64 checksum;
    u64 commits;
};

SPPKIT_PAGE_ALIGNED u8 log_area[LOG_BYTES];
SPPKIT_PAGE_ALIGNED u32 log_index[MAX_RECORDS];
SPPKIT_SUBPAGE_ALIGNED struct log_hdr log_hdr;

volatile u64 param_batches = 6;
volatile u64 param_per_batch = 40;

static inline u64 payload_word(u32 seq, u32 k) { return ckpt_mix(((u64)seq << 20) | k); }

static inline int append(u32 seq)
{
    u32 len = 16 + (u32)(ckpt_mix(seq) % 121);
    u64 head = rt_read64(&log_hdr.head);
    u64 need = (sizeof(struct rec_hdr) + len + 7) & ~7ull;
    u64 count = rt_read64(&log_hdr.count);
    if (head + need > LOG_BYTES || count >= MAX_RECORDS)
        return 0;
    u8 *p = &log_area[head];
    u64 sum = 0;
    u32 k = 0;
    for (; k + 8 <= len; k += 8) {
        u64 w = payload_word(seq, k);
        rt_write64(p + sizeof(struct rec_hdr) + k, w);
        sum += w;
    }
    for (; k < len; k++) {
        u8 b = (u8)payload_word(seq, k);
        rt_write8(p + sizeof(struct rec_hdr) + k, b);
        sum += b;
    }
    rt_write32(p, len);
    rt_write32(p + 4, seq);
    rt_write64(p + 8, sum);
    rt_write32(&log_index[count], (u32)head);
    rt_write64(&log_hdr.head, head + need);
    rt_write64(&log_hdr.count, count + 1);
    rt_write64(&log_hdr.checksum, ckpt_mix(rt_read64(&log_hdr.checksum) ^ sum));
    return 1;
}

int main(void)
{
    u64 nb = param_batches, per = param_per_batch;
    rt_puts("ckpt_log: ");
    rt_put_dec(nb);
    rt_puts(" batches of ");
    rt_put_dec(per);
    rt_puts(" appends\n");

    u32 seq = 0;
    for (u64 b = 1; b <= nb; b++) {
        for (u64 j = 0; j < per; j++)
            if (append(seq))
                seq++;
        rt_write64(&log_hdr.commits, rt_read64(&log_hdr.commits) + 1);
        checkpoint_signal((u32)b);
    }

    /* Re-read the log: every record intact and in sequence. */
    u64 bad = 0, check = 0, count = rt_read64(&log_hdr.count);
    for (u64 i = 0; i < count; i++) {
        u8 *p = &log_area[rt_read32(&log_index[i])];
        u32 len = rt_read32(p), s = rt_read32(p + 4);
        u64 sum = 0;
        u32 k = 0;
        for (; k + 8 <= len; k += 8)
            sum += rt_read64(p + sizeof(struct rec_hdr) + k);
        for (; k < len; k++)
            sum += rt_read8(p + sizeof(struct rec_hdr) + k);
        if (s != i || sum != rt_read64(p + 8))
            bad++;
        check = ckpt_mix(check ^ sum);
    }
    if (check != rt_read64(&log_hdr.checksum))
        bad++;
    ckpt_put("ckpt_log", "records", count);
    ckpt_put("ckpt_log", "bytes", rt_read64(&log_hdr.head));
    ckpt_put("ckpt_log", "checksum", check);
    rt_puts(bad ? "ckpt_log: CORRUPT\n" : "ckpt_log: ok\n");
    return bad ? 1 : 0;
}
