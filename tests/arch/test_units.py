"""Unit tests of sppkit.arch: pure decoders, HostMemory, the builders, bad input.

The hardware rules themselves are tested in tests/conformance/ (one class per rule);
here each function is tested on its own.
"""

from __future__ import annotations

import pickle

import pytest

from sppkit.arch import (
    EPT_ACCESSED,
    EPT_DIRTY,
    EPT_LARGE,
    EPT_R,
    EPT_RWX,
    EPT_SPP,
    EPT_W,
    EPT_X,
    FULL_ACCESS_MAP,
    MT_UC,
    PAGE_1G,
    PAGE_2M,
    PAGE_4K,
    SECONDARY_ENABLE_EPT,
    SECONDARY_SPP,
    SPP_VECTOR_ODD_BITS,
    Access,
    EptBuilder,
    EptMisconfig,
    EptViolation,
    HostMemory,
    Level,
    PhysicalAddressError,
    Processor,
    SppEvent,
    SpptBuilder,
    VmEntryFailure,
    decode_ept_entry,
    decode_eptp,
    decode_sppt_entry,
    make_ept_entry,
    make_eptp,
    map_from_vector,
    subpage_index,
    vector_from_map,
)
from sppkit.arch.sppt import subpages_touched

RWX = 7
WB = 6 << 3


def naive_vector(access_map: int) -> int:
    return sum(1 << (2 * i) for i in range(32) if access_map >> i & 1)


# =====================================================================================
class TestDecodeEptEntry:
    def test_not_present(self):
        e = decode_ept_entry(0x1234_5000 | WB | EPT_LARGE | (1 << 50), Level.PDE)
        assert not e.present and not e.leaf
        assert e.misconfig is None and e.memory_type is None and e.page_size is None

    def test_pte_fields(self):
        raw = 0xABC_D000 | EPT_R | EPT_X | (5 << 3) | (1 << 6) | EPT_ACCESSED | EPT_DIRTY | EPT_SPP | (1 << 63)
        e = decode_ept_entry(raw, 1)
        assert e.level is Level.PTE
        assert (e.present, e.leaf, e.read, e.write, e.execute) == (True, True, True, False, True)
        assert (e.address, e.memory_type, e.ignore_pat) == (0xABC_D000, 5, True)
        assert (e.accessed, e.dirty, e.spp, e.suppress_ve) == (True, True, True, True)
        assert e.page_size == PAGE_4K and e.misconfig is None

    @pytest.mark.parametrize("level, size", [(Level.PDE, PAGE_2M), (Level.PDPTE, PAGE_1G)])
    def test_large_leaf(self, level, size):
        raw = 0x4_0000_0000 | RWX | WB | EPT_LARGE | EPT_SPP | EPT_DIRTY
        e = decode_ept_entry(raw, level)
        assert e.leaf and e.page_size == size and e.address == 0x4_0000_0000
        assert e.spp is False  # bit 61 is meaningful on a 4-KiB PTE only
        assert e.dirty and e.memory_type == 6 and e.misconfig is None

    def test_large_leaf_address_excludes_reserved_low_bits(self):
        e = decode_ept_entry(0x4_0000_0000 | (1 << 12) | RWX | WB | EPT_LARGE, Level.PDE)
        assert e.address == 0x4_0000_0000
        assert "reserved" in e.misconfig

    def test_non_leaf(self):
        e = decode_ept_entry(0x5000 | EPT_R | EPT_W | EPT_ACCESSED | EPT_DIRTY | EPT_SPP, Level.PDPTE)
        assert e.present and not e.leaf and e.address == 0x5000
        assert e.memory_type is None and e.dirty is False and e.spp is False and e.accessed

    def test_pml4e_bit7_reserved_not_large(self):
        e = decode_ept_entry(0x5000 | RWX | EPT_LARGE, Level.PML4E)
        assert not e.leaf and "reserved" in e.misconfig

    def test_pte_bit7_ignored(self):
        e = decode_ept_entry(0x5000 | RWX | WB | EPT_LARGE, Level.PTE)
        assert e.leaf and e.page_size == PAGE_4K and e.misconfig is None

    @pytest.mark.parametrize(
        "raw, level, needle",
        [
            (0x5000 | EPT_W, 1, "write permission without read"),
            (0x5000 | EPT_W | EPT_X | WB, 1, "write permission without read"),
            (0x5000 | RWX | (2 << 3), 1, "memory type 2"),
            (0x5000 | RWX | (7 << 3), 1, "memory type 7"),
            (0x5000 | RWX | (1 << 46), 1, "reserved"),
            (0x5000 | RWX | (1 << 3), 4, "reserved"),
            (0x5000 | RWX | (1 << 6), 3, "reserved"),
        ],
    )
    def test_misconfig_reasons(self, raw, level, needle):
        assert needle in decode_ept_entry(raw, level, 46).misconfig

    def test_maxphyaddr_moves_reserved_boundary(self):
        raw = 0x5000 | RWX | WB | (1 << 40)
        assert decode_ept_entry(raw, 1, 46).misconfig is None
        assert decode_ept_entry(raw, 1, 46).address == 0x5000 | (1 << 40)
        assert "reserved" in decode_ept_entry(raw, 1, 39).misconfig

    def test_bad_level(self):
        with pytest.raises(ValueError):
            decode_ept_entry(0, 5)

    def test_make_ept_entry_round_trip(self):
        raw = make_ept_entry(0x4000_0000, w=False, leaf=True, level=Level.PDPTE, memory_type=MT_UC, accessed=True)
        e = decode_ept_entry(raw, Level.PDPTE)
        assert (e.leaf, e.read, e.write, e.execute, e.memory_type, e.accessed) == (True, True, False, True, MT_UC, True)
        assert raw & EPT_LARGE
        assert make_ept_entry(0x7000) == 0x7000 | EPT_RWX  # a table pointer: no memtype, no bit 7


