"""The C core's receive blocks: packets held in place until written, within the budget.

A channel's framer receives small packets into its block and hands them to the reorder
buffer in place; a block still holding packets is retired instead of moved, and the
budget counts its free part (`Budget.slack`). Hypothesis drives one channel
(`Framer.pump_recv`, tiny blocks so that they turn over often) with the packets of a
device in any arrival order, a tight budget, and a loader that takes batches, reports
them written later and holds on to the views a while longer (as a sink may). After every
step:

- the memory the packets pin (queued + slack) stays within the budget plus one packet
  (the next idx, accepted over budget while the loader is idle) plus one block (retired
  between two offers), however the stragglers are spread over the blocks: an offer that
  does not fit first copies out the packets of sparse retired blocks;
- the loader has written a prefix of the stream, in idx order.

At the end the device is driven to completion, which must succeed (no deadlock under
backpressure) with exactly its stream written, and once every view is gone the budget
holds nothing: no slack is left behind.
"""

from __future__ import annotations

import fcntl
import gc
import os
import random

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import vfiomig._core as core_module
from vfiomig._core import PacketHeader, Ready, ReorderBuffer
from vfiomig._core._wire import encode_handshake, encode_packet, wrap_config

pytestmark = pytest.mark.skipif(
    "native" not in core_module.IMPLEMENTATIONS, reason="the C core is not built"
)
native = core_module.IMPLEMENTATIONS.get("native")
if native is not None:
    from vfiomig._native import Run

UUID = bytes(range(16))
KEY = ("0000:00:04.0/vfio", 0)
BLOCK = 16 * 1024  # packets up to 4 KiB stay in the block until written
MAX_PACKET = 4095
CHANNELS = 2


class _Channel:
    def __init__(self, cid: int, packets: list[bytes], rng: random.Random) -> None:
        assert native is not None
        self.stream = encode_handshake(UUID, cid) + b"".join(packets)
        self.pos = 64
        self.rng = rng
        self.framer = native.Framer(uuid=UUID, channels=CHANNELS, buffer_size=BLOCK)
        self.framer.feed(self.stream[:64])
        assert isinstance(self.framer.next_event(), native.ChannelHello)
        self.routes: dict[tuple[str, int], object] = {}
        self.parked: PacketHeader | None = None  # a header refused for budget
        self.ended = False

    def recv(self, view: memoryview) -> int:
        if self.pos >= len(self.stream):
            return 0
        n = min(len(view), len(self.stream) - self.pos, self.rng.randint(1, 3 * BLOCK))
        view[:n] = self.stream[self.pos : self.pos + n]
        self.pos += n
        return n

    def slow_path(self, buf: ReorderBuffer, hdr: PacketHeader) -> bool:
        """The channel task's slow path for a header pump_recv handed back: offer (or
        park), read the data, deliver; the device then joins the fast path."""
        if not buf.offer(hdr.version, hdr.idx, hdr.flags, hdr.size):
            self.parked = hdr
            return False
        self.parked = None
        self.routes[KEY] = buf
        if hdr.size and self.rng.random() < 0.5:  # left to pump_recv, as a channel does
            self.framer.defer_payload(buf)
            return True
        data = bytearray(hdr.size)
        got = 0
        while got < len(data):
            got += self.framer.read_payload_into(memoryview(data)[got:])
            if got < len(data):
                with self.framer.get_buffer(4096) as view:
                    n = self.recv(view)
                self.framer.commit(n)
        buf.deliver(hdr.idx, bytes(data))
        self.routes[KEY] = buf
        return True

    def receive(self, buf: ReorderBuffer, limit: int) -> None:
        if self.ended or (self.parked is not None and not self.slow_path(buf, self.parked)):
            return
        status, _done, hdr = self.framer.pump_recv(self.recv, self.routes, limit)
        if status == native.PUMP_END:  # type: ignore[union-attr]
            self.ended = True
        elif status == native.PUMP_HEADER:  # type: ignore[union-attr]
            self.slow_path(buf, hdr)


