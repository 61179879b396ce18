"""Segment files: records appended in batches, read back whole or not at all."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from txstarttls.queue import new_queue_id
from txstarttls.queue.segments import (
    ADD,
    HEADER_SIZE,
    TOMBSTONE,
    SegmentWriter,
    encode_record,
    open_payload,
    read_log,
    scan,
    segment_name,
    segment_numbers,
)

IDS = [new_queue_id() for _ in range(8)]


def a_batch(count: int = 3) -> list[bytes]:
    return [
        encode_record(ADD, IDS[i], b"payload %d\r\n" % i * (i + 1))
        for i in range(count)
    ]


class Calls:
    """Count the calls of some os functions made on files under ``root``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
        self.counts = dict.fromkeys(names, 0)
        for name in names:
            real = getattr(os, name)

            def counting(*args: Any, _name: str = name, _real: Any = real) -> Any:
                self.counts[_name] += 1
                return _real(*args)

            monkeypatch.setattr(os, name, counting)


def test_a_batch_is_read_back_in_order(tmp_path: Path) -> None:
    writer = SegmentWriter(tmp_path, durable=True)
    batch = a_batch()
    placed = writer.append(batch)
    writer.close()
    segment = tmp_path / segment_name(writer.sequence)
    found = scan(segment)
    assert found.problem is None
    assert found.records == tuple(placed)
    assert found.valid_end == segment.stat().st_size == sum(map(len, batch))
    assert [r.queue_id for r in found.records] == IDS[:3]
    for record, data in zip(found.records, batch, strict=True):
        with open_payload(segment, record) as payload:
            assert payload.read() == data[HEADER_SIZE:]


def test_one_writev_and_one_fdatasync_per_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = SegmentWriter(tmp_path, durable=True)
    writer.append(a_batch(1))  # the segment is created and its entry fsynced
    calls = Calls(monkeypatch, "writev", "fdatasync", "fsync", "open")
    writer.append(a_batch(8))
    assert calls.counts == {"writev": 1, "fdatasync": 1, "fsync": 0, "open": 0}


def test_a_writer_that_is_not_durable_never_syncs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = Calls(monkeypatch, "fdatasync", "fsync")
    writer = SegmentWriter(tmp_path, durable=False)
    writer.append(a_batch())
    writer.append(a_batch())
    assert calls.counts == {"fdatasync": 0, "fsync": 0}


def test_a_new_segment_is_synced_with_its_directory_before_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    writer = SegmentWriter(tmp_path, durable=True)
    writer.append(a_batch(1))
    assert synced == [str(tmp_path / segment_name(1)), str(tmp_path)]


def test_a_full_segment_makes_way_for_the_next(tmp_path: Path) -> None:
    writer = SegmentWriter(tmp_path, durable=False, limit=100)
    first = writer.append(a_batch(2))
    second = writer.append(a_batch(1))
    writer.close()
    assert segment_numbers(tmp_path) == [1, 2]
    assert scan(tmp_path / segment_name(1)).records == tuple(first)
    assert scan(tmp_path / segment_name(2)).records == tuple(second)


def test_writers_never_share_a_segment(tmp_path: Path) -> None:
    one = SegmentWriter(tmp_path, durable=False)
    other = SegmentWriter(tmp_path, durable=False)
    one.append(a_batch(1))
    other.append(a_batch(1))
    assert {one.sequence, other.sequence} == {1, 2}
    one.close()
    other.close()


def test_after_a_failed_write_the_next_batch_starts_a_new_segment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = SegmentWriter(tmp_path, durable=True)
    writer.append(a_batch(1))

    def full(*args: object) -> int:
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(os, "fdatasync", full)
        with pytest.raises(OSError):
            writer.append(a_batch(2))
    writer.append(a_batch(1))
    assert segment_numbers(tmp_path) == [1, 2]


def test_bad_records_are_refused_before_anything_is_written() -> None:
    with pytest.raises(ValueError, match="kind"):
        encode_record(b"X", IDS[0], b"x")
    with pytest.raises(ValueError, match="tombstone"):
        encode_record(TOMBSTONE, IDS[0], b"x")
    with pytest.raises(ValueError):
        encode_record(ADD, "../../etc/passwd", b"x")