# =====================================================================================
class TestDecodeEptp:
    def test_fields(self):
        p = decode_eptp(0x1234_5000 | 6 | (3 << 3) | (1 << 6) | (1 << 7))
        assert (p.memory_type, p.walk_length, p.accessed_dirty, p.supervisor_shadow_stack) == (6, 4, True, True)
        assert p.pml4 == p.ep4ta == 0x1234_5000

    def test_no_flags(self):
        p = decode_eptp(0x9000)
        assert (p.memory_type, p.walk_length, p.accessed_dirty, p.supervisor_shadow_stack) == (0, 1, False, False)

    def test_make_eptp(self):
        assert make_eptp(0x9000) == 0x9000 | 6 | (3 << 3)
        assert make_eptp(0x9000, accessed_dirty=True, memory_type=MT_UC) == 0x9000 | (3 << 3) | (1 << 6)
        with pytest.raises(ValueError, match="pml4=0x9001"):
            make_eptp(0x9001)


# =====================================================================================
class TestDecodeSpptEntry:
    @pytest.mark.parametrize("level", [4, 3, 2])
    def test_non_leaf(self, level):
        e = decode_sppt_entry(0x7000 | 1, level)
        assert (e.present, e.address, e.reserved, e.access_map, e.misconfigured) == (True, 0x7000, 0, None, False)
        assert e.name == {4: "L4E", 3: "L3E", 2: "L2E"}[level]

    @pytest.mark.parametrize("bit", [1, 11, 46, 51, 52, 63])
    def test_non_leaf_reserved(self, bit):
        e = decode_sppt_entry(0x7000 | 1 | (1 << bit), 2, 46)
        assert e.reserved == 1 << bit and e.misconfigured

    def test_non_leaf_not_present_is_not_misconfigured(self):
        e = decode_sppt_entry(0x7000 | 0xFFE, 3)
        assert not e.present and e.reserved == 0xFFE and not e.misconfigured

    def test_address_bit_below_maxphyaddr(self):
        e = decode_sppt_entry((1 << 45) | 1, 4, 46)
        assert e.address == 1 << 45 and not e.misconfigured

    def test_l1e(self):
        e = decode_sppt_entry(0, 1)
        assert e.present and e.name == "L1E" and e.access_map == 0 and not e.misconfigured
        e = decode_sppt_entry(0x5555_5555_5555_5555, 1)
        assert e.access_map == FULL_ACCESS_MAP and e.address is None
        e = decode_sppt_entry(1 << 63 | 1, 1)
        assert e.reserved == 1 << 63 and e.misconfigured and e.access_map == 1

    @pytest.mark.parametrize("level", [0, 5, -1, "L1E"])
    def test_bad_level(self, level):
        with pytest.raises(ValueError, match="SPPT level"):
            decode_sppt_entry(0, level)


# =====================================================================================
class TestVectorMap:
    @pytest.mark.parametrize(
        "access_map, vec",
        [(0, 0), (1, 1), (2, 4), (1 << 31, 1 << 62), (FULL_ACCESS_MAP, 0x5555_5555_5555_5555), (0xF0, 0x5500)],
    )
    def test_examples(self, access_map, vec):
        assert vector_from_map(access_map) == vec
        assert map_from_vector(vec) == access_map

    def test_round_trip_and_naive(self):
        for m in [0, 1, 0xDEAD_BEEF, 0x8000_0001, 0x1234_5678, FULL_ACCESS_MAP] + [1 << i for i in range(32)]:
            v = vector_from_map(m)
            assert v == naive_vector(m)
            assert v & SPP_VECTOR_ODD_BITS == 0
            assert map_from_vector(v) == m

    def test_map_from_vector_ignores_odd_bits(self):
        assert map_from_vector(SPP_VECTOR_ODD_BITS) == 0
        assert map_from_vector(SPP_VECTOR_ODD_BITS | 1 | (1 << 62)) == 1 | (1 << 31)

    @pytest.mark.parametrize("bad", [-1, 1 << 32])
    def test_out_of_range(self, bad):
        with pytest.raises(ValueError, match="access map"):
            vector_from_map(bad)


# =====================================================================================
class TestSubpages:
    @pytest.mark.parametrize(
        "gpa, size, expect",
        [
            (0, 1, [0]),
            (127, 1, [0]),
            (127, 2, [0, 1]),
            (128, 128, [1]),
            (128, 129, [1, 2]),
            (0xF7F, 2, [30, 31]),
            (0xFFF, 1, [31]),
            (0, 4096, list(range(32))),
            (0x5_0000_0F80, 128, [31]),
        ],
    )
    def test_subpages_touched(self, gpa, size, expect):
        assert list(subpages_touched(gpa, size)) == expect

    @pytest.mark.parametrize("gpa, i", [(0, 0), (0x7F, 0), (0x80, 1), (0xF7F, 30), (0xF80, 31), (0x1FFF, 31), (0x1000, 0)])
    def test_subpage_index(self, gpa, i):
        assert subpage_index(gpa) == i


