"""Malformed traces and bad options: a clear error naming the file and the problem
(TraceFormatError, or a usage error on the command line), never a raw zlib / zipfile /
tokenize / pyarrow exception, a hang or silently wrong records; and a failed
conversion never destroys its input."""

from __future__ import annotations

import builtins
import importlib.util
import gzip
import io
import json
import re
import struct
import zipfile
import zlib

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sppkit.cli import main
from sppkit.engines.replay import NO_RIP, TRACE_DTYPE, write_native
from sppkit.engines.replay.formats import (
    RIP_CARRY,
    LackeySource,
    NativeWriter,
    TraceFormatError,
    TraceRecorder,
    convert_trace,
    detect_format,
    open_trace,
    read_trace,
)

LACKEY = "I  00401000,4\n S 00601000,8\n S 00601080,8\nI  00401004,4\n M 00601100,4\n" * 20


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _assert_cli_error(r, code, *needles):
    """A one-line error (no traceback, no escaping exception) holding each needle."""
    assert r.exit_code == code, (r.exit_code, r.output, r.exception)
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert "Traceback" not in r.output
    for n in needles:
        assert n in r.output, (n, r.output)


def _records(n=10):
    r = np.zeros(n, TRACE_DTYPE)
    r["gpa"] = (np.arange(n, dtype=np.uint64) + 1) * 0x1000
    r["size"] = 8
    r["rip"] = 0x401000
    return r


# ------------------------------------------------------------------------------- 1. corrupt .gz text traces
def _corrupt_gzip(data: bytes) -> bytes:
    """A gzip stream whose deflate data starts with a reserved block type: zlib.error."""
    z = bytearray(gzip.compress(data))
    z[10] = 0xFF  # first byte after the 10-byte gzip header: BFINAL=1, BTYPE=11 (invalid)
    return bytes(z)


@pytest.fixture
def bad_gz(tmp_path):
    p = tmp_path / "bad.lackey.gz"
    p.write_bytes(_corrupt_gzip(LACKEY.encode()))
    with pytest.raises(zlib.error):  # what the file does to a plain reader
        gzip.decompress(p.read_bytes())
    return p


def test_corrupt_gzip_trace_is_a_trace_format_error(bad_gz):
    with pytest.raises(TraceFormatError, match=r"bad\.lackey\.gz: cannot read: .*invalid block type"):
        read_trace(bad_gz, "lackey")
    with pytest.raises(TraceFormatError, match=r"bad\.lackey\.gz: cannot read"):
        read_trace(bad_gz)


def test_corrupt_gzip_detect_format(tmp_path):
    p = tmp_path / "t.log.gz"  # no format in the name: detect_format reads the head
    p.write_bytes(_corrupt_gzip(LACKEY.encode()))
    with pytest.raises(TraceFormatError, match=r"t\.log\.gz: cannot read"):
        detect_format(p)


def test_corrupt_gzip_while_skipping_an_overlong_line(tmp_path):
    """The loop that skips a line longer than 1 MiB reads the file too."""
    p = tmp_path / "long.lackey.gz"
    good = gzip.compress(b"x" * (3 << 20))  # one 3-MiB line: malformed, skipped to its end...
    bad = _corrupt_gzip(b" S 1000,8\n")  # ...which is in a corrupt second gzip member
    p.write_bytes(good + bad)
    with pytest.raises(TraceFormatError, match=r"long\.lackey\.gz: cannot read"):
        read_trace(p, "lackey")


def test_corrupt_gzip_on_the_command_line(bad_gz, tmp_path):
    r = invoke("replay", bad_gz, "--protect", "0x601000:0x100", "--json")
    _assert_cli_error(r, 2, "bad.lackey.gz: cannot read")
    r = invoke("trace", "convert", bad_gz, tmp_path / "out.npz")
    _assert_cli_error(r, 2, "bad.lackey.gz: cannot read")
    assert not (tmp_path / "out.npz").exists()


# ------------------------------------------------------------------------------- 2. zip-level errors in .npz
def _npy(a: np.ndarray) -> bytes:
    b = io.BytesIO()
    np.lib.format.write_array(b, a)
    return b.getvalue()


def _npz(members: dict[str, bytes], compression=zipfile.ZIP_DEFLATED) -> bytearray:
    b = io.BytesIO()
    with zipfile.ZipFile(b, "w", compression) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return bytearray(b.getvalue())


def _trace_npz(n=10, compression=zipfile.ZIP_DEFLATED) -> bytearray:
    r = _records(n)
    return _npz({"gpa.npy": _npy(r["gpa"]), "size.npy": _npy(r["size"])}, compression)


def _zip_header(data: bytearray, name: bytes, magic: bytes, name_len_at: int, name_at: int) -> int:
    """Offset of the zip header with signature ``magic`` whose file name is ``name``."""
    i = 0
    while (i := data.find(magic, i)) >= 0:
        n = int.from_bytes(data[i + name_len_at : i + name_len_at + 2], "little")
        if data[i + name_at : i + name_at + n] == name:
            return i
        i += 4
    raise AssertionError(name)


def _central(data: bytearray, name: bytes) -> int:
    """Offset of ``name``'s central directory entry."""
    return _zip_header(data, name, b"PK\x01\x02", 28, 46)


def _local(data: bytearray, name: bytes) -> int:
    """Offset of ``name``'s local file header."""
    return _zip_header(data, name, b"PK\x03\x04", 26, 30)


def _bad_name(d):
    d[_local(d, b"gpa.npy") + 30] ^= 0xFF  # BadZipFile: names in directory and header differ


def _bad_crc(d):
    c = _central(d, b"gpa.npy") + 16
    d[c] ^= 0xFF  # BadZipFile: Bad CRC-32, raised as the member's last chunk is read


def _bad_deflate(d):
    d[_local(d, b"gpa.npy") + 30 + len(b"gpa.npy")] = 0xFF  # zlib.error: invalid block type


def _unsupported_method(d):
    c = _central(d, b"gpa.npy") + 10
    d[c : c + 2] = (99).to_bytes(2, "little")  # NotImplementedError: compression method


def _zip_version(d):
    c = _central(d, b"gpa.npy") + 6
    d[c : c + 2] = (99).to_bytes(2, "little")  # NotImplementedError from ZipFile() itself: version 9.9


def _encrypted(d):
    d[_central(d, b"gpa.npy") + 8] |= 1  # RuntimeError: password required
    d[_local(d, b"gpa.npy") + 6] |= 1


def _short_deflate(d):
    """The directory says the compressed data is shorter than it is: the member stops short."""
    c = _central(d, b"gpa.npy") + 20
    d[c : c + 4] = (20).to_bytes(4, "little")
    loc = _local(d, b"gpa.npy") + 18
    d[loc : loc + 4] = (20).to_bytes(4, "little")


@pytest.mark.parametrize("corrupt", [_bad_name, _bad_crc, _bad_deflate, _unsupported_method, _zip_version,
                                     _encrypted, _short_deflate])
def test_zip_errors_in_npz_are_trace_format_errors(tmp_path, corrupt):
    d = _trace_npz(3000)
    corrupt(d)
    p = tmp_path / "t.npz"
    p.write_bytes(bytes(d))
    with pytest.raises(TraceFormatError, match=r"t\.npz: (unreadable native trace|member gpa\.npy)"):
        read_trace(p, chunk_records=100)


@pytest.mark.parametrize("corrupt", [_bad_name, _encrypted])
def test_zip_errors_in_stored_npz(tmp_path, corrupt):
    """Stored members are read in place, past zipfile: their headers are checked too."""
    d = _trace_npz(10, zipfile.ZIP_STORED)
    corrupt(d)
    p = tmp_path / "s.npz"
    p.write_bytes(bytes(d))
    with pytest.raises(TraceFormatError, match=r"s\.npz: member gpa\.npy"):
        read_trace(p)


def test_zip_errors_on_the_command_line(tmp_path):
    d = _trace_npz(100)
    _bad_deflate(d)
    p = tmp_path / "t.npz"
    p.write_bytes(bytes(d))
    r = invoke("replay", p, "--protect", "0x1000:0x100", "--json")
    _assert_cli_error(r, 2, "t.npz: unreadable native trace")


