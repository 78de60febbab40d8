"""The request tape of sync client streams: replay for a retry, and no request lost to a dead attempt."""

from __future__ import annotations

from lbkit.channel import _Tape


def test_a_new_attempt_replays_what_was_sent_then_continues():
    tape = _Tape(iter(range(6)))
    first = tape.reader()
    assert [next(first), next(first)] == [0, 1]
    second = tape.reader()
    assert list(second) == [0, 1, 2, 3, 4, 5]


def test_the_reader_of_a_failed_attempt_takes_nothing_more_from_the_source():
    tape = _Tape(iter(range(6)))
    first = tape.reader()
    assert next(first) == 0
    second = tape.reader()
    # grpc's request thread of the failed attempt pulls once more: it must get nothing.
    assert list(first) == []
    assert next(second) == 0
    tape.stop_recording()  # the new attempt got its first response before replaying everything
    assert list(second) == [1, 2, 3, 4, 5]


def test_recording_stops_after_the_first_response_and_past_the_limit():
    tape = _Tape(iter(range(1000)))
    reader = tape.reader()
    for _ in range(300):
        next(reader)
    assert not tape.replayable  # more than 256 requests kept: a retry could not replay them all
