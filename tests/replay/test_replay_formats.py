"""Trace importers and writers on small hand-written files: lackey, CSV, pinatrace,
the native format (.npz, Parquet), malformed records, --strict, detection, shards."""

from __future__ import annotations

import builtins
import gzip

import numpy as np
import pytest

from sppkit.engines.replay import (
    NO_RIP,
    TRACE_DTYPE,
    Diagnostics,
    MalformedRecord,
    MissingDependency,
    TraceFormatError,
    TraceRecorder,
    convert_trace,
    detect_format,
    list_shards,
    open_trace,
    read_trace,
    write_native,
)

LACKEY = """\
==4242== Lackey, an example Valgrind tool
==4242== Copyright (C) 2002-2017, and GNU GPL'd, by Nicholas Nethercote.
==4242== Command: /bin/true
==4242==
 S 7ff000f38,8
I  04016c50,3
 S 1fff000768,8
 L 04228d58,8
 M 0421c7f0,4
I  04016c53,5
 L 1fff000770,8
 S 04228e00,16
I  04016c58,2
==4242==
"""


def _rows(arr):
    return [(int(g), int(s), int(r)) for g, s, r in arr[["gpa", "size", "rip"]].tolist()]


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_bytes(text.encode() if isinstance(text, str) else text)
    return p


# ------------------------------------------------------------------------------- lackey
def test_lackey_stores_and_modifies_with_the_last_instruction_as_ip(tmp_path):
    p = _write(tmp_path, "t.lackey", LACKEY)
    arr = read_trace(p, "lackey")
    assert arr.dtype == TRACE_DTYPE
    assert _rows(arr) == [
        (0x7FF000F38, 8, int(NO_RIP)),  # before any I line: IP unknown
        (0x1FFF000768, 8, 0x04016C50),
        (0x0421C7F0, 4, 0x04016C50),  # M = load + store: a write
        (0x04228E00, 16, 0x04016C53),
    ]


def test_lackey_streams_in_chunks_across_blocks(tmp_path):
    lines = ["==1== x"]
    want = []
    for i in range(5000):
        lines.append(f"I  {0x400000 + i:08x},3")
        lines.append(f" S {0x10000 + 8 * i:08x},8")
        want.append((0x10000 + 8 * i, 8, 0x400000 + i))
    p = _write(tmp_path, "big.lackey", "\n".join(lines) + "\n")
    src = open_trace(p, "lackey", chunk_records=700)
    src.block_bytes = 4096  # many blocks: lines and the IP carried across block edges
    chunks = list(src)
    assert max(len(c) for c in chunks) <= 700
    assert _rows(np.concatenate(chunks)) == want
    assert src.bytes_done == src.bytes_total


def test_lackey_malformed_lines_warn_with_file_and_line(tmp_path):
    text = LACKEY.replace(" L 04228d58,8", "garbage in the log").replace(" M 0421c7f0,4", " M 0421c7fz,4")
    text += " S 1000,0\n S 1000,70000\n"
    p = _write(tmp_path, "bad.lackey", text)
    diag = Diagnostics()
    arr = np.concatenate(list(open_trace(p, "lackey", diagnostics=diag)))
    assert len(arr) == 3
    assert diag.skipped == 4
    assert diag.examples[0].startswith(f"{p}:8: not a lackey line")
    assert diag.examples[1].startswith(f"{p}:9: malformed store")
    assert f"{p}:15: size 0 out of range" in diag.examples[2]
    assert f"{p}:16: size 70000 out of range" in diag.examples[3]


def test_lackey_strict_makes_the_first_malformed_record_fatal(tmp_path):
    p = _write(tmp_path, "bad.lackey", LACKEY.replace(" M 0421c7f0,4", " M 0421c7f0"))
    with pytest.raises(MalformedRecord, match=r"bad\.lackey:9: malformed store"):
        read_trace(p, "lackey", strict=True)


def test_lackey_tolerates_crlf_uppercase_and_no_final_newline(tmp_path):
    p = _write(tmp_path, "w.lackey", "I  0040ABCD,3\r\n S 1FFF0,8\r\n S 20,1")
    assert _rows(read_trace(p, "lackey")) == [(0x1FFF0, 8, 0x40ABCD), (0x20, 1, 0x40ABCD)]