# ------------------------------------------------------------------------------- 3. malformed .npy header
def _raw_npy(descr: bytes, shape: bytes, data: bytes, *, close=True) -> bytes:
    h = b"{'descr': '%s', 'fortran_order': False, 'shape': %s" % (descr, shape)
    if close:
        h += b", }"
    h += b" " * (64 - (10 + len(h) + 1) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(h)) + h + data


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED], ids=["stored", "deflated"])
def test_npy_header_cut_off_is_a_trace_format_error(tmp_path, compression):
    bad = _raw_npy(b"<u8", b"(1,", bytes(8), close=False)  # the dict literal never closes: tokenize.TokenError
    p = tmp_path / "tok.npz"
    p.write_bytes(bytes(_npz({"gpa.npy": bad, "size.npy": bad}, compression)))
    with pytest.raises(TraceFormatError, match=r"tok\.npz: member gpa\.npy: \.npy header is malformed"):
        read_trace(p)


# ------------------------------------------------------------------------------- 4. shape vs member size
def _lying_npz(path, n_claimed, compression, *, pad=True):
    """gpa/size members of 10 records whose headers claim ``n_claimed``, then a pad member."""
    r = _records(10)
    members = {}
    for c in ("gpa", "size"):
        hdr = _npy(np.zeros(n_claimed, r[c].dtype))[: -n_claimed * r[c].dtype.itemsize or None]
        members[c + ".npy"] = hdr + r[c].tobytes()
    if pad:
        members["pad"] = b"\x08\x00" * 64
    path.write_bytes(bytes(_npz(members, compression)))
    return path


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED], ids=["stored", "deflated"])
@pytest.mark.parametrize("claimed", [12, 8])
def test_header_count_must_match_the_member_size(tmp_path, compression, claimed):
    p = _lying_npz(tmp_path / "short.npz", claimed, compression)
    with pytest.raises(TraceFormatError,
                       match=rf"short\.npz: member gpa\.npy: header says {claimed} records but the member holds 80 bytes"):
        read_trace(p, strict=True)


def test_huge_declared_shape_is_an_error_not_a_hang(tmp_path):
    p = tmp_path / "hang.npz"
    members = {"gpa.npy": _raw_npy(b"<u8", b"(%d,)" % 2**60, bytes(8)),
               "size.npy": _raw_npy(b"<u2", b"(%d,)" % 2**60, b"\x08\x00")}
    p.write_bytes(bytes(_npz(members, zipfile.ZIP_DEFLATED)))
    chunks = iter(open_trace(p, "native"))  # before: one record, then 2**40 empty chunks
    with pytest.raises(TraceFormatError, match=r"hang\.npz: member gpa\.npy: header says 1152921504606846976 records"):
        next(chunks)


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED], ids=["stored", "deflated"])
@pytest.mark.parametrize("descr, shape, data, why", [
    (b"<u8", b"(-1,)", bytes(80), r"header shape \(-1,\) is not a record count"),
    (b"<u8", b"(True,)", bytes(8), r"header shape \(True,\) is not a record count"),
    (b"|V0", b"(10,)", b"", r"dtype '\|V0' has no size"),
], ids=["negative", "bool", "zero-itemsize"])
def test_bad_shape_or_dtype_is_a_trace_format_error(tmp_path, compression, descr, shape, data, why):
    p = tmp_path / "bad.npz"
    size = _raw_npy(b"<u2", b"(10,)", b"\x08\x00" * 10)
    p.write_bytes(bytes(_npz({"gpa.npy": _raw_npy(descr, shape, data), "size.npy": size}, compression)))
    with pytest.raises(TraceFormatError, match=r"bad\.npz: member gpa\.npy: " + why):
        read_trace(p, strict=True)


def test_stored_member_sizes_must_agree(tmp_path):
    d = _trace_npz(10, zipfile.ZIP_STORED)
    c = _central(d, b"gpa.npy") + 24  # uncompressed size > stored size
    d[c : c + 4] = (int.from_bytes(d[c : c + 4], "little") + 16).to_bytes(4, "little")
    p = tmp_path / "s.npz"
    p.write_bytes(bytes(d))
    with pytest.raises(TraceFormatError, match=r"s\.npz: member gpa\.npy"):
        read_trace(p)


def test_good_npz_still_reads(tmp_path):
    r = _records(1000)
    for comp in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        p = tmp_path / f"ok{comp}.npz"
        p.write_bytes(bytes(_npz({"gpa.npy": _npy(r["gpa"]), "size.npy": _npy(r["size"]),
                                  "rip.npy": _npy(r["rip"])}, comp)))
        assert np.array_equal(read_trace(p, chunk_records=64), r)
    p = tmp_path / "w.npz"
    write_native(p, r)
    assert np.array_equal(read_trace(p, chunk_records=64), r)
    e = tmp_path / "empty.npz"
    write_native(e, r[:0])
    assert len(read_trace(e)) == 0


# ------------------------------------------------------------------------------- 5, 6. Parquet
def _corrupt_parquet(tmp_path):
    pytest.importorskip("pyarrow")
    p = tmp_path / "c.parquet"
    write_native(p, _records(1000))
    d = bytearray(p.read_bytes())
    d[200:210] = b"\xff" * 10  # inside the first column chunk
    p.write_bytes(bytes(d))
    return p


def test_corrupt_parquet_data_is_a_trace_format_error(tmp_path):
    p = _corrupt_parquet(tmp_path)
    with pytest.raises(TraceFormatError, match=r"c\.parquet: unreadable Parquet trace: "):
        read_trace(p)


def test_corrupt_parquet_pages(tmp_path):
    """Corruption at any offset of the data pages: a TraceFormatError (or records)."""
    pytest.importorskip("pyarrow")
    p = tmp_path / "c.parquet"
    write_native(p, _records(1000))
    good = p.read_bytes()
    footer = int.from_bytes(good[-8:-4], "little")
    for at in range(4, len(good) - footer - 8, 97):
        d = bytearray(good)
        d[at : at + 4] = b"\xff\x00\x7f\x80"
        p.write_bytes(bytes(d))
        try:
            read_trace(p)
        except TraceFormatError as e:
            assert "c.parquet" in str(e)


def test_corrupt_parquet_on_the_command_line(tmp_path):
    p = _corrupt_parquet(tmp_path)
    r = invoke("replay", p, "--protect", "0x1000:0x100", "--json")
    _assert_cli_error(r, 2, "c.parquet: unreadable Parquet trace")


