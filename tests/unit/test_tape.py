"""The request tapes of client streams (sync and asyncio): replay for a retry, no request lost to a dead
attempt, and no lock held while the source blocks."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator

import pytest

from lbkit.aio.channel import AsyncRequestTape
from lbkit.channel import MAX_REPLAY, RequestTape


def test_a_new_attempt_replays_what_was_sent_then_continues():
    tape = RequestTape(iter(range(6)))
    first = tape.reader()
    assert [next(first), next(first)] == [0, 1]
    second = tape.reader()
    assert list(second) == [0, 1, 2, 3, 4, 5]


def test_the_reader_of_a_failed_attempt_takes_nothing_more_from_the_source():
    tape = RequestTape(iter(range(6)))
    first = tape.reader()
    assert next(first) == 0
    second = tape.reader()
    # grpc's request thread of the failed attempt pulls once more: it must get nothing.
    assert list(first) == []
    assert next(second) == 0
    tape.stop_recording()  # the new attempt got its first response before replaying everything
    assert list(second) == [1, 2, 3, 4, 5]


def test_recording_stops_past_the_limit_and_after_the_first_response():
    tape = RequestTape(iter(range(1000)))
    reader = tape.reader()
    for _ in range(MAX_REPLAY + 10):
        next(reader)
    assert not tape.replayable  # too many requests kept: a retry could not replay them all
    assert list(reader) == list(range(MAX_REPLAY + 10, 1000))


def test_a_source_that_raises_is_remembered_and_ends_replay():
    def source() -> Iterator[int]:
        yield 1
        raise ValueError("bad request")

    tape = RequestTape(source())
    reader = tape.reader()
    assert next(reader) == 1
    with pytest.raises(ValueError, match="bad request"):
        next(reader)
    assert isinstance(tape.error, ValueError) and not tape.replayable


def test_a_source_waiting_for_a_response_blocks_nothing_else():
    """Ping-pong: the source yields the next request only after the previous response arrived; the
    response side (stop_recording, a new attempt's reader of what was read) must not wait for it."""
    answered = threading.Event()
    taken = threading.Event()

    def source() -> Iterator[int]:
        yield 0
        taken.set()
        assert answered.wait(5), "the response never came"
        yield 1

    tape = RequestTape(source())
    first = tape.reader()
    assert next(first) == 0
    pulled: list[int] = []
    puller = threading.Thread(target=lambda: pulled.extend(first))  # grpc's request thread
    puller.start()
    assert taken.wait(5)  # the request thread now blocks inside the source
    done = threading.Event()

    def respond() -> None:
        tape.stop_recording()  # what the first response does
        done.set()

    threading.Thread(target=respond).start()
    assert done.wait(5), "stop_recording() waited for the source"
    answered.set()
    puller.join(5)
    assert pulled == [1]


def test_a_request_read_by_a_dead_attempt_goes_to_the_new_one():
    release = threading.Event()
    started = threading.Event()

    def source() -> Iterator[int]:
        yield 0
        started.set()
        release.wait(5)
        yield 1

    tape = RequestTape(source())
    first = tape.reader()
    assert next(first) == 0
    stale: list[int] = []
    t = threading.Thread(target=lambda: stale.extend(first))
    t.start()
    assert started.wait(5)
    second = tape.reader()  # the first attempt failed while its thread waits in the source
    assert next(second) == 0  # replayed at once, without waiting for the source
    release.set()
    t.join(5)
    assert stale == []  # the dead attempt's reader kept what it read for the new one
    assert list(second) == [1]


async def test_the_asyncio_tape_replays_and_hands_over_like_the_sync_one():
    async def source() -> AsyncIterator[int]:
        for i in range(4):
            yield i

    tape = AsyncRequestTape(source())
    first = tape.reader()
    assert await first.__anext__() == 0
    second = tape.reader()
    assert [i async for i in first] == []
    assert [i async for i in second] == [0, 1, 2, 3]


async def test_the_asyncio_tape_takes_writes_until_done_writing():
    tape = AsyncRequestTape(None)
    reader = tape.reader()
    got: list[int] = []

    async def read() -> None:
        got.extend([i async for i in reader])

    task = asyncio.create_task(read())
    await tape.write(1)
    await tape.write(2)
    tape.done_writing()
    await asyncio.wait_for(task, 5)
    assert got == [1, 2]
    replay = tape.reader()
    assert [i async for i in replay] == [1, 2]
    with pytest.raises(asyncio.InvalidStateError):
        await tape.write(3)


async def test_writes_waiting_when_the_call_ends_fail_with_its_error():
    tape = AsyncRequestTape(None)
    write = asyncio.create_task(tape.write(1))
    await asyncio.sleep(0)
    tape.close(RuntimeError("the call failed"))
    with pytest.raises(RuntimeError, match="the call failed"):
        await write
