"""Tests for common/png16.py (16-bit PNG reader/writer for SYNTHIA labels)."""
import os
import struct
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common.png16 import read_label_channel, read_png16, write_png16  # noqa: E402

FILTER_SETS = [None, (0, 1, 2, 3, 4), (0,), (1,), (2,), (3,), (4,), (4, 3, 1)]


def _chunk(ctype, payload):
    crc = struct.pack(">I", zlib.crc32(ctype + payload))
    return struct.pack(">I", len(payload)) + ctype + payload + crc


def _png(chunks):
    return b"\x89PNG\r\n\x1a\n" + b"".join(_chunk(t, p) for t, p in chunks)


def _ihdr(w, h, depth=16, colour=2, interlace=0):
    return b"IHDR", struct.pack(">IIBBBBB", w, h, depth, colour, 0, 0, interlace)


def _filter_types(path):
    """Row filter types used in a (non-interlaced) PNG, read straight from its IDAT."""
    with open(path, "rb") as fh:
        data = fh.read()
    _, _, w, h, depth, colour = struct.unpack(">8s8sIIBB", data[:26])
    pos, idat = 8, b""
    while pos < len(data):
        length, ctype = struct.unpack(">I4s", data[pos:pos + 8])
        if ctype == b"IDAT":
            idat += data[pos + 8:pos + 8 + length]
        pos += 12 + length
    stride = 1 + w * {0: 1, 2: 3, 4: 2, 6: 4}[colour] * depth // 8
    return set(zlib.decompress(idat)[::stride][:h])


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
@pytest.mark.parametrize("filters", FILTER_SETS)
def test_round_trip(tmp_path, channels, filters):
    rng = np.random.default_rng(channels)
    small = rng.integers(0, 23, size=(7, 13, channels)).astype(np.uint16)
    full = rng.integers(0, 65536, size=(9, 5, channels)).astype(np.uint16)
    full[0, 0], full[-1, -1] = 65535, 0
    y, x = np.mgrid[0:11, 0:17]  # smooth ramp: small differences across rows/columns
    smooth = np.stack([(x * 257 + y * 1000 + k) % 65536 for k in range(channels)], -1)
    tiny = rng.integers(0, 8, size=(8, 9, channels, 2)) @ np.array([256, 1])  # many Paeth ties
    for i, arr in enumerate([small, full, smooth.astype(np.uint16), tiny.astype(np.uint16)]):
        path = tmp_path / f"a{i}.png"
        write_png16(path, arr, filters)
        if filters is not None:
            assert _filter_types(path) == set(filters[:arr.shape[0]])
        out = read_png16(path)
        assert out.dtype == np.uint16 and out.shape == arr.shape
        np.testing.assert_array_equal(out, arr)


def test_two_dimensional_input_and_single_pixel(tmp_path):
    arr = np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000
    write_png16(tmp_path / "g.png", arr, (0, 1, 2, 3, 4))
    np.testing.assert_array_equal(read_png16(tmp_path / "g.png"), arr[:, :, None])
    write_png16(tmp_path / "one.png", np.array([[[1, 2, 3, 65535]]], np.uint16), (4,))
    np.testing.assert_array_equal(read_png16(str(tmp_path / "one.png")), [[[1, 2, 3, 65535]]])


def test_reads_pillow_16bit_grey(tmp_path):
    arr = np.random.default_rng(1).integers(0, 65536, size=(19, 23)).astype(np.uint16)
    Image.fromarray(arr).save(tmp_path / "p.png")
    with Image.open(tmp_path / "p.png") as img:
        assert img.mode == "I;16"  # Pillow handles single-channel 16-bit PNGs correctly
        np.testing.assert_array_equal(np.array(img), arr)
    np.testing.assert_array_equal(read_png16(tmp_path / "p.png")[:, :, 0], arr)


@pytest.mark.parametrize("filters", FILTER_SETS)
def test_pillow_reads_our_16bit_grey(tmp_path, filters):
    arr = np.random.default_rng(2).integers(0, 65536, size=(10, 21)).astype(np.uint16)
    write_png16(tmp_path / "o.png", arr, filters)
    with Image.open(tmp_path / "o.png") as img:
        assert img.mode == "I;16"
        np.testing.assert_array_equal(np.array(img).astype(np.int64), arr)


@pytest.mark.parametrize("channels,mode", [(3, "RGB"), (4, "RGBA")])
@pytest.mark.parametrize("filters", FILTER_SETS)
def test_pillow_high_bytes_match_our_16bit_colour(tmp_path, channels, mode, filters):
    # Independent check of the writer's filters on multi-channel data: Pillow
    # (13.0) decodes 16-bit RGB/RGBA to 8 bits by keeping each sample's high byte.
    arr = np.random.default_rng(3).integers(0, 65536, size=(12, 9, channels)).astype(np.uint16)
    write_png16(tmp_path / "c.png", arr, filters)
    with Image.open(tmp_path / "c.png") as img:
        assert img.mode == mode
        np.testing.assert_array_equal(np.array(img), arr >> 8)


