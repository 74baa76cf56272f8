"""The AMST core driven by a deterministic simulator: virtual time, no sockets, no sleeps.

Two cores (opener A, acceptor B) are joined by simulated streams. Each stream direction is a FIFO
link with a rate and a one-way delay; its writer pulls frames from the core whenever fewer than
``LOWAT`` bytes are still unsent (as TCP_NOTSENT_LOWAT makes a real socket do). Frames cross the link
through the real codec (encoder on one side, a decoder per stream on the other). The schedule can kill
streams (everything in flight on them is lost, both sides drop them), freeze them (nothing arrives any
more; the cores must notice the stall), join new ones, retire one gracefully, slow one down, and stall
a consumer. Producers on both sides write random-sized pieces on several channels; consumers read
random amounts.

Every run checks: every channel's bytes arrive exactly once, in order; each side's send buffer stays
within its budget (plus one write piece); each side's receive memory stays within the session window
(plus the initial window of each channel); every channel ends on both sides.
"""

from __future__ import annotations

import heapq
import itertools
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from novacron.dwcp.errors import ProtocolError
from novacron.dwcp.frames.codec import Frame, FrameDecoder, FrameEncoder
from novacron.dwcp.frames.messages import Ack, ChannelClose, DataChunk
from novacron.dwcp.transport.config import INITIAL_CHANNEL_WINDOW, AmstConfig
from novacron.dwcp.transport.core import (
    AmstCore,
    ChannelEnded,
    ChannelOpened,
    Role,
    StreamDrained,
    StreamStalled,
)

KiB = 1024
MAX_FRAME = 64 * KiB
CONFIG = AmstConfig(
    chunk_min=1 * KiB,
    chunk_initial=8 * KiB,
    chunk_max=32 * KiB,
    channel_window=INITIAL_CHANNEL_WINDOW,
    session_window=2 * INITIAL_CHANNEL_WINDOW,
    max_channels=16,
    budget_initial=128 * KiB,
    budget_floor=64 * KiB,
    budget_max=512 * KiB,
    ack_every_bytes=32 * KiB,
    stall_timeout_s=0.5,
    ping_interval_s=0.2,
)
LOWAT = 16 * KiB
SPIN_LIMIT = 100_000  # events at one instant: the core keeps asking for a pull it then refuses
WRITE_PIECE = 24 * KiB  # the largest single write: the budget may be exceeded by at most this


@dataclass
class Pipe:
    """One direction of a simulated stream."""

    rate: float  # bytes per second
    delay: float
    busy_until: float = 0.0
    frozen: bool = False  # nothing sent from now on arrives (a stalled path)

    def unsent(self, now: float) -> float:
        return max(0.0, self.busy_until - now) * self.rate


@dataclass
class SimStream:
    index: int
    pipes: dict[str, Pipe]  # by sending side
    decoders: dict[str, FrameDecoder]  # by receiving side
    alive: dict[str, bool] = field(default_factory=lambda: {"a": True, "b": True})


@dataclass
class Flow:
    """A producer on one side writing one channel, and what the other side reads of it."""

    data: bytes
    written: int = 0
    closed: bool = False
    received: bytearray = field(default_factory=bytearray)
    eof: bool = False
    ended: dict[str, bool] = field(default_factory=lambda: {"a": False, "b": False})


