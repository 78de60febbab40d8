"""ChannelPoller's schedule on a fake clock, over stand-ins for grpc's Cython channel (``_channel`` with
``check_connectivity_state``, what :func:`lbkit._grpc_private.connectivity` reads)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import grpc
import pytest

from lbkit._connectivity import ChannelPoller
from lbkit.testing.clock import FakeClock

READY, IDLE, CONNECTING = (
    s.value[0]
    for s in (
        grpc.ChannelConnectivity.READY,
        grpc.ChannelConnectivity.IDLE,
        grpc.ChannelConnectivity.CONNECTING,
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


class FakeChannel:
    def __init__(self, state: int = IDLE) -> None:
        self._channel = _Core(state)


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
