"""Minimal 16-bit PNG reader and writer built on numpy + zlib.

Why this exists: SYNTHIA-RAND-CITYSCAPES stores its labels (``GT/LABELS/*.png``)
as 16-bit-per-sample RGB(A) PNGs whose channel 0 (R) holds the class id 0..22.
Pillow opens 16-bit RGB/RGBA PNGs as 8-bit images and keeps only the high byte
of each sample, so every id reads as 0.  ``read_png16`` decodes such files
exactly (non-interlaced, bit depth 8 or 16, colour types 0, 2, 4, 6);
``write_png16`` writes 16-bit PNGs, which the tests use as SYNTHIA-like fixtures.
"""
import os
import struct
import zlib

import numpy as np

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_CHANNELS = {0: 1, 4: 2, 2: 3, 6: 4}  # colour type -> samples per pixel
_COLOUR_TYPE = {c: t for t, c in _CHANNELS.items()}


def _chunks(data, name):
    """Yield (type, payload) for every chunk, checking lengths and CRCs."""
    if data[:8] != _SIGNATURE:
        raise ValueError(f"{name}: not a PNG file (bad signature)")
    pos = 8
    while pos < len(data):
        if pos + 12 > len(data):
            raise ValueError(f"{name}: truncated file (partial chunk header at byte {pos})")
        length, ctype = struct.unpack(">I4s", data[pos:pos + 8])
        end = pos + 8 + length
        if end + 4 > len(data):
            raise ValueError(f"{name}: truncated file ({ctype!r} chunk at byte {pos} is cut off)")
        if zlib.crc32(data[pos + 4:end]) != struct.unpack(">I", data[end:end + 4])[0]:
            raise ValueError(f"{name}: CRC mismatch in {ctype!r} chunk at byte {pos}")
        yield ctype, data[pos + 8:end]
        pos = end + 4


def _unfilter(filt, ftypes):
    """Undo the PNG row filters of ``filt`` (H, W, bpp uint8) -> uint8 (H, W, bpp).

    Pixel (y, x) depends on its left (a), upper (b) and upper-left (c)
    neighbours only, so all pixels on one anti-diagonal y + x = k can be decoded
    together.  In a skewed buffer ``q`` (q[r + col, r] is padded pixel (r, col);
    row 0 and column 0 are zero padding) each anti-diagonal is one contiguous
    slice, and its a, b, c neighbours are slices of the previous two.
    """
    h, w, bpp = filt.shape
    if not ftypes.any():  # every row uses filter 0 (None)
        return filt.copy()
    ft = ftypes.astype(np.intp)[:, None]
    q, f = np.zeros((2, w + h + 1, h + 1, bpp), np.int16)
    s0, s1, s2 = q.strides
    skew = lambda arr: np.lib.stride_tricks.as_strided(arr, (h + 1, w + 1, bpp), (s0 + s1, s0, s2))
    skew(f)[1:, 1:] = filt
    for j in range(2, w + h + 1):  # anti-diagonal j holds pixels with y + x = j - 2
        lo, hi = max(1, j - w), min(h, j - 1) + 1  # padded rows on this diagonal
        a, b, c = q[j - 1, lo:hi], q[j - 1, lo - 1:hi - 1], q[j - 2, lo - 1:hi - 1]
        pa, pb, pc = abs(b - c), abs(a - c), abs(a + b - 2 * c)  # |p-a|, |p-b|, |p-c|
        paeth = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))
        pred = np.choose(ft[lo - 1:hi - 1], (0, a, b, (a + b) >> 1, paeth))
        q[j, lo:hi] = (f[j, lo:hi] + pred) & 255
    return skew(q)[1:, 1:].astype(np.uint8)