def test_parquet_duplicate_column(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    t = pa.Table.from_arrays([pa.array([0x1000], pa.uint64()), pa.array([0x2000], pa.uint64()),
                              pa.array([8], pa.uint16())], names=["gpa", "gpa", "size"])
    p = tmp_path / "dup.parquet"
    pq.write_table(t, p)
    with pytest.raises(TraceFormatError, match=r"dup\.parquet: column 'gpa' appears twice"):
        read_trace(p)


# ------------------------------------------------------------------------------- 7. convert never destroys input
@pytest.mark.parametrize("suffix", [".npz", ".parquet"])
def test_convert_onto_its_input_is_a_usage_error(tmp_path, suffix):
    if suffix == ".parquet":
        pytest.importorskip("pyarrow")
    p = tmp_path / f"x{suffix}"
    write_native(p, _records(50))
    before = p.read_bytes()
    r = invoke("trace", "convert", p, p)
    _assert_cli_error(r, 2, "would overwrite the input")
    assert p.read_bytes() == before
    r = invoke("trace", "convert", p, tmp_path / "." / f"x{suffix}")  # another spelling of the same file
    _assert_cli_error(r, 2, "would overwrite the input")
    assert p.read_bytes() == before
    with pytest.raises(ValueError, match="would overwrite the input"):
        convert_trace(p, p)
    assert p.read_bytes() == before


def test_convert_onto_one_of_its_shards_is_a_usage_error(tmp_path):
    d = tmp_path / "parts"
    convert_trace(_lackey(tmp_path), d, shard_records=30)
    before = {f.name: f.read_bytes() for f in d.iterdir()}
    assert len(before) > 1
    r = invoke("trace", "convert", d, d / "part-00001.npz")
    _assert_cli_error(r, 2, "would overwrite the input")
    r = invoke("trace", "convert", d, d, "--shard-records", "10")
    _assert_cli_error(r, 2, "would overwrite the input")
    assert {f.name: f.read_bytes() for f in d.iterdir()} == before


def _lackey(tmp_path):
    p = tmp_path / "t.lackey"
    p.write_text(LACKEY)
    return p


def test_failed_convert_keeps_an_existing_parquet_output(tmp_path):
    pytest.importorskip("pyarrow")
    old = tmp_path / "old.parquet"
    write_native(old, _records(5))
    before = old.read_bytes()
    bad = tmp_path / "bad.lackey"
    bad.write_text(LACKEY + "garbage\n")
    r = invoke("trace", "convert", bad, old, "--strict")
    _assert_cli_error(r, 2, "bad.lackey:101")
    assert old.read_bytes() == before
    assert sorted(f.name for f in tmp_path.iterdir()) == ["bad.lackey", "old.parquet"]  # no temporaries left
    # a successful conversion replaces it
    r = invoke("trace", "convert", _lackey(tmp_path), old, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["records"] == 60
    assert len(read_trace(old)) == 60


def test_parquet_writer_abort_keeps_the_old_file(tmp_path):
    pytest.importorskip("pyarrow")
    p = tmp_path / "t.parquet"
    write_native(p, _records(5))
    before = p.read_bytes()
    w = NativeWriter(p)
    w.write(_records(7))
    w.abort()
    assert p.read_bytes() == before
    with NativeWriter(p) as w:
        w.write(_records(7))
    assert len(read_trace(p)) == 7
    assert sorted(f.name for f in tmp_path.iterdir()) == ["t.parquet"]


# ------------------------------------------------------------------------------- 8. nan / inf cycle costs
@pytest.mark.parametrize("opt", ["--exit-cycles", "--user-exit-cycles", "--miss-cycles"])
@pytest.mark.parametrize("value", ["nan", "inf", "NaN", "Infinity"])
def test_cycle_costs_must_be_finite(tmp_path, opt, value):
    r = invoke("replay", _lackey(tmp_path), "--protect", "0x601000:0x80", "--json", opt, value)
    _assert_cli_error(r, 2, opt)
    assert "NaN" not in r.stdout and "Infinity" not in r.stdout


def test_cycle_costs_still_accept_finite_values(tmp_path):
    r = invoke("replay", _lackey(tmp_path), "--protect", "0x601000:0x80", "--json", "--exit-cycles", "0",
               "--miss-cycles", "1e3")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["estimated_overhead"]["cycles_per_exit"]["spp_miss"] == 1000.0


# ------------------------------------------------------------------------------- 9. compressed native, arguments
@pytest.mark.parametrize("name", ["t.npz.gz", "t.parquet.gz", "t.npz.xz"])
def test_compressed_native_traces_are_refused_clearly(tmp_path, name):
    p = tmp_path / name
    b = io.BytesIO()
    np.savez(b, gpa=np.arange(3, dtype=np.uint64), size=np.full(3, 8, np.uint16))
    p.write_bytes(gzip.compress(b.getvalue()))
    with pytest.raises(TraceFormatError, match=rf"{name}: compressed native traces are not supported"):
        detect_format(p)
    with pytest.raises(TraceFormatError, match=r"compress"):
        read_trace(p)


def test_compressed_native_trace_with_explicit_format(tmp_path):
    p = tmp_path / "t.npz.gz"
    b = io.BytesIO()
    np.savez(b, gpa=np.arange(3, dtype=np.uint64), size=np.full(3, 8, np.uint16))
    p.write_bytes(gzip.compress(b.getvalue()))
    with pytest.raises(TraceFormatError, match=r"t\.npz\.gz: a gzip-compressed native trace is not supported"):
        read_trace(p, "native")


def test_bad_open_trace_arguments_name_the_argument(tmp_path):
    p = _lackey(tmp_path)
    pin = tmp_path / "t.pin"
    pin.write_text("0x401000: W 0x601000\n")
    with pytest.raises(ValueError, match=r"size=0: the pinatrace write size"):
        open_trace(pin, "pinatrace", size=0)
    with pytest.raises(ValueError, match=r"size=70000"):
        open_trace(pin, "pinatrace", size=70000)
    for bad in (0, -1, 0.5, True, None):
        with pytest.raises(ValueError, match=r"chunk_records=.*: must be a positive integer"):
            open_trace(p, "lackey", chunk_records=bad)
    with pytest.raises(ValueError, match=r"block_bytes=0: must be a positive integer"):
        LackeySource(p, block_bytes=0)  # was: an empty trace


# ---------------------------------------------------------------- lackey I lines in strict mode
def test_strict_reports_a_malformed_instruction_line_no_store_uses(tmp_path):
    """A malformed ``I`` line replaced by a later ``I`` line before any store: strict
    mode still reports it, naming the file and the line."""
    from sppkit.engines.replay.formats import MalformedRecord

    p = tmp_path / "i.lackey"
    p.write_text("I  00401000,3\n S 1000,8\nI  not-an-address\nI  401000,3\n S 1000,8\n")
    with pytest.raises(MalformedRecord, match=r"i\.lackey:3: malformed instruction line"):
        read_trace(p, "lackey", strict=True)
    # the default mode only parses the I lines stores use: both stores are kept, with their IPs
    assert read_trace(p, "lackey")["rip"].tolist() == [0x401000, 0x401000]


# ---------------------------------------------------------------- the reserved RIP_CARRY value
RESERVED = 0xFFFFFFFFFFFFFFFE


@pytest.mark.parametrize("fmt, name, text", [
    ("csv", "s.csv", f"0x1000,8,{RESERVED:#x}\n0x2000,8,0x5\n"),
    ("pinatrace", "s.pin", f"{RESERVED:#x}: W 0x1000\n0x5: W 0x2000\n"),
    ("native", "s.npz", None),
])
def test_a_rip_equal_to_the_carry_marker_is_malformed(tmp_path, fmt, name, text):
    """rip 0xfffffffffffffffe is sppkit's internal "IP carried over from the previous
    shard" marker: a trace giving it is malformed (it used to turn silently into an
    unknown IP)."""
    from sppkit.engines.replay.formats import MalformedRecord

    p = tmp_path / name
    if text is None:
        np.savez(p, gpa=np.array([0x1000, 0x2000], np.uint64), size=np.array([8, 8], np.uint16),
                 rip=np.array([RESERVED, 5], np.uint64))
    else:
        p.write_text(text)
    with pytest.raises(MalformedRecord, match=f"{name}.*(:1|record 0): rip 0xfffffffffffffffe is reserved"):
        read_trace(p, fmt, strict=True)
    recs = read_trace(p, fmt)
    assert recs["rip"].tolist() == [5] and recs["gpa"].tolist() == [0x2000]


def test_a_lackey_instruction_at_the_carry_marker_is_malformed(tmp_path):
    from sppkit.engines.replay.formats import MalformedRecord

    p = tmp_path / "r.lackey"
    p.write_text(f"I  {RESERVED:x},3\n S 1000,8\n")
    with pytest.raises(MalformedRecord, match=r"r\.lackey:1: rip 0xfffffffffffffffe is reserved"):
        read_trace(p, "lackey", strict=True)
    assert read_trace(p, "lackey")["rip"].tolist() == [0xFFFFFFFFFFFFFFFF]  # the store stays, IP unknown


def test_carry_marker_rip_on_the_command_line(tmp_path):
    p = tmp_path / "s.csv"
    p.write_text(f"0x1000,8,{RESERVED:#x}\n0x2000,8\n")
    r = invoke("replay", p, "--protect", "0x1000:8", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.output[r.output.index("{"):])
    assert d["skipped_records"] == 1 and d["violations"] == 0 and d["writes"] == 1


# ---------------------------------------------------------------- writes running past the 64-bit address space
TOP = 1 << 64


def _wrap_trace(tmp_path, fmt, rows, *, name=None):
    """A trace of ``rows`` [(gpa, size, rip)] in ``fmt`` (pinatrace: size 8 only)."""
    ext = {"csv": "csv", "lackey": "lackey", "pinatrace": "pin", "npz": "npz", "parquet": "parquet"}[fmt]
    p = tmp_path / (name or f"w.{ext}")
    if fmt == "csv":
        p.write_text("".join(f"{g:#x},{s},{r:#x}\n" for g, s, r in rows))
    elif fmt == "lackey":  # one I line per store: line 2k+2 is the store of row k
        p.write_text("".join(f"I  {r:08x},4\n S {g:x},{s}\n" for g, s, r in rows))
    elif fmt == "pinatrace":
        assert all(s == 8 for _, s, _ in rows)
        p.write_text("".join(f"{r:#x}: W {g:#x}\n" for g, _, r in rows) + "#eof\n")
    else:
        if fmt == "parquet":
            pytest.importorskip("pyarrow")
        # columns written directly (write_native refuses such records, see below)
        a = np.array(rows, np.dtype([("gpa", "<u8"), ("size", "<u2"), ("rip", "<u8")]))
        if fmt == "npz":
            np.savez(p, gpa=a["gpa"], size=a["size"], rip=a["rip"])
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.table({c: a[c] for c in ("gpa", "size", "rip")}), p)
    return p


# where row 1 is reported: (line or record, as the message spells it)
_WHERE = {"csv": ":2: ", "lackey": ":4: ", "pinatrace": ":2: ", "npz": ": record 1: ", "parquet": ": record 1: "}
_FORMATS = ["csv", "lackey", "pinatrace", "npz", "parquet"]


@pytest.mark.parametrize("fmt", _FORMATS)
@pytest.mark.parametrize("gpa, size", [(TOP - 1, 8), (TOP - 4, 8), (TOP - 7, 8)])
def test_a_write_past_the_64_bit_space_is_a_malformed_record(tmp_path, fmt, gpa, size):
    """``0xffffffffffffffff,8`` used to be read, then stop the replay with a bare
    ValueError naming neither the file nor the line."""
    from sppkit.engines.replay import ProtectionModel, replay
    from sppkit.engines.replay.formats import Diagnostics, MalformedRecord

    good = [(0x1000, 8, 0x401000), (TOP - 8, 8, 0x401004)]  # the last one ends exactly at 2**64: fine
    p = _wrap_trace(tmp_path, fmt, [good[0], (gpa, size, 0x401002), good[1]])
    where = re.escape(p.name + _WHERE[fmt])
    reason = re.escape(f"a write of {size} bytes at gpa {gpa:#x} runs past the 64-bit address space")
    with pytest.raises(MalformedRecord, match=where + reason):
        read_trace(p, strict=True)
    diag = Diagnostics()
    recs = read_trace(p, diagnostics=diag)
    assert recs["gpa"].tolist() == [g for g, _, _ in good]
    assert recs["rip"].tolist() == [r for _, _, r in good]
    assert diag.skipped == 1 and re.search(where + reason, diag.examples[0])
    model = ProtectionModel({(TOP - 8) >> 12: 0})
    res = replay(p, model)
    assert (res.writes, res.skipped_records, res.violations) == (2, 1, 1)
    assert re.search(where + reason, res.to_dict()["skipped_examples"][0])
    with pytest.raises(MalformedRecord, match=where + reason):
        replay(p, model, strict=True)


@pytest.mark.parametrize("fmt", ["csv", "lackey", "npz"])
@pytest.mark.parametrize("size", [2, 8, 4095, 4096, 4097, 65535])
def test_the_last_byte_of_the_space_is_exactly_the_boundary(tmp_path, fmt, size):
    """gpa + size == 2**64 is read; one byte further is malformed, for any size."""
    from sppkit.engines.replay.formats import Diagnostics

    p = _wrap_trace(tmp_path, fmt, [(TOP - size, size, 1), (TOP - size + 1, size, 2)])
    diag = Diagnostics()
    assert read_trace(p, diagnostics=diag)["gpa"].tolist() == [TOP - size]
    assert diag.skipped == 1
    assert f"a write of {size} bytes at gpa {TOP - size + 1:#x}" in diag.examples[0]


@pytest.mark.parametrize("size", [2, 8, 65535])
def test_pinatrace_boundary_depends_on_the_write_size(tmp_path, size):
    from sppkit.engines.replay.formats import Diagnostics

    p = tmp_path / "b.pin"
    p.write_text(f"0x1: W {TOP - size:#x}\n0x2: W {TOP - size + 1:#x}\n0x3: W {TOP - 1:#x}\n")
    diag = Diagnostics()
    got = read_trace(p, "pinatrace", size=size, diagnostics=diag)["gpa"].tolist()
    assert got == [TOP - size]
    assert diag.skipped == 2
    assert diag.examples[0].startswith(f"{p}:2: a write of {size} bytes at gpa {TOP - size + 1:#x}")


@pytest.mark.parametrize("fmt, text, where", [
    ("csv", "0x1000,8\n0XFFFFFFFFFFFFFFFF , 8\n", ":2: "),  # upper-case hex and spaces: the per-line parser
    ("csv", "gpa,size\n18446744073709551615,2\n", ":2: "),  # a header, decimal
    ("lackey", " S 1000,8\n S  FFFFFFFFFFFFFFFC , 8\n", ":2: "),
    ("lackey", " M fffffffffffffffc,8\n", ":1: "),
    ("pinatrace", "0x1: W 0x1000\n 0X2 :  W  FFFFFFFFFFFFFFFC\n", ":2: "),
])
def test_wraps_are_caught_on_the_per_line_parser_too(tmp_path, fmt, text, where):
    from sppkit.engines.replay.formats import MalformedRecord

    p = tmp_path / "slow.txt"
    p.write_text(text)
    with pytest.raises(MalformedRecord, match=re.escape("slow.txt" + where) + "a write of .* runs past the 64-bit"):
        read_trace(p, fmt, strict=True)


@pytest.mark.parametrize("fmt", ["csv", "lackey", "pinatrace"])
def test_wrap_line_numbers_across_blocks(tmp_path, fmt):
    """Small blocks: the line number is the file's, not the block's."""
    from sppkit.engines.replay.formats import _SOURCES, Diagnostics

    rows = [(0x1000 + 8 * i, 8, 0x401000) for i in range(200)]
    rows[150] = (TOP - 2, 8, 0x401000)
    p = _wrap_trace(tmp_path, fmt, rows)
    diag = Diagnostics()
    src = _SOURCES[fmt](p, diagnostics=diag, block_bytes=64)
    n = sum(len(g) for g, _, _ in src.columns())
    line = 2 * 150 + 2 if fmt == "lackey" else 151
    assert n == 199 and diag.skipped == 1
    assert diag.examples[0].startswith(f"{p}:{line}: a write of 8 bytes at gpa {TOP - 2:#x}")


@pytest.mark.parametrize("text, line, why", [
    # strict mode names the FIRST malformed line of a block, whatever its kind
    (f"0x1: W {TOP - 4:#x}\nnonsense\n", 1, "runs past the 64-bit"),
    (f"{RESERVED:#x}: W 0x1000\nnonsense\n", 1, "is reserved"),
    (f"nonsense\n{RESERVED:#x}: W 0x1000\n", 1, "expected 'IP: W ADDR'"),
])
def test_pinatrace_strict_names_the_first_malformed_line(tmp_path, text, line, why):
    """The reserved-rip lines used to be reported after the unparseable ones, so
    ``--strict`` named a later line."""
    from sppkit.engines.replay.formats import MalformedRecord

    p = tmp_path / "o.pin"
    p.write_text(text)
    with pytest.raises(MalformedRecord, match=rf"o\.pin:{line}: .*{why}"):
        read_trace(p, "pinatrace", strict=True)


def test_wraps_in_a_shard_directory_name_the_shard(tmp_path):
    from sppkit.engines.replay import ProtectionModel, replay
    from sppkit.engines.replay.formats import MalformedRecord

    d = tmp_path / "shards"
    d.mkdir()
    (d / "a.csv").write_text("0x1000,8\n")
    (d / "b.csv").write_text("# x\n0x2000,8\n0xfffffffffffffff9,8\n")
    with pytest.raises(MalformedRecord, match=r"shards/b\.csv:3: a write of 8 bytes at gpa 0xfffffffffffffff9"):
        read_trace(d, strict=True)
    assert read_trace(d)["gpa"].tolist() == [0x1000, 0x2000]
    res = replay(d, ProtectionModel({1: 0}))
    assert (res.writes, res.skipped_records, res.page_granular_exits) == (2, 1, 1)
    with pytest.raises(MalformedRecord, match=r"b\.csv:3: "):
        replay(d, ProtectionModel({1: 0}), strict=True)


def test_convert_skips_or_refuses_a_wrapping_record(tmp_path):
    src = _wrap_trace(tmp_path, "csv", [(0x1000, 8, 1), (TOP - 1, 8, 2), (0x2000, 8, 3)])
    out = tmp_path / "out.npz"
    got = convert_trace(src, out)
    assert (got["records"], got["skipped_records"]) == (2, 1)
    assert read_trace(out)["gpa"].tolist() == [0x1000, 0x2000]
    out2 = tmp_path / "out2.npz"
    from sppkit.engines.replay.formats import MalformedRecord

    with pytest.raises(MalformedRecord, match=r"w\.csv:2: a write of 8 bytes at gpa 0xffffffffffffffff"):
        convert_trace(src, out2, strict=True)
    assert not out2.exists()
    # a native input is checked the same way (it used to be copied through unchanged)
    nat = _wrap_trace(tmp_path, "npz", [(0x1000, 8, 1), (TOP - 1, 8, 2)])
    got = convert_trace(nat, tmp_path / "out3.npz")
    assert (got["records"], got["skipped_records"]) == (1, 1)


def test_wraps_on_the_command_line(tmp_path):
    p = _wrap_trace(tmp_path, "csv", [(0x1000, 8, 1), (TOP - 1, 8, 2)])
    r = invoke("replay", p, "--protect", "0x1000:0x80", "--json")
    assert r.exit_code == 0, r.output
    assert "w.csv:2: a write of 8 bytes at gpa 0xffffffffffffffff runs past the 64-bit address space" in r.stderr
    d = json.loads(r.stdout)
    assert (d["writes"], d["skipped_records"], d["violations"]) == (1, 1, 1)
    r = invoke("replay", p, "--protect", "0x1000:0x80", "--strict")
    _assert_cli_error(r, 2, "w.csv:2: a write of 8 bytes at gpa 0xffffffffffffffff runs past the 64-bit")
    r = invoke("replay", p, "--protect", "0x1000:0x80", "--strict", "--sweep")
    _assert_cli_error(r, 2, "w.csv:2: a write of 8 bytes")
    r = invoke("trace", "convert", p, tmp_path / "o.npz", "--strict")
    _assert_cli_error(r, 2, "w.csv:2: a write of 8 bytes")
    assert not (tmp_path / "o.npz").exists()


# ---------------------------------------------------------------- native columns: negative values are records
def test_negative_values_in_a_signed_native_column_are_malformed_records(tmp_path):
    """They used to fail the whole file ("records 0..2: negative address"), even
    without --strict, naming no record."""
    from sppkit.engines.replay.formats import Diagnostics, MalformedRecord

    p = tmp_path / "neg.npz"
    np.savez(p, gpa=np.array([0x1000, -5, 0x2000, 0x3000]), size=np.array([8, 8, 8, 8]),
             rip=np.array([1, 2, -3, 4]))
    with pytest.raises(MalformedRecord, match=r"neg\.npz: record 1: gpa -5 is negative"):
        read_trace(p, strict=True)
    diag = Diagnostics()
    assert read_trace(p, diagnostics=diag)["gpa"].tolist() == [0x1000, 0x3000]
    assert diag.skipped == 2 and "record 2: rip -3 is negative" in diag.examples[1]


def test_a_float_native_column_is_still_a_format_error(tmp_path):
    p = tmp_path / "f.npz"
    np.savez(p, gpa=np.array([4096.5]), size=np.array([8], np.uint16))
    with pytest.raises(TraceFormatError, match=r"f\.npz: records 0\.\.0: expected an integer gpa column, got float64"):
        read_trace(p)


# ---------------------------------------------------------------- the writer refuses what the readers refuse
@pytest.mark.parametrize("field, dtype, value, match", [
    ("size", "<i8", 70000, "record 2: size 70000 out of range"),  # was stored as 4464
    ("size", "<u2", 0, "record 2: size 0 out of range"),
    ("gpa", "<i8", -5, "record 2: gpa -5 is negative"),  # was stored as 0xfffffffffffffffb
    ("rip", "<i8", -1, "record 2: rip -1 is negative"),
    ("gpa", "<u8", TOP - 4, "record 2: a write of 8 bytes at gpa 0xfffffffffffffffc runs past"),
    ("rip", "<u8", RESERVED, "record 2: rip 0xfffffffffffffffe is reserved"),
])
def test_native_writer_refuses_bad_records_and_writes_nothing(tmp_path, field, dtype, value, match):
    dt = [(c, dtype if c == field else t) for c, t in (("gpa", "<u8"), ("size", "<u2"), ("rip", "<u8"))]
    good = np.array([(0x1000, 8, 1)] * 3, dt)
    bad = good.copy()
    bad[field][2] = value
    p = tmp_path / "w.npz"
    write_native(p, _records(4))
    before = p.read_bytes()
    with pytest.raises(TraceFormatError, match=match):
        write_native(p, bad)
    assert p.read_bytes() == before
    w = NativeWriter(tmp_path / "x.npz")
    w.write(good)
    with pytest.raises(TraceFormatError, match=match.replace("record 2", "record 5")):  # counted across writes
        w.write(bad)
    w.close()
    assert len(read_trace(tmp_path / "x.npz")) == 3  # the refused call wrote nothing
    assert sorted(f.name for f in tmp_path.iterdir()) == ["w.npz", "x.npz"]


@pytest.mark.parametrize("records", [np.zeros(3), [(1, 8)], np.array([(4096.7, 8)], [("gpa", "<f8"), ("size", "<u2")])])
def test_native_writer_refuses_what_is_not_integer_records(tmp_path, records):
    with pytest.raises(TypeError, match="integer|structured array"):  # a float gpa was truncated silently
        write_native(tmp_path / "t.npz", records)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- found by fuzzing the text readers
@pytest.mark.parametrize("line", ["1_000,8", "+4096,8", "0x_10,8", "4096,+8", "0x1000,0x_8", "4096,8,1_0", "0x1000,8,+5"])
def test_csv_fields_are_decimal_or_0x_hex_only(tmp_path, line):
    """The per-line parser used Python's int(): "1_000" was read as 1000, "+5" as 5
    and "0x_10" as 16 -- a corrupted field silently became another number."""
    from sppkit.engines.replay.formats import Diagnostics, MalformedRecord

    p = tmp_path / "n.csv"
    p.write_text(f"0x2000,8\n{line}\n")
    with pytest.raises(MalformedRecord, match=r"n\.csv:2: expected integers \(decimal or 0x-prefixed hex\)"):
        read_trace(p, strict=True)
    diag = Diagnostics()
    assert read_trace(p, diagnostics=diag)["gpa"].tolist() == [0x2000] and diag.skipped == 1


def test_csv_documented_forms_still_read(tmp_path):
    p = tmp_path / "ok.csv"
    p.write_text("gpa,size,rip\n0X1F00 , 0010 ,\t0xAbC\n0008192,0x8\n")
    assert read_trace(p, strict=True).tolist() == [(0x1F00, 10, 0xABC), (8192, 8, 0xFFFFFFFFFFFFFFFF)]


def _lackey_source(p, block_bytes, strict=False):
    from sppkit.engines.replay.formats import Diagnostics

    diag = Diagnostics(strict=strict)
    src = LackeySource(p, diagnostics=diag, block_bytes=block_bytes)
    recs = [tuple(x) for g, s, r in src.columns() for x in zip(g.tolist(), s.tolist(), r.tolist())]
    return recs, diag


@pytest.mark.parametrize("block_bytes", [1 << 20, 8, 16, 21, 40])
def test_lackey_unused_bad_instruction_line_is_not_reported_whatever_the_blocks(tmp_path, block_bytes):
    """A malformed I line no store uses is not reported by default -- it used to be,
    when a block boundary happened to fall right after it (the last I line of a block
    is parsed for the next block's stores), so the skipped count depended on layout."""
    p = tmp_path / "b.lackey"
    p.write_text("I  40100z,3\nI  401004,3\n S 1000,8\n")
    recs, diag = _lackey_source(p, block_bytes)
    assert recs == [(0x1000, 8, 0x401004)] and diag.skipped == 0


@pytest.mark.parametrize("block_bytes", [1 << 20, 8, 16, 21, 40])
def test_lackey_bad_instruction_line_used_by_a_later_block_is_reported(tmp_path, block_bytes):
    p = tmp_path / "u.lackey"
    p.write_text("I  401000,3\n S 1000,8\nI  40100z,3\n L 2000,8\n S 3000,8\n")
    recs, diag = _lackey_source(p, block_bytes)
    assert recs == [(0x1000, 8, 0x401000), (0x3000, 8, 0xFFFFFFFFFFFFFFFF)]
    assert diag.skipped == 1 and diag.examples[0].startswith(f"{p}:3: malformed instruction line")


@pytest.mark.parametrize("block_bytes", [1 << 20, 8, 21])
def test_lackey_bad_last_instruction_line_of_the_file_is_reported_when_the_next_file_uses_it(tmp_path, block_bytes):
    """Its IP carries over to the next shard's first stores: reported if they take it,
    like any other I line (it was reported at the end of its file whatever followed, so
    a trace cut there counted a record the concatenated trace did not)."""
    from sppkit.engines.replay.formats import Diagnostics

    p = tmp_path / "l.lackey"
    p.write_text(" S 1000,8\nI  40100z,3\n L 2000,8\n")
    recs, diag = _lackey_source(p, block_bytes)
    assert len(recs) == 1 and diag.skipped == 0  # no store uses it (yet)
    q = tmp_path / "m.lackey"
    for nxt, reported in (("I  401000,3\n S 3000,8\n", False), (" L 2000,8\n S 3000,8\nI  401000,3\n", True)):
        q.write_text(nxt)
        diag = Diagnostics()
        for f in (p, q):  # one Diagnostics through both files: one trace
            list(LackeySource(f, diagnostics=diag, block_bytes=block_bytes).columns())
        assert diag.skipped == reported
        assert [e.split(": ")[0] for e in diag.examples] == [f"{p}:2"] * reported


def test_lackey_strict_checks_the_size_of_every_instruction_line(tmp_path):
    """--strict "checks every I line": it used to parse only the address."""
    from sppkit.engines.replay.formats import MalformedRecord

    p = tmp_path / "s.lackey"
    p.write_text("I  401000,zz\n S 1000,8\n")
    with pytest.raises(MalformedRecord, match=r"s\.lackey:1: malformed instruction line"):
        read_trace(p, "lackey", strict=True)
    assert read_trace(p, "lackey")["rip"].tolist() == [0x401000]  # the default mode reads only the address


_SEED = {"csv": "gpa,size,rip\n0x1000,8,0x401000\n4096,4,5\n# c\n\n 0X2000 , 16 \n0xfffffffffffffff8,8\n",
         "lackey": "==1== x\nI  00401000,4\n S 00601000,8\n L 00601000,8\nI  00401004,3\n M 00601100,4\n",
         "pinatrace": "0x401000: W 0x601000\n0x401004: R 0x601000\n401008: W 601100\n#eof\n"}


@st.composite
def _mutated(draw, fmt):
    data = bytearray(_SEED[fmt].encode() * 2)
    for _ in range(draw(st.integers(0, 6))):
        i = draw(st.integers(0, len(data) - 1))
        chunk = bytes(draw(st.lists(st.sampled_from(list(b"0123456789abcdefxXSMLI ,:#\n\r=-WRf_+z")), max_size=8)))
        if draw(st.booleans()):
            data[i : i + len(chunk)] = chunk
        else:
            data[i:i] = chunk
    return bytes(data)


@pytest.mark.parametrize("fmt", ["csv", "lackey", "pinatrace"])
def test_text_readers_do_not_depend_on_block_boundaries(tmp_path, fmt):
    """Mutated traces read with 1-MiB blocks and with blocks of a few bytes: the same
    records, the same skipped count, and in strict mode the same first error."""
    from sppkit.engines.replay.formats import _SOURCES, Diagnostics, MalformedRecord

    def read(p, block_bytes, strict):
        diag = Diagnostics(strict=strict)
        try:
            src = _SOURCES[fmt](p, diagnostics=diag, block_bytes=block_bytes)
            recs = [tuple(x) for g, s, r in src.columns() for x in zip(g.tolist(), s.tolist(), r.tolist())]
        except MalformedRecord as e:
            return str(e)
        return recs, diag.skipped, sorted(diag.examples)

    @settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(data=_mutated(fmt), strict=st.booleans(), small=st.integers(1, 48))
    def check(data, strict, small):
        p = tmp_path / f"m.{fmt}"
        p.write_bytes(data)
        assert read(p, 1 << 20, strict) == read(p, small, strict)

    check()


def test_strict_with_a_lenient_diagnostics_is_refused_not_ignored(tmp_path):
    """strict=True next to diagnostics=Diagnostics() was silently ignored: the bad
    record skipped, no error."""
    from sppkit.engines.replay.formats import Diagnostics, MalformedRecord

    p = tmp_path / "d.csv"
    p.write_text("0x1000,8\n0x2000,0\n")
    for call in (lambda: read_trace(p, strict=True, diagnostics=Diagnostics()),
                 lambda: open_trace(p, strict=True, diagnostics=Diagnostics()),
                 lambda: convert_trace(p, tmp_path / "o.npz", strict=True, diagnostics=Diagnostics())):
        with pytest.raises(ValueError, match=r"strict=True contradicts diagnostics=Diagnostics\(strict=False\)"):
            call()
    assert sorted(f.name for f in tmp_path.iterdir()) == ["d.csv"]
    with pytest.raises(MalformedRecord, match=r"d\.csv:2: size 0"):  # agreeing arguments are fine
        read_trace(p, strict=True, diagnostics=Diagnostics(strict=True))
    assert len(read_trace(p, diagnostics=Diagnostics())) == 1


# ------------------------------------------------------------------------------- 10. convert: old shards, leftovers
CSV5 = "".join(f"{0x1000 * i},8,{0x401000 + i}\n" for i in range(1, 6))


def _csv(tmp_path, text=CSV5, name="t.csv"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_convert_into_a_directory_holding_shards_is_refused(tmp_path):
    """Converting again with fewer shards left the old part files, replayed with the
    new ones: read_trace gave 8 records for a 5-record trace."""
    src, out = _csv(tmp_path), tmp_path / "out"
    assert len(convert_trace(src, out, shard_records=2)["files"]) == 3
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    with pytest.raises(FileExistsError, match=r"out already holds 3 shard\(s\) \(part-00000\.npz, \.\.\.\)"):
        convert_trace(src, out, shard_records=5)
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before  # nothing changed
    assert len(read_trace(out)) == 5
    # any file a replay of the directory would read counts; hidden files and subdirectories do not
    other = tmp_path / "other"
    other.mkdir()
    (other / ".keep").write_text("")
    (other / "sub").mkdir()
    convert_trace(src, other, shard_records=5)
    assert len(read_trace(other)) == 5
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "README").write_text("hello")
    with pytest.raises(FileExistsError, match=r"notes already holds 1 shard\(s\) \(README\)"):
        convert_trace(src, notes, shard_records=5)
    assert sorted(f.name for f in notes.iterdir()) == ["README"]


def test_convert_into_shards_beside_its_input_is_refused(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    src = _csv(d)
    with pytest.raises(FileExistsError, match=r"holds 1 shard\(s\) \(t\.csv\)"):
        convert_trace(src, d, shard_records=2)
    assert sorted(f.name for f in d.iterdir()) == ["t.csv"]


def test_convert_shards_onto_a_file_is_refused(tmp_path):
    src = _csv(tmp_path)
    (tmp_path / "out").write_text("keep me")
    with pytest.raises(NotADirectoryError, match=r"out exists and is not a directory"):
        convert_trace(src, tmp_path / "out.npz", shard_records=2)
    assert (tmp_path / "out").read_text() == "keep me"


@pytest.mark.parametrize("existing", [False, True])
def test_failed_sharded_convert_leaves_nothing_behind(tmp_path, existing):
    """A conversion failing after some shards were written left those shards (and the
    directories it created): a later replay read a partial trace."""
    src = tmp_path / "in"
    src.mkdir()
    _csv(src, CSV5, "a.csv")
    _csv(src, "1,2,3,4\n", "b.csv")  # fails once a.csv's shards are written
    out = tmp_path / "a" / "b" / "out"
    if existing:
        out.mkdir(parents=True)
    with pytest.raises(TraceFormatError, match=r"b\.csv:1"):
        convert_trace(src, out, "csv", shard_records=2, strict=True)
    if existing:
        assert list(out.iterdir()) == []
    else:
        assert not (tmp_path / "a").exists()
    assert sorted(f.name for f in tmp_path.iterdir()) == (["a", "in"] if existing else ["in"])


def test_interrupted_sharded_convert_leaves_nothing_behind(tmp_path):
    src = _csv(tmp_path)
    out = tmp_path / "out"
    seen = []

    def progress(s):
        seen.append(s)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert_trace(src, out, shard_records=2, progress=progress)
    assert seen and not out.exists()


@pytest.mark.parametrize("kw, match", [
    ({"shard_records": 0}, r"shard_records=0: must be a positive integer"),
    ({"shard_records": 2.5}, r"shard_records=2\.5: must be a positive integer"),
    ({"shard_records": True}, r"shard_records=True"),
    ({"shard_records": 1 << 63}, r"shard_records=9223372036854775808: .*at most 2\*\*63-1"),
    ({"chunk_records": 1 << 64}, r"chunk_records=18446744073709551616: .*at most 2\*\*30"),
    ({"size": 0}, r"size=0"),
    ({"fmt": "bogus"}, r"trace format 'bogus'"),
    ({"progress": 5}, r"progress must be a callable"),
])
def test_convert_checks_its_arguments_before_writing(tmp_path, kw, match):
    src = _csv(tmp_path)
    kw = dict(kw)
    fmt = kw.pop("fmt", "auto")
    with pytest.raises((ValueError, TypeError), match=match):
        convert_trace(src, tmp_path / "out" / "deeper", fmt, **{"shard_records": 2, **kw})
    assert sorted(f.name for f in tmp_path.iterdir()) == ["t.csv"]  # no directory created


@pytest.mark.parametrize("out, exc, match", [
    ("", ValueError, "an empty path"),
    ("{dir}", IsADirectoryError, "is a directory; a directory of shards needs --shard-records"),
    ("{tmp}/nodir/x.npz", FileNotFoundError, r"x\.npz: directory .*nodir does not exist"),
    ("{tmp}/x.txt", TraceFormatError, r"x\.txt: a native trace is written as \.npz or \.parquet"),
])
def test_convert_to_a_bad_single_file_output(tmp_path, out, exc, match):
    src = _csv(tmp_path)
    d = tmp_path / "d.npz"
    d.mkdir()
    with pytest.raises(exc, match=match):
        convert_trace(src, out.format(dir=d, tmp=tmp_path))
    assert sorted(f.name for f in tmp_path.iterdir()) == ["d.npz", "t.csv"]
    assert list(d.iterdir()) == []


# ------------------------------------------------------------------------------- 11. writer and recorder targets
@pytest.mark.parametrize("name", ["x.npz", "x.parquet"])
def test_native_writer_in_a_missing_directory_names_the_target(tmp_path, name):
    """The error named the temporary directory: "No such file or directory:
    '/tmp/nodir/.sppkit-trace-36pz3kuz'"."""
    if name.endswith(".parquet"):
        pytest.importorskip("pyarrow")
    target = tmp_path / "nodir" / name
    for make in (NativeWriter, TraceRecorder):
        with pytest.raises(FileNotFoundError) as e:
            make(target)
        assert str(e.value) == f"{target}: directory {tmp_path / 'nodir'} does not exist"
        assert ".sppkit-trace" not in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_native_writer_refuses_a_directory_or_a_file_as_parent(tmp_path):
    (tmp_path / "d.npz").mkdir()
    with pytest.raises(IsADirectoryError, match=r"d\.npz is a directory"):
        NativeWriter(tmp_path / "d.npz")
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError, match=r"f/x\.npz: .*f is not a directory"):
        NativeWriter(tmp_path / "f" / "x.npz")
    with pytest.raises(ValueError, match="an empty path"):
        NativeWriter("")
    assert sorted(f.name for f in tmp_path.iterdir()) == ["d.npz", "f"]


def test_native_writer_in_an_unwritable_directory_names_the_target(tmp_path, monkeypatch):
    from sppkit.engines.replay import formats

    def mkdtemp(prefix, dir):
        raise PermissionError(13, "Permission denied", f"{dir}/{prefix}abcdefgh")

    monkeypatch.setattr(formats.tempfile, "mkdtemp", mkdtemp)
    with pytest.raises(PermissionError) as e:
        NativeWriter(tmp_path / "x.npz")
    assert str(e.value) == f"{tmp_path / 'x.npz'}: cannot write in {tmp_path}: Permission denied"


def test_native_writer_close_failure_names_the_target_and_cleans_up(tmp_path):
    p = tmp_path / "x.npz"
    w = NativeWriter(p)
    w.write(_records(3))
    p.mkdir()  # the target became a directory meanwhile
    with pytest.raises(IsADirectoryError, match=rf"^{re.escape(str(p))}: cannot write: Is a directory$"):
        w.close()
    assert sorted(f.name for f in tmp_path.iterdir()) == ["x.npz"]  # no temporaries


def test_a_failed_npz_write_writes_nothing(tmp_path):
    """A write failing on the way to the disk after some columns were written left the
    columns of different lengths: the trace closed later was unreadable."""
    p = tmp_path / "x.npz"
    w = NativeWriter(p)
    w.write(_records(3))
    real = w._files["rip"]

    class Full:
        def __getattr__(self, name):
            return getattr(real, name)

        def write(self, data):
            raise OSError(28, "No space left on device")

    w._files["rip"] = Full()
    with pytest.raises(OSError, match="No space left"):
        w.write(_records(4))
    w._files["rip"] = real
    w.write(_records(2))
    w.close()
    got = read_trace(p)
    assert len(got) == 5 and list(got["gpa"]) == [0x1000, 0x2000, 0x3000, 0x1000, 0x2000]


def test_a_failed_parquet_write_discards_the_trace(tmp_path):
    pytest.importorskip("pyarrow")
    p = tmp_path / "x.parquet"
    write_native(p, _records(2))
    before = p.read_bytes()
    w = NativeWriter(p)

    def boom(table):
        raise OSError(28, "No space left on device")

    w._pq.write_table = boom
    with pytest.raises(OSError, match="No space left"):
        w.write(_records(4))
    with pytest.raises(ValueError, match=r"writer is closed \(aborted after a failed write"):
        w.write(_records(1))
    w.close()
    assert p.read_bytes() == before
    assert sorted(f.name for f in tmp_path.iterdir()) == ["x.parquet"]


@pytest.mark.parametrize("chunk", [0, -1, 1.5, True, 1 << 64])
def test_recorder_chunk_records_is_checked_before_anything_is_created(tmp_path, chunk):
    with pytest.raises(ValueError, match=r"chunk_records=.*: must be a positive integer, at most 2\*\*30"):
        TraceRecorder(tmp_path / "x.npz", chunk_records=chunk)
    assert list(tmp_path.iterdir()) == []  # (a failed buffer left the writer's temporary directory)


@pytest.mark.parametrize("gpa, size, rip, exc, match", [
    (-1, 8, None, ValueError, r"record 1: gpa -0x1 is outside the 64-bit address space"),
    (1 << 64, 8, None, ValueError, r"record 1: gpa .* outside"),
    (0x1000, 0, None, ValueError, r"record 1: size 0 out of range"),
    (0x1000, 65536, None, ValueError, r"record 1: size 65536 out of range"),
    ((1 << 64) - 4, 8, None, ValueError, r"record 1: a write of 8 bytes .* runs past"),
    (0x1000, 8, -5, ValueError, r"record 1: rip -0x5 is outside"),
    (0x1000, 8, int(RIP_CARRY), ValueError, r"record 1: rip 0xfffffffffffffffe is reserved"),
    (4096.0, 8, None, TypeError, r"record 1: gpa must be an integer, got float"),
    (0x1000, "8", None, TypeError, r"record 1: size must be an integer"),
    (0x1000, True, None, TypeError, r"record 1: size must be an integer"),
])
def test_recorder_refuses_a_bad_record_and_keeps_the_rest(tmp_path, gpa, size, rip, exc, match):
    """A bad record raised an OverflowError naming nothing, or (size 0) was refused only
    at the next flush with every good record of its chunk; after that the recorder
    broke (IndexError) on every call."""
    p = tmp_path / "x.npz"
    rec = TraceRecorder(p, chunk_records=2)
    rec(0x1000, 8, 0x401000)
    with pytest.raises(exc, match=match):
        rec(gpa, size, rip)
    rec(np.uint64(0x2000), np.uint16(4), None)
    rec(0x3000, 8, int(NO_RIP))
    rec((1 << 64) - 8, 8, 7)  # the last bytes of the space are fine
    rec.close()
    assert [(int(g), int(s)) for g, s in read_trace(p)[["gpa", "size"]].tolist()] == [
        (0x1000, 8), (0x2000, 4), (0x3000, 8), ((1 << 64) - 8, 8)]
    assert rec.count == 4


def test_recorder_abort_and_context_manager(tmp_path):
    p = tmp_path / "x.npz"
    write_native(p, _records(2))
    before = p.read_bytes()
    with pytest.raises(RuntimeError):
        with TraceRecorder(p) as rec:
            rec(0x1000, 8, None)
            raise RuntimeError("the run failed")
    assert p.read_bytes() == before
    with TraceRecorder(p) as rec:
        rec(0x5000, 8, None)
    assert len(read_trace(p)) == 1
    with pytest.raises(ValueError, match="recorder is closed"):
        rec(0x1000, 8, None)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["x.npz"]


# ------------------------------------------------------------------------------- 12. size arguments, read errors
@pytest.mark.parametrize("name", ["t.csv", "t.npz", "t.parquet"])
@pytest.mark.parametrize("chunk", [1 << 64, (1 << 30) + 1, 0])
def test_chunk_records_is_bounded_and_blames_the_argument(tmp_path, name, chunk):
    """read_trace("t.parquet", chunk_records=2**64) said "t.parquet: unreadable Parquet
    trace: Python int too large to convert to C long": the file was blamed."""
    if name.endswith(".parquet"):
        pytest.importorskip("pyarrow")
    p = tmp_path / name
    write_native(p, _records(3)) if name != "t.csv" else p.write_text(CSV5)
    with pytest.raises(ValueError, match=r"^chunk_records=\d+: must be a positive integer, at most 2\*\*30$") as e:
        read_trace(p, chunk_records=chunk)
    assert not isinstance(e.value, TraceFormatError)
    assert len(read_trace(p, chunk_records=1 << 30)) in (3, 5)


def test_block_bytes_is_bounded(tmp_path):
    p = _lackey(tmp_path)
    with pytest.raises(ValueError, match=r"block_bytes=1099511627776: must be a positive integer, at most 2\*\*30"):
        LackeySource(p, block_bytes=1 << 40)
    assert len(list(LackeySource(p, block_bytes=1 << 30))) == 1


def test_huge_values_are_shown_short(tmp_path):
    with pytest.raises(ValueError) as e:
        read_trace(_lackey(tmp_path), chunk_records=10 ** 400)
    assert len(str(e.value)) < 120 and "(401 characters)" in str(e.value)


def test_open_trace_checks_the_format_before_the_file(tmp_path):
    with pytest.raises(TraceFormatError, match=r"trace format 'bogus'"):
        open_trace(tmp_path / "missing", "bogus")
    with pytest.raises(TraceFormatError, match=r"trace format \['csv'\]"):
        open_trace(_lackey(tmp_path), ["csv"])
    with pytest.raises(TraceFormatError, match=r"is a directory, not a trace file"):
        open_trace(tmp_path)


@pytest.mark.parametrize("name, fmt", [("t.csv", "auto"), ("t.lackey", "lackey"), ("t.log", "auto"),
                                       ("t.npz", "auto"), ("t.csv.gz", "csv")])
def test_read_errors_show_the_path_once(tmp_path, monkeypatch, name, fmt):
    """"X: cannot read: [Errno 13] Permission denied: 'X'" repeated the path."""
    from sppkit.engines.replay import formats

    p = tmp_path / name
    p.write_bytes(b"x")
    real = builtins.open

    def guarded(file, *a, **k):
        if str(file) == str(p):
            raise PermissionError(13, "Permission denied", str(file))
        return real(file, *a, **k)

    monkeypatch.setattr(formats, "open", guarded, raising=False)
    with pytest.raises(TraceFormatError) as e:
        read_trace(p, fmt)
    assert str(e.value) == f"{p}: cannot read: Permission denied"
    if name in ("t.lackey", "t.log"):  # the others are detected by name
        with pytest.raises(TraceFormatError) as e:
            detect_format(p)
        assert str(e.value) == f"{p}: cannot read: Permission denied"


def test_an_unlistable_shard_directory_is_a_clear_error(tmp_path, monkeypatch):
    from pathlib import Path

    def iterdir(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "iterdir", iterdir)
    with pytest.raises(TraceFormatError) as e:
        read_trace(tmp_path)
    assert str(e.value) == f"{tmp_path}: cannot list the directory: Permission denied"


def test_a_writer_never_closed_leaves_no_temporary_files(tmp_path):
    import gc

    for name in ("x.npz", "x.parquet"):
        if name.endswith(".parquet") and importlib.util.find_spec("pyarrow") is None:
            continue
        w = NativeWriter(tmp_path / name)
        w.write(_records(3))
        assert any(f.name.startswith(".sppkit-trace-") for f in tmp_path.iterdir())
        del w
        gc.collect()
        assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kw, exc, match", [
    ({"keep": -1}, ValueError, r"keep=-1"), ({"keep": 1.5}, ValueError, r"keep=1\.5"),
    ({"on_warning": "print"}, TypeError, r"on_warning must be a callable"),
])
def test_diagnostics_arguments_are_checked(kw, exc, match):
    from sppkit.engines.replay import Diagnostics

    with pytest.raises(exc, match=match):
        Diagnostics(**kw)


def test_diagnostics_must_be_a_diagnostics(tmp_path):
    with pytest.raises(TypeError, match="diagnostics must be a Diagnostics or None, got dict"):
        read_trace(_csv(tmp_path), diagnostics={})
    with pytest.raises(TypeError, match="diagnostics must be a Diagnostics"):
        convert_trace(_csv(tmp_path), tmp_path / "x.npz", diagnostics=[])
    assert sorted(f.name for f in tmp_path.iterdir()) == ["t.csv"]
