"""Shared by the KVM engine tests (test_engine.py, test_kvm_differential.py, test_kvm_cli.py).

* skip marks that carry the reason KVM or the guest toolchain is unusable here
  (``kvm_status()`` / ``toolchain_status()``): a test never passes silently without them;
* small purpose-made guest programs (freestanding C, the sppkit guest runtime) and a
  builder that compiles them into a per-session cache;
* ``run_engine``: construct a KvmEngine, record every write that reached ``vm.write``
  (the ``Vm.on_write`` observer), run, close.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from sppkit.engines.kvm.binding import kvm_status
from sppkit.guests import build_guest, load_elf, toolchain_status

KVM_OK, KVM_REASON = kvm_status()
GCC_OK, GCC_REASON = toolchain_status()

requires_kvm = pytest.mark.skipif(not KVM_OK, reason=f"KVM not usable: {KVM_REASON}")
requires_gcc = pytest.mark.skipif(not GCC_OK, reason=f"guest toolchain missing: {GCC_REASON}")

PAGE = 4096
SUBPAGE = 128
FULL = 0xFFFFFFFF
M64 = (1 << 64) - 1

# ------------------------------------------------------------------ guest sources

#: K stores of a 32-bit value to area+0x100, each read back; returns how many stuck.
REPEAT_C = r"""
#include "sppkit_rt.h"
#ifndef REPEAT
#define REPEAT 5
#endif
SPPKIT_PAGE_ALIGNED u8 area[SPPKIT_PAGE_SIZE];
u32 stuck;
int main(void)
{
    u32 n = 0;
    for (u32 i = 1; i <= REPEAT; i++) {
        rt_write32(area + 0x100, 0xc0de0000u | i);
        if (rt_read32(area + 0x100) == (0xc0de0000u | i))
            n++;
    }
    rt_write32(&stuck, n);
    rt_puts("repeat: ");
    rt_put_dec(n);
    rt_puts(" stuck\n");
    return (int)n;
}
"""

#: One 8-byte store to area+0x10 between two console lines; returns 7.
STOP_C = r"""
#include "sppkit_rt.h"
SPPKIT_PAGE_ALIGNED u8 area[SPPKIT_PAGE_SIZE];
int main(void)
{
    rt_puts("before\n");
    rt_write64(area + 0x10, 0x1122334455667788ull);
    rt_puts("after\n");
    return 7;
}
"""

#: MODE 1: fxsave64 to area+0x100; MODE 2: lock cmpxchg16b at area+0x200;
#: MODE 3: one 8-byte store crossing from area's first page into its second.
UNEMULATABLE_C = r"""
#include "sppkit_rt.h"
SPPKIT_PAGE_ALIGNED u8 area[2 * SPPKIT_PAGE_SIZE];
int main(void)
{
    rt_puts("unemulatable: start\n");
#if MODE == 1
    __asm__ __volatile__("fxsave64 (%0)" : : "r"(area + 0x100) : "memory");
#elif MODE == 2
    u64 lo = 0, hi = 0;
    __asm__ __volatile__("lock cmpxchg16b (%2)"
                         : "+a"(lo), "+d"(hi)
                         : "r"(area + 0x200), "b"(1ull), "c"(2ull)
                         : "memory", "cc");
#elif MODE == 3
    rt_write64(area + SPPKIT_PAGE_SIZE - 4, 0x1122334455667788ull);
#endif
    rt_puts("unemulatable: done\n");
    return 0;
}
"""

#: 64 pages; one 32-bit store at offset 8 of every page, then all read back.
PAGES_C = r"""
#include "sppkit_rt.h"
#define NPAGES 64
SPPKIT_PAGE_ALIGNED u8 arr[NPAGES * SPPKIT_PAGE_SIZE];
int main(void)
{
    u32 n = 0;
    for (u32 i = 0; i < NPAGES; i++)
        rt_write32(arr + i * SPPKIT_PAGE_SIZE + 8, 0xab000000u | i);
    for (u32 i = 0; i < NPAGES; i++)
        if (rt_read32(arr + i * SPPKIT_PAGE_SIZE + 8) == (0xab000000u | i))
            n++;
    return (int)n;
}
"""

#: An 8-byte store from sub-page 0 (bytes 0x7c-0x7f) into sub-page 1 (0x80-0x83).
SPAN_C = r"""
#include "sppkit_rt.h"
SPPKIT_PAGE_ALIGNED u8 area[SPPKIT_PAGE_SIZE];
int main(void)
{
    rt_write64(area + 0x7c, 0x1122334455667788ull);
    rt_puts("span: done\n");
    return 0;
}
"""

#: Never exits.
SPIN_C = r"""
#include "sppkit_rt.h"
int main(void)
{
    rt_puts("spin\n");
    for (;;)
        rt_barrier();
    return 0;
}
"""

#: A store before and after an `out` to port 0x80 (a host port handler may change
#: the protections there); returns 1 if the second store stuck.
PORT_C = r"""
#include "sppkit_rt.h"
SPPKIT_PAGE_ALIGNED u8 area[SPPKIT_PAGE_SIZE];
int main(void)
{
    rt_write32(area + 0x10, 0x11111111u);
    outb(0x80, 1);
    rt_write32(area + 0x10, 0x22222222u);
    return (int)(rt_read32(area + 0x10) == 0x22222222u);
}
"""


def build_source(source: str, name: str, cache: Path, cflags: tuple[str, ...] = ()):
    """Compile a guest C source (text) into ``cache`` and load it."""
    cache.mkdir(parents=True, exist_ok=True)
    src = cache / f"{name}.c"
    if not src.exists() or src.read_text() != source:
        src.write_text(source)
    return load_elf(build_guest(src, cache_dir=cache, cflags=cflags))


def bundled(name: str):
    """A bundled guest program (selftest, mixed, readback), built in the default cache."""
    return load_elf(build_guest(name))


# ------------------------------------------------------------------ running
@dataclass
class Run:
    engine: object
    result: object
    writes: list[tuple[int, int, int | None]] = field(default_factory=list)  # (gpa, size, rip) seen by vm.write
    memory: dict[int, bytes] = field(default_factory=dict)


def run_engine(image, *, policy=None, cpl: int = 3, engine_cls=None, before_run=None,
               keep: tuple[tuple[int, int], ...] = (), timeout: float = 30.0, **kw) -> Run:
    """Run ``image`` under the KVM engine; ``keep`` = ``(gpa, n)`` ranges read from guest
    memory after the run (also available through ``run.engine.vm`` until it is closed;
    the engine is closed here, the Vm stays readable)."""
    from sppkit.engines.kvm.engine import KvmEngine

    cls = engine_cls or KvmEngine
    eng = cls(image, policy=policy, cpl=cpl, timeout=timeout, **kw)
    writes: list[tuple[int, int, int | None]] = []
    eng.vm.on_write(lambda gpa, size, rip: writes.append((gpa, size, rip)))
    try:
        if before_run is not None:
            before_run(eng)
        result = eng.run()
        memory = {gpa: eng.vm.read(gpa, n) for gpa, n in keep}
    finally:
        eng.close()
    return Run(eng, result, writes, memory)


def touched(off: int, size: int) -> range:
    """Sub-pages of one page touched by ``[off, off + size)`` (``off`` within the page)."""
    return range(off // SUBPAGE, (off + size - 1) // SUBPAGE + 1)


def fragments(gpa: int, size: int) -> list[tuple[int, int, int]]:
    """``(gpa, size, offset into the data)`` per 4-KiB page of a store."""
    out, pos = [], 0
    while pos < size:
        g = gpa + pos
        n = min(size - pos, PAGE - (g % PAGE))
        out.append((g, n, pos))
        pos += n
    return out


def denied_ranges(base: int, maps: dict[int, int]) -> list[tuple[int, int]]:
    """``(start, length)`` of every run of denied sub-pages; ``maps``: page index -> map."""
    ranges = []
    for page, amap in sorted(maps.items()):
        sp = 0
        while sp < 32:
            if (amap >> sp) & 1:
                sp += 1
                continue
            first = sp
            while sp < 32 and not (amap >> sp) & 1:
                sp += 1
            ranges.append((base + page * PAGE + first * SUBPAGE, (sp - first) * SUBPAGE))
    return ranges