def test_lackey_gzip(tmp_path):
    p = tmp_path / "t.lackey.gz"
    p.write_bytes(gzip.compress(LACKEY.encode()))
    assert len(read_trace(p, "lackey")) == 4
    assert detect_format(p) == "lackey"


# ------------------------------------------------------------------------------- CSV
def test_csv_header_hex_decimal_optional_rip(tmp_path):
    p = _write(tmp_path, "t.csv", "gpa,size,rip\n0x1000,8,0x401000\n4096,4\n 0X2000 , 016 , 7\n\n# comment\n")
    assert _rows(read_trace(p, "csv")) == [(0x1000, 8, 0x401000), (4096, 4, int(NO_RIP)), (0x2000, 16, 7)]


def test_csv_without_header(tmp_path):
    p = _write(tmp_path, "t.csv", "0x1000,8\n0x2000,1,0x10\n")
    assert _rows(read_trace(p, "csv")) == [(0x1000, 8, int(NO_RIP)), (0x2000, 1, 0x10)]


def test_csv_malformed_records(tmp_path):
    p = _write(tmp_path, "t.csv", "gpa,size\n0x1000,8\nnot,numbers\n0x10,8,1,2\n0x10,0\n0x20\n0x30,8\n")
    diag = Diagnostics()
    arr = np.concatenate(list(open_trace(p, "csv", diagnostics=diag)))
    assert _rows(arr) == [(0x1000, 8, int(NO_RIP)), (0x30, 8, int(NO_RIP))]
    assert diag.skipped == 4
    assert [e.split(": ")[0] for e in diag.examples] == [f"{p}:3", f"{p}:4", f"{p}:5", f"{p}:6"]
    with pytest.raises(MalformedRecord, match=r"t\.csv:3: "):
        read_trace(p, "csv", strict=True)


def test_csv_header_only_on_line_one(tmp_path):
    p = _write(tmp_path, "t.csv", "0x1000,8\ngpa,size\n")
    diag = Diagnostics()
    list(open_trace(p, "csv", diagnostics=diag))
    assert diag.skipped == 1 and f"{p}:2:" in diag.examples[0]


# ------------------------------------------------------------------------------- pinatrace
PIN = """\
0x7f3a1c2b4e10: W 0x7ffd8a3c0f18
0x7f3a1c2b4e14: R 0x7ffd8a3c0f20
0x401000: W 0x601040
#eof
"""


def test_pinatrace_writes_with_the_given_size(tmp_path):
    p = _write(tmp_path, "pinatrace.out", PIN)
    assert detect_format(p) == "pinatrace"
    assert _rows(read_trace(p, "pinatrace")) == [(0x7FFD8A3C0F18, 8, 0x7F3A1C2B4E10), (0x601040, 8, 0x401000)]
    assert {int(s) for s in read_trace(p, "pinatrace", size=4)["size"]} == {4}


def test_pinatrace_malformed_and_strict(tmp_path):
    p = _write(tmp_path, "pin.out", PIN.replace("0x401000: W 0x601040", "0x401000 W 0x601040"))
    diag = Diagnostics()
    assert len(np.concatenate(list(open_trace(p, "pinatrace", diagnostics=diag)))) == 1
    assert diag.skipped == 1 and diag.examples[0].startswith(f"{p}:3: ")
    with pytest.raises(MalformedRecord, match=r"pin\.out:3"):
        read_trace(p, "pinatrace", strict=True)
    with pytest.raises(ValueError, match="--size"):
        open_trace(p, "pinatrace", size=0)


# ------------------------------------------------------------------------------- native
def _sample(n=1000, seed=0):
    r = np.random.default_rng(seed)
    arr = np.zeros(n, TRACE_DTYPE)
    arr["gpa"] = r.integers(0, 1 << 47, n, dtype=np.uint64)
    arr["size"] = r.integers(1, 65536, n)
    arr["rip"] = r.integers(0, 1 << 64, n, dtype=np.uint64)
    return arr