# =====================================================================================
class TestHostMemory:
    def test_sparse_reads_are_zero(self):
        mem = HostMemory(46)
        assert mem.read(0x1234_5678, 100) == bytes(100)
        assert mem.read_u64(0x3FFF_FFFF_FFF8) == 0
        assert mem.frames_in_use == 0  # reading creates no frame

    def test_write_read_crossing_frames(self):
        mem = HostMemory(40)
        data = bytes(range(256)) * 40  # 10240 bytes at 0x10_0F00: frames 0x100..0x103
        mem.write(0x10_0F00, data)
        assert mem.read(0x10_0F00, len(data)) == data
        assert mem.read(0x10_0EFF, 2) == b"\x00\x00"
        assert mem.frames_in_use == 4

    @pytest.mark.parametrize("hpa", [0x2000, 0x2FF8, 0x2FF9, 0x2FFC, 0x2FFF])
    def test_u64_at_frame_edges(self, hpa):
        mem = HostMemory(40)
        mem.write_u64(hpa, 0x0102_0304_0506_0708)
        assert mem.read_u64(hpa) == 0x0102_0304_0506_0708
        assert mem.read(hpa, 8) == bytes([8, 7, 6, 5, 4, 3, 2, 1])  # little-endian
        assert mem.read_u64(hpa + 1) == 0x0001_0203_0405_0607

    def test_memoryview_and_bytearray_writes(self):
        mem = HostMemory(40)
        mem.write(0x5000, memoryview(b"abcdef")[1:4])
        mem.write(0x5003, bytearray(b"XY"))
        assert mem.read(0x5000, 6) == b"bcdXY\x00"

    def test_alloc_frame_zeroed_aligned_unique(self):
        mem = HostMemory(40)
        frames = [mem.alloc_frame() for _ in range(50)]
        assert len(set(frames)) == 50
        assert all(f % 4096 == 0 and 0 < f < mem.limit for f in frames)
        mem.write(frames[3] + 100, b"dirty")
        mem.free_frame(frames[3])
        again = mem.alloc_frame()
        assert again not in frames[:3] + frames[4:]
        assert mem.read(again, 4096) == bytes(4096)

    def test_alloc_skips_frames_written_directly(self):
        mem = HostMemory(40, first_frame=0x10_0000)
        mem.write_u64(0x10_0000, 1)
        mem.write_u64(0x10_1000, 1)
        f = mem.alloc_frame()
        assert f == 0x10_2000 and mem.read_u64(0x10_0000) == 1

    def test_free_frame_drops_contents(self):
        mem = HostMemory(40)
        f = mem.alloc_frame()
        mem.write_u64(f, 0xFF)
        n = mem.frames_in_use
        mem.free_frame(f)
        assert mem.frames_in_use == n - 1 and mem.read_u64(f) == 0

    def test_free_frame_errors(self):
        mem = HostMemory(40)
        f = mem.alloc_frame()
        with pytest.raises(ValueError, match=f"hpa={f + 8:#x}"):
            mem.free_frame(f + 8)
        mem.free_frame(f)
        with pytest.raises(ValueError, match="not an allocated frame"):
            mem.free_frame(f)

    @pytest.mark.parametrize("maxphyaddr", [32, 39, 46, 52])
    def test_addresses_at_or_above_limit(self, maxphyaddr):
        mem = HostMemory(maxphyaddr)
        limit = 1 << maxphyaddr
        mem.write_u64(limit - 8, 7)
        assert mem.read_u64(limit - 8) == 7
        assert mem.read(limit - 1, 1) == b"\x00"
        for call in (
            lambda: mem.read(limit, 1),
            lambda: mem.read(limit - 4, 8),
            lambda: mem.read_u64(limit),
            lambda: mem.read_u64(limit - 4),
            lambda: mem.write_u64(limit, 1),
            lambda: mem.write(limit + 0x1000, b"x"),
            lambda: mem.write(limit - 1, b"xy"),
        ):
            with pytest.raises(PhysicalAddressError) as ei:
                call()
            assert "hpa=0x" in str(ei.value) and "maxphyaddr" in str(ei.value)
        assert isinstance(PhysicalAddressError("x"), ValueError)

    def test_error_message_names_the_address(self):
        mem = HostMemory(36)
        with pytest.raises(PhysicalAddressError, match="hpa=0x1000000000"):
            mem.read(1 << 36, 4)

    def test_negative_address(self):
        mem = HostMemory(40)
        for call in (lambda: mem.read(-8, 8), lambda: mem.read_u64(-8), lambda: mem.write_u64(-8, 0), lambda: mem.write(-1, b"x")):
            with pytest.raises(PhysicalAddressError, match="-0x"):
                call()

    def test_bad_values(self):
        mem = HostMemory(40)
        for v in (-1, 1 << 64, 1.0, "1"):
            with pytest.raises(ValueError, match="value="):
                mem.write_u64(0x1000, v)
        with pytest.raises(ValueError, match="negative"):
            mem.read(0x1000, -1)
        with pytest.raises(TypeError, match="hpa must be an int"):
            mem.read(1.5, 1)

    @pytest.mark.parametrize("bad", [31, 53, 46.0, "46"])
    def test_bad_maxphyaddr(self, bad):
        with pytest.raises(ValueError, match="maxphyaddr"):
            HostMemory(bad)

    def test_frame_outside_space(self):
        mem = HostMemory(32)
        with pytest.raises(PhysicalAddressError):
            mem.frame(1 << 20)
        with pytest.raises(PhysicalAddressError):
            mem.frame(-1)

    @staticmethod
    def _words_match(mem: HostMemory) -> None:
        """``_words`` holds exactly the frames of ``_frames``, as their u64 words."""
        assert mem._words.keys() == mem._frames.keys()
        for pfn, f in mem._frames.items():
            for i in (0, 1, 0x1FF):
                assert mem._words[pfn][i] == mem.read_u64((pfn << 12) + 8 * i)

    def test_words_follow_frames(self):
        mem = HostMemory(40)
        a = mem.alloc_frame()
        mem.write_u64(a + 8, 0x0102_0304_0506_0708)
        mem.write_u64(0x5000, 1 << 63)  # a frame created by a write
        r = mem.alloc_range(3 * 4096, backing=bytearray(3 * 4096))
        mem.write_u64(r + 4096 + 0xFF8, 0xAB)
        self._words_match(mem)
        assert mem._words[(a >> 12)][1] == 0x0102_0304_0506_0708
        mem.free_frame(a)
        mem.free_range(r, 3 * 4096)
        self._words_match(mem)
        b = mem.alloc_frame()  # re-used frame: zeroed, and its words too
        assert b == a and mem._words[b >> 12][1] == 0
        self._words_match(mem)

    def test_little_endian_words_fallback(self):
        """The big-endian fallback reads the same values as the native view does here."""
        from sppkit.arch.memory import _LittleEndianWords

        f = bytearray(4096)
        f[8:16] = (0x0102_0304_0506_0708).to_bytes(8, "little")
        f[0xFF8:] = (0xFFFF_0000_0000_0001).to_bytes(8, "little")
        words = _LittleEndianWords(f)
        assert (words[0], words[1], words[0x1FF]) == (0, 0x0102_0304_0506_0708, 0xFFFF_0000_0000_0001)

    def test_walks_through_little_endian_words_fallback(self, monkeypatch):
        """EPT and SPPT walks give the same decisions through the big-endian fallback."""
        from sppkit import Vm
        from sppkit.arch import memory as memory_mod

        monkeypatch.setattr(memory_mod, "_words_of", memory_mod._LittleEndianWords)
        vm = Vm(cache=True)
        vm.add_memslot(0, 0x10000000, 8 * 4096)
        vm.enable_spp("eager")
        vm.set_subpage_access(0x10000, [0x0000FFFF])
        assert all(type(w) is memory_mod._LittleEndianWords for w in vm.memory._words.values())
        assert vm.write(0x10000000, b"ok").committed
        assert not vm.write(0x10000000 + 16 * 128, b"no").committed
        assert vm.write(0x10001000 + 16 * 128, b"ok").committed

    def test_pickle_keeps_words(self):
        mem = HostMemory(40)
        mem.write_u64(0x3000, 0x1234)
        clone = pickle.loads(pickle.dumps(mem))
        assert clone.read_u64(0x3000) == 0x1234
        self._words_match(clone)
        clone.write_u64(0x3000, 0x5678)  # the clone's words view the clone's frames
        assert clone._words[3][0] == 0x5678 and mem._words[3][0] == 0x1234


