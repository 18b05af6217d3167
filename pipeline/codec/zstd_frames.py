"""zstd frames, one per passage, so a reader decompresses only the passages it fetched.

Level 0 stores the codes as they are (a codec whose codes do not compress, e.g. product quantisation)."""
from __future__ import annotations

import zstandard

from storage.errors import OperationFailed


class PackError(OperationFailed, ValueError):
    """A stored frame does not decode to the size its row says (corrupt or hostile data)."""


class Packer:
    def __init__(self, level: int = 3):
        self.level = level
        self._c = zstandard.ZstdCompressor(level=level, write_content_size=True) if level else None
        self._d = zstandard.ZstdDecompressor()

    def pack(self, raw: bytes) -> bytes:
        return self._c.compress(raw) if self._c is not None else raw

    def unpack(self, frame: bytes, expected_size: int) -> bytes:
        """Decompress at most `expected_size` bytes: a frame claiming more is refused, not inflated."""
        if self._c is None:
            if len(frame) != expected_size:
                raise PackError(f"row holds {len(frame)} code bytes, expects {expected_size}")
            return frame
        try:
            declared = zstandard.frame_content_size(frame)
        except zstandard.ZstdError as exc:
            raise PackError(f"not a zstd frame: {exc}") from exc
        if declared not in (-1, expected_size):
            raise PackError(f"frame declares {declared} bytes, row expects {expected_size}")
        try:
            raw = self._d.decompress(frame, max_output_size=expected_size)
        except zstandard.ZstdError as exc:
            raise PackError(f"corrupt zstd frame: {exc}") from exc
        if len(raw) != expected_size:
            raise PackError(f"frame holds {len(raw)} bytes, row expects {expected_size}")
        return raw
