"""The event loop's side of the pipeline: frames and connection events in, buffered rows out.

``on_frames`` runs on the event loop for the frames of each socket read: it takes their seqs,
queues them for the journal, checks or flattens each and buffers it, with no I/O. The flush
side (recorder.pipeline) writes what is buffered.

Connection events (sessions opened and closed, contracts rejected) take the same path: a
seq, a journal record, rows of ``session_log``/``rejections``.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import tzinfo
from pathlib import Path
from typing import Any, Protocol

import orjson
import structlog

from recorder.buffer import Buffer, Key, Row
from recorder.columnar import FrameBatch
from recorder.config import JournalConfig, StorageConfig
from recorder.errors import FlattenError
from recorder.flatten import ENVELOPE, Extra, flatten
from recorder.journal import Journal
from recorder.logs import Muted
from recorder.paths import partition_date
from recorder.plain import flatten_fast, plain_frame
from recorder.records import EVENT, FRAME, SNAPSHOT, Pending
from recorder.reference import reference_row
from recorder.schema import SOURCE_SNAPSHOT, SOURCE_STREAM
from recorder.spill import Spill
from recorder.state import SeqAllocator

log = structlog.get_logger("recorder.intake")

_DAY_BUCKET_US = 15 * 60 * 1_000_000  # every time zone offset in use is a multiple of 15 min
_EMPTY_MESSAGE: Extra = (ENVELOPE, None, "{}")  # a message with no section still leaves a row
DUPLICATE = "duplicate: the same contract and timestamp came on two streams"
#: plain frames decoded together by DuckDB (about 15 MB of JSON)
DECODE_FRAMES = 20_000


@dataclass
class Stats:
    """Counters of one recorder run (the metrics and the progress line read them)."""

    frames: int = 0
    snapshots: int = 0
    quarantined: int = 0
    recovered: int = 0
    decoded_in_bulk: int = 0  # plain frames whose rows DuckDB built
    pauses: int = 0  # times the readers stopped: memory full, and the journal could not spill
    spills: int = 0  # times memory filled and frames went on to wait in the journal
    spilled: int = 0  # frames and snapshots that waited in the journal (recorder.spill)
    rows_written: Counter[str] = field(default_factory=Counter)
    files_written: int = 0
    bytes_written: int = 0
    flushes: int = 0
    flush_failures: int = 0
    last_flush_at: float | None = None  # wall-clock seconds
    last_flush_ok: bool = True
    last_message_at: dict[str, float] = field(default_factory=dict)


class Stored(Protocol):
    """What Parquet holds already, while the journal is replayed (recorder.recovery)."""

    def __call__(self, key: Key, seq: int) -> bool:
        """Whether partition ``key`` holds the rows of frame ``seq``."""

    def frame_high(self, day: str, contract: str) -> int:
        """The highest seq held by a partition of a data table for ``(day, contract)``."""


class LocalDays:
    """Local calendar dates of UTC instants, memoised per 15-minute bucket (a hot-path cache)."""

    def __init__(self, tz: tzinfo) -> None:
        self._tz = tz
        self._cache: dict[int, str] = {}

    def __call__(self, instant_us: int) -> str:
        bucket = instant_us // _DAY_BUCKET_US
        day = self._cache.get(bucket)
        if day is None:
            if len(self._cache) > 4096:
                self._cache.clear()
            day = self._cache[bucket] = partition_date(instant_us, self._tz).isoformat()
        return day


class Intake:
    """Turns frames, snapshots and connection events into buffered rows, on the event loop.

    The base of :class:`recorder.pipeline.Pipeline`, which adds the flush side.
    """

    def __init__(
        self,
        data_dir: Path,
        storage: StorageConfig,
        partition_tz: tzinfo,
        naive_tz: tzinfo,
        journal: JournalConfig | None = None,
        run: str = "",
        *,
        bulk_decode: bool = True,
    ) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir = data_dir
        self.storage = storage
        self.run = run
        self._naive_tz = naive_tz
        self._local_day = LocalDays(partition_tz)
        self._seq = SeqAllocator(data_dir)
        self._buffer = Buffer(
            storage.flush_interval_seconds, storage.max_rows_per_file, storage.max_buffered_rows
        )
        self._bulk = bulk_decode
        self._frames = FrameBatch()  # plain frames not decoded yet
        self._last_frame_at = 0.0  # time.monotonic() of the latest frame
        self._last_read = 0  # frames of the latest socket read
        self.journal: Journal | None = None
        if journal is not None and journal.enabled:
            self.journal = Journal(
                data_dir,
                fsync=journal.fsync,
                fsync_interval=journal.fsync_interval_seconds,
                write_interval=journal.write_interval_seconds,
                segment_bytes=journal.segment_megabytes * 1024 * 1024,
                retention_days=journal.retention_days,
                on_error=self._journal_error,
            )
        self._wake = asyncio.Event()
        self._seen_sections: set[str | None] = set()
        self._open_sessions: dict[str, dict[str, Any]] = {}
        self._dedupe: dict[str, set[int]] = {}
        self._muted = Muted(log)
        #: set while replaying the journal: tells which partitions already hold a seq
        self._skip: Stored | None = None
        #: set while frames wait in the journal because memory is full (recorder.spill)
        self._spill: Spill | None = None
        self.stats = Stats()

    def _check_pressure(self) -> None:
        """Spill, stop or restart the readers by the rows in memory and the last read's
        frames (Pipeline: it holds the rows)."""
        raise NotImplementedError

    def _journal_error(self, error: OSError) -> None:
        # called from the journal's thread; structlog's logger is thread-safe
        self._muted.warning(
            "journal", "journal write failed; frames kept and retried", error=str(error)
        )

    # ------------------------------------------------------------------ hot path

    def on_frame(self, connection: str, frame: bytes | str, received_us: int) -> int:
        """Take one frame as received; returns its seq. Never raises for bad input."""
        return self.on_frames(connection, (frame,), received_us)

    def on_frames(self, connection: str, frames: Sequence[bytes | str], received_us: int) -> int:
        """Take frames received together, in order; returns the first one's seq (the rest
        follow it). Never raises for bad input.

        A plain frame (the usual kind) only joins the batch DuckDB decodes in the writer
        thread; any other takes the full rules here and now. The feed hands over the frames
        aiohttp parsed from one socket read: the per-frame work is then only the check, and
        the bookkeeping (seqs, the journal's queue, the batch's columns) is done per call.
        """
        count = len(frames)
        first = self._seq.take(count)
        raws = [frame if isinstance(frame, bytes) else frame.encode() for frame in frames]
        if self.journal is not None:
            self.journal.extend(FRAME, first, received_us, connection, raws)
        self.stats.frames += count
        self._last_frame_at = now = time.monotonic()
        if self._spill is not None:  # memory is full: the frames wait in the journal
            self._spill.spilled(FRAME, first, received_us, connection, raws)
            self.stats.spilled += count
        else:
            self._take(connection, frames, raws, received_us, first, now)
        # once a call, after its frames joined: a full memory stops the readers before their
        # next read (this read's frames are in already; TCP holds the server back)
        self._last_read = count
        self._check_pressure()
        return first

    def _take(
        self,
        connection: str,
        frames: Sequence[bytes | str],
        raws: list[bytes],
        received_us: int,
        first: int,
        now: float,
    ) -> None:
        """Check each frame (``raws``: as bytes) of seqs from ``first`` and buffer it.

        While the journal is replayed, a plain frame that Parquet may hold some rows of
        already (a table's partition names its seq or a later one) takes the per-frame path,
        which leaves those rows out; the others join the batch DuckDB decodes.
        """
        if not self._bulk:
            for seq, frame in enumerate(frames, first):
                self._ingest(connection, frame, received_us, seq, now)
            return
        naive_tz, dedupe, local_day, skip = (
            self._naive_tz,
            self._dedupe,
            self._local_day,
            self._skip,
        )
        seqs: list[int] = []
        exchange: list[int] = []
        days: list[str] = []
        contracts: list[str] = []
        kept: list[bytes] = []
        for seq, raw in enumerate(raws, first):
            plain = plain_frame(raw, naive_tz)
            if plain is None:
                self._ingest(connection, frames[seq - first], received_us, seq, now, plain=False)
                continue
            contract, exchange_us = plain
            day = local_day(exchange_us)
            if skip is not None and seq <= skip.frame_high(day, contract):
                self._ingest(connection, frames[seq - first], received_us, seq, now)
                continue
            if dedupe and contract in dedupe:
                seen = dedupe[contract]
                if exchange_us in seen:
                    self._quarantine(connection, raw, received_us, seq, DUPLICATE, now)
                    continue
                seen.add(exchange_us)
            seqs.append(seq)
            exchange.append(exchange_us)
            days.append(day)
            contracts.append(contract)
            kept.append(raw)
        if seqs:
            batch = self._frames
            waiting = len(batch)
            batch.extend(seqs, received_us, exchange, days, contracts, kept, now)
            self.stats.last_message_at.update(dict.fromkeys(contracts, received_us / 1e6))
            if waiting < DECODE_FRAMES <= len(batch):  # once: the flusher takes every frame
                self._wake.set()

    def on_snapshot(self, connection: str, message: bytes, received_us: int) -> int:
        """Take one live-overview snapshot, already in wire shape; stored with source=snapshot."""
        seq = self._seq.next()
        if self.journal is not None:
            self.journal.append(SNAPSHOT, seq, received_us, connection, message)
        self.stats.snapshots += 1
        if self._spill is not None:  # its rows go where the frames' go: after them
            self._spill.spilled(SNAPSHOT, seq, received_us, connection, [message])
            self.stats.spilled += 1
        else:
            self._ingest(connection, message, received_us, seq, time.monotonic(), SOURCE_SNAPSHOT)
        return seq

    def overlap(self, contracts: tuple[str, ...], active: bool) -> None:
        """While two streams carry ``contracts``, a repeated (contract, exchange_ts) is dropped.

        While frames wait in the journal, the change waits for the frames that came before it.
        """
        if self._spill is not None:
            self._spill.overlaps.append((self._seq.last, contracts, active))
            return
        self._overlap(contracts, active)

    def _overlap(self, contracts: tuple[str, ...], active: bool) -> None:
        for contract in contracts:
            if active:
                self._dedupe.setdefault(contract, set())
            else:
                self._dedupe.pop(contract, None)

    def _ingest(
        self,
        connection: str,
        frame: bytes | str,
        received_us: int,
        seq: int,
        now: float,
        source: str = SOURCE_STREAM,
        *,
        plain: bool = True,
    ) -> None:
        # plain=False: on_frames found the frame not plain (or its book not one bulk decoding
        # takes): the full rules take it
        message = flatten_fast(frame, self._naive_tz) if plain else None
        if message is None:  # not a plain frame: the full rules decide
            try:
                message = flatten(frame, self._naive_tz)
            except FlattenError as exc:
                self._quarantine(connection, frame, received_us, seq, exc.reason, now)
                return
        contract = message.contract
        if self._dedupe and source == SOURCE_STREAM and contract in self._dedupe:
            seen = self._dedupe[contract]
            if message.exchange_us in seen:
                self._quarantine(connection, frame, received_us, seq, DUPLICATE, now)
                return
            seen.add(message.exchange_us)
        day = self._local_day(message.exchange_us)
        head = (message.exchange_us, received_us, seq)
        tail = (source,)
        full = False
        for table, rows in message.rows.items():
            key = (table, day, contract)
            full |= self._add(key, [head + row + tail for row in rows], seq, now)
        extras = message.extras or ([] if message.rows else [_EMPTY_MESSAGE])
        if extras:
            rows = [head + e + tail for e in extras]
            full |= self._add(("extras", day, contract), rows, seq, now)
            self._note_sections(message.extras, contract)
        self.stats.last_message_at[contract] = received_us / 1e6
        if full:
            self._wake.set()

    def _add(self, key: Key, rows: list[Row], seq: int, now: float) -> bool:
        if self._skip is not None and self._skip(key, seq):
            return False
        return self._buffer.add(key, rows, now)

    def _quarantine(
        self,
        connection: str,
        frame: bytes | str,
        received_us: int,
        seq: int,
        reason: str,
        now: float,
    ) -> None:
        raw = frame if isinstance(frame, str) else frame.decode("utf-8", "backslashreplace")
        day = self._local_day(received_us)
        if self._skip is None:
            self.stats.quarantined += 1
        row = (received_us, seq, connection, reason, raw)
        if self._add(("quarantine", day, None), [row], seq, now):
            self._wake.set()
        if self._skip is None:
            self._muted.warning("quarantine", "frame quarantined", seq=seq, reason=reason)

    def _note_sections(self, extras: list[Extra], contract: str) -> None:
        for section, _, _ in extras:
            if section not in self._seen_sections:
                self._seen_sections.add(section)
                log.info("unknown section kept in extras", section=section, contract=contract)

    # ------------------------------------------------------------------ spilled frames

    def read_back(self, spill: Spill, runs: list[Pending]) -> None:
        """Take what waited in the journal (runs in seq order, as
        :class:`~recorder.spill.JournalTail` reads them) as :meth:`on_frames`,
        :meth:`on_snapshot` and the connection events would have when it came."""
        now = time.monotonic()
        for kind, first, received_us, connection, payloads in runs:
            if spill.overlaps:
                for contracts, active in spill.due_overlaps(first):
                    self._overlap(contracts, active)
            spill.taken(payloads)
            if kind == FRAME:
                self._take(connection, payloads, payloads, received_us, first, now)
            elif kind == SNAPSHOT:
                self._ingest(connection, payloads[0], received_us, first, now, SOURCE_SNAPSHOT)
            elif kind == EVENT:
                self._event_rows(orjson.loads(payloads[0]), first, received_us, now)

    # ------------------------------------------------------------------ journal replay

    def replaying(self, skip: Stored | None) -> None:
        """Enter (``skip`` given) or leave journal-replay mode (see recorder.recovery)."""
        self._skip = skip

    def replay_frame(
        self,
        connection: str,
        frame: bytes,
        received_us: int,
        seq: int,
        now: float,
        source: str = SOURCE_STREAM,
    ) -> None:
        self.stats.recovered += 1
        self._ingest(connection, frame, received_us, seq, now, source)

    def replay_frames(
        self, connection: str, frames: list[bytes], received_us: int, first: int, now: float
    ) -> None:
        """Frames of consecutive seqs from ``first``, received together, as journaled."""
        self.stats.recovered += len(frames)
        self._take(connection, frames, frames, received_us, first, now)

    def replay_event(self, event: dict[str, Any], seq: int, received_us: int, now: float) -> None:
        self._event_rows(event, seq, received_us, now)

    def seq_above(self, seq: int) -> None:
        self._seq.ensure_above(seq)

    @property
    def last_seq(self) -> int:
        """The last seq handed out (0 when none yet)."""
        return self._seq.last

    def reopen_for_close(self, session: str, opened: dict[str, Any]) -> None:
        """Know a session the journal shows open, so that it can be closed (recovery)."""
        self._open_sessions[session] = {k: v for k, v in opened.items() if k != "frames"}

    # ------------------------------------------------------------------ connection events

    def session_opened(
        self, session: str, endpoint: str, contracts: tuple[str, ...], at_us: int
    ) -> None:
        event = {
            "event": "session_opened",
            "session": session,
            "run": self.run,
            "endpoint": endpoint,
            "contracts": list(contracts),
            "opened_at": at_us,
        }
        self._open_sessions[session] = event
        self._record_event(event, at_us)

    def session_closed(
        self, session: str, at_us: int, code: int | None, reason: str, frames: int, stale: bool
    ) -> None:
        opened = self._open_sessions.pop(session, None)
        if opened is None:
            return
        event = {
            **opened,
            "event": "session_closed",
            "closed_at": at_us,
            "close_code": code,
            "reason": reason,
            "frames": frames,
            "stale": stale,
        }
        self._record_event(event, at_us)

    def contracts_rejected(self, contracts: tuple[str, ...], at_us: int, reason: str) -> None:
        event = {"event": "contracts_rejected", "contracts": list(contracts), "reason": reason}
        self._record_event(event, at_us)

    def on_reference(self, items: list[tuple[dict[str, Any], str]], at_us: int) -> None:
        """Static data of the contract universe, as discovery fetched it (the contracts view)."""
        self._record_event({"event": "reference", "items": [list(i) for i in items]}, at_us)

    def _record_event(self, event: dict[str, Any], at_us: int) -> None:
        seq = self._seq.next()
        if self.journal is not None:
            session, payload = str(event.get("session", "")), orjson.dumps(event)
            self.journal.append(EVENT, seq, at_us, session, payload)
            if self._spill is not None:  # its rows go where the frames' go: after them
                self._spill.spilled(EVENT, seq, at_us, session, [payload])
                return
        self._event_rows(event, seq, at_us, time.monotonic())

    def _event_rows(self, event: dict[str, Any], seq: int, received_us: int, now: float) -> None:
        day = self._local_day(received_us)
        kind = event["event"]
        if kind == "contracts_rejected":
            rows = [(received_us, seq, c, event["reason"]) for c in event["contracts"]]
            self._add(("rejections", day, None), rows, seq, now)
        elif kind == "reference":
            head = (received_us, seq)
            rows = [head + reference_row(item, market) for item, market in event["items"]]
            self._add(("reference", day, None), rows, seq, now)
        elif kind in ("session_opened", "session_closed"):
            row = (
                received_us,
                seq,
                event["session"],
                event["run"],
                event["endpoint"],
                event["contracts"],
                event["opened_at"],
                event.get("closed_at"),
                event.get("close_code"),
                event.get("reason"),
                event.get("frames", 0),
                event.get("stale", False),
            )
            self._add(("session_log", day, None), [row], seq, now)
