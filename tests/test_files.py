"""sppkit._files.read_regular: the one reader of users' input files."""

from __future__ import annotations

import pytest

from sppkit._files import FileTooLarge, NotRegularFile, read_regular


def test_a_huge_limit_allocates_nothing_up_front(tmp_path):
    """The limit bounds what is read, not what is asked for: a flat binary with
    --memory 512G used to be read with f.read(512 GiB + 1), a MemoryError."""
    f = tmp_path / "code.bin"
    f.write_bytes(b"\x90" * 5000)
    assert read_regular(f, 512 << 30) == b"\x90" * 5000
    assert read_regular(f, 1 << 62) == b"\x90" * 5000


def test_limit_is_exact(tmp_path):
    f = tmp_path / "code.bin"
    f.write_bytes(b"x" * 100)
    assert read_regular(f, 100) == b"x" * 100
    with pytest.raises(FileTooLarge, match="100 bytes, more than 99"):
        read_regular(f, 99)
    assert read_regular(f) == b"x" * 100


def test_devices_and_directories_are_refused(tmp_path):
    with pytest.raises(NotRegularFile):
        read_regular("/dev/zero", 1 << 40)
    with pytest.raises(IsADirectoryError):
        read_regular(tmp_path, 10)


def test_head_refuses_before_the_rest_is_read(tmp_path, monkeypatch):
    """``head`` sees the first bytes first: a 360 MB non-ELF given as a guest used to be
    read whole (400 MB of memory) before "not an ELF file"."""
    from sppkit.guests import GuestImageError, load_elf

    f = tmp_path / "big.npz"
    with open(f, "wb") as w:
        w.write(b"PK\x03\x04")
        w.truncate(64 << 20)
    seen = []

    def head(first):
        seen.append(len(first))
        raise ValueError("no")

    with pytest.raises(ValueError, match="no"):
        read_regular(f, 1 << 30, head)
    assert seen == [64]
    import tracemalloc

    tracemalloc.start()
    try:
        with pytest.raises(GuestImageError, match=r"not an ELF file \(starts with b'PK\\x03\\x04'"):
            load_elf(f)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, peak  # (read whole: 64 MiB)
    assert read_regular(f, 1 << 30, lambda first: None)[:4] == b"PK\x03\x04"


def test_a_file_that_grows_past_the_limit_is_refused_with_its_size(tmp_path, monkeypatch):
    """A file that grows while read: the refusal gave the bytes read so far ("201 bytes,
    more than 200") as its size."""
    import os as _os

    f = tmp_path / "grows"
    f.write_bytes(b"x" * 100)
    real_fstat = _os.fstat
    calls = []

    def fstat(fd):
        calls.append(fd)
        if len(calls) == 1:
            st = real_fstat(fd)
            with open(f, "ab") as w:  # it grows right after being measured
                w.write(b"y" * 500)
            return st
        return real_fstat(fd)

    monkeypatch.setattr("sppkit._files.os.fstat", fstat)
    with pytest.raises(FileTooLarge, match="600 bytes, more than 200"):
        read_regular(f, 200)