class Sim:
    def __init__(self, seed: int, streams: int, rate: float = 2e6, delay: float = 0.01) -> None:
        self.rng = random.Random(seed)
        self.now = 0.0
        self._events: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self.cores = {
            "a": AmstCore(Role.OPENER, 0.0, config=CONFIG, max_frame_size=MAX_FRAME),
            "b": AmstCore(Role.ACCEPTOR, 0.0, config=CONFIG, max_frame_size=MAX_FRAME),
        }
        self.encoder = FrameEncoder(MAX_FRAME)
        self.rate, self.delay = rate, delay
        self.streams: dict[int, SimStream] = {}
        self._next_stream = 0
        self.flows: dict[tuple[str, int], Flow] = {}  # (writer side, channel) -> flow
        self._pull_at: dict[tuple[str, int], float] = {}
        self._timer_at: dict[str, float | None] = {"a": None, "b": None}
        self.consumer_stalled = {"a": False, "b": False}
        self.read_sizes = (1 * KiB, 64 * KiB)
        self.max_held = {"a": 0, "b": 0}
        self.max_buffered_over = {"a": 0, "b": 0}
        self.stalls = 0
        for _ in range(streams):
            self.add_stream()

    # ---- event queue ----

    def at(self, when: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._events, (when, next(self._seq), action))

    def run(self, until: float) -> None:
        same_time = 0
        while self._events and self._events[0][0] <= until:
            when, _, action = heapq.heappop(self._events)
            same_time = same_time + 1 if when <= self.now else 0
            assert same_time < SPIN_LIMIT, f"{SPIN_LIMIT} events without time moving at t={self.now}"
            self.now = max(self.now, when)
            action()

    @staticmethod
    def other(side: str) -> str:
        return "b" if side == "a" else "a"

    # ---- streams ----

    def add_stream(self) -> int:
        index = self._next_stream
        self._next_stream += 1
        self.streams[index] = SimStream(
            index,
            {s: Pipe(self.rate, self.delay) for s in "ab"},
            {s: FrameDecoder(MAX_FRAME) for s in "ab"},
        )
        for side in "ab":
            self.cores[side].add_stream(index, self.now)
            self.react(side)
        return index

    def kill(self, index: int) -> None:
        """The connection breaks: both sides see it, in-flight frames are lost."""
        s = self.streams.get(index)
        if s is None:
            return
        for side in "ab":
            if s.alive[side]:
                s.alive[side] = False
                self.cores[side].remove_stream(index, self.now)
                self.react(side)
        del self.streams[index]
        self._replace_if_none()

    def _replace_if_none(self) -> None:
        """As the opener does: when no stream takes new work any more, join one."""
        a = self.cores["a"]
        if all(a._streams[i].draining or a._streams[i].stalled for i in a.streams if i in self.streams):
            self.at(self.now + 0.1, self.add_stream)

    def freeze(self, index: int) -> None:
        s = self.streams.get(index)
        if s is not None:
            for pipe in s.pipes.values():
                pipe.frozen = True

    def slow(self, index: int, factor: float) -> None:
        s = self.streams.get(index)
        if s is not None:
            for pipe in s.pipes.values():
                pipe.rate /= factor

    def retire(self, index: int) -> None:
        if index in self.streams:
            self.cores["a"].drain_stream(index, self.now)
            self.react("a")
            self._replace_if_none()

    def _close_gracefully(self, side: str, index: int) -> None:
        """`side` says GOODBYE after its last frame; the peer drops the stream when that arrives."""
        s = self.streams.get(index)
        if s is None or not s.alive[side]:
            return
        s.alive[side] = False
        self.cores[side].remove_stream(index, self.now)
        self.react(side)
        pipe = s.pipes[side]
        peer = self.other(side)

        def peer_sees_goodbye() -> None:
            if s.alive[peer]:
                s.alive[peer] = False
                self.cores[peer].remove_stream(index, self.now)
                self.react(peer)
            self.streams.pop(index, None)

        self.at(max(self.now, pipe.busy_until) + pipe.delay, peer_sees_goodbye)
        self._replace_if_none()

    # ---- frames ----

    def _send(self, side: str, s: SimStream, frames: list[Frame]) -> None:
        pipe = s.pipes[side]
        peer = self.other(side)
        data = b"".join(self.encoder.encode(f) for f in frames)
        start = max(self.now, pipe.busy_until)
        pipe.busy_until = start + len(data) / pipe.rate
        if pipe.frozen:
            return

        def deliver() -> None:
            if not (s.alive[peer] and self.streams.get(s.index) is s):
                return
            dec = s.decoders[peer]
            dec.receive_data(data)
            for frame in dec.frames():
                self.cores[peer].receive_frame(s.index, frame, self.now)
            self.react(peer)

        self.at(pipe.busy_until + pipe.delay, deliver)

    def _pull(self, side: str, index: int) -> None:
        self._pull_at.pop((side, index), None)
        s = self.streams.get(index)
        if s is None or not s.alive[side]:
            return
        core = self.cores[side]
        frames = core.frames_to_send(index, self.now)
        if frames:
            self._send(side, s, frames)
        self.react(side)

    def _schedule_pulls(self, side: str) -> None:
        core = self.cores[side]
        for index, s in self.streams.items():
            if not s.alive[side] or not core.has_work(index, self.now):
                continue
            pipe = s.pipes[side]
            when = max(self.now, pipe.busy_until - LOWAT / pipe.rate)
            key = (side, index)
            if key in self._pull_at and self._pull_at[key] <= when:
                continue
            self._pull_at[key] = when
            self.at(when, lambda side=side, index=index: self._pull(side, index))

    def _schedule_timer(self, side: str) -> None:
        when = self.cores[side].get_timer()
        if when is None:
            return
        current = self._timer_at[side]
        if current is not None and current <= when:
            return
        self._timer_at[side] = when

        def fire() -> None:
            if self._timer_at[side] != when:
                return
            self._timer_at[side] = None
            self.cores[side].handle_timer(max(self.now, when))
            self.react(side)

        self.at(max(self.now, when), fire)

    # ---- applications ----

    def open_flow(self, side: str, size: int) -> None:
        cid = self.cores[side].open_channel("bulk", self.now, label=f"{side}-{len(self.flows)}")
        self.flows[(side, cid)] = Flow(self.rng.randbytes(size))
        self.react(side)

    def _produce(self, side: str) -> None:
        core = self.cores[side]
        for (writer, cid), flow in self.flows.items():
            if writer != side or flow.closed:
                continue
            while flow.written < len(flow.data) and core.write_room > 0:
                n = min(self.rng.randint(1, WRITE_PIECE), len(flow.data) - flow.written)
                core.write(cid, flow.data[flow.written : flow.written + n])
                flow.written += n
            if flow.written == len(flow.data):
                core.close_channel(cid)
                flow.closed = True

    def _consume(self, side: str) -> None:
        if self.consumer_stalled[side]:
            return
        core = self.cores[side]
        for (writer, cid), flow in self.flows.items():
            if writer == side or flow.eof:
                continue
            while core.readable_bytes(cid):
                flow.received += core.read(cid, self.rng.randint(*self.read_sizes))
            if cid in core.channels and core.at_eof(cid):
                flow.eof = True
                core.close_channel(cid)  # the reader is done too: its (empty) direction ends

    def stall_consumer(self, side: str, seconds: float) -> None:
        self.consumer_stalled[side] = True

        def resume() -> None:
            self.consumer_stalled[side] = False
            self.react(side)

        self.at(self.now + seconds, resume)

    # ---- after every core call ----

    def react(self, side: str) -> None:
        core = self.cores[side]
        for _ in range(4):  # reading frees window, which may let the producer write again
            while (event := core.next_event()) is not None:
                if isinstance(event, ChannelOpened):
                    assert (self.other(side), event.channel) in self.flows
                elif isinstance(event, ChannelEnded):
                    for (writer, cid), flow in self.flows.items():
                        if cid == event.channel:
                            assert not event.aborted, event
                            flow.ended[side] = True
                            if writer != side:
                                flow.eof = True
                elif isinstance(event, StreamStalled):
                    self.stalls += 1
                    self.kill(event.stream)  # the session aborts the socket; the peer sees a reset
                elif isinstance(event, StreamDrained):
                    self._close_gracefully(side, event.stream)
            core.rtt_samples.clear()
            self._consume(side)
            self._produce(side)
        self._check(side)
        self._schedule_pulls(side)
        self._schedule_timer(side)

    def _check(self, side: str) -> None:
        core = self.cores[side]
        held = core.held_bytes
        self.max_held[side] = max(self.max_held[side], held)
        limit = CONFIG.session_window + CONFIG.max_channels * INITIAL_CHANNEL_WINDOW
        assert held <= limit, f"{side} holds {held} received bytes, bound {limit}"
        over = core.buffered_bytes - core.budget
        self.max_buffered_over[side] = max(self.max_buffered_over[side], over)
        assert over <= WRITE_PIECE, f"{side} buffers {core.buffered_bytes}, budget {core.budget}"

    # ---- verdict ----

    def done(self) -> bool:
        return all(f.eof and f.ended["a"] and f.ended["b"] for f in self.flows.values())

    def verify(self) -> None:
        for (writer, cid), flow in self.flows.items():
            assert flow.written == len(flow.data), (writer, cid)
            assert bytes(flow.received) == flow.data, (
                f"channel {cid} from {writer}: got {len(flow.received)} of {len(flow.data)} bytes"
                + (", content differs" if len(flow.received) == len(flow.data) else "")
            )
            assert flow.eof and flow.ended == {"a": True, "b": True}, (writer, cid, flow.ended)
        for side in "ab":
            core = self.cores[side]
            assert core.channels == (), f"{side} still has channels {core.channels}"
            assert core.buffered_bytes == 0
            assert core.granted_bytes == 0


