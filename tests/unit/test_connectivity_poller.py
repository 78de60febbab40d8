"""ChannelPoller's schedule on a fake clock, over stand-ins for grpc's Cython channel (``_channel`` with
``check_connectivity_state``, what :func:`lbkit._grpc_private.connectivity` reads)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator

import grpc
import pytest

from lbkit._connectivity import AsyncChannelPoller, ChannelPoller
from lbkit.testing.clock import FakeClock

READY, IDLE, CONNECTING, TRANSIENT_FAILURE = (
    s.value[0]
    for s in (
        grpc.ChannelConnectivity.READY,
        grpc.ChannelConnectivity.IDLE,
        grpc.ChannelConnectivity.CONNECTING,
        grpc.ChannelConnectivity.TRANSIENT_FAILURE,
    )
)


class _Core:
    def __init__(self, state: int) -> None:
        self.state = state
        self.reads = 0
        self.asked = 0

    def check_connectivity_state(self, try_to_connect: bool) -> int:
        self.reads += 1
        self.asked += try_to_connect
        return self.state


_ENUM = {s.value[0]: s for s in grpc.ChannelConnectivity}


class FakeChannel:
    """As a sync channel (its Cython channel's ``check_connectivity_state``) and as a ``grpc.aio`` one
    (``get_state``), both reading the same core."""

    def __init__(self, state: int = IDLE) -> None:
        self._channel = _Core(state)

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        return _ENUM[self._channel.check_connectivity_state(try_to_connect)]


def wait_until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError("condition not met in time")
        time.sleep(0.002)


@pytest.fixture
def poller() -> Iterator[tuple[ChannelPoller, FakeClock]]:
    clock = FakeClock()
    p = ChannelPoller(clock=clock, first_interval=0.01, min_period=0.05, reads_per_second=100.0).start()
    yield p, clock
    p.stop()


def settle(p: ChannelPoller, clock: FakeClock, until: float) -> None:
    """Advance the clock in small steps until ``until`` seconds from now, letting the poller read."""
    end = clock.now + until
    while clock.now < end:
        reads = p.reads
        clock.advance(0.01)
        due = p.next_due()
        if due is not None and due <= clock.now:
            wait_until(lambda reads=reads: p.reads > reads or (p.next_due() or 0.0) > clock.now)


def test_states_are_reported_on_change_and_idle_channels_asked_to_connect(poller) -> None:
    p, clock = poller
    channel = FakeChannel(IDLE)
    seen: list[tuple[object, grpc.ChannelConnectivity]] = []
    p.watch("a", channel, lambda key, state: seen.append((key, state)))
    wait_until(lambda: seen == [("a", grpc.ChannelConnectivity.IDLE)])
    assert channel._channel.asked >= 1  # every read asks an IDLE channel to connect
    channel._channel.state = READY
    settle(p, clock, 0.1)
    assert seen == [("a", grpc.ChannelConnectivity.IDLE), ("a", grpc.ChannelConnectivity.READY)]


def test_a_trusted_ready_channel_is_read_only_every_ready_period_unless_hinted(poller) -> None:
    p, clock = poller
    channel = FakeChannel(READY)
    p.watch("call", channel, lambda key, state: None, trusted=True)
    settle(p, clock, 30.0)  # long enough for the interval to have grown to its cap
    before = channel._channel.reads
    settle(p, clock, 30.0)
    assert 2 <= channel._channel.reads - before <= 4  # every ready_period (10 s), not every few ms
    reads = channel._channel.reads
    p.hint("call")  # a call failed on it: read it now, not at the next sweep
    wait_until(lambda: channel._channel.reads == reads + 1)


def test_a_failed_calls_hint_reads_a_ready_channel_before_it_returns_every_time(poller) -> None:
    p, _ = poller
    channel = FakeChannel(READY)
    heard: list[grpc.ChannelConnectivity] = []
    p.watch("call", channel, lambda key, state: heard.append(state), trusted=True)
    wait_until(lambda: len(heard) == 1)
    reads = channel._channel.reads
    p.hint("call")  # the first failed call: the channel still reads READY (grpc has not caught up)
    assert channel._channel.reads >= reads + 1  # read before hint() returned
    channel._channel.state = TRANSIENT_FAILURE
    p.hint("call")  # the next one, moments later: read again at once, though a read is due soon anyway
    assert heard[-1] is grpc.ChannelConnectivity.TRANSIENT_FAILURE  # heard before hint() returned
    reads = channel._channel.reads
    p.hint("call")  # not READY any more: out of the pickers already, left to the poller's own reads
    assert channel._channel.reads == reads
    p.stop()
    channel._channel.state = READY
    p.hint("call")  # stopped: nothing is read, no callback runs
    assert channel._channel.reads == reads and len(heard) == 2


def test_untrusted_channels_share_the_read_budget(poller) -> None:
    p, clock = poller
    channels = [FakeChannel(READY) for _ in range(20)]
    for i, channel in enumerate(channels):
        p.watch(i, channel, lambda key, state: None)
    assert p.period == pytest.approx(20 / 100.0)  # 20 channels, 100 reads a second
    settle(p, clock, 5.0)
    before = sum(c._channel.reads for c in channels)
    settle(p, clock, 2.0)
    reads = sum(c._channel.reads for c in channels) - before
    assert 150 <= reads <= 250  # about 100 a second, not 20 / first_interval


def test_unwatched_and_closed_channels_are_not_read_again(poller) -> None:
    p, clock = poller
    gone, closed = FakeChannel(READY), FakeChannel(READY)
    p.watch("gone", gone, lambda key, state: None)
    p.watch("closed", closed, lambda key, state: None)
    wait_until(lambda: gone._channel.reads >= 1 and closed._channel.reads >= 1)
    p.unwatch("gone")
    reads = gone._channel.reads
    closed._channel = None  # type: ignore[assignment]  # as a closed grpc channel: reads fail
    settle(p, clock, 2.0)
    assert gone._channel.reads == reads and len(p) == 1


# --------------------------------------------------------------------------- the asyncio driver


class SlowCore(_Core):
    """A channel whose state takes ``cost`` seconds of CPU to read (the loop cannot run meanwhile)."""

    def __init__(self, state: int, cost: float) -> None:
        super().__init__(state)
        self.cost = cost

    def check_connectivity_state(self, try_to_connect: bool) -> int:
        end = time.perf_counter() + self.cost
        while time.perf_counter() < end:
            pass
        return super().check_connectivity_state(try_to_connect)


async def test_async_poller_reads_a_large_batch_in_slices_that_let_the_loop_run() -> None:
    p = AsyncChannelPoller().start()
    channels = [FakeChannel(READY) for _ in range(400)]
    for channel in channels:
        channel._channel = SlowCore(READY, 50e-6)  # 400 reads: 20 ms, ten loop slices
    seen_mid_batch: list[int] = []

    async def other_work() -> None:
        while p.reads < len(channels):
            if p.reads > 0:
                seen_mid_batch.append(p.reads)
            await asyncio.sleep(0)

    try:
        for i, channel in enumerate(channels):
            p.watch(i, channel, lambda key, state: None)
        await asyncio.wait_for(other_work(), 5.0)
    finally:
        await p.stop()
    # Other work ran while the first batch (all 400 due at once) was being read, not only after it.
    assert any(0 < reads < len(channels) for reads in seen_mid_batch), seen_mid_batch[:5]


async def test_async_poller_skips_a_channel_unwatched_while_its_batch_is_read() -> None:
    p = AsyncChannelPoller().start()
    first, second = FakeChannel(READY), FakeChannel(READY)
    heard: list[object] = []

    def on_first(key: object, state: grpc.ChannelConnectivity) -> None:
        heard.append(key)
        p.unwatch("second")  # as a member closed by what the first one's state set off

    try:
        p.watch("first", first, on_first)
        p.watch("second", second, lambda key, state: heard.append(key))  # due in the same batch
        while not heard:
            await asyncio.sleep(0.001)
        assert heard == ["first"]
        assert second._channel.reads == 0 and len(p) == 1
    finally:
        await p.stop()


async def test_async_poller_hears_changes_and_nothing_after_stop() -> None:
    clock = FakeClock()
    p = AsyncChannelPoller(clock=clock).start()
    channel = FakeChannel(IDLE)
    seen: list[grpc.ChannelConnectivity] = []
    p.watch("a", channel, lambda key, state: seen.append(state))
    while not seen:
        await asyncio.sleep(0.001)
    assert seen == [grpc.ChannelConnectivity.IDLE] and channel._channel.asked >= 1
    channel._channel.state = READY
    reads = p.reads
    clock.advance(0.05)  # the follow-up read comes due on the poller's clock
    while p.reads == reads:
        await asyncio.sleep(0.001)
    assert seen == [grpc.ChannelConnectivity.IDLE, grpc.ChannelConnectivity.READY]
    task = p._task
    await p.stop()
    assert task is not None and task.done()  # stop() returns once the reading task has ended
    p.watch("b", FakeChannel(IDLE), lambda key, state: seen.append(state))  # ignored once stopped
    assert len(p) == 0 and p._task is None


async def test_async_poller_reads_a_ready_channel_at_once_on_every_failed_calls_hint() -> None:
    clock = FakeClock()  # stands still: only the hints read
    p = AsyncChannelPoller(clock=clock).start()
    channel = FakeChannel(READY)
    seen: list[grpc.ChannelConnectivity] = []
    try:
        p.watch("call", channel, lambda key, state: seen.append(state), trusted=True)
        while not seen:
            await asyncio.sleep(0.001)
        p.hint("call")  # still READY
        channel._channel.state = TRANSIENT_FAILURE
        p.hint("call")  # a read is due soon anyway; this one is made now, before the next pick
        assert seen == [grpc.ChannelConnectivity.READY, grpc.ChannelConnectivity.TRANSIENT_FAILURE]
    finally:
        await p.stop()
