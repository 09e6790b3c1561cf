"""Bad input to HostMemory: a clear TypeError/ValueError/PhysicalAddressError naming the
bad value, and a refused call changes nothing (no frame created, none dropped, no byte
written, the free list and the allocation cursor as they were).

Each case here was found by fuzzing: before the fix it was silently accepted (an int
written as that many zero bytes, a frame keyed 1.5, a bool taken as address 1, frames
dropped from a negative or unaligned range), raised an unclear error (OverflowError,
BufferError, "unsupported operand", "memoryview assignment: lvalue and rvalue have
different structures") after creating a frame, or hung.
"""

from __future__ import annotations

import re
from array import array

import numpy as np
import pytest

from sppkit.arch import HostMemory, PhysicalAddressError
from sppkit.arch.memory import MAX_READ

from arch_helpers import deadline, named


def snapshot(mem: HostMemory) -> tuple:
    """Everything a call may change: every frame's bytes (and which frames have a word
    view), the free list and the allocation cursor."""
    frames = dict(mem._frames)
    return {pfn: bytes(f) for pfn, f in frames.items()}, set(mem._words), list(mem._free), mem._next


def refused(mem: HostMemory, exc: type[Exception], match: str, call) -> None:
    before = snapshot(mem)
    with pytest.raises(exc, match=match):
        call()
    assert snapshot(mem) == before


@pytest.fixture
def mem() -> HostMemory:
    """46-bit memory with some frames in use: allocated ones (one freed, on the free
    list), frames 0 and 1 written directly, and a backed range."""
    m = HostMemory(46)
    a = m.alloc_frame()
    b = m.alloc_frame()
    m.write_u64(a, 0xA)
    m.write_u64(b + 8, 0xB)
    m.free_frame(m.alloc_frame())
    m.write(0, b"frame zero")
    m.write(0x1FF8, b"frame one")
    m.alloc_range(0x2000, backing=bytearray(0x2000))
    return m


# =================================================================== write(hpa, data)
class TestWriteData:
    @pytest.mark.parametrize("data", [5, 0, 2**64, -1, 1.5, "abc", None, [1, 2, 3], (1,), object()])
    def test_not_a_buffer_is_a_type_error_naming_data(self, mem, data):
        # 5 was written as 5 zero bytes, 2**64 an OverflowError, [1, 2, 3] as 3 bytes
        refused(mem, TypeError, re.escape(f"data={data!r:.60}"), lambda: mem.write(0x5000, data))

    def test_data_checked_before_the_address(self, mem):
        refused(mem, TypeError, "data=", lambda: mem.write(mem.limit, 2**64))
        refused(mem, TypeError, "data=", lambda: mem.write(-1, 7))

    def test_memoryview_of_any_format_is_its_raw_bytes(self, mem):
        for hpa in (0x7_0000, 0x7_0FFC):  # within a frame, across two new frames
            raw = array("I", [0x0102_0304, 0x0506_0708])
            mem.write(hpa, memoryview(raw))  # was a BufferError after creating the frame
            assert mem.read(hpa, 8) == raw.tobytes()
            assert mem.read(hpa + 8, 8) == bytes(8)

    def test_memoryview_narrower_than_existing_value(self, mem):
        mem.write_u64(0x3000, 0x1122_3344_5566_7788)
        mem.write(0x3000, memoryview(array("H", [0xAAAA])))
        assert mem.read_u64(0x3000) == 0x1122_3344_5566_AAAA

    def test_memoryview_onto_a_backed_frame(self):
        m = HostMemory(40)
        backing = bytearray(0x2000)
        base = m.alloc_range(0x2000, backing=backing)
        raw = array("Q", [0x0102_0304_0506_0708, 0x1112_1314_1516_1718])
        m.write(base + 0xFF8, memoryview(raw))  # across the two backed frames
        assert bytes(backing[0xFF8:0x1008]) == raw.tobytes()
        assert m.read(base + 0xFF8, 16) == raw.tobytes()

    def test_memoryview_multidimensional_and_strided(self, mem):
        mem.write(0x9000, memoryview(bytes(range(6))).cast("B", (2, 3)))
        assert mem.read(0x9000, 6) == bytes(range(6))
        mem.write(0x9100, memoryview(b"abcdef")[::2])
        assert mem.read(0x9100, 4) == b"ace\x00"
        mem.write(0x9200, memoryview(array("i", [-1, 2]))[::-1])
        assert mem.read(0x9200, 8) == array("i", [2, -1]).tobytes()

    def test_wide_memoryview_past_the_end_creates_no_frame(self, mem):
        # len() of an 'I' view counts items: 2 items "fit" 4 bytes below the limit,
        # its 8 bytes do not -- the frame was created before the error
        view = memoryview(array("I", [1, 2]))
        refused(mem, PhysicalAddressError, "hpa=0x3ffffffffffc", lambda: mem.write(mem.limit - 4, view))