# =====================================================================================
@pytest.fixture
def mem() -> HostMemory:
    return HostMemory(46)


def translate(mem, eptb, gpa, size=1, access=Access.READ, **kw):
    return Processor(mem, eptb.eptp(), **kw).translate(gpa, size, access)


class TestEptBuilder:
    def test_map_4k(self, mem):
        b = EptBuilder(mem)
        h = mem.alloc_frame()
        b.map(0x1234_5000, h, 0x1000, w=False, memory_type=5)
        walk = b.walk(0x1234_5000)
        assert [lvl for lvl, _, _ in walk] == [Level.PML4E, Level.PDPTE, Level.PDE, Level.PTE]
        assert walk[-1][2] == h | EPT_R | EPT_X | (5 << 3)
        assert translate(mem, b, 0x1234_5ABC) == ((h + 0xABC, 1),)
        with pytest.raises(EptViolation):
            translate(mem, b, 0x1234_5ABC, access=Access.WRITE)

    @pytest.mark.parametrize("page_size, level", [(PAGE_2M, Level.PDE), (PAGE_1G, Level.PDPTE)])
    def test_map_large(self, mem, page_size, level):
        b = EptBuilder(mem)
        b.map(page_size * 3, page_size * 5, page_size * 2, page_size=page_size)
        lvl, _, raw = b.leaf(page_size * 4 + 0x1234)
        assert lvl == level and raw & EPT_LARGE and raw & ~0xFFF & ((1 << 46) - 1) == page_size * 6
        assert translate(mem, b, page_size * 4 + 0x1234) == ((page_size * 6 + 0x1234, 1),)

    def test_leaf_and_walk_unmapped(self, mem):
        b = EptBuilder(mem)
        assert b.leaf(0x5000) is None
        assert len(b.walk(0x5000)) == 1  # stops at the not-present PML4E

    @pytest.mark.parametrize(
        "kw, needle",
        [
            (dict(gpa=0x1001, hpa=0x2000, size=0x1000), "multiples of page_size"),
            (dict(gpa=0x1000, hpa=0x2000, size=0), "multiples"),
            (dict(gpa=0x20_0000, hpa=0x40_1000, size=PAGE_2M, page_size=PAGE_2M), "multiples"),
            (dict(gpa=0x1000, hpa=0x2000, size=0x1000, page_size=0x2000), "page_size"),
            (dict(gpa=0x1000, hpa=0x2000, size=0x1000, memory_type=7), "memory_type"),
            (dict(gpa=0, hpa=0, size=PAGE_2M, page_size=PAGE_2M, spp=True), "4-KiB"),
            (dict(gpa=(1 << 48) - 0x1000, hpa=0, size=0x2000), "48-bit"),
            (dict(gpa=0, hpa=(1 << 46) - 0x1000, size=0x2000), "MAXPHYADDR"),
            (dict(gpa=-0x1000, hpa=0, size=0x1000), "gpa"),
        ],
    )
    def test_map_refuses(self, mem, kw, needle):
        with pytest.raises(ValueError, match=needle):
            EptBuilder(mem).map(**kw)

    def test_map_4k_inside_large_leaf_refused(self, mem):
        b = EptBuilder(mem)
        b.map(0, 0, PAGE_2M, page_size=PAGE_2M)
        with pytest.raises(ValueError, match="split it first"):
            b.map(0x1000, 0x1000, 0x1000)

    def test_unaligned_pml4(self, mem):
        with pytest.raises(ValueError, match="pml4=0x1008"):
            EptBuilder(mem, pml4=0x1008)

    @pytest.mark.parametrize("page_size", [PAGE_2M, PAGE_1G])
    def test_split_keeps_translation(self, mem, page_size):
        b = EptBuilder(mem)
        b.map(page_size, 4 * page_size, page_size, page_size=page_size, w=False, memory_type=1)
        probes = [page_size, page_size + 0x1234, 2 * page_size - 1]
        before = [translate(mem, b, g) for g in probes]
        assert b.split(page_size + 5) is True
        lvl, _, raw = b.leaf(page_size + 0x1234)
        assert lvl == Level(LevelFor(page_size) - 1)
        assert raw & 7 == EPT_R | EPT_X and (raw >> 3) & 7 == 1
        assert [translate(mem, b, g) for g in probes] == before
        with pytest.raises(EptViolation):
            translate(mem, b, page_size + 0x1234, access=Access.WRITE)

    def test_split_nothing(self, mem):
        b = EptBuilder(mem)
        assert b.split(0x5000) is False
        b.map(0x5000, 0x9000, 0x1000)
        assert b.split(0x5000) is False

    def test_split_does_not_make_ignored_bit61_meaningful(self, mem):
        b = EptBuilder(mem)
        s = SpptBuilder(mem)
        b.map(0, 0x4000_0000, PAGE_2M, page_size=PAGE_2M, w=False)
        b.update_leaf(0, set_bits=EPT_SPP)  # bit 61 on a 2-MiB leaf: ignored
        s.set_vector(0x3000, 0x5555_5555_5555_5555)
        cpu = Processor(mem, b.eptp(), secondary_controls=SECONDARY_ENABLE_EPT | SECONDARY_SPP, spptp=s.spptp)
        with pytest.raises(EptViolation):
            cpu.translate(0x3000, 4, Access.WRITE)
        b.split(0)
        with pytest.raises(EptViolation):
            cpu.translate(0x3000, 4, Access.WRITE)

    def test_merge_round_trip(self, mem):
        b = EptBuilder(mem)
        b.map(PAGE_2M, 0x4000_0000, PAGE_2M, page_size=PAGE_2M, x=False)
        b.split(PAGE_2M)
        n = mem.frames_in_use
        assert b.merge(PAGE_2M, Level.PDE) is True
        assert mem.frames_in_use == n - 1  # the page table was freed
        lvl, _, raw = b.leaf(PAGE_2M + 0x5000)
        assert lvl == Level.PDE and raw & EPT_LARGE and raw & 7 == EPT_R | EPT_W
        assert translate(mem, b, PAGE_2M + 0x5123) == ((0x4000_5123, 1),)

    def test_merge_2m_into_1g(self, mem):
        b = EptBuilder(mem)
        b.map(PAGE_1G, 2 * PAGE_1G, PAGE_1G, page_size=PAGE_2M)
        assert b.merge(PAGE_1G, Level.PDPTE) is True
        assert b.leaf(PAGE_1G)[0] == Level.PDPTE
        assert translate(mem, b, PAGE_1G + 0x12_3456) == ((2 * PAGE_1G + 0x12_3456, 1),)

    @pytest.mark.parametrize("spoil", ["perm", "frame", "spp", "hole"])
    def test_merge_refuses_non_uniform(self, mem, spoil):
        b = EptBuilder(mem)
        b.map(0, 0x4000_0000, PAGE_2M)
        if spoil == "perm":
            b.set_writable(0x7000, False)
        elif spoil == "frame":
            b.map(0x7000, 0x9000_0000, 0x1000)
        elif spoil == "spp":
            b.set_spp(0x7000)
        else:
            b.unmap(0x7000, 0x1000)
        assert b.merge(0, Level.PDE) is False
        assert b.leaf(0x8000)[0] == Level.PTE

    def test_merge_refuses_misaligned_frames(self, mem):
        b = EptBuilder(mem)
        b.map(0, 0x4000_1000, PAGE_2M)  # contiguous but not 2-MiB aligned
        assert b.merge(0, Level.PDE) is False

    def test_merge_level_checked(self, mem):
        with pytest.raises(ValueError, match="merge"):
            EptBuilder(mem).merge(0, Level.PTE)

    def test_merge_keeps_accumulated_permissions(self, mem):
        b = EptBuilder(mem)
        b.map(PAGE_2M, 0x4000_0000, PAGE_2M)
        _, pde_hpa, pde = b.walk(PAGE_2M)[2]
        mem.write_u64(pde_hpa, pde & ~EPT_W)  # write-protect the whole 2 MiB at the PDE
        with pytest.raises(EptViolation):
            translate(mem, b, PAGE_2M, access=Access.WRITE)
        b.merge(PAGE_2M, Level.PDE)
        with pytest.raises(EptViolation):
            translate(mem, b, PAGE_2M, access=Access.WRITE)

    def test_set_spp(self, mem):
        b = EptBuilder(mem)
        b.map(0x5000, 0x9000, 0x1000)
        assert b.set_spp(0x5000) & EPT_SPP
        assert b.leaf(0x5000)[2] & EPT_SPP
        assert not b.set_spp(0x5000, False) & EPT_SPP

    @pytest.mark.parametrize("page_size", [PAGE_2M, PAGE_1G])
    def test_set_spp_refuses_large_leaf(self, mem, page_size):
        b = EptBuilder(mem)
        b.map(0, 0, page_size, page_size=page_size)
        with pytest.raises(ValueError, match="4-KiB PTE"):
            b.set_spp(0x3000)
        assert not b.leaf(0)[2] & EPT_SPP

    def test_set_spp_unmapped(self, mem):
        with pytest.raises(ValueError, match="not mapped"):
            EptBuilder(mem).set_spp(0x5000)

    def test_set_writable_and_unmap(self, mem):
        b = EptBuilder(mem)
        b.map(0x5000, 0x9000, 0x2000)
        assert not b.set_writable(0x5000, False) & EPT_W
        assert b.leaf(0x6000)[2] & EPT_W
        b.unmap(0x5000, 0x1000)
        assert b.leaf(0x5000) is None and b.leaf(0x6000) is not None

    def test_unmap_refuses_cutting_a_large_leaf(self, mem):
        b = EptBuilder(mem)
        b.map(0, 0, PAGE_2M, page_size=PAGE_2M)
        with pytest.raises(ValueError, match="split first"):
            b.unmap(0x1000, 0x1000)

    def test_leaves(self, mem):
        b = EptBuilder(mem)
        b.map(0, 0, PAGE_2M, page_size=PAGE_2M)
        b.map(PAGE_2M + 0x3000, 0x9000, 0x2000)
        got = [(g, lvl) for g, lvl, _ in b.leaves(0, 2 * PAGE_2M)]
        assert got == [(0, Level.PDE), (PAGE_2M + 0x3000, Level.PTE), (PAGE_2M + 0x4000, Level.PTE)]
        assert list(b.leaves(0x1000, 0)) == []


