"""The intraday merge: the day files of a date that has not closed yet, rewritten as few.

Every flush writes one day file per table (see :mod:`recorder.paths`), and compaction folds a
date's day files into contract files only once the date has closed; until then a query on
today's data opens every flush's footer (17,280 a day at one flush per 5 s). A **merge**
rewrites runs of a date's day files as one day file each, in the swap of a date fold (see
:mod:`recorder.datefold`):

1. list the date folder ``D``; cut its day files, in name (= seq) order, into **runs** of
   contiguous files holding at most ``max_rows`` rows together (:func:`plan_runs`); a run of
   one file is left as it is. A run never skips a file in between, so its merged file, named
   ``{first}-{last}.parquet`` with the lowest and highest seq the run's names give (no tag: it
   is a day file like the others, which the next merge and the closing fold take as they take
   any other), overlaps no other day file and names the highest seq of each file it replaces:
   recovery's rule (:class:`recorder.recovery.HighWater`) gives the same answer after it;
2. build the new ``D`` in the staging folder (``_state/compaction/{table}/date=X``): each
   run's merged file (its files' rows in the day files' schema, sorted by (``contract``,
   ``seq``), each frame's rows in their order; read back and compared), and a hard link for
   every other file of ``D``, contract folders and their files included;
3. under both locks the fold takes (:meth:`Compactor.date_locks`: the one every flush of day
   files holds, then the date folder's own), list ``D`` again. Day files a flush added since
   the listing (their names sort after every listed one) are hard-linked into the staged
   folder there and then, a link taking microseconds: a flush lands every few seconds while a
   merge of many files takes longer, so giving up on each would make busy dates never merge.
   Any other change (a file gone or replaced, a contract file added) gives the attempt up;
4. exchange the staged folder and ``D`` (``renameat2(RENAME_EXCHANGE)``), release the locks
   and delete the old ``D``.

**Readers** list the day files of ``D`` in one directory listing, so they see the old files
or the merged one, never both; one that listed the old files and opens them after the swap
fails (file not found), as with a fold. Contract files are the same inodes on both sides.
Without the exchange (a file system that lacks it) a date is **not merged**: the fold's
fallback (rename in, then unlink) would show the merged rows twice for a moment, which queries
run during the trading day would see; the day files stay as the flushes wrote them.

**Crashes** leave at most the staging folder, which the next merge or compaction run deletes;
``D`` is whole before and after the exchange.

**Which files.** Every day file is taken, the newest too: a flush never appends to a file, so
the newest is as complete as any. Runs hold at most ``max_rows`` rows (:data:`MERGED_ROWS`),
which bounds a merge's memory (a run is read whole, sorted, written, read back) and how often
a row is rewritten: a merged file grows with each pass until it is full, then stays as it is.

**Files.** zstd level :data:`COMPRESSION_LEVEL`, row groups of the flushes' size (a
one-contract read skips the groups of other contracts by their ``contract`` statistics),
statistics on ``contract`` and ``exchange_ts`` only, dictionaries on.

The daemon runs a pass every ``compaction.merge_interval_seconds`` (:class:`AutoMerge`), on
the dates that have not closed (``compaction.after_seconds`` after local midnight), never at
the same time as a compaction run in the same data directory
(:func:`recorder.compaction.run_lock`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, tzinfo
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import structlog

from recorder import compaction
from recorder.buffer import Key
from recorder.compaction import CompactionBusy, closed_dates_end, run_lock
from recorder.compactor import Compactor, Outcome
from recorder.folding import DateListing, is_compacted, list_date, read_sorted
from recorder.packing import statistics_columns
from recorder.paths import file_name, seq_range
from recorder.schema import CONTRACT_COLUMN, TABLES
from recorder.state import fsync_dir
from recorder.writer import FLUSH_GROUP_ROWS

log = structlog.get_logger("recorder.merging")

#: zstd level of merged files. On 4,000 day files (1.2 M rows, 27.1 MB at the flushes' level
#: 1): level 1 gives 17.5 MB, 3 16.8 MB, 6 15.4 MB, 9 15.4 MB, the merge taking 3.3, 3.5, 3.7
#: and 3.7 s (reading and the read-back dominate); the closing fold rewrites them at 19 anyway
COMPRESSION_LEVEL = 6
#: rows of one merged file at most (the daemon passes ``storage.max_rows_per_file``, what a
#: flush holds at once): a run is read whole, sorted, written and read back, so this bounds
#: a merge's memory (measured: a run of 179,000 ``aggregate`` rows, the widest table, peaks
#: 120 MB above the process; 537,000 ``best_limit`` rows 160 MB)
MERGED_ROWS = 250_000
#: a run is merged once it holds this many files
MIN_FILES = 2


@dataclass(frozen=True)
class Merged:
    """What one merge of a date folder did."""

    outcome: Outcome
    files_before: int = 0  # day files replaced by merged files
    files_after: int = 0  # merged files written
    rows: int = 0


@dataclass
class MergeResult:
    """What a merge pass did."""

    dates: int = 0  # date folders merged
    files_before: int = 0
    files_after: int = 0
    rows: int = 0
    problems: list[str] = field(default_factory=list)


def plan_runs(rows: Sequence[int], max_rows: int, min_files: int = MIN_FILES) -> list[range]:
    """The runs of files to merge, as index ranges into ``rows`` (the row count of each day
    file, in name order): contiguous files, greedily, while their rows add up to ``max_rows``
    at most; runs shorter than ``min_files`` are left out. The runs of a prefix of the files
    are the same whatever files follow it, but for the last run, which may grow."""
    runs = []
    start = total = 0
    for index, count in enumerate(rows):
        if index > start and total + count > max_rows:
            if index - start >= min_files:
                runs.append(range(start, index))
            start, total = index, 0
        total += count
    if len(rows) - start >= min_files:
        runs.append(range(start, len(rows)))
    return runs


class Merger:
    """Merges the day files of date folders, with the staging, locks and exchange of
    ``compactor`` (whose ``on_step`` hook sees the steps staged, verified, locked, exchanged
    and cleaned)."""

    def __init__(
        self,
        compactor: Compactor,
        max_rows: int = MERGED_ROWS,
        compression_level: int = COMPRESSION_LEVEL,
    ) -> None:
        self.compactor = compactor
        self.data_dir = compactor.data_dir
        self.max_rows = max_rows
        self.compression_level = compression_level

    def dates(self, days: Callable[[date], bool]) -> Iterator[tuple[Key, Path]]:
        """The date folders that ``days`` accepts of the tables partitioned by contract."""
        for table in TABLES.values():
            root = self.data_dir / table.name
            if not table.by_contract or not root.is_dir():
                continue
            for folder in sorted(root.iterdir()):
                if not folder.name.startswith("date=") or not folder.is_dir():
                    continue
                try:
                    day = date.fromisoformat(folder.name.removeprefix("date="))
                except ValueError:
                    continue
                if days(day):
                    yield (table.name, day.isoformat(), None), folder

    def merge(self, key: Key, live: Path, stop: threading.Event | None = None) -> Merged | None:
        """Merge the day files of the date folder ``live`` (see the module docstring); None
        when there is nothing to merge (or ``stop`` was set while the files were written)."""
        table = TABLES[key[0]]
        listing = list_date(live)
        found = [seq_range(n) for n in listing.day_files]
        spans = [s for s in found if s is not None]
        if listing.foreign or len(spans) < len(found) or _overlapping(spans):
            return Merged(Outcome.UNSAFE)
        # a compacted day file (compaction.layout "date") counts as full: never merged again
        counts = [
            self.max_rows if is_compacted(n) else pq.read_metadata(live / n).num_rows
            for n in listing.day_files
        ]
        runs = plan_runs(counts, self.max_rows)
        if not runs:
            return None
        staged = self.compactor.fresh_staging(live)
        merged: set[str] = set()
        rows = 0
        for run in runs:
            if stop is not None and stop.is_set():
                self.compactor.drop_staging(staged)
                return None
            sources = [listing.day_files[i] for i in run]
            paths = [live / n for n in sources]
            data = read_sorted(paths, table.day_schema, [CONTRACT_COLUMN, "seq"])
            if data is None:  # a column the schema does not know: merging would drop it
                self.compactor.drop_staging(staged)
                return Merged(Outcome.UNSAFE)
            self._write_verified(data, staged / file_name(spans[run[0]][0], spans[run[-1]][1]))
            merged.update(sources)
            rows += data.num_rows
        _link(live, staged, listing, keep=lambda n: n not in merged)
        fsync_dir(staged)
        self.compactor.step("staged", key)
        self.compactor.step("verified", key)  # each merged file was read back as written
        with self.compactor.date_locks(key):
            self.compactor.step("locked", key)
            outcome = self._install(key, live, staged, listing)
        self.compactor.drop_staging(staged)
        self.compactor.step("cleaned", key)
        if outcome is not Outcome.COMPACTED:
            return Merged(outcome)
        where = str(live.relative_to(self.data_dir))
        log.debug("merged day files", date=where, files=len(merged), into=len(runs), rows=rows)
        return Merged(outcome, len(merged), len(runs), rows)

    def _install(self, key: Key, live: Path, staged: Path, listing: DateListing) -> Outcome:
        """Swap the staged folder in, taking in the day files flushed since ``listing``
        (called under both locks)."""
        now = list_date(live)
        listed = len(listing.day_files)
        # names sort by seq: what follows the listed files is newer (a flush's, or a replay's)
        newer = now.day_files[listed:]
        if (
            now.day_files[:listed] != listing.day_files
            or now.contracts != listing.contracts
            or now.foreign
        ):
            return Outcome.CHANGED
        for name in newer:
            os.link(live / name, staged / name)
        if newer:
            fsync_dir(staged)
        if not self.compactor.exchange(staged, live):
            log.warning(
                "the file system cannot exchange folders atomically; day files not merged",
                date=str(live.relative_to(self.data_dir)),
            )
            return Outcome.UNSAFE
        self.compactor.step("exchanged", key)
        return Outcome.COMPACTED

    def _write_verified(self, data: pa.Table, path: Path) -> None:
        """Write ``data`` as the day file ``path``, durably, then read it back and compare."""
        tmp = path.with_name(f".{path.name}.tmp")
        pq.write_table(
            data,
            tmp,
            compression="zstd",
            compression_level=self.compression_level,
            use_dictionary=True,
            write_statistics=[CONTRACT_COLUMN, *statistics_columns(data.schema)],
            row_group_size=FLUSH_GROUP_ROWS,
            sorting_columns=[
                pq.SortingColumn(data.column_names.index(CONTRACT_COLUMN)),
                pq.SortingColumn(data.column_names.index("seq")),
            ],
        )
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.rename(tmp, path)
        back = pq.ParquetFile(path).read()
        if not back.equals(data):
            raise OSError(f"{path.name}: the merged file read back differs from what was written")


def _overlapping(spans: Sequence[tuple[int, int]]) -> bool:
    """Whether two of the seq ranges ``spans`` (in name order) overlap."""
    return any(a[1] >= b[0] for a, b in itertools.pairwise(spans))


def _link(live: Path, staged: Path, listing: DateListing, keep: Callable[[str], bool]) -> None:
    """Hard-link into ``staged`` the day files ``keep`` accepts and every contract file."""
    for name in listing.day_files:
        if keep(name):
            os.link(live / name, staged / name)
    for folder, names in listing.contracts.items():
        (staged / folder).mkdir()
        for name in names:
            os.link(live / folder / name, staged / folder / name)
        fsync_dir(staged / folder)


# ------------------------------------------------------------------ a pass, and the daemon's


def merge_open_dates(
    data_dir: Path,
    tz: tzinfo,
    *,
    now: datetime,
    after_seconds: float,
    stop: threading.Event | None = None,
    merger: Merger | None = None,
    wait: bool = False,
) -> MergeResult:
    """Merge the day files of every date not closed at ``now`` (see
    :func:`recorder.compaction.closed_dates_end`), holding the compaction run lock (raises
    CompactionBusy when a compaction holds it and ``wait`` is False)."""
    merger = merger or Merger(Compactor(data_dir))
    end = closed_dates_end(now, tz, after_seconds)
    result = MergeResult()
    with run_lock(merger.data_dir, wait):
        merger.compactor.remove_leftovers()
        for key, folder in list(merger.dates(lambda day: day >= end)):
            if stop is not None and stop.is_set():
                break
            _merge_one(merger, key, folder, stop, result)
    if result.dates or result.problems:
        log.info(
            "merge pass finished",
            dates=result.dates,
            files_before=result.files_before,
            files_after=result.files_after,
            rows=result.rows,
            problems=len(result.problems),
        )
    return result


def _merge_one(
    merger: Merger, key: Key, folder: Path, stop: threading.Event | None, result: MergeResult
) -> None:
    where = str(folder.relative_to(merger.data_dir))
    for _ in range(3):  # a change other than a flush (another process) three times is unlikely
        try:
            done = merger.merge(key, folder, stop)
        except (OSError, pa.ArrowException) as exc:
            result.problems.append(f"{where}: {exc}")
            log.error("cannot merge day files; left as they were", date=where, error=str(exc))
            return
        if done is None:
            return
        if done.outcome is Outcome.COMPACTED:
            result.dates += 1
            result.files_before += done.files_before
            result.files_after += done.files_after
            result.rows += done.rows
            return
        if done.outcome is Outcome.UNSAFE:
            reason = "foreign, overlapping or unknown-column files, or no atomic exchange"
            result.problems.append(f"{where}: not merged ({reason})")
            return
    log.info("date folder keeps changing; merged next time", date=where)


class AutoMerge(compaction.BackgroundPasses):
    """A background task of the daemon: a merge pass every ``interval_seconds``; :meth:`close`
    stops it after the run in hand."""

    name = "merging"

    def __init__(
        self,
        data_dir: Path,
        tz: tzinfo,
        after_seconds: float,
        interval_seconds: float,
        max_rows: int = MERGED_ROWS,
    ) -> None:
        super().__init__(data_dir, tz, after_seconds)
        self.interval_seconds = interval_seconds
        self.max_rows = max_rows

    async def _run(self) -> None:
        while True:
            # the first pass waits one interval: start-up is the compaction pass's moment
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.interval_seconds)
            if self._stop.is_set():
                return
            await asyncio.to_thread(self._pass)
            self.passes += 1

    def _pass(self) -> None:
        try:
            merge_open_dates(
                self.data_dir,
                self.tz,
                now=compaction.wall_clock(),
                after_seconds=self.after_seconds,
                stop=self._halt,
                merger=Merger(Compactor(self.data_dir), self.max_rows),
            )
        except CompactionBusy:
            log.debug("a compaction is running; this merge pass is skipped")
        except Exception:  # a bug here must not stop the recording
            log.exception("merge pass failed; the recording goes on")