# =================================================================== HostMemory(first_frame=)
class TestFirstFrame:
    @pytest.mark.parametrize("bad", [-4096, -1, 4097, 0x800, 1.5, 4096.0, True, "0x1000", None, np.int64(4096)])
    def test_bad_first_frame_is_a_value_error(self, bad):
        with pytest.raises(ValueError, match=re.escape(f"first_frame={bad!r}")):
            HostMemory(40, first_frame=bad)

    def test_first_frame_within_the_address_space(self):
        with pytest.raises(ValueError, match=re.escape(f"first_frame={1 << 32!r}")):
            HostMemory(32, first_frame=1 << 32)
        m = HostMemory(32, first_frame=(1 << 32) - 4096)
        assert m.alloc_frame() == (1 << 32) - 4096
        assert HostMemory(32, first_frame=0).alloc_frame() == 0

    def test_negative_first_frame_no_longer_allocates_negative_frames(self):
        with pytest.raises(ValueError, match="first_frame=-4096"):
            HostMemory(first_frame=-4096).alloc_frame()  # returned -0x1000, stored pfn -1


# =================================================================== frame(pfn)
class TestFrame:
    @pytest.mark.parametrize("bad", [1.5, 2.0, True, False, "1", None, [1], np.int64(3), np.uint64(5)])
    def test_not_an_int_creates_no_frame(self, bad):
        m = HostMemory(40)
        m.write(0x7000, b"x")  # frame 7 exists; frames 0..5 do not
        refused(m, TypeError, re.escape(f"pfn={bad!r}"), lambda: m.frame(bad))
        assert all(type(k) is int for k in m._frames)

    def test_int_subclass_is_keyed_as_int(self):
        from enum import IntEnum

        class P(IntEnum):
            SEVEN = 7

        m = HostMemory(40)
        f = m.frame(P.SEVEN)
        assert [type(k) for k in m._frames] == [int] and m.frame(7) is f


# =================================================================== read_u64 / write_u64
class TestU64:
    @pytest.mark.parametrize("bad", [1.5, 8.0, True, False, "8", None, np.uint64(8), np.int64(0x5000)])
    def test_read_u64_bad_hpa_is_a_type_error(self, mem, bad):
        refused(mem, TypeError, named("hpa", bad), lambda: mem.read_u64(bad))

    @pytest.mark.parametrize("bad", [1.5, True, False, "8", None, np.uint64(0x5000), np.int64(8)])
    def test_write_u64_bad_hpa_is_a_type_error(self, mem, bad):
        # write_u64(True, 1) wrote at HPA 1
        refused(mem, TypeError, named("hpa", bad), lambda: mem.write_u64(bad, 1))

    @pytest.mark.parametrize("bad", [True, False])
    def test_write_u64_bool_value_is_a_value_error(self, mem, bad):
        # (other bad values are in test_units.py: they were refused already)
        refused(mem, ValueError, re.escape(f"value={bad!r}"), lambda: mem.write_u64(0x5000, bad))

    def test_write_u64_bool_both(self, mem):
        before = snapshot(mem)
        with pytest.raises((TypeError, ValueError), match="True"):
            mem.write_u64(True, True)  # wrote 1 at HPA 1
        assert snapshot(mem) == before

    def test_valid_u64_still_works_at_frame_edges(self):
        m = HostMemory(40)
        for hpa in (0, 0xFF8, 0xFFC, (1 << 40) - 8):
            m.write_u64(hpa, 0x0102_0304_0506_0708)
            assert m.read_u64(hpa) == 0x0102_0304_0506_0708
        with pytest.raises(TypeError, match=named("hpa", True)):
            m.read_u64(True)


# =================================================================== free_frame(hpa)
class TestFreeFrame:
    @pytest.mark.parametrize("bad", [4096.0, True, "0x1000", None, np.uint64(0x100000)])
    def test_not_an_int_is_a_type_error(self, mem, bad):
        refused(mem, TypeError, named("hpa", bad), lambda: mem.free_frame(bad))

    @pytest.mark.parametrize("bad", [-4096, -(1 << 50), 1 << 46, 1 << 60])
    def test_outside_the_space_is_a_physical_address_error(self, mem, bad):
        refused(mem, PhysicalAddressError, named("hpa", bad), lambda: mem.free_frame(bad))