class BlocksMachine(RuleBasedStateMachine):
    @initialize(
        limit=st.integers(0, 6 * BLOCK),
        sizes=st.lists(st.integers(0, MAX_PACKET), min_size=1, max_size=60),
        seed=st.integers(0, 2**32 - 1),
    )
    def setup(self, limit: int, sizes: list[int], seed: int) -> None:
        assert native is not None
        rng = random.Random(seed)
        self.data = [rng.randbytes(n) for n in sizes]
        # Each idx goes to a channel at random; a channel carries its packets in idx order
        # (SPEC §2), so a late channel leaves stragglers in the other's blocks.
        per: list[list[bytes]] = [[] for _ in range(CHANNELS)]
        for i, d in enumerate(self.data):
            per[rng.randrange(CHANNELS)].append(encode_packet(KEY[0], KEY[1], i, 0, d))
        cfg = encode_packet(KEY[0], KEY[1], len(sizes), 1, wrap_config(b"cfg"))
        per[rng.randrange(CHANNELS)].append(cfg)
        self.budget = native.Budget(limit)
        self.buf = native.ReorderBuffer(f"{KEY[0]}/{KEY[1]}", self.budget)
        self.buf.open_gate()
        self.channels = [_Channel(c, p, rng) for c, p in enumerate(per)]
        self.taken: Ready | None = None  # a batch taken, not yet written
        self.kept: list[memoryview] = []  # views a sink still holds after the write
        self.held: list[Run] = []  # runs written, not yet released (a late loader)
        self.pipe_r, self.pipe_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        fcntl.fcntl(self.pipe_w, fcntl.F_SETPIPE_SZ, 4096)  # short writes
        self.written = bytearray()
        self.expect = b"".join(self.data)

    @rule(c=st.integers(0, CHANNELS - 1), limit=st.integers(1, 2 * BLOCK))
    def receive(self, c: int, limit: int) -> None:
        self.channels[c].receive(self.buf, limit)

    # -- the loader -------------------------------------------------------------------

    @rule(through_fd=st.booleans())
    def loader_take(self, through_fd: bool = False) -> None:
        """Take a run and write it: as chunks (views, as most sinks), or from C with
        write_to into a small non-blocking pipe (short writes: the cursor carries on)."""
        if self.taken is None:
            self.taken = self.buf.take_ready()
            if self.taken is None:
                return
            run = self.taken.chunks
            assert isinstance(run, Run) and run.nbytes == self.taken.nbytes
            if not through_fd:
                for c in run:
                    assert isinstance(c, bytes) or (isinstance(c, memoryview) and c.readonly)
                    self.written += c
                return
            while run.remaining:
                try:
                    run.write_to(self.pipe_w)
                except BlockingIOError:
                    pass
                self.written += os.read(self.pipe_r, 1 << 20)

    @rule(keep=st.booleans(), release=st.booleans())
    def loader_written(self, keep: bool, release: bool = True) -> None:
        """Report the run written; release it now, or leave it to a late loader (held,
        released later in any order); the sink may keep views of its chunks."""
        if self.taken is not None:
            self.buf.written(self.taken.nbytes)
            run = self.taken.chunks
            assert isinstance(run, Run)
            if keep:
                self.kept += [c for c in run if isinstance(c, memoryview)]
            if release:
                self.taken.release()
                assert run.released and run.remaining == 0
                with pytest.raises(ValueError, match="released"):
                    run[0]
            else:
                self.held.append(run)
            self.taken = None

    @rule(data=st.data())
    def loader_releases_a_held_run(self, data: st.DataObject) -> None:
        if self.held:
            i = data.draw(st.integers(0, len(self.held) - 1))
            self.held.pop(i).release()

    @rule()
    def sink_lets_go(self) -> None:
        self.kept.clear()

    # -- invariants -------------------------------------------------------------------

    @invariant()
    def memory_within_budget(self) -> None:
        b = self.budget
        assert b.queued >= 0 and b.slack >= 0
        # held by the sink or a late loader, outside the budget
        kept = sum(len(v) for v in self.kept) + sum(r.nbytes for r in self.held)
        assert b.queued + b.slack <= b.limit + MAX_PACKET + CHANNELS * BLOCK + kept

    @invariant()
    def written_in_order(self) -> None:
        assert self.expect.startswith(bytes(self.written))

    def teardown(self) -> None:
        if not hasattr(self, "buf"):
            return
        for _ in range(10_000):
            self.loader_written(False)
            self.sink_lets_go()
            self.loader_take()
            if self.taken is None and self.buf.finishable:
                break
            if self.taken is None and all(ch.parked or ch.ended for ch in self.channels):
                for ch in self.channels:
                    if ch.parked is not None and ch.slow_path(self.buf, ch.parked):
                        break
                else:
                    pytest.fail("every offer refused with nothing to write: deadlock")
            for ch in self.channels:
                ch.receive(self.buf, 1 << 20)
        else:
            pytest.fail("the device never completed")
        assert bytes(self.written) == self.expect
        self.buf.mark_loaded()
        assert self.budget.queued == 0
        while self.held:
            self.held.pop().release()
        os.close(self.pipe_r)
        os.close(self.pipe_w)
        self.channels.clear()
        gc.collect()
        assert self.budget.slack == 0, "a block's charge outlived it"


