"""Malformed traces and bad options: a clear error naming the file and the problem
(TraceFormatError, or a usage error on the command line), never a raw zlib / zipfile /
tokenize / pyarrow exception, a hang or silently wrong records; and a failed
conversion never destroys its input."""

from __future__ import annotations

import gzip
import io
import json
import struct
import zipfile
import zlib

import numpy as np
import pytest
from click.testing import CliRunner

from sppkit.cli import main
from sppkit.engines.replay import TRACE_DTYPE, write_native
from sppkit.engines.replay.formats import (
    LackeySource,
    NativeWriter,
    TraceFormatError,
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
    p.write_text(f"0x1000,8,{RESERVED:#x}\n")
    r = invoke("replay", p, "--protect", "0x1000:8", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.output[r.output.index("{"):])
    assert d["skipped_records"] == 1 and d["violations"] == 0