def LevelFor(page_size):
    return {PAGE_2M: Level.PDE, PAGE_1G: Level.PDPTE}[page_size]


class TestSpptBuilder:
    def test_set_and_get_vector(self, mem):
        s = SpptBuilder(mem)
        s.set_vector(0x1234_5000, 0x41)
        assert s.get_vector(0x1234_5000) == 0x41
        assert s.get_vector(0x1234_6000) == 0  # same L1 table: a zero vector
        assert s.get_vector(0x8000_0000_0000 - 0x1000) is None  # no L3 table there
        assert [n for n, _, _ in s.walk(0x1234_5000)] == ["L4E", "L3E", "L2E", "L1E"]

    def test_vectors_seen_by_processor(self, mem):
        b, s = EptBuilder(mem), SpptBuilder(mem)
        b.map(0x5000, 0x9000, 0x1000, w=False, spp=True)
        s.set_vector(0x5000, vector_from_map(0b10))
        cpu = Processor(mem, b.eptp(), secondary_controls=SECONDARY_ENABLE_EPT | SECONDARY_SPP, spptp=s.spptp)
        assert cpu.translate(0x5080, 4, Access.WRITE) == ((0x9080, 4),)
        with pytest.raises(EptViolation):
            cpu.translate(0x5000, 4, Access.WRITE)

    @pytest.mark.parametrize("vec", [2, 1 << 63, SPP_VECTOR_ODD_BITS])
    def test_set_vector_refuses_odd_bits(self, mem, vec):
        s = SpptBuilder(mem)
        with pytest.raises(ValueError, match="odd"):
            s.set_vector(0x5000, vec)
        assert s.get_vector(0x5000) is None  # nothing was allocated or written

    @pytest.mark.parametrize("vec", [-1, 1 << 64])
    def test_set_vector_range(self, mem, vec):
        with pytest.raises(ValueError, match="vector"):
            SpptBuilder(mem).set_vector(0x5000, vec)

    @pytest.mark.parametrize("root", [0x1001, 0x1800, 0x1FFF])
    def test_unaligned_root(self, mem, root):
        with pytest.raises(ValueError, match=f"root={root:#x}"):
            SpptBuilder(mem, root=root)

    def test_root_above_limit(self, mem):
        with pytest.raises(ValueError, match="maxphyaddr"):
            SpptBuilder(mem, root=1 << 46)

    def test_given_root(self, mem):
        s = SpptBuilder(mem, root=0x7000)
        assert s.spptp == 0x7000
        s.set_vector(0, 1)
        assert mem.read_u64(0x7000) & 1

    def test_set_l2_present(self, mem):
        s = SpptBuilder(mem)
        s.set_vector(0x5000, 1)
        assert s.set_l2_present(0x5000, False) is True
        assert s.get_vector(0x5000) is None and s.walk(0x5000)[-1][0] == "L2E"
        assert s.set_l2_present(0x5000, True) is True
        assert s.get_vector(0x5000) == 1  # the table was kept
        assert s.set_l2_present(1 << 40, False) is False

    def test_free(self, mem):
        n = mem.frames_in_use
        s = SpptBuilder(mem)
        s.set_vector(0x5000, 1)
        assert mem.frames_in_use == n + 4
        s.free()
        assert mem.frames_in_use == n


