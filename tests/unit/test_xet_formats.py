"""The Xet formats the emulated CAS reads (xet-core's xorb chunk headers, shard file-info section, hash hex),
and the reconstruction it answers for a byte range, on bytes built here by the layout xet-core writes."""

from __future__ import annotations

import struct

import pytest

from batchrun.emulator.xet_cas import (
    SHARD_TAG,
    Term,
    XetCas,
    XetFormatError,
    hash_hex,
    parse_shard_files,
    parse_xorb,
)


def chunk(data: bytes) -> bytes:
    """One uncompressed chunk: version 0, 3-byte LE lengths, scheme 0 (none)."""
    n = len(data).to_bytes(3, "little")
    return bytes([0]) + n + bytes([0]) + n + data


def xorb(*chunks: bytes) -> bytes:
    return b"".join(chunk(c) for c in chunks) + b"XETBLOB" + b"\x01" + b"\0" * 40


def raw(first: int) -> bytes:
    return bytes(range(first, first + 32))


def shard(files: list[tuple[bytes, int, list[tuple[bytes, int, int, int]]]]) -> bytes:
    out = SHARD_TAG + struct.pack("<QQ", 2, 200)
    for file_hash, flags, terms in files:
        out += file_hash + struct.pack("<IIQ", flags, len(terms), 0)
        for xorb_hash, unpacked, start, end in terms:
            out += xorb_hash + struct.pack("<IIII", 0, unpacked, start, end)
        out += b"\x11" * 48 * (len(terms) if flags & (1 << 31) else 0) + (b"\x22" * 48 if flags & (1 << 30) else b"")
    return out + b"\xff" * 32 + b"\0" * 16 + b"xorb-info-section-follows"


def test_a_hash_is_written_as_four_little_endian_u64_in_hex():
    assert hash_hex(raw(0)) == "0706050403020100" "0f0e0d0c0b0a0908" "1716151413121110" "1f1e1d1c1b1a1918"


def test_a_xorb_s_chunk_headers_give_offsets_and_sizes_up_to_the_footer():
    parsed = parse_xorb(xorb(b"abc", b"", b"defgh"))
    assert parsed.offsets == [0, 11, 19, 32]
    assert parsed.sizes == [3, 0, 5]
    with pytest.raises(XetFormatError):
        parse_xorb(b"XETBLOB")
    with pytest.raises(XetFormatError):
        parse_xorb(chunk(b"abcdef")[:-1])


def test_the_file_info_section_skips_verification_and_metadata_entries():
    files = parse_shard_files(shard([
        (raw(0), 1 << 31 | 1 << 30, [(raw(100), 7, 0, 2), (raw(150), 9, 4, 5)]),
        (raw(50), 0, [(raw(100), 3, 2, 3)]),
    ]))
    assert files == {
        hash_hex(raw(0)): [Term(hash_hex(raw(100)), 0, 2, 7), Term(hash_hex(raw(150)), 4, 5, 9)],
        hash_hex(raw(50)): [Term(hash_hex(raw(100)), 2, 3, 3)],
    }
    with pytest.raises(XetFormatError, match="tag"):
        parse_shard_files(b"\0" * 100)
    with pytest.raises(XetFormatError, match="no end"):
        parse_shard_files(shard([])[:-60])


def cas_with_a_file() -> XetCas:
    """A file of 12 bytes: chunks 0..2 of xorb A (3+4 bytes), then chunk 0 of xorb B (5 bytes)."""
    cas = XetCas(base_url="http://hub")
    cas.xorbs["a"] = parse_xorb(xorb(b"abc", b"defg", b"zz"))
    cas.xorbs["b"] = parse_xorb(xorb(b"hijkl"))
    cas.files["f"] = [Term("a", 0, 2, 7), Term("b", 0, 1, 5)]
    return cas


def test_the_whole_file_s_reconstruction_names_each_term_and_its_byte_range():
    answer = cas_with_a_file()._reconstruct(cas_with_a_file().files["f"], 0, 11)
    assert answer["offset_into_first_range"] == 0
    assert answer["terms"] == [{"hash": "a", "unpacked_length": 7, "range": {"start": 0, "end": 2}},
                               {"hash": "b", "unpacked_length": 5, "range": {"start": 0, "end": 1}}]
    assert answer["fetch_info"]["a"] == [{"range": {"start": 0, "end": 2}, "url": "http://hub/xet-cas/fetch/a",
                                          "url_range": {"start": 0, "end": 22}}]
    assert answer["fetch_info"]["b"][0]["url_range"] == {"start": 0, "end": 12}


def test_a_byte_range_keeps_only_the_chunks_it_touches_and_the_offset_into_the_first():
    cas = cas_with_a_file()
    answer = cas._reconstruct(cas.files["f"], 4, 8)  # "efg" of chunk a1 and "hi" of b0
    assert answer["offset_into_first_range"] == 1
    assert [(t["hash"], t["range"], t["unpacked_length"]) for t in answer["terms"]] == [
        ("a", {"start": 1, "end": 2}, 4), ("b", {"start": 0, "end": 1}, 5)]
    assert answer["fetch_info"]["a"][0]["url_range"] == {"start": 11, "end": 22}