def test_native_npz_round_trip_streams_in_chunks(tmp_path):
    arr = _sample(10_000)
    p = tmp_path / "t.npz"
    assert write_native(p, arr) == 10_000
    assert detect_format(p) == "native"
    chunks = list(open_trace(p, "native", chunk_records=999))
    assert max(len(c) for c in chunks) == 999
    got = np.concatenate(chunks)
    assert np.array_equal(got, arr)
    with np.load(p) as z:  # a plain numpy archive too
        assert np.array_equal(z["gpa"], arr["gpa"]) and str(z["format"]).startswith("sppkit-trace")


def test_native_accepts_a_plain_savez_and_a_compressed_one(tmp_path):
    arr = _sample(300)
    p = tmp_path / "plain.npz"
    np.savez_compressed(p, gpa=arr["gpa"], size=arr["size"].astype(np.int32))
    got = read_trace(p, "native", chunk_records=128)
    assert np.array_equal(got["gpa"], arr["gpa"]) and np.array_equal(got["size"], arr["size"])
    assert (got["rip"] == NO_RIP).all()


def test_native_bad_sizes_are_malformed_records(tmp_path):
    p = tmp_path / "z.npz"
    np.savez(p, gpa=np.array([1, 2, 3], np.uint64), size=np.array([8, 0, 4], np.uint32))
    diag = Diagnostics()
    assert len(np.concatenate(list(open_trace(p, "native", diagnostics=diag)))) == 2
    assert diag.examples == [f"{p}: record 1: size 0 out of range (1..65535)"]
    with pytest.raises(MalformedRecord, match="record 1"):
        read_trace(p, "native", strict=True)


def _npz_with_header_version(path, version, stored, **arrays):
    """An .npz whose members are .npy files of the given header version."""
    import io
    import zipfile

    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED) as zf:
        for name, a in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, a, version=version)
            zf.writestr(name + ".npy", buf.getvalue())


@pytest.mark.parametrize("stored", [True, False], ids=["stored", "deflated"])
@pytest.mark.parametrize("version", [(1, 0), (2, 0), (3, 0)])
def test_native_reads_every_npy_header_version(tmp_path, version, stored):
    """numpy writes .npy headers of version 1.0, 2.0 (large headers) and 3.0 (utf-8
    field names); a trace's members may carry any of them."""
    arr = _sample(500)
    p = tmp_path / "v.npz"
    _npz_with_header_version(p, version, stored, gpa=arr["gpa"], size=arr["size"], rip=arr["rip"])
    assert np.array_equal(read_trace(p, "native", chunk_records=128), arr)


def test_native_unknown_npy_header_version_is_a_clear_error(tmp_path):
    arr = _sample(10)
    p = tmp_path / "v.npz"
    _npz_with_header_version(p, (2, 0), True, gpa=arr["gpa"], size=arr["size"])
    raw = bytearray(p.read_bytes())
    at = raw.index(b"\x93NUMPY\x02\x00")
    raw[at + 6] = 7  # header version 7.0
    p.write_bytes(bytes(raw))
    with pytest.raises(TraceFormatError, match=r"header version 7\.0 is not supported"):
        read_trace(p, "native")


def test_native_missing_column_is_a_clear_error(tmp_path):
    p = tmp_path / "x.npz"
    np.savez(p, address=np.arange(3))
    with pytest.raises(TraceFormatError, match="no 'gpa' array"):
        read_trace(p, "native")


def test_parquet_round_trip(tmp_path):
    pytest.importorskip("pyarrow")
    arr = _sample(5000)
    p = tmp_path / "t.parquet"
    write_native(p, arr)
    assert np.array_equal(read_trace(p, "native", chunk_records=1000), arr)