# =====================================================================================
@pytest.fixture
def cpu(mem) -> Processor:
    b = EptBuilder(mem)
    b.map(0, 0x10_0000_0000, 0x4000)
    return Processor(mem, b.eptp())


class TestTranslateBadInput:
    @pytest.mark.parametrize("gpa", [-1, -0x1000, 1.5, "0x1000", None, True])
    def test_bad_gpa(self, cpu, gpa):
        with pytest.raises((ValueError, TypeError), match="gpa="):
            cpu.translate(gpa, 1, Access.READ)

    @pytest.mark.parametrize("size", [0, -1, 1.0, None, True])
    def test_bad_size(self, cpu, size):
        with pytest.raises((ValueError, TypeError), match="size="):
            cpu.translate(0, size, Access.READ)

    def test_beyond_48_bits(self, cpu):
        with pytest.raises(ValueError, match="48-bit"):
            cpu.translate((1 << 48) - 4, 8, Access.READ)
        with pytest.raises(EptViolation):  # the last byte is still a GPA
            cpu.translate((1 << 48) - 1, 1, Access.READ)

    @pytest.mark.parametrize("gpa, size", [(0, 4096 * 2 + 1), (0xFFF, 4098), (0x800, 8192)])
    def test_more_than_two_pages(self, cpu, gpa, size):
        with pytest.raises(ValueError, match=f"size={size}"):
            cpu.translate(gpa, size, Access.READ)

    def test_exactly_two_pages(self, cpu):
        assert len(cpu.translate(0xFFF, 4097, Access.READ)) == 2

    @pytest.mark.parametrize("access", ["writes", "rw", 3, -1, None, 1.0, True])
    def test_unknown_access(self, cpu, access):
        with pytest.raises((ValueError, TypeError), match="access="):
            cpu.translate(0, 1, access)

    @pytest.mark.parametrize("access, kind", [("write", Access.WRITE), ("READ", Access.READ), ("fetch", Access.EXECUTE), (1, Access.WRITE)])
    def test_access_coercion(self, mem, access, kind):
        b = EptBuilder(mem)
        b.map(0, 0x9000, 0x1000, r=True, w=False, x=False)
        cpu = Processor(mem, b.eptp())
        if kind == Access.READ:
            assert cpu.translate(0, 1, access) == ((0x9000, 1),)
        else:
            with pytest.raises(EptViolation) as ei:
                cpu.translate(0, 1, access)
            assert ei.value.qualification & 7 == 1 << kind

    @pytest.mark.parametrize("gla", [-1, 1.5, "x"])
    def test_bad_gla(self, cpu, gla):
        with pytest.raises(ValueError, match="gla="):
            cpu.translate(0, 1, Access.READ, gla=gla)

    def test_gla_with_non_linear(self, cpu):
        with pytest.raises(ValueError, match="gla"):
            cpu.translate(0, 1, Access.READ, gla=0x1000, linear=False)

    def test_paging_structure_execute(self, cpu):
        with pytest.raises(ValueError, match="paging-structure"):
            cpu.translate(0, 8, Access.EXECUTE, paging_structure=True)


