"""Faults of the disk and of the journal: nothing received is lost, nothing stops the daemon."""

from __future__ import annotations

import errno
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

import recorder
from recorder.journal import Journal
from recorder.records import FRAME, encode
from tests.conftest import make_config, record_until


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 48 MiB file system (tmpfs), so that "disk full" is the kernel's own ENOSPC."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mount_point)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.decode().strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill(disk: Path) -> Path:
    """Fill the file system until the kernel answers ENOSPC; returns the filler file."""
    filler = disk / "filler"
    block = b"\0" * (1 << 20)
    with open(filler, "wb") as handle:
        try:
            while True:
                handle.write(block)
                handle.flush()
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
    return filler


@pytest.mark.slow
def test_disk_full_for_seconds_loses_nothing(simulator: Any, small_disk: Path) -> None:
    """With the disk full for ~3 s, writes fail and are retried; then every frame is stored."""
    sim = simulator(contracts=4, rate=500, keep_sent=True)
    data_dir = small_disk / "data"
    phase: dict[str, Any] = {"filled": None, "freed": None}

    def orchestrate(rec: Any) -> None:
        stats = rec.pipeline.stats
        if phase["filled"] is None and stats.files_written >= 8:
            phase["filler"] = fill(small_disk)
            phase["filled"] = time.monotonic()
            phase["failures_before"] = stats.flush_failures
        elif (
            phase["filled"] is not None
            and phase["freed"] is None
            and time.monotonic() - phase["filled"] >= 3.0
            and stats.flush_failures >= phase["failures_before"] + 2
        ):
            phase["filler"].unlink()
            phase["freed"] = time.monotonic()
            phase["frames_at_free"] = stats.frames

    with capture_logs() as logs:
        record_until(
            make_config(sim, data_dir, storage={"flush_interval_seconds": 0.2}),
            lambda r: (
                phase["freed"] is not None
                and r.pipeline.stats.frames >= phase["frames_at_free"] + 300
                and r.pipeline.stats.last_flush_ok
            ),
            during=orchestrate,
            timeout=60,
        )
    con = recorder.connect(data_dir)
    sent = len(sim.sent)
    assert con.execute("SELECT count(*), count(DISTINCT seq) FROM aggregate").fetchall() == [
        (sent, sent)
    ]
    assert con.execute("SELECT count(*) FROM best_limit").fetchall() == [(3 * sent,)]
    # each kind of failure is logged once (per minute), not once per retry
    flush = [e for e in logs if e["event"] == "flush failed; rows kept in memory and retried"]
    journal = [e for e in logs if e["event"] == "journal write failed; frames kept and retried"]
    assert len(flush) == 1
    assert len(journal) == 1
    assert "No space left on device" in journal[0]["error"]
    assert not list(data_dir.glob("**/.*.tmp"))


def test_torn_journal_tail_is_cut_with_a_warning(tmp_path: Path) -> None:
    """A torn last record is cut off (the warning says how many bytes); the records before stay."""
    journal_dir = tmp_path / "_journal"
    journal_dir.mkdir()
    records = [encode(FRAME, seq, 1_000 + seq, "c1", b'{"x": %d}' % seq) for seq in (1, 2, 3)]
    torn = encode(FRAME, 4, 1_004, "c1", b'{"x": 4}')[:-3]
    segment = journal_dir / f"{1:020d}.jnl"
    segment.write_bytes(b"".join(records) + torn)
    with capture_logs() as logs:
        found = list(Journal(tmp_path).recover())
    assert [r.seq for r in found] == [1, 2, 3]
    assert [r.payload for r in found] == [b'{"x": 1}', b'{"x": 2}', b'{"x": 3}']
    cut = [e for e in logs if e["event"] == "journal tail cut"]
    assert [(e["bytes_cut"], e["records_kept"]) for e in cut] == [(len(torn), 3)]
    assert segment.stat().st_size == sum(len(r) for r in records)


def test_corrupt_record_ends_the_valid_prefix(tmp_path: Path) -> None:
    """A record whose CRC does not match is where the valid journal ends."""
    journal_dir = tmp_path / "_journal"
    journal_dir.mkdir()
    good = encode(FRAME, 1, 1, "c", b"{}")
    bad = bytearray(encode(FRAME, 2, 2, "c", b"{}"))
    bad[-1] ^= 0xFF
    (journal_dir / f"{1:020d}.jnl").write_bytes(good + bytes(bad))
    with capture_logs() as logs:
        assert [r.seq for r in Journal(tmp_path).recover()] == [1]
    assert [e["bytes_cut"] for e in logs if e["event"] == "journal tail cut"] == [len(bad)]


@pytest.mark.slow
def test_daemon_starts_over_a_garbage_journal_tail(simulator: Any, tmp_path: Path) -> None:
    """Garbage after the journal's last record: the daemon warns, records, and loses nothing."""
    sim = simulator(contracts=3, rate=0, max_messages=40, keep_sent=True)
    config = make_config(sim, tmp_path)
    record_until(config, lambda r: r.pipeline.stats.frames == 40)
    journal_dir = tmp_path / "_journal"
    segment = journal_dir / f"{10**12:020d}.jnl"
    segment.write_bytes(encode(FRAME, 10**12, 5, "c", b"{}") + os.urandom(777))
    with capture_logs() as logs:
        record_until(config, lambda r: r.pipeline.stats.frames == 40)
    assert [e["bytes_cut"] for e in logs if e["event"] == "journal tail cut"] == [777]
    con = recorder.connect(tmp_path)
    assert con.execute("SELECT count(*) FROM aggregate").fetchall() == [(80,)]
    quarantined = "SELECT reason FROM quarantine WHERE seq = 1000000000000"
    assert con.execute(quarantined).fetchall() == [
        ("identifier: none of contractId, ContractId, contractName",)
    ]
    assert con.execute("SELECT count(*) FROM aggregate WHERE seq > 1000000000000").fetchall() == [
        (40,)
    ]