# =================================================================== read(hpa, n)
class TestRead:
    @pytest.mark.parametrize("bad", [8.0, True, "8", None, np.int64(8)])
    def test_bad_length_is_a_type_error(self, mem, bad):
        refused(mem, TypeError, re.escape(f"n={bad!r}"), lambda: mem.read(0, bad))

    def test_bad_address_message_names_it(self, mem):
        refused(mem, TypeError, named("hpa", 1.5), lambda: mem.read(1.5, 1))

    @pytest.mark.parametrize("n", [1 << 45, (1 << 46) - 0x5000, MAX_READ + 1])
    def test_longer_than_max_read_is_refused_before_any_work(self, mem, n):
        """read(0, 2**45) built its result a frame at a time: 2**33 frames, a day's work
        or a MemoryError.  Now the length is refused, naming it and the limit, before
        any frame is looked at or any buffer allocated."""

        class Untouchable(dict):
            def get(self, *a):
                raise AssertionError("a frame was looked up")

        mem._frames = Untouchable(mem._frames)
        refused(mem, ValueError, named("n", n) + r" is more than MAX_READ = 0x40000000 bytes \(1 GiB\)",
                lambda: mem.read(0x5000, n))

    def test_max_read_is_the_boundary(self, mem, monkeypatch):
        from sppkit.arch import memory

        monkeypatch.setattr(memory, "MAX_READ", 0x3000)  # (a real 1-GiB read takes seconds)
        whole = mem.read(0xFFF, 0x3000)  # the longest read: across frames 0..3, frame 1's bytes in it
        assert whole == mem.read(0xFFF, 0x1800) + mem.read(0x27FF, 0x1800)
        assert whole[0x1FF8 - 0xFFF : 0x2001 - 0xFFF] == b"frame one"
        refused(mem, ValueError, named("n", 0x3001) + " is more than MAX_READ = 0x3000",
                lambda: mem.read(0xFFF, 0x3001))
        assert mem.read_u64(0x1FF8) == int.from_bytes(b"frame on", "little")  # read_u64 is unchanged

    def test_a_long_read_past_the_address_space_still_names_the_address(self, mem):
        refused(mem, PhysicalAddressError, named("hpa", 0x5000), lambda: mem.read(0x5000, 1 << 50))


# =================================================================== free_range(hpa, size)
class TestFreeRange:
    @pytest.mark.parametrize(
        "hpa, size, exc, name, value",
        [
            (-8192, 16384, PhysicalAddressError, "hpa", -8192),  # dropped frames 0 and 1
            (-8192, 8192, PhysicalAddressError, "hpa", -8192),
            (0x1800, 0x1000, ValueError, "hpa", 0x1800),  # dropped frame 1
            (0x1000, 0x800, ValueError, "size", 0x800),
            (0, -4096, ValueError, "size", -4096),
            (0, -1, ValueError, "size", -1),
            ((1 << 48) - 1, (1 << 48) - 1, ValueError, "hpa", (1 << 48) - 1),  # hung
            ((1 << 46) - 4096, 8192, PhysicalAddressError, "hpa", (1 << 46) - 4096),
            (1 << 46, 4096, PhysicalAddressError, "hpa", 1 << 46),
            (np.uint64(0), -1, TypeError, "hpa", np.uint64(0)),  # OverflowError
            (0.0, 4096, TypeError, "hpa", 0.0),
            (True, 4096, TypeError, "hpa", True),
            (0, 4096.0, TypeError, "size", 4096.0),
            (0, True, TypeError, "size", True),
            (0, np.int64(8192), TypeError, "size", np.int64(8192)),
            (0, None, TypeError, "size", None),
        ],
    )
    def test_bad_range_drops_nothing(self, mem, hpa, size, exc, name, value):
        with deadline(10):
            refused(mem, exc, named(name, value), lambda: mem.free_range(hpa, size))

    def test_huge_range_visits_only_frames_in_memory(self):
        """The whole 2**52 space is 2**40 frame numbers: only the frames there are visited."""
        m = HostMemory(52)
        m.write(0x5000, b"x")
        m.alloc_frame()
        m.write(1 << 51, b"k")  # just above the first range: kept
        m.write((1 << 52) - 1, b"y")
        with deadline(10):
            m.free_range(0, 1 << 51)
        assert sorted(m._frames) == [1 << 39, ((1 << 52) - 1) >> 12]
        assert m._words.keys() == m._frames.keys()
        with deadline(10):
            m.free_range(0, 1 << 52)
        assert not m._frames and not m._words

    def test_small_range_still_drops_its_frames(self, mem):
        base = mem.alloc_range(0x4000)
        mem.write(base + 0x1000, b"a")
        mem.write(base + 0x3FFF, b"b")
        n = mem.frames_in_use
        mem.free_range(base, 0x4000)
        assert mem.frames_in_use == n - 2 and mem._words.keys() == mem._frames.keys()
        mem.free_range(base, 0)  # an empty range: nothing to do
        with pytest.raises(ValueError, match=named("size", 0x800)):
            mem.free_range(base, 0x800)