def run_to_completion(sim: Sim, limit_s: float = 120.0) -> None:
    step = 0.25
    t = 0.0
    while not sim.done():
        t += step
        assert t <= limit_s, f"not finished after {limit_s} s of virtual time"
        sim.run(t)
    sim.verify()


# ------------------------------------------------------------------------------------------- tests


def test_one_stream_one_channel_is_byte_exact() -> None:
    sim = Sim(seed=1, streams=1)
    sim.open_flow("a", 300 * KiB)
    run_to_completion(sim)


def test_many_channels_both_directions_over_several_streams() -> None:
    sim = Sim(seed=2, streams=4)
    for side, size in (("a", 700 * KiB), ("a", 1), ("a", 90 * KiB), ("b", 400 * KiB), ("b", 0)):
        sim.open_flow(side, size)
    run_to_completion(sim)
    assert sim.cores["a"].counters.chunks_retransmitted == 0


def test_a_stream_killed_mid_transfer_loses_nothing() -> None:
    sim = Sim(seed=3, streams=3)
    sim.open_flow("a", 1500 * KiB)
    sim.open_flow("b", 500 * KiB)
    sim.at(0.3, lambda: sim.kill(1))
    run_to_completion(sim)
    assert sim.cores["a"].counters.chunks_retransmitted > 0


