"""Shared helpers for the replay tests (imported by name: pytest puts tests/replay on sys.path)."""

from __future__ import annotations

import numpy as np

from sppkit import Decision, Vm
from sppkit.engines.replay import TRACE_DTYPE

FULL = 0xFFFFFFFF


def records(rows) -> np.ndarray:
    """[(gpa, size, rip), ...] → an array of TRACE_DTYPE."""
    out = np.zeros(len(rows), TRACE_DTYPE)
    for i, (g, s, r) in enumerate(rows):
        out[i] = (g, s, r)
    return out


def reference_vm(rows, maps: dict[int, int], *, spp_write_check: str = "all-touched", spp_mode: str = "lazy"):
    """The reference the replay must match: a Vm with memslots covering every touched
    page, SPP enabled, the access maps set, every violation SKIPped (the handler only
    records the IP, as no handler would decide SKIP), and every page-split access fed
    as its own ``vm.write`` call.  Returns ``(vm, {rip: violations})``."""
    pages = set(maps)
    for g, s, _ in rows:
        pages.update(range(g >> 12, ((g + s - 1) >> 12) + 1))
    vm = Vm(spp_write_check=spp_write_check)
    ps = sorted(pages)
    slot = i = 0
    while i < len(ps):
        j = i
        while j + 1 < len(ps) and ps[j + 1] == ps[j] + 1:
            j += 1
        vm.add_memslot(slot, ps[i] << 12, (j - i + 1) << 12)
        slot += 1
        i = j + 1
    vm.enable_spp(spp_mode)
    for g, m in sorted(maps.items()):
        vm.set_subpage_access(g, [m])
    ips: dict = {}

    def handler(ev):
        ips[ev.rip] = ips.get(ev.rip, 0) + 1
        return Decision.SKIP

    vm.on_violation(handler)
    for g, s, r in rows:
        end = g + s
        while g < end:
            k = min(end, (g | 0xFFF) + 1) - g
            vm.write(g, b"\0" * k, rip=r)
            g += k
    return vm, ips


def assert_matches_vm(res, vm, ips) -> None:
    """Every counter of a ReplayResult equals the reference Vm's."""
    st = vm._stats
    assert res.accesses == st.writes
    assert res.page_granular_exits == st.page_granular
    assert res.violations == st.violations
    assert res.spp_misses == st.spp_misses
    assert res.exits_avoided == st.page_granular - st.violations
    pages = res.page_counts()
    assert {g: p for g, (p, v) in pages.items()} == dict(st.page_granular_by_page.counts)
    assert {g: v for g, (p, v) in pages.items() if v} == dict(st.violations_by_page.counts)
    assert res.subpage_violations() == dict(st.violations_by_subpage.counts)
    assert res.ip_violations() == ips
    d = vm.stats(top=5)
    assert [(p["gfn"], p["violations"]) for p in d["top_pages"]] == \
        [(p["gfn"], p["violations"]) for p in sorted(res.top_pages(10**6), key=lambda p: (-p["violations"], p["gfn"]))
         if p["violations"]][:5]
