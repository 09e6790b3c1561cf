/*
 * ckpt_signal.h - how the checkpointing workloads (ckpt_*.c) tell the host that a
 * phase ended: one 32-bit `out` of the phase number to port 0xF5.
 *
 * `sppkit checkpoint GUEST --at-port-signal` takes a checkpoint at each such
 * signal (after the `out` has retired: an instruction boundary).  Without a host
 * listening the `out` does nothing, so the workloads run unchanged anywhere.
 */
#ifndef CKPT_SIGNAL_H
#define CKPT_SIGNAL_H

#include "sppkit_rt.h"

#define CKPT_PORT 0xF5

static inline void checkpoint_signal(u32 phase)
{
    outl(CKPT_PORT, phase);
}

/* splitmix64: a stateless 64-bit mixer, so workloads can regenerate keys and values
 * from an index instead of keeping them in (tracked) memory. */
static inline u64 ckpt_mix(u64 x)
{
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

static inline void ckpt_put(const char *prog, const char *what, u64 v)
{
    rt_puts(prog);
    rt_puts(": ");
    rt_puts(what);
    rt_puts(" = ");
    rt_put_hex(v);
    rt_putc('\n');
}

#endif /* CKPT_SIGNAL_H */
