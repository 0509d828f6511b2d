"""The outbox on a real SQLite file: sequences, bounds per kind, sync API, dead letters, reopen."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from fieldline.edge.ingest.outbox import (
    DB_FILE,
    DeadLetter,
    DiskFull,
    NewRecord,
    Outbox,
    OutboxFull,
    RecordRefused,
    RecordTooLarge,
)
from fieldline.shared.limits import MAX_RECORD_PAYLOAD_BYTES, MAX_TOPIC_CHARS
from fieldline.shared.policy import Retention


def tele(i: int, size: int = 10) -> NewRecord:
    return NewRecord("telemetry", "plant/t", 1_700_000_000_000 + i, b"%0*d" % (size, i))


def test_sequences_are_monotonic_and_never_reused_after_reopen(tmp_path: Path) -> None:
    box = Outbox(tmp_path)
    assert box.commit_batch([tele(i) for i in range(5)]) == [1, 2, 3, 4, 5]
    box.mark_synced(5)
    assert box.prune(Retention(keep_synced_s=0)) == 5  # every row gone
    box.close()
    box = Outbox(tmp_path)  # as after a crash or a restart
    assert box.commit_batch([tele(5)]) == [6]
    assert box.stats().synced_seq == 5
    box.close()
    # The file is WAL with synchronous=FULL, as the module promises.
    conn = sqlite3.connect(tmp_path / DB_FILE)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def test_read_batch_mark_synced_stats(tmp_path: Path) -> None:
    box = Outbox(tmp_path)
    box.commit_batch([tele(i) for i in range(10)])
    box.append([NewRecord("verdict", "plant/v", 5, b'{"defect": true}')])
    batch = box.read_batch(0, 4)
    assert [r.seq for r in batch] == [1, 2, 3, 4]
    assert batch[0].payload == b"0000000000" and batch[0].kind == "telemetry"
    assert [r.seq for r in box.read_batch(8, 100)] == [9, 10, 11]
    box.mark_synced(4)
    assert [r.seq for r in box.read_batch(0, 2)] == [5, 6]  # synced rows are not re-sent
    s = box.stats()
    assert (s.rows, s.unsynced, s.synced_seq, s.last_seq) == (11, 7, 4, 11)
    assert s.bytes == 10 * 10 + len(b'{"defect": true}')
    # prune keeps synced rows younger than keep_synced_s
    assert box.prune(Retention(keep_synced_s=3600)) == 0
    assert box.prune(Retention(keep_synced_s=0)) == 4
    assert box.stats().rows == 7


def test_telemetry_drops_oldest_by_bytes_and_the_count_persists(tmp_path: Path) -> None:
    box = Outbox(tmp_path, Retention(max_rows=1000, max_bytes=64 * 1024))
    box.append([NewRecord("event", "plant/e", 1, b"e" * 1000)])
    for i in range(100):
        box.commit_batch([tele(i, size=1000)])
    s = box.stats()
    assert s.bytes <= 64 * 1024
    assert s.dropped == 100 - (s.rows - 1)
    kinds = [r.kind for r in box.read_batch(0, 1000)]
    assert kinds[0] == "event"  # the oldest row, yet never dropped
    oldest_tele = box.read_batch(1, 1)[0].payload
    assert int(oldest_tele) == s.dropped  # exactly the oldest ones went
    box.close()
    assert Outbox(tmp_path).stats().dropped == s.dropped


def test_full_of_verdicts_refuses_and_writes_nothing(tmp_path: Path) -> None:
    box = Outbox(tmp_path, Retention(max_rows=100, max_bytes=1024 * 1024, keep_synced_s=0))
    box.commit_batch([NewRecord("verdict", "v", 1, b"{}") for _ in range(100)])
    with pytest.raises(OutboxFull):
        box.commit_batch([tele(0)], [DeadLetter("t", "bad", b"x")])
    with pytest.raises(OutboxFull):
        box.append([NewRecord("verdict", "v", 1, b"{}")])
    s = box.stats()
    assert (s.rows, s.dead_letters, s.dropped) == (100, 0, 0)
    box.mark_synced(50)  # synced rows make room without pruning first
    assert box.commit_batch([tele(1)]) == [101]
    assert box.stats().rows == 51


def test_dead_letters_are_kept_truncated_and_counted(tmp_path: Path) -> None:
    box = Outbox(tmp_path)
    box.commit_batch([], [DeadLetter("plant/x", "not JSON, PNG or JPEG", b"z" * 100_000)])
    box.commit_batch([tele(0)], [DeadLetter("plant/y", "empty payload", b"")])
    assert box.stats().dead_letters == 2
    assert box.dead_letters() == [
        ("plant/y", "empty payload", 0),
        ("plant/x", "not JSON, PNG or JPEG", 100_000),
    ]
    conn = sqlite3.connect(tmp_path / DB_FILE)
    (kept,) = conn.execute(
        "SELECT length(payload) FROM dead_letters WHERE topic='plant/x'"
    ).fetchone()
    conn.close()
    assert kept == 1024
    box.close()
    assert Outbox(tmp_path).stats().dead_letters == 2


def test_redelivery_keys(tmp_path: Path) -> None:
    box = Outbox(tmp_path)
    box.commit_batch([tele(0), tele(1)], delivered=["7:aa", "8:bb"])
    assert box.already_delivered(["7:aa", "9:cc"]) == {"7:aa"}
    assert box.already_delivered([]) == set()
    # Only the newest ingested rows count: an old row with the same key is not a redelivery.
    box.append([NewRecord("verdict", "v", 1, b"{}") for _ in range(5)])  # no delivery key
    box.commit_batch([tele(2), tele(3)], delivered=["9:cc", "10:dd"])
    assert box.already_delivered(["7:aa", "8:bb", "10:dd"], window=3) == {"8:bb", "10:dd"}


def test_a_record_the_cloud_would_refuse_is_refused_with_the_reason(tmp_path: Path) -> None:
    box = Outbox(tmp_path)
    big = MAX_RECORD_PAYLOAD_BYTES + 1
    with pytest.raises(RecordTooLarge) as refused:
        box.append([NewRecord("verdict", "plant/v", 1, b"x" * big)])
    assert (refused.value.size, refused.value.limit) == (big, MAX_RECORD_PAYLOAD_BYTES)
    assert f"{big} bytes exceeds the record limit of {MAX_RECORD_PAYLOAD_BYTES} bytes" in str(
        refused.value
    )
    with pytest.raises(RecordRefused, match="kind 'alarm'"):
        box.append([NewRecord("alarm", "plant/a", 1, b"{}")])
    with pytest.raises(RecordRefused, match=f"exceeds {MAX_TOPIC_CHARS}"):
        box.append([NewRecord("event", "t" * (MAX_TOPIC_CHARS + 1), 1, b"{}")])
    # One refused record refuses its whole batch: nothing of it is stored.
    with pytest.raises(RecordTooLarge):
        box.commit_batch([tele(1), NewRecord("telemetry", "plant/t", 2, b"x" * big)])
    assert box.stats().rows == 0
    # At the limit exactly, it is stored.
    assert box.append([NewRecord("verdict", "plant/v", 1, b"x" * MAX_RECORD_PAYLOAD_BYTES)]) == [1]


def test_a_bound_lowered_from_400000_to_50000_rows_prunes_in_chunks(tmp_path: Path) -> None:
    box = Outbox(tmp_path, Retention(max_rows=400_000))
    verdicts = [NewRecord("verdict", "v", 1, b"{}")] * 1000
    box.commit_batch(verdicts)
    for _ in range(40):
        box.commit_batch([NewRecord("telemetry", "t", 1, b"12.5")] * 9_975)
    assert box.stats().rows == 400_000
    box.set_retention(Retention(max_rows=50_000))
    # One IN (...) list of 350,000 sequences would pass SQLite's variable limit; this commits.
    seqs = box.commit_batch([NewRecord("telemetry", "t", 2, b"13.5")])
    stats = box.stats()
    assert stats.rows == 50_000 and seqs == [400_001]
    assert stats.dropped == 350_001  # telemetry only, counted
    assert len(box.read_batch(0, 1000)) == 1000
    assert {r.kind for r in box.read_batch(0, 1000)} == {"verdict"}  # no verdict lost


def test_a_full_disk_is_back_pressure_and_writes_resume_when_space_returns(
    tmp_path: Path,
) -> None:
    box = Outbox(tmp_path)
    box.commit_batch([NewRecord("telemetry", "t", 1, b"1")])
    # SQLite's own page limit stands in for the disk here (the same SQLITE_FULL error); the
    # e2e test fills a real tmpfs.
    (pages,) = box._conn.execute("PRAGMA page_count").fetchone()
    box._conn.execute(f"PRAGMA max_page_count = {pages + 2}")
    with pytest.raises(DiskFull):
        box.commit_batch([NewRecord("telemetry", "t", 1, b"x" * 100_000)] * 10)
    assert box.stats().rows == 1  # nothing half-written, the totals still true
    box._conn.execute("PRAGMA max_page_count = 1073741823")
    assert box.commit_batch([NewRecord("telemetry", "t", 1, b"2")]) == [2]