def test_parquet_without_pyarrow_says_what_to_install(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_pyarrow(name, *a, **kw):
        if name == "pyarrow" or name.startswith("pyarrow."):
            raise ImportError("No module named 'pyarrow'")
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    with pytest.raises(MissingDependency, match=r"sppkit\[parquet\]"):
        write_native(tmp_path / "t.parquet", _sample(3))
    (tmp_path / "r.parquet").write_bytes(b"PAR1")
    with pytest.raises(MissingDependency, match="pyarrow"):
        read_trace(tmp_path / "r.parquet", "native")


def test_recorder_is_an_on_write_observer(tmp_path):
    p = tmp_path / "rec.npz"
    rec = TraceRecorder(p, chunk_records=4)
    for i in range(10):
        rec(0x1000 + i, 8, 0x400000 + i if i % 2 else None)
    rec.close()
    got = read_trace(p)
    assert _rows(got) == [(0x1000 + i, 8, 0x400000 + i if i % 2 else int(NO_RIP)) for i in range(10)]


# ------------------------------------------------------------------------------- conversion, shards, detection
def test_convert_lackey_to_native_and_shards(tmp_path):
    p = _write(tmp_path, "t.lackey", LACKEY)
    out = tmp_path / "t.npz"
    info = convert_trace(p, out, "lackey")
    assert info["records"] == 4
    assert np.array_equal(read_trace(out), read_trace(p, "lackey"))
    info = convert_trace(p, tmp_path / "parts", "lackey", shard_records=3)
    files = list_shards(tmp_path / "parts")
    assert [f.name for f in files] == ["part-00000.npz", "part-00001.npz"]
    assert np.array_equal(read_trace(tmp_path / "parts"), read_trace(p, "lackey"))


def test_lackey_shards_carry_the_ip_like_one_file(tmp_path):
    lines = LACKEY.splitlines(keepends=True)
    d = tmp_path / "shards"
    d.mkdir()
    (d / "a").write_text("".join(lines[:7]))  # ends right after "I  04016c50,3"... and a store
    (d / "b").write_text("".join(lines[7:]))  # starts with loads/stores of that instruction
    (d / ".hidden").write_text("garbage")
    whole = tmp_path / "t.lackey"
    whole.write_text(LACKEY)
    assert np.array_equal(read_trace(d, "lackey"), read_trace(whole, "lackey"))


def test_detection_and_errors(tmp_path):
    assert detect_format(_write(tmp_path, "a.log", LACKEY)) == "lackey"
    assert detect_format(_write(tmp_path, "b.txt", "0x10,8\n0x20,4,0x1\n")) == "csv"
    with pytest.raises(TraceFormatError, match="cannot tell the trace format"):
        detect_format(_write(tmp_path, "c.txt", "hello world\n"))
    with pytest.raises(TraceFormatError, match="no such trace"):
        list_shards(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TraceFormatError, match="no trace shards"):
        list_shards(tmp_path / "empty")
    with pytest.raises(TraceFormatError, match="format 'xml'"):
        open_trace(tmp_path / "a.log", "xml")


def test_check_native_path_checks_without_creating(tmp_path):
    from sppkit.engines.replay.formats import check_native_path

    assert check_native_path(tmp_path / "x.npz") == tmp_path / "x.npz"
    with pytest.raises(TraceFormatError, match=r"x\.txt: a native trace is written as \.npz or \.parquet"):
        check_native_path(tmp_path / "x.txt")
    with pytest.raises(FileNotFoundError, match=r"x\.npz: directory .*nodir does not exist"):
        check_native_path(tmp_path / "nodir" / "x.npz")
    assert list(tmp_path.iterdir()) == []


def test_convert_into_an_existing_empty_directory_and_again_elsewhere(tmp_path):
    p = _write(tmp_path, "t.lackey", LACKEY)
    (tmp_path / "parts").mkdir()
    info = convert_trace(p, tmp_path / "parts", "lackey", shard_records=2)
    assert [f.rsplit("/", 1)[1] for f in info["files"]] == ["part-00000.npz", "part-00001.npz"]
    assert _rows(read_trace(tmp_path / "parts")) == _rows(read_trace(p, "lackey"))
    # converting the shards into a new directory with other shard sizes gives the same records
    info = convert_trace(tmp_path / "parts", tmp_path / "one", shard_records=10)
    assert len(info["files"]) == 1
    assert _rows(read_trace(tmp_path / "one")) == _rows(read_trace(p, "lackey"))
