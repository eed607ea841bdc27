"""The writer thread's side of a flush: plain frames decoded in bulk, rows written as files.

:class:`FlushWorker` owns the one thread that decodes and writes (recorder.pipeline hands it
the rows waiting and awaits the answer, so a slow disk never stalls the event loop), DuckDB's
decoder and the Parquet writer. A batch DuckDB refuses is flattened frame by frame instead;
rows that could not be written come back to the pipeline, which keeps them for the next
flush.
"""

from __future__ import annotations

import asyncio
import math
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import tzinfo
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from recorder import allocators
from recorder.buffer import Batch, Key, Row
from recorder.columnar import Decoder, FrameBatch, batches_to_parts, partitions
from recorder.config import StorageConfig
from recorder.errors import StorageError
from recorder.flatten import flatten
from recorder.journal import Journal
from recorder.logs import Muted
from recorder.schema import SOURCE_STREAM, TABLES
from recorder.writer import ParquetWriter, WrittenFile

if TYPE_CHECKING:
    from recorder.intake import Stats

#: frames decoded together at most: a flush after the readers paused may hold hundreds of
#: thousands, and DuckDB's working memory grows with the batch (a bigger batch decodes
#: faster per frame: 20,000 at a time cost 12 % of the throughput)
DECODE_CHUNK_FRAMES = 100_000
#: the rows a frame not decoded yet is taken to make until frames have been decoded: a full
#: message (three book levels and three other sections); then the average seen so far
ROWS_PER_FRAME = 6.0

#: what a flush gives back: the files written, the rows not written (per table) and the
#: error that stopped it, if any
Written = tuple[list[WrittenFile], dict[str, list[pa.Table]], StorageError | None]


class FlushWorker:
    """Decodes plain frames and writes rows into Parquet files, in its own thread."""

    def __init__(
        self,
        data_dir: Path,
        storage: StorageConfig,
        naive_tz: tzinfo,
        journal: Journal | None,
        stats: Stats,
        muted: Muted,
    ) -> None:
        self._storage = storage
        self._naive_tz = naive_tz
        self._journal = journal
        self._stats = stats
        self._muted = muted
        self._writer = ParquetWriter(data_dir, storage.compression_level, storage.fsync)
        self._decoder = Decoder()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="parquet-writer")
        self._trimmed_at = -math.inf  # monotonic time of the last give_back
        #: rows per decoded frame, on average (a float written whole: the event loop reads it)
        self.rows_per_frame = ROWS_PER_FRAME

    async def decode(self, frames: FrameBatch) -> dict[str, pa.Table]:
        """The rows of ``frames`` (left empty), decoded in the worker's thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._decode, frames)

    async def write(self, job: list[Any]) -> Written:
        """One flush of ``[batches, frames, parts]`` in the worker's thread, emptying ``job``:
        the worker alone holds the rows then, so they are freed as soon as written."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._take_write, job)

    def close(self) -> None:
        """Wait for the work under way, then let the thread and DuckDB go."""
        self._pool.shutdown(wait=True)
        self._decoder.close()

    def _decode(self, frames: FrameBatch) -> dict[str, pa.Table]:
        """The rows of plain frames, decoded DECODE_CHUNK_FRAMES at a time; ``frames`` is left
        empty, and each chunk's raw frames are freed once decoded (a backlog's frames and
        its rows are not all in memory at once)."""
        chunks = frames.take_chunks(DECODE_CHUNK_FRAMES)
        pieces = []
        while chunks:
            pieces.append(self._decode_chunk(chunks.pop(0)))
        if len(pieces) == 1:
            return pieces[0]
        names = {name for piece in pieces for name in piece}
        return {
            name: pa.concat_tables([piece[name] for piece in pieces if name in piece])
            for name in names
        }

    def _decode_chunk(self, frames: FrameBatch) -> dict[str, pa.Table]:
        """The rows of plain frames: DuckDB's bulk decoding, or frame by frame if it fails."""
        if not len(frames):
            return {}
        try:
            tables = self._decoder.decode(frames)
            self._stats.decoded_in_bulk += len(frames)
            rows = sum(t.num_rows for t in tables.values())
            self.rows_per_frame = 0.5 * self.rows_per_frame + 0.5 * rows / len(frames)
            return tables
        except (duckdb.Error, pa.ArrowException) as exc:
            self._muted.warning(
                "decode", "bulk decoding failed; frames flattened one by one", error=str(exc)
            )
        batches: dict[Key, list[Row]] = {}
        for i, frame in enumerate(frames.frames):
            message = flatten(frame, self._naive_tz)
            head = (message.exchange_us, frames.received[i], frames.seq[i])
            for table, rows in message.rows.items():
                key = (table, frames.day[i], message.contract)
                batches.setdefault(key, []).extend(head + row + (SOURCE_STREAM,) for row in rows)
        return batches_to_parts(Batch(key, rows) for key, rows in batches.items())

    def _take_write(self, job: list[Any]) -> Written:
        batches, frames, parts = job
        job.clear()
        try:
            return self._write(batches, frames, parts)
        finally:
            del batches, frames, parts
            # the flushes' freed heap blocks go back (recorder.allocators), at most once a
            # flush interval: under a burst, each trim's pages would be faulted in again
            now = time.monotonic()
            if now - self._trimmed_at >= self._storage.flush_interval_seconds:
                self._trimmed_at = now
                allocators.give_back()

    def _write(
        self, batches: list[Batch], frames: FrameBatch, parts: dict[str, list[pa.Table]]
    ) -> Written:
        """One flush: decode, sort, cut into files and write them.

        Rows are copied once, into file order; the frames and rows they come from are let go
        as soon as they are not needed (``frames`` is left empty), so a flush holds about one
        copy of its rows, not three.
        """
        tables = {name: list(rows) for name, rows in parts.items()}
        parts.clear()
        for source in (self._decode(frames), batches_to_parts(batches)):
            for name, rows in source.items():
                tables.setdefault(name, []).append(rows)
        batches.clear()
        try:
            merged = {name: pa.concat_tables(rows) for name, rows in tables.items()}
            newest = max(int(pc.max(rows.column("seq")).as_py()) for rows in merged.values())
            journal = self._journal
            if journal is not None and not journal.wait_written(newest, timeout=5.0):
                return [], tables, StorageError("the journal is behind; rows kept for later")
            ordered: dict[str, pa.Table] = {}
            files = []
            for name, rows in merged.items():
                ordered[name], cut = partitions(TABLES[name], rows, self._storage.max_rows_per_file)
                files.extend(cut)
        except pa.ArrowException as exc:  # a defect, not bad input: keep every row, say so
            return [], tables, StorageError(f"cannot arrange rows into files: {exc}")
        del tables, merged, rows  # `ordered` holds every row, in file order
        written, failed, error = self._writer.write_parts(ordered, files)
        kept: dict[str, list[pa.Table]] = {}
        for part in failed:
            kept.setdefault(part.key[0], []).append(
                ordered[part.key[0]].slice(part.offset, part.length)
            )
        return written, kept, error