@pytest.mark.parametrize("channels", [3, 4])
def test_pillow_loses_synthia_ids_but_we_do_not(tmp_path, channels):
    ids = (np.arange(8 * 12).reshape(8, 12) % 23).astype(np.uint16)  # class ids 0..22
    arr = np.zeros((8, 12, channels), np.uint16)
    arr[:, :, 0] = ids
    arr[:, :, 1] = 7
    if channels == 4:
        arr[:, :, 3] = 65535
    write_png16(tmp_path / "label.png", arr, (0, 1, 2, 3, 4))
    # Pillow 13.0 keeps only the high byte, so every id < 256 becomes 0.
    with Image.open(tmp_path / "label.png") as img:
        pil_ids = np.array(img.convert("RGB"))[:, :, 0]
    assert not pil_ids.any()
    labels = read_label_channel(tmp_path / "label.png")
    assert labels.dtype == np.uint16 and labels.shape == (8, 12)
    np.testing.assert_array_equal(labels, ids)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA"])
def test_reads_pillow_8bit(tmp_path, mode):
    rng = np.random.default_rng(4)
    y, x = np.mgrid[0:40, 0:50]
    smooth = np.stack([(x * 3 + y * 5) % 256, (x * y) % 256, (x + 2 * y) % 256, x * 5], -1)
    noisy = rng.integers(0, 256, size=(40, 50, 4))
    arr = np.where(y[:, :, None] < 20, smooth, noisy).astype(np.uint8)[:, :, :len(mode)]
    img = Image.fromarray(arr.squeeze(-1) if mode == "L" else arr)
    assert img.mode == mode
    img.save(tmp_path / "e.png")
    assert len(_filter_types(tmp_path / "e.png")) >= 2  # Pillow's adaptive filtering mixes types
    out = read_png16(tmp_path / "e.png")
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out, arr)


def _write_valid(path):
    write_png16(path, np.arange(6 * 5 * 3, dtype=np.uint16).reshape(6, 5, 3), (0, 1, 2, 3, 4))
    return path.read_bytes()


def _expect_error(path, data, match):
    path.write_bytes(data)
    with pytest.raises(ValueError, match=match) as info:
        read_png16(path)
    assert path.name in str(info.value)


def test_error_bad_signature(tmp_path):
    data = _write_valid(tmp_path / "sig.png")
    _expect_error(tmp_path / "sig.png", b"\x89PNX" + data[4:], "signature")


def test_error_truncated_file(tmp_path):
    data = _write_valid(tmp_path / "half.png")
    _expect_error(tmp_path / "half.png", data[:len(data) // 2], "truncated")
    _expect_error(tmp_path / "noend.png", data[:-12], "truncated")  # IEND chunk missing


def test_error_truncated_image_data(tmp_path):
    rows = b"".join(b"\x00" + bytes(4 * 6) for _ in range(3))
    cut_stream = _png([_ihdr(4, 3), (b"IDAT", zlib.compress(rows)[:-5]), (b"IEND", b"")])
    _expect_error(tmp_path / "zlib.png", cut_stream, "truncated")
    too_few = _png([_ihdr(4, 3), (b"IDAT", zlib.compress(rows[:-1])), (b"IEND", b"")])
    _expect_error(tmp_path / "short.png", too_few, "truncated")


def test_error_corrupted_crc(tmp_path):
    data = bytearray(_write_valid(tmp_path / "crc.png"))
    data[-13] ^= 0xFF  # last byte of the IDAT CRC (IEND is the final 12 bytes)
    _expect_error(tmp_path / "crc.png", bytes(data), "CRC")
    data = bytearray(_write_valid(tmp_path / "crc2.png"))
    data[45] ^= 0x01  # a byte inside the IDAT payload
    _expect_error(tmp_path / "crc2.png", bytes(data), "CRC")


def test_error_interlaced(tmp_path):
    data = _write_valid(tmp_path / "adam7.png")
    patched = data[:8] + _chunk(*_ihdr(5, 6, interlace=1)) + data[33:]  # valid CRC, Adam7 flag
    _expect_error(tmp_path / "adam7.png", patched, "interlace")


def test_error_palette(tmp_path):
    grey = Image.fromarray(np.arange(20, dtype=np.uint8).reshape(4, 5))
    grey.convert("P").save(tmp_path / "pal.png")
    _expect_error(tmp_path / "pal.png", (tmp_path / "pal.png").read_bytes(), "palette")


def test_error_unsupported_bit_depth(tmp_path):
    idat = (b"IDAT", zlib.compress(bytes(9)))
    data = _png([_ihdr(4, 3, depth=4, colour=0), idat, (b"IEND", b"")])
    _expect_error(tmp_path / "d4.png", data, "bit depth 4")


def test_error_missing_chunks(tmp_path):
    idat = (b"IDAT", zlib.compress(b"\x00" + bytes(6)))
    _expect_error(tmp_path / "noihdr.png", _png([idat, (b"IEND", b"")]), "IHDR")
    _expect_error(tmp_path / "noidat.png", _png([_ihdr(1, 1), (b"IEND", b"")]), "IDAT")


def test_error_bad_filter_type(tmp_path):
    data = _png([_ihdr(1, 1), (b"IDAT", zlib.compress(b"\x05" + bytes(6))), (b"IEND", b"")])
    _expect_error(tmp_path / "f5.png", data, "filter")


def test_writer_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError):
        write_png16(tmp_path / "x.png", np.zeros((2, 2, 5), np.uint16))
    with pytest.raises(ValueError):
        write_png16(tmp_path / "x.png", np.full((2, 2), 70000))
    with pytest.raises(ValueError):
        write_png16(tmp_path / "x.png", np.zeros((2, 2), np.uint16), filters=(5,))