class TestProcessorConstruction:
    def test_memory_type(self):
        with pytest.raises(TypeError, match="memory must be a HostMemory"):
            Processor(bytearray(4096), 0)

    def test_spp_write_check_option(self, mem):
        with pytest.raises(ValueError, match="spp_write_check='bytes'"):
            Processor(mem, make_eptp(0x1000), spp_write_check="bytes")

    def test_defaults(self, mem):
        cpu = Processor(mem, make_eptp(0x1000))
        assert cpu.secondary_controls == SECONDARY_ENABLE_EPT
        assert cpu.ept_enabled and not cpu.spp_enabled and cpu.cache is None
        assert cpu.spp_write_check == "all-touched"

    @pytest.mark.parametrize(
        "kw, needle",
        [
            (dict(eptp=-1), "eptp="),
            (dict(eptp=1 << 64), "eptp="),
            (dict(spptp=True), "spptp="),
            (dict(secondary_controls=1 << 32), "32 bits"),
            (dict(secondary_controls="2"), "secondary_controls="),
        ],
    )
    def test_load_controls_bad_values(self, mem, kw, needle):
        cpu = Processor(mem, make_eptp(0x1000))
        with pytest.raises(ValueError, match=needle):
            cpu.load_controls(**kw)
        assert cpu.eptp == make_eptp(0x1000)

    def test_vm_entry_failure_is_error_7(self, mem):
        with pytest.raises(VmEntryFailure) as ei:
            Processor(mem, make_eptp(0x1000), secondary_controls=SECONDARY_SPP)
        assert ei.value.error_number == 7 and "error 7" in str(ei.value)
        assert isinstance(ei.value, ValueError)


class TestExitObjects:
    @pytest.mark.parametrize("cls, reason", [(EptViolation, 48), (EptMisconfig, 49), (SppEvent, 66)])
    def test_pickle_round_trip(self, cls, reason):
        e = cls(0x18A, 0x5123, 0x7000, level="PTE", entry=0x9001, entry_hpa=0x3018, detail="why")
        f = pickle.loads(pickle.dumps(e))
        assert type(f) is cls and f.reason == reason
        assert (f.qualification, f.gpa, f.gla, f.level, f.entry, f.entry_hpa, f.detail) == (
            0x18A, 0x5123, 0x7000, "PTE", 0x9001, 0x3018, "why"
        )
        assert str(f) == str(e)

    def test_messages(self):
        assert "SPP miss" in str(SppEvent(0x800, 0x5000, None))
        assert "SPP misconfiguration" in str(SppEvent(0x1000, 0x5000, None))
        assert SppEvent(0x1800, 0, None).is_miss and SppEvent(0x1000, 0, None).is_misconfig
        s = str(EptViolation(0x182, 0x5123, None, level="PDE", entry=0, entry_hpa=0x2000))
        assert "gpa=0x5123" in s and "qualification=0x182" in s and "PDE" in s and "0x2000" in s
        assert EptViolation(0x182, 0, None).is_write and not EptViolation(0x181, 0, None).is_write


