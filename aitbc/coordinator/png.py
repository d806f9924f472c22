"""What a PNG artifact may be: its structure read chunk by chunk, never decoded.

A miner's image must be one well-formed PNG (signature, IHDR first, IEND last, nothing after it)
whose dimensions are the job's and whose size is within what those dimensions can compress to:
no padding after IEND, no megabytes of ancillary chunks, no IDAT larger than the raw pixels
stored uncompressed. docs/receipts.md ("Image outputs") states the bound.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from typing import BinaryIO

from aitbc.errors import InvalidArgument
from aitbc.jobs import PNG_MAGIC

SIGNATURE = PNG_MAGIC
MAX_ANCILLARY_BYTES = 64 * 1024  # text, gamma, ICC profile ... in all
_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # colour type -> samples per pixel
_PIECE = 1024 * 1024  # how much of a chunk is read at once


@dataclass(frozen=True, slots=True)
class PngInfo:
    width: int
    height: int


def raw_size(width: int, height: int, channels: int, bit_depth: int) -> int:
    """Bytes of the filtered scanlines: one filter byte per row plus the packed samples."""
    return height * (1 + (width * channels * bit_depth + 7) // 8)


def stored_bound(raw: int) -> int:
    """The most compressed image data an honest encoder writes for `raw` bytes: incompressible
    pixels (noise) come out slightly larger than raw (measured ~0.1% with Pillow's streaming zlib;
    1% + 1 KiB is allowed)."""
    return raw + raw // 100 + 1024


def inspect(data: bytes | BinaryIO) -> PngInfo:
    """Walk the chunks; raise InvalidArgument (naming what is wrong) unless this is one plain PNG.
    `data` is the bytes or a binary file (an upload on disk: read in pieces, never all in memory)."""
    f = io.BytesIO(data) if isinstance(data, bytes | bytearray) else data
    total = f.seek(0, io.SEEK_END)
    f.seek(0)
    if f.read(len(SIGNATURE)) != SIGNATURE:
        raise InvalidArgument("not a PNG image (bad signature)")
    pos, first, info, idat, ancillary, chunks = len(SIGNATURE), True, None, 0, 0, 0
    while True:
        if pos + 12 > total:
            raise InvalidArgument("PNG is truncated (no IEND chunk)")
        length, kind = struct.unpack(">I4s", f.read(8))
        end = pos + 12 + length
        if end > total:
            raise InvalidArgument(f"PNG chunk {kind!r} runs past the end of the file")
        crc, body = zlib.crc32(kind), b""
        for off in range(0, length, _PIECE):  # bodies are read in pieces: IDAT may be megabytes
            piece = f.read(min(_PIECE, length - off))
            crc = zlib.crc32(piece, crc)
            if off == 0 and kind != b"IDAT":
                body = piece[:64]  # the header fields read below (IHDR is 13 bytes)
        tail = f.read(4)
        chunks += 1
        if struct.unpack(">I", tail)[0] != crc:
            raise InvalidArgument(f"PNG chunk {kind!r} has a bad CRC")
        if first:
            if kind != b"IHDR" or length != 13:
                raise InvalidArgument("PNG does not start with its IHDR chunk")
            width, height, depth, colour = struct.unpack(">IIBB", body[:10])
            if colour not in _CHANNELS or depth not in (1, 2, 4, 8, 16) or not width or not height:
                raise InvalidArgument(f"PNG header is invalid (colour type {colour}, bit depth {depth})")
            info = (width, height, _CHANNELS[colour], depth)
            first = False
        elif kind == b"IDAT":
            idat += length
        elif kind == b"IEND":
            if end != total:
                raise InvalidArgument(f"PNG has {total - end} bytes after its IEND chunk (padding)")
            break
        else:
            ancillary += length
            if ancillary > MAX_ANCILLARY_BYTES:
                raise InvalidArgument(f"PNG carries more than {MAX_ANCILLARY_BYTES} bytes of ancillary chunks")
        pos = end
    assert info is not None
    width, height, channels, depth = info
    idat_bound = stored_bound(raw_size(width, height, channels, depth))
    if idat > idat_bound:
        raise InvalidArgument(f"PNG image data is {idat} bytes, more than a {width}x{height} image can take "
                              f"even uncompressed ({idat_bound})")
    # every chunk costs 12 bytes of framing: an honest encoder writes IDAT in pieces of 4 KiB or more
    most = len(SIGNATURE) + idat_bound + 12 * (idat_bound // 4096 + 2) + MAX_ANCILLARY_BYTES + 12 * 64 + 25 + 12
    if total > most:
        raise InvalidArgument(f"PNG is {total} bytes in {chunks} chunks, more than a {width}x{height} image "
                              f"needs ({most})")
    return PngInfo(width, height)