def test_all_streams_die_and_a_new_one_joins() -> None:
    sim = Sim(seed=4, streams=2)
    sim.open_flow("a", 1 * 1024 * KiB)

    def outage() -> None:
        sim.kill(0)
        sim.kill(1)
        sim.at(sim.now + 0.2, sim.add_stream)

    sim.at(0.25, outage)
    run_to_completion(sim)


def test_a_frozen_stream_is_detected_as_stalled_and_its_chunks_resent() -> None:
    sim = Sim(seed=5, streams=3)
    sim.open_flow("a", 1500 * KiB)
    sim.at(0.2, lambda: sim.freeze(2))
    run_to_completion(sim)
    assert sim.stalls >= 1
    assert sim.cores["a"].counters.chunks_retransmitted > 0


def test_a_slow_stream_does_not_hold_the_others_back() -> None:
    """Pull scheduling: a stream 20x slower takes a small share instead of an equal one."""
    sim = Sim(seed=6, streams=4)
    sim.slow(3, 20)
    sim.open_flow("a", 3 * 1024 * KiB)
    run_to_completion(sim)
    a = sim.cores["a"]
    sent = {i: a.stream_stats(i)[0] for i in a.streams}
    assert sent[3] < 0.1 * sum(sent.values()), sent
    # 3 fast streams at 2 MB/s each move 3 MiB in about half a second: the slow one did not stretch it.
    assert sim.now < 1.5


def test_a_stream_retired_gracefully_needs_no_retransmission() -> None:
    sim = Sim(seed=7, streams=3)
    sim.open_flow("a", 1500 * KiB)
    sim.at(0.2, lambda: sim.retire(2))
    run_to_completion(sim)
    a = sim.cores["a"]
    assert 2 not in a.streams and 2 not in sim.cores["b"].streams
    assert a.counters.chunks_retransmitted == 0


def test_a_stalled_consumer_stops_the_producer_within_bounds() -> None:
    sim = Sim(seed=8, streams=3)
    sim.open_flow("a", 4 * 1024 * KiB)
    sim.stall_consumer("b", 5.0)
    sim.run(4.0)
    a, b = sim.cores["a"], sim.cores["b"]
    flow = next(iter(sim.flows.values()))
    # The producer wrote no more than the receive window plus its own budget, then stopped.
    assert flow.written <= CONFIG.channel_window + a.budget + WRITE_PIECE
    assert b.held_bytes <= CONFIG.channel_window
    assert a.write_room <= 0
    written_at_4s = flow.written
    sim.run(4.9)
    assert flow.written == written_at_4s  # still waiting
    assert not sim.stalls  # pings kept flowing: a paused reader is not a dead stream
    run_to_completion(sim)