class TestCacheAfterAccessedDirtyEnabled:
    """docs/modelling.md, translation cache: a write hitting a cached mapping whose leaf
    is not yet dirty walks again to set D when EPT A/D flags are enabled — also when
    A/D was switched on (same EP4TA) after the mapping was cached."""

    def test_write_sets_dirty_after_ad_switched_on(self):
        from sppkit.arch import EPT_DIRTY, Access, EptBuilder, HostMemory, Processor

        mem = HostMemory()
        ept = EptBuilder(mem)
        ept.map(0x1000, mem.alloc_frame(), 0x1000)
        cpu = Processor(mem, ept.eptp(accessed_dirty=False), cache=True)
        cpu.translate(0x1000, 8, Access.WRITE)  # cached with A/D off: D stays clear
        assert not ept.leaf(0x1000)[2] & EPT_DIRTY
        cpu.load_controls(eptp=ept.eptp(accessed_dirty=True))
        cpu.translate(0x1000, 8, Access.WRITE)
        assert ept.leaf(0x1000)[2] & EPT_DIRTY

    def test_read_hit_does_not_set_dirty(self):
        from sppkit.arch import EPT_DIRTY, Access, EptBuilder, HostMemory, Processor

        mem = HostMemory()
        ept = EptBuilder(mem)
        ept.map(0x1000, mem.alloc_frame(), 0x1000)
        cpu = Processor(mem, ept.eptp(accessed_dirty=True), cache=True)
        cpu.translate(0x1000, 8, Access.READ)
        cpu.translate(0x1000, 8, Access.READ)
        assert not ept.leaf(0x1000)[2] & EPT_DIRTY


class TestBackedRangesAreLazy:
    """alloc_range(backing=...) makes no frame up front (it made two memoryviews a page:
    a second and 130 MB of Python objects per GiB of guest RAM); a backed frame enters
    the frame tables when first used, and reads, writes and table walks see the backing
    whether it was touched or not."""

    def test_a_large_backing_costs_nothing_up_front(self):
        import mmap

        mem = HostMemory(46)
        try:
            ram = mmap.mmap(-1, 4 << 30, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | 0x4000)  # NORESERVE
        except OSError as e:  # (a host with strict overcommit)
            pytest.skip(f"this host refuses a lazily backed 4-GiB mapping: {e}")
        try:
            base = mem.alloc_range(4 << 30, backing=ram)
            assert not mem._frames and not mem._words
            assert mem.frames_in_use == (4 << 30) >> 12
            ram[0x12345678:0x12345680] = (0x1122334455667788).to_bytes(8, "little")  # behind the memory's back
            assert mem.read_u64(base + 0x12345678) == 0x1122334455667788
            assert mem.read(base + 0x12345676, 4) == bytes([0, 0, 0x88, 0x77])
            assert not mem._frames  # reading makes no frame
            mem.write(base + (3 << 30) + 0xFFE, b"abcd")  # across two untouched frames
            assert ram[(3 << 30) + 0xFFE:(3 << 30) + 0x1002] == b"abcd"
            assert len(mem._frames) == 2 and mem._words.keys() == mem._frames.keys()
            assert mem.read(base + (3 << 30) + 0xFFE, 4) == b"abcd"
        finally:
            del mem
            ram.close()

    def test_a_table_walk_reads_an_untouched_backed_frame(self):
        mem = HostMemory(40)
        backing = bytearray(0x4000)
        base = mem.alloc_range(0x4000, backing=backing)
        ept = EptBuilder(mem)
        ept.map(0x5000, base + 0x3000, 0x1000)
        # move the leaf table into the backed range, written there behind the memory's back
        pml4 = ept.eptp() & ~0xFFF
        pdpt = mem.read_u64(pml4) & ~0xFFF
        pd = mem.read_u64(pdpt) & ~0xFFF
        pt = mem.read_u64(pd) & ~0xFFF
        backing[0x1000:0x2000] = mem.read(pt, 0x1000)
        assert (base + 0x1000) >> 12 not in mem._words
        mem.write_u64(pd, (mem.read_u64(pd) & 0xFFF) | (base + 0x1000))
        cpu = Processor(mem, ept.eptp(), secondary_controls=SECONDARY_ENABLE_EPT)
        assert cpu.translate(0x5010, 8, Access.READ)[0].hpa == base + 0x3010

    def test_freed_backed_frames_read_zeros_and_are_reused_zeroed(self):
        mem = HostMemory(40)
        backing = bytearray(b"\xAA" * 0x3000)
        base = mem.alloc_range(0x3000, backing=backing)
        assert mem.read(base + 0x1000, 2) == b"\xAA\xAA"
        mem.free_range(base + 0x1000, 0x1000)  # the middle frame, never touched
        assert mem.read(base + 0x1000, 2) == b"\0\0" and mem.read(base + 0x2000, 2) == b"\xAA\xAA"
        assert mem.frames_in_use == 2
        mem.free_frame(base)  # a backed frame freed: its pfn is reused, zeroed, not the backing
        assert mem.alloc_frame() == base and mem.read(base, 2) == b"\0\0" and backing[:2] == b"\xAA\xAA"
        with pytest.raises(ValueError, match="not an allocated frame"):
            mem.free_frame(base + 0x1000)

    def test_alloc_frame_and_alloc_range_keep_clear_of_backed_ranges(self):
        mem = HostMemory(40)
        base = mem.alloc_range(0x3000, backing=bytearray(0x3000))
        pfns = {mem.alloc_frame() >> 12 for _ in range(8)}
        assert not any(base >> 12 <= p < (base + 0x3000) >> 12 for p in pfns)
        other = mem.alloc_range(0x2000)
        assert other >= base + 0x3000 or other + 0x2000 <= base