def test_blocks_state_machine() -> None:
    BlocksMachine.TestCase.settings = settings(
        max_examples=min(80, settings().max_examples),
        stateful_step_count=60,
        deadline=None,
    )
    BlocksMachine.TestCase().runTest()


def test_a_packet_view_is_read_only_and_its_block_not_exportable() -> None:
    assert native is not None
    buf = native.ReorderBuffer("d/0", native.Budget(1 << 20))
    buf.open_gate()
    ch = _Channel(0, [encode_packet(*KEY, 0, 0, b"x" * 3000)], random.Random(0))
    ch.routes[KEY] = buf
    assert ch.framer.pump_recv(ch.recv, ch.routes, 1 << 20)[:2] == (native.PUMP_END, 1)
    ready = buf.take_ready()
    assert ready is not None
    (view,) = ready.chunks
    assert isinstance(view, memoryview) and view.readonly and bytes(view) == b"x" * 3000
    with pytest.raises(TypeError):
        view[0] = 0
    with pytest.raises(BufferError):
        memoryview(view.obj)  # the block itself is never handed out


def test_a_straggler_is_copied_out_when_its_block_stands_in_the_way() -> None:
    """Channel 0 brings idx 0, 1, 2, 4, 5..9 (3000 bytes each, four to its first block),
    channel 1 idx 3 late. Once 0..2 are written the first block holds only idx 4, waiting
    for 3, and stays whole; the budget (20 000 bytes) counts its free part. The offer of
    idx 6 does not fit with it, so idx 4 is copied out and the block freed: every packet
    of channel 0 is accepted, none parks."""
    assert native is not None
    size, limit = 3000, 20_000
    data = [bytes([i]) * size for i in range(10)]
    budget = native.Budget(limit)
    buf = native.ReorderBuffer(f"{KEY[0]}/{KEY[1]}", budget)
    buf.open_gate()
    order0 = [0, 1, 2, 4, 5, 6, 7, 8, 9]
    ch0 = _Channel(0, [encode_packet(*KEY, i, 0, data[i]) for i in order0], random.Random(0))
    ch0.rng.randint = lambda a, b: b  # type: ignore[method-assign]  # receive all there is
    routes = {KEY: buf}
    status, done, _ = ch0.framer.pump_recv(ch0.recv, routes, 1)  # the first block: 0 1 2 4
    assert (status, done) == (native.PUMP_NEED_DATA, 4)
    ready = buf.take_ready()
    assert ready is not None and ready.nbytes == 3 * size
    assert all(isinstance(c, memoryview) for c in ready.chunks)
    buf.written(ready.nbytes)
    del ready
    assert budget.slack == 0  # the block is still the channel's current one
    status, done, hdr = ch0.framer.pump_recv(ch0.recv, routes, 1 << 20)
    assert (status, done, hdr) == (native.PUMP_END, 5, None), "an offer was refused"
    assert budget.queued == 6 * size  # idx 4..9
    assert budget.slack < BLOCK - size  # the first block's charge is gone with it
    assert budget.peak_pinned > limit  # the retired block was counted before it was freed
    ch1 = _Channel(1, [encode_packet(*KEY, 3, 0, data[3])], random.Random(0))
    ch1.receive(buf, 1 << 20)
    ready = buf.take_ready()
    assert ready is not None and b"".join(ready.chunks) == b"".join(data[3:])