def test_duplicate_and_stale_acks_are_harmless() -> None:
    """An old ACK that overtook a newer one (another stream) must not move the window back."""
    core = AmstCore(Role.OPENER, 0.0, config=CONFIG, max_frame_size=MAX_FRAME)
    core.add_stream(0, 0.0)
    cid = core.open_channel("bulk", 0.0)
    core.write(cid, bytes(100 * KiB))
    frames = core.frames_to_send(0, 0.0)
    seqs = [f.body.seq for f in frames if isinstance(f.body, DataChunk)]
    assert seqs
    newer = Frame(Ack(next_seq=len(seqs), window=200 * KiB), channel=cid)
    older = Frame(Ack(next_seq=0, window=10 * KiB), channel=cid)
    core.receive_frame(0, newer, 0.1)
    room = core._channel(cid).sender.window_room()
    core.receive_frame(0, older, 0.1)
    core.receive_frame(0, newer, 0.1)
    assert core._channel(cid).sender.window_room() == room


@pytest.mark.parametrize(
    ("frame", "what"),
    [
        (Frame(Ack(next_seq=5), channel=1), "never sent"),
        (Frame(DataChunk(seq=0), channel=2, payload=bytes(INITIAL_CHANNEL_WINDOW + 1)), "flow control"),
        (Frame(DataChunk(seq=10**6), channel=2, payload=b"x"), "too far ahead"),
        (Frame(ChannelClose(next_seq=0), channel=3), "never opened"),
    ],
)
def test_peer_protocol_violations_are_typed_errors(frame: Frame, what: str) -> None:
    core = AmstCore(Role.OPENER, 0.0, config=CONFIG, max_frame_size=MAX_FRAME)
    core.add_stream(0, 0.0)
    core.open_channel("bulk", 0.0)  # channel 1 exists, nothing sent on it
    with pytest.raises(ProtocolError, match=what):
        core.receive_frame(0, frame, 0.0)
    with pytest.raises(ProtocolError):  # the core stays failed
        core.receive_frame(0, Frame(Ack(next_seq=0), channel=1), 0.0)


def test_a_close_that_contradicts_received_data_is_refused() -> None:
    core = AmstCore(Role.ACCEPTOR, 0.0, config=CONFIG, max_frame_size=MAX_FRAME)
    core.add_stream(0, 0.0)
    core.receive_frame(0, Frame(DataChunk(seq=3), channel=1, payload=b"abc"), 0.0)
    with pytest.raises(ProtocolError, match="fewer chunks"):
        core.receive_frame(0, Frame(ChannelClose(next_seq=2), channel=1), 0.0)


# ------------------------------------------------------------------------------- random schedules

events = st.lists(
    st.tuples(
        st.sampled_from(["kill", "freeze", "join", "retire", "slow", "stall_consumer"]),
        st.floats(min_value=0.0, max_value=2.0),
        st.integers(min_value=0, max_value=7),
    ),
    max_size=6,
)


EXAMPLES = int(os.environ.get("AMST_SIM_EXAMPLES", "80"))  # raise it for a longer search


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    streams=st.integers(1, 5),
    sizes_a=st.lists(st.integers(0, 600 * KiB), min_size=1, max_size=3),
    sizes_b=st.lists(st.integers(0, 300 * KiB), max_size=2),
    schedule=events,
    delay=st.sampled_from([0.0005, 0.01, 0.05]),
)
def test_random_schedules_deliver_every_byte_exactly_once_in_order(  # noqa: PLR0917
    seed: int,
    streams: int,
    sizes_a: list[int],
    sizes_b: list[int],
    schedule: list[tuple[str, float, int]],
    delay: float,
) -> None:
    sim = Sim(seed=seed, streams=streams, delay=delay)
    for size in sizes_a:
        sim.open_flow("a", size)
    for size in sizes_b:
        sim.open_flow("b", size)
    for action, when, arg in schedule:

        def do(action: str = action, arg: int = arg) -> None:
            live = sorted(sim.streams)
            target = live[arg % len(live)] if live else None
            if action == "join" or target is None:
                sim.add_stream()
            elif action == "kill":
                sim.kill(target)
            elif action == "freeze":
                sim.freeze(target)
                sim.at(sim.now + 0.05, sim.add_stream)
            elif action == "retire" and len(live) > 1:
                sim.retire(target)
            elif action == "slow":
                sim.slow(target, 1 + arg)
            elif action == "stall_consumer":
                sim.stall_consumer("ab"[arg % 2], 0.1 * (1 + arg))

        sim.at(when, do)
    run_to_completion(sim, limit_s=300.0)
