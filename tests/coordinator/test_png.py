"""The coordinator's PNG structure check: one plain PNG of the job's size, nothing more."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from aitbc.coordinator import png
from aitbc.errors import InvalidArgument
from aitbc.miner.backend import null_png


def encode(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def test_honest_pngs_pass_even_incompressible_ones() -> None:
    def size(data: bytes) -> tuple[int, int]:
        info = png.inspect(data)
        return info.width, info.height

    assert size(null_png("x", 1, 64, 64)) == (64, 64)
    noise = np.random.default_rng(1).integers(0, 256, (512, 512, 3))
    assert size(encode(noise)) == (512, 512)
    assert size(encode(np.zeros((64, 96, 4)))) == (96, 64)


def test_a_padded_png_is_refused() -> None:
    good = null_png("x", 1, 64, 64)
    with pytest.raises(InvalidArgument, match="bytes after its IEND chunk"):
        png.inspect(good + b"\0" * 60_000_000)
    iend = good.rindex(b"IEND") - 4
    with pytest.raises(InvalidArgument, match="ancillary chunks"):  # padding hidden in a text chunk
        png.inspect(good[:iend] + chunk(b"tEXt", b"c\0" + b"x" * 200_000) + good[iend:])
    with pytest.raises(InvalidArgument, match="more than a 64x64 image"):  # or in image data
        png.inspect(good[:iend] + chunk(b"IDAT", b"\0" * 40_000) + good[iend:])
    with pytest.raises(InvalidArgument, match="more than a 64x64 image needs"):  # or in empty chunks
        png.inspect(good[:iend] + chunk(b"IDAT", b"") * 20_000 + good[iend:])


@pytest.mark.parametrize(("data", "needle"), [
    (b"GIF89a" + b"\0" * 100, "bad signature"),
    (png.SIGNATURE + chunk(b"IDAT", b""), "does not start with its IHDR"),
    (png.SIGNATURE + chunk(b"IHDR", struct.pack(">IIBBBBB", 64, 64, 8, 2, 0, 0, 0)), "truncated"),
    (png.SIGNATURE + chunk(b"IHDR", struct.pack(">IIBBBBB", 64, 64, 8, 9, 0, 0, 0)) + chunk(b"IEND", b""),
     "header is invalid"),
])
def test_what_is_not_one_plain_png_is_refused(data: bytes, needle: str) -> None:
    with pytest.raises(InvalidArgument, match=needle):
        png.inspect(data)


def test_a_bad_crc_is_refused() -> None:
    good = bytearray(null_png("x", 1, 64, 64))
    good[20] ^= 1  # inside IHDR's width
    with pytest.raises(InvalidArgument, match="bad CRC"):
        png.inspect(bytes(good))
