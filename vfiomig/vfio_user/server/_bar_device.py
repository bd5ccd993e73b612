"""`BarDevice`: a small emulated device whose BAR contents are its whole state.

It is the device of the examples and of the tests: its migration stream is a header
(magic, BAR count, each BAR's size) followed by every BAR's bytes, so a migration is
verified by comparing the destination's BARs with the source's, byte for byte.

The emulator follows libvfio-user's ``samples/server.c``: the stream is snapshotted when
the device enters STOP_COPY, ``write_data`` takes at most the bytes still expected (more is
a partial write, which the server turns into EINVAL), and RESUMING -> STOP validates the
stream and loads it into the BARs, failing with EINVAL if it is incomplete or wrong.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Sequence
from typing import Final

from vfiomig.vfio_user._migration_bodies import MigState

MAGIC: Final = b"VFMBARS1"
_HEAD = struct.Struct("=8sI")
_SIZE = struct.Struct("=Q")


class BarDevice:
    """An emulator (see `Emulator`) with ``len(bar_sizes)`` zero-filled BARs.

    Attributes:
        bars: the BAR contents, one ``bytearray`` per region index.
        transitions: every state the server moved the device to, in order (for tests).
        write_sizes: the size of every ``write_data`` call (for tests).
    """

    def __init__(self, bar_sizes: Sequence[int] = (0x1000,)) -> None:
        if not bar_sizes or any(size < 0 for size in bar_sizes):
            raise ValueError(f"bar sizes {list(bar_sizes)} must be a non-empty list of sizes")
        self.bars = [bytearray(size) for size in bar_sizes]
        self.transitions: list[MigState] = []
        self.write_sizes: list[int] = []
        self._state = MigState.RUNNING
        self._outgoing = b""
        self._read_pos = 0
        self._incoming = bytearray()

    # ------------------------------------------------------------------ the state stream

    def state_bytes(self) -> bytes:
        """The migration stream this device would send now."""
        head = _HEAD.pack(MAGIC, len(self.bars)) + b"".join(_SIZE.pack(len(b)) for b in self.bars)
        return head + b"".join(bytes(b) for b in self.bars)

    def _stream_size(self) -> int:
        return _HEAD.size + _SIZE.size * len(self.bars) + sum(len(b) for b in self.bars)

    def _load(self, stream: bytes) -> None:
        if len(stream) != self._stream_size():
            raise OSError(
                errno.EINVAL,
                f"bar device state is {len(stream)} bytes (expected {self._stream_size()})",
            )
        magic, count = _HEAD.unpack_from(stream)
        if magic != MAGIC or count != len(self.bars):
            raise OSError(errno.EINVAL, f"bar device state has magic {magic!r} and {count} bars")
        pos = _HEAD.size
        for bar in self.bars:
            (size,) = _SIZE.unpack_from(stream, pos)
            if size != len(bar):
                raise OSError(errno.EINVAL, f"bar device state has a bar of {size} bytes")
            pos += _SIZE.size
        for bar in self.bars:
            bar[:] = stream[pos : pos + len(bar)]
            pos += len(bar)

    # ------------------------------------------------------------------ Emulator callbacks

    @property
    def region_sizes(self) -> Sequence[int]:
        return [len(b) for b in self.bars]

    def transition(self, state: MigState) -> None:
        previous, self._state = self._state, state
        try:
            if state == MigState.STOP_COPY:
                self._outgoing = self.state_bytes()
                self._read_pos = 0
            elif state == MigState.RESUMING:
                self._incoming = bytearray()
            elif state == MigState.STOP and previous == MigState.RESUMING:
                self._load(bytes(self._incoming))
                self._incoming = bytearray()
        except OSError:
            self._state = previous
            raise
        self.transitions.append(state)

    def read_data(self, size: int) -> bytes:
        if self._state != MigState.STOP_COPY:
            return b""  # no precopy data: everything is sent while stopped
        chunk = self._outgoing[self._read_pos : self._read_pos + size]
        self._read_pos += len(chunk)
        return chunk

    def write_data(self, data: memoryview) -> int:
        self.write_sizes.append(len(data))
        room = self._stream_size() - len(self._incoming)
        taken = min(room, len(data))
        self._incoming += data[:taken]
        return taken

    def region_read(self, index: int, offset: int, count: int) -> bytes:
        return bytes(self.bars[index][offset : offset + count])

    def region_write(self, index: int, offset: int, data: memoryview) -> int:
        self.bars[index][offset : offset + len(data)] = data
        return len(data)

    def reset(self) -> None:
        for bar in self.bars:
            bar[:] = bytes(len(bar))
        self._incoming = bytearray()
        self._outgoing = b""
        self._state = MigState.RUNNING
