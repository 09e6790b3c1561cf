"""vm.stats() (plain, JSON-serialisable counters) and vm.spp_memory()."""

from __future__ import annotations

import json

import pytest

from sppkit import Decision, Vm

from vmm_helpers import FULL, G1, M2, MODES, PAGE, spp_vm

BASE = 0x10000000
GFN = BASE >> 12


@pytest.mark.parametrize("mode", MODES)
def test_counters(mode):
    vm = spp_vm(mode)
    vm.set_subpage_access(GFN + 1, [0x0000FFFF])
    vm.set_subpage_access(GFN + 2, [0])
    answers = iter([Decision.EMULATE, Decision.UNPROTECT, Decision.STOP])
    vm.on_violation(lambda ev: next(answers, Decision.SKIP))

    assert vm.write(BASE, b"plain").committed  # unprotected page: not page-granular
    assert vm.write(BASE + PAGE, b"allowed").committed  # protected page, writable sub-page
    assert vm.write(BASE + PAGE + 0x800, b"emulated").committed  # EMULATE
    assert vm.write(BASE + 2 * PAGE + 0x180, b"u").committed  # UNPROTECT
    assert not vm.write(BASE + 2 * PAGE, b"s").committed  # STOP
    assert not vm.write(BASE + 2 * PAGE + 0x200, b"k").committed  # SKIP
    assert vm.write(BASE + 2 * PAGE + 0x180, b"u").committed  # unprotected sub-page now
    st = vm.stats()
    assert json.loads(json.dumps(st)) == st
    assert st["writes"] == 7
    assert st["page_granular"] == 6
    assert st["violations"] == 4
    assert st["exits_avoided"] == 2
    assert st["spp_misses"] == (2 if mode == "lazy" else 0)  # first write + after UNPROTECT
    assert st["decisions"] == {"skip": 1, "emulate": 1, "unprotect": 1, "stop": 1}
    assert st["readonly_writes"] == 0 and st["dirty_log_faults"] == 0
    assert st["top_pages"][0] == {"gfn": GFN + 2, "violations": 3}
    assert {"gfn": GFN + 1, "violations": 1} in st["top_pages"]
    assert {"gfn": GFN + 1, "subpage": 16, "violations": 1} in st["top_subpages"]
    assert {"gfn": GFN + 2, "subpage": 3, "violations": 1} in st["top_subpages"]
    assert st["top_page_granular"][0] == {"gfn": GFN + 2, "writes": 4}
    assert st["counters_exact"] is True
    assert len(vm.stats(top=1)["top_pages"]) == 1

    vm.reset_stats()
    st = vm.stats()
    assert st["writes"] == 0 and st["violations"] == 0 and st["top_pages"] == []


def test_stats_before_anything_and_without_spp():
    vm = Vm()
    vm.add_memslot(0, 0, PAGE)
    vm.write(0, b"x")
    st = vm.stats()
    json.dumps(st)
    assert st["writes"] == 1 and st["page_granular"] == 0 and st["violations"] == 0


def test_page_crossing_write_counts():
    vm = spp_vm("eager")
    vm.set_subpage_access(GFN + 1, [0xFFFFFFFE])
    r = vm.write(BASE + PAGE - 1, b"ab")
    assert not r.committed
    st = vm.stats()
    assert st["writes"] == 1 and st["page_granular"] == 1 and st["violations"] == 1
    assert st["top_page_granular"] == [{"gfn": GFN + 1, "writes": 1}]


def test_exits_avoided_is_never_negative():
    vm = spp_vm("eager")
    vm.set_subpage_access(GFN, [0x7FFFFFFF, 0xFFFFFFFE])
    vm.on_violation(lambda ev: Decision.EMULATE)
    r = vm.write(BASE + PAGE - 2, b"abcd")
    assert r.committed and len(r.events) == 2
    st = vm.stats()
    assert st["violations"] == 2
    assert st["exits_avoided"] >= 0, st


# ---------------------------------------------------------------- spp_memory
def test_map_bytes_grow_with_protected_pages_not_with_memory():
    """Access maps are kept for protected pages only: enabling SPP on a GiB of guest
    memory costs a few hundred bytes, not 4 bytes a page (1 MiB here; 512 MiB for the
    512 GiB an engine allows), and unprotecting gives the memory back."""
    vm = Vm()
    vm.add_memslot(0, BASE, 16 * PAGE)
    vm.add_memslot(1, G1, G1)
    vm.add_memslot(2, 0, 3 * PAGE, readonly=True)
    assert vm.spp_memory()["map_bytes"] == 0
    vm.enable_spp("lazy")
    vm.add_memslot(3, 4 * G1, M2)
    mem = vm.spp_memory()
    pages = 16 + G1 // PAGE + 3 + M2 // PAGE
    assert mem["protectable_pages"] == pages
    empty = mem["map_bytes"]
    assert 0 < empty < 1024
    json.dumps(mem)
    vm.set_subpage_access(G1 >> 12, [0x0000FFFF] * 500)
    grown = vm.spp_memory()["map_bytes"]
    assert empty + 500 * 24 < grown < empty + 500 * 200
    assert vm.get_subpage_access((G1 >> 12) + 499, 2) == [0x0000FFFF, FULL]
    vm.set_subpage_access(G1 >> 12, [FULL] * 500)
    assert vm.spp_memory()["map_bytes"] < grown
    vm.delete_memslot(1)
    vm.disable_spp()
    assert vm.spp_memory()["map_bytes"] == 0 and vm.spp_memory()["sppt_bytes"] == 0


@pytest.mark.parametrize("mode", MODES)
def test_sppt_bytes_grow_per_2m_region_not_per_page(mode):
    vm = spp_vm(mode, slots=((0, G1, G1),))
    root_only = vm.spp_memory()["sppt_bytes"]
    assert root_only == PAGE
    seen = []
    for n in range(1, 9):
        region = G1 + (n - 1) * 7 * M2
        # three pages of the region protected: still one L1 table
        vm.set_subpage_access((region >> 12) + 1, [0, 0x1, 0x2])
        vm.write(region + PAGE, b"x")  # lazy: the miss builds it
        mem = vm.spp_memory()
        assert mem["protected_2m_regions"] == n
        seen.append(mem["sppt_bytes"])
    # root + L3 + L2 tables, plus one L1 table per region
    assert seen == [PAGE * (3 + n) for n in range(1, 9)]
    assert vm.spp_memory()["sppt_tables"] == 11


def test_top_counter_prunes_ties_by_key_whatever_the_order_keys_came_in():
    """fix: the pruned table kept, among keys with equal counts at the cut, those
    counted first — so the same counts, counted in another order (an engine handing
    over a batch of counts), kept other keys."""
    from sppkit.vmm.stats import TopCounter

    kept = []
    for order in (range(10), reversed(range(10))):
        c = TopCounter(capacity=6)  # (10 keys: no pruning while counting)
        for k in order:
            c.add(k, 2 if k in (7, 8) else 1)
        c.capacity = 3
        c.prune()
        kept.append(sorted(c.counts))
    assert kept[0] == kept[1] == [0, 7, 8]