@settings(max_examples=60, deadline=None)
@given(cut=st.integers(min_value=0, max_value=10_000))
def test_a_torn_tail_loses_only_the_records_it_cuts(
    tmp_path_factory: Any, cut: int
) -> None:
    directory = tmp_path_factory.mktemp("torn")
    batch = [*a_batch(4), encode_record(TOMBSTONE, IDS[5])]
    writer = SegmentWriter(directory, durable=False)
    placed = writer.append(batch)
    writer.close()
    segment = directory / segment_name(writer.sequence)
    length = cut % (segment.stat().st_size + 1)
    os.truncate(segment, length)
    found = scan(segment)
    whole = tuple(r for r in placed if r.offset + r.length <= length)
    assert found.records == whole
    assert found.valid_end == (whole[-1].offset + whole[-1].length if whole else 0)
    assert (found.problem is None) == (found.valid_end == length)


def test_a_damaged_record_stops_the_scan_and_says_so(tmp_path: Path) -> None:
    writer = SegmentWriter(tmp_path, durable=False)
    placed = writer.append(a_batch(3))
    writer.close()
    segment = tmp_path / segment_name(writer.sequence)
    data = bytearray(segment.read_bytes())
    data[placed[1].offset] ^= 0x01
    segment.write_bytes(bytes(data))
    found = scan(segment)
    assert found.records == (placed[0],)
    assert found.problem == "checksum mismatch"


def test_zeros_where_a_record_should_start_are_reported(tmp_path: Path) -> None:
    writer = SegmentWriter(tmp_path, durable=False)
    placed = writer.append(a_batch(2))
    writer.close()
    segment = tmp_path / segment_name(writer.sequence)
    with segment.open("ab") as file:
        file.write(bytes(HEADER_SIZE + 10))
    found = scan(segment)
    assert found.records == tuple(placed)
    assert found.problem == "no record header"


def test_the_log_is_what_was_added_less_what_was_removed(tmp_path: Path) -> None:
    writer = SegmentWriter(tmp_path, durable=False, limit=1)  # a segment per batch
    first = writer.append(a_batch(3))
    writer.append([encode_record(TOMBSTONE, IDS[1])])
    writer.append(
        [encode_record(ADD, IDS[4], b"late"), encode_record(TOMBSTONE, IDS[4])]
    )
    writer.close()
    state = read_log(tmp_path)
    assert state.sequences == (1, 2, 3)
    assert {queue_id: logged.record for queue_id, logged in state.live.items()} == {
        IDS[0]: first[0],
        IDS[2]: first[2],
    }
    assert state.live[IDS[2]].sequence == 1
    assert state.removed == {IDS[1], IDS[4]}
    assert state.problems == ()


def test_reading_the_log_reports_damage_and_skips_freed_segments(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = SegmentWriter(tmp_path, durable=False, limit=1)
    writer.append(a_batch(1))
    writer.append(a_batch(2)[1:])
    writer.close()
    with (tmp_path / segment_name(2)).open("ab") as file:
        file.write(b"TXR1 A")  # a batch cut short by a crash
    # Segment 1 is freed by a relay between listing and reading.
    real_listdir = os.listdir

    def listing_then_freeing(path: Any) -> list[str]:
        names = real_listdir(path)
        (tmp_path / segment_name(1)).unlink()
        return names

    monkeypatch.setattr(os, "listdir", listing_then_freeing)
    state = read_log(tmp_path)
    assert state.sequences == (2,)
    assert list(state.live) == [IDS[1]]
    assert state.problems == ((2, "incomplete record header at the end"),)


def test_a_payload_opens_as_a_file_of_its_own(tmp_path: Path) -> None:
    writer = SegmentWriter(tmp_path, durable=False)
    big = bytes(range(256)) * 4096  # past any buffer size
    placed = writer.append(
        [*a_batch(1), encode_record(ADD, IDS[6], big), *a_batch(2)[1:]]
    )
    writer.close()
    segment = tmp_path / segment_name(writer.sequence)
    with open_payload(segment, placed[1]) as payload:
        assert payload.read(3) == big[:3]
        assert payload.tell() == 3
        payload.seek(len(big) - 10)
        assert payload.read() == big[-10:]
        assert payload.read() == b""
        payload.seek(-5, os.SEEK_END)
        assert payload.read(100) == big[-5:]
        payload.seek(0)
        assert payload.read() == big
    with open_payload(segment, placed[2]) as payload:
        assert payload.read() == a_batch(2)[1][HEADER_SIZE:]


def test_a_payload_file_gives_its_descriptor_back(tmp_path: Path) -> None:
    writer = SegmentWriter(tmp_path, durable=False)
    (record,) = writer.append(a_batch(1))
    writer.close()
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(5):
        with open_payload(tmp_path / segment_name(writer.sequence), record) as payload:
            payload.read()
    assert len(os.listdir("/proc/self/fd")) == before