def read_png16(path):
    """Read a non-interlaced 8/16-bit grey/grey+alpha/RGB/RGBA PNG -> uint16 (H, W, C)."""
    name = os.fspath(path)
    with open(name, "rb") as fh:
        data = fh.read()
    header, idat = None, []
    for ctype, payload in _chunks(data, name):
        if ctype == b"IHDR":
            if len(payload) != 13:
                raise ValueError(f"{name}: malformed IHDR chunk")
            header = struct.unpack(">IIBBBBB", payload)
        elif ctype == b"IDAT":
            idat.append(payload)
        elif ctype == b"IEND":
            break
    else:
        raise ValueError(f"{name}: truncated file (no IEND chunk)")
    if header is None:
        raise ValueError(f"{name}: missing IHDR chunk")
    width, height, depth, colour, compression, filter_method, interlace = header
    if colour not in _CHANNELS or depth not in (8, 16):
        what = "palette" if colour == 3 else f"bit depth {depth}, colour type {colour}"
        raise ValueError(f"{name}: unsupported PNG ({what}); only bit depth 8 or 16 with "
                         "colour type 0, 2, 4 or 6 is supported")
    if interlace != 0:
        raise ValueError(f"{name}: Adam7-interlaced PNGs are not supported")
    if compression != 0 or filter_method != 0 or width == 0 or height == 0:
        raise ValueError(f"{name}: invalid IHDR (compression/filter method or size)")
    if not idat:
        raise ValueError(f"{name}: missing IDAT chunk")
    try:
        raw = zlib.decompress(b"".join(idat))
    except zlib.error as exc:
        raise ValueError(f"{name}: truncated or corrupt image data ({exc})") from exc
    channels = _CHANNELS[colour]
    bpp = channels * depth // 8
    need = height * (width * bpp + 1)  # one filter byte + width * bpp bytes per row
    if len(raw) < need:
        raise ValueError(f"{name}: truncated image data ({len(raw)} bytes, expected {need})")
    rows = np.frombuffer(raw, np.uint8, need).reshape(height, -1)
    if rows[:, 0].max() > 4:
        raise ValueError(f"{name}: invalid row filter type {rows[:, 0].max()}")
    pixels = _unfilter(rows[:, 1:].reshape(height, width, bpp), rows[:, 0])
    if depth == 16:
        pixels = pixels.reshape(-1).view(">u2")
    return pixels.astype(np.uint16).reshape(height, width, channels)


def read_label_channel(path):
    """SYNTHIA class ids: channel 0 (R) of ``read_png16`` as uint16 (H, W)."""
    return np.ascontiguousarray(read_png16(path)[:, :, 0])


def _chunk(ctype, payload):
    return (struct.pack(">I", len(payload)) + ctype + payload
            + struct.pack(">I", zlib.crc32(ctype + payload)))


def write_png16(path, array, filters=None):
    """Write a uint16 (H, W) or (H, W, C<=4) array as a 16-bit PNG.

    ``filters``: None (filter 0 on every row) or an iterable of PNG filter
    types 0..4 cycled over the rows, e.g. (0, 1, 2, 3, 4).
    """
    arr = np.asarray(array)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or not 1 <= arr.shape[2] <= 4 or arr.size == 0:
        raise ValueError(f"expected a non-empty (H, W) or (H, W, 1..4) array, got {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer) or arr.min() < 0 or arr.max() > 65535:
        raise ValueError("array must hold integers in 0..65535")
    cycle = [0] if filters is None else [int(t) for t in filters]
    if not cycle or not all(0 <= t <= 4 for t in cycle):
        raise ValueError(f"filters must be PNG filter types 0..4, got {filters!r}")
    h, w, channels = arr.shape
    bpp = 2 * channels
    raw = np.ascontiguousarray(arr, ">u2").view(np.uint8).reshape(h, w * bpp).astype(np.int32)
    # Forward filters straight from the spec: predict each raw byte from the raw
    # bytes left (a), above (b) and above-left (c), store (raw - prediction) mod 256.
    a, b, c = np.zeros((3, h, w * bpp), np.int32)
    a[:, bpp:], b[1:], c[1:, bpp:] = raw[:, :-bpp], raw[:-1], raw[:-1, :-bpp]
    p = a + b - c
    pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
    paeth = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))
    predictions = np.stack([np.zeros_like(raw), a, b, (a + b) // 2, paeth])
    ftypes = np.resize(np.array(cycle, np.intp), h)
    filtered = (raw - predictions[ftypes, np.arange(h)]) % 256
    scanlines = np.concatenate([ftypes[:, None], filtered], axis=1).astype(np.uint8)
    ihdr = struct.pack(">IIBBBBB", w, h, 16, _COLOUR_TYPE[channels], 0, 0, 0)
    with open(os.fspath(path), "wb") as fh:
        fh.write(_SIGNATURE + _chunk(b"IHDR", ihdr)
                 + _chunk(b"IDAT", zlib.compress(scanlines.tobytes(), 6)) + _chunk(b"IEND", b""))
