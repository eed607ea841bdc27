"""Which files of a data directory a :class:`~recorder.store.Store` request reads.

Per date folder of the dates a time range can fall on (see :mod:`recorder.paths`): the
contract files of the contracts asked for, then the date's day files, compacted or not (whose
rows a request reads under a filter on ``contract``). A date folder is listed before its
contract folders, and every request lists again, so a file written meanwhile is read by the
next request (the steps of one request share a listing: :meth:`StoreFiles.listed_once`).

A compaction swaps a whole date folder for a new one (:mod:`recorder.compactor`). A file
listed before the swap and gone after it makes the request's query fail, and the request
lists again. A contract folder listed in a date folder and gone when its own files are listed
means the same (a fold in the ``date`` layout leaves no contract folder), but nothing would
fail: the date folder is listed again at once (:meth:`StoreFiles.contract_files`).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import date, datetime, timedelta, tzinfo
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq

from recorder.packing import CONTRACTS_KEY
from recorder.paths import decode_contract, encode_contract, is_packed_day_file, partition_dir
from recorder.schema import CONTRACT_COLUMN, TABLES
from recorder.storesql import TimeLike, to_utc

Contracts = str | Iterable[str] | None

#: UTC offsets span -12:00..+14:00, so without the partition time zone the local date of an
#: instant is known only to lie within these bounds of its UTC date
_BEHIND, _AHEAD = timedelta(hours=12), timedelta(hours=14)
ONE_US = timedelta(microseconds=1)
CONTRACT_PREFIX = "contract="
#: tables read whole whatever the request: the sessions and gaps views need all of them
WHOLE = ("session_log", "rejections")
#: listings of a date folder a request makes at most while its contract folders vanish
_LISTINGS = 3
#: one listing of a date folder: the names of its contract folders, its day files
Listing = tuple[set[str], list[Path]]


def contract_list(contracts: Contracts) -> list[str] | None:
    if contracts is None:
        return None
    return [contracts] if isinstance(contracts, str) else list(dict.fromkeys(contracts))


def _is_parquet(name: str) -> bool:
    return name.endswith(".parquet") and not name.startswith(".")


def folder_name(contract: str) -> str:
    return CONTRACT_PREFIX + encode_contract(contract)


def folder_contract(name: str) -> str:
    """The contract of a contract folder's name (``contract=<encoded>``)."""
    return decode_contract(name[len(CONTRACT_PREFIX) :])


class PackedContracts:
    """The contracts whose rows each compacted day file holds, its ``contract`` column read
    once per process.

    In the ``date`` layout a contract's rows of a closed date are in the date's compacted
    day file, not in a folder of its own: :meth:`StoreFiles.asof_files` reads such a file only
    where it holds a contract looked for, and stops looking back at the first one that does,
    rather than reading every date of the history. A file is never rewritten in place (a
    new fold names a new file, see :mod:`recorder.paths`), so what a path held is kept, as
    :class:`recorder.catalog.FileSchemas` keeps what footers said.
    """

    def __init__(self) -> None:
        self._known: dict[str, frozenset[str]] = {}
        self._lock = threading.Lock()

    def of(self, path: Path) -> frozenset[str] | None:
        """The contracts of ``path``; None when it is gone (a fold replaced it)."""
        with self._lock:
            known = self._known.get(str(path))
        if known is None:
            try:
                known = _contracts_of(path)
            except FileNotFoundError:
                return None
            with self._lock:
                self._known[str(path)] = known
        return known

    def may_hold(self, path: Path, contract: str) -> bool:
        """Whether ``path`` holds rows of ``contract`` (a file gone may: reading it fails,
        and the request lists again)."""
        known = self.of(path)
        return known is None or contract in known


def _contracts_of(path: Path) -> frozenset[str]:
    """The contracts of a compacted day file: the list in its footer
    (:data:`~recorder.packing.CONTRACTS_KEY`), else its ``contract`` column's values."""
    parquet = pq.ParquetFile(path, read_dictionary=[CONTRACT_COLUMN])
    listed = (parquet.metadata.metadata or {}).get(CONTRACTS_KEY.encode())
    if listed is not None:
        return frozenset(json.loads(listed))
    return frozenset(pc.unique(parquet.read([CONTRACT_COLUMN]).column(0)).to_pylist())


#: what is known of the compacted day files this process has read
PACKED = PackedContracts()


def _day(name: str) -> date | None:
    if not name.startswith("date="):
        return None
    try:
        return date.fromisoformat(name[5:])
    except ValueError:
        return None


class StoreFiles:
    """Which files of a data directory a request reads (see the module docstring)."""

    def __init__(self, data_dir: Path, partition_timezone: tzinfo | None) -> None:
        self.data_dir = data_dir
        self.partition_timezone = partition_timezone
        self._memo = threading.local()  # per thread: the listings of a listed_once() block

    @contextmanager
    def listed_once(self) -> Iterator[None]:
        """Within the block (in this thread) a folder is listed once: the steps of a request
        that reads in several steps (:meth:`recorder.store.Store.asof`) share one listing.
        :meth:`forget` drops it (a listed file was removed: list again)."""
        if getattr(self._memo, "folders", None) is not None:
            yield  # an enclosing block keeps the listings
            return
        self._memo.folders = {}
        try:
            yield
        finally:
            self._memo.folders = None

    def forget(self) -> None:
        """Drop the listings a :meth:`listed_once` block holds: the next request lists again."""
        if getattr(self._memo, "folders", None) is not None:
            self._memo.folders = {}

    def _names(self, folder: Path) -> list[str] | None:
        """The sorted names in ``folder`` (None if it does not exist)."""
        memo: dict[Path, list[str] | None] | None = getattr(self._memo, "folders", None)
        if memo is not None and folder in memo:
            return memo[folder]
        try:
            names: list[str] | None = sorted(os.listdir(folder))
        except FileNotFoundError:
            names = None
        if memo is not None:
            memo[folder] = names
        return names

    def visible(self, folder: Path) -> list[Path]:
        """The Parquet files of one partition folder that readers may see (no temporary
        files)."""
        return [folder / n for n in self._names(folder) or () if _is_parquet(n)]

    def date_listing(self, folder: Path) -> Listing:
        """One date folder of a table partitioned by contract: the names of its contract
        folders and its day files, compacted or not (no temporary files), from one listing."""
        names = self._names(folder) or []
        folders = {n for n in names if n.startswith(CONTRACT_PREFIX)}
        return folders, [folder / n for n in names if _is_parquet(n)]

    def contract_files(self, folder: Path, names: Iterable[str]) -> tuple[list[Path], bool]:
        """The visible files of the contract folders ``names`` of the date folder ``folder``,
        and whether each of them was still there.

        One that is gone was listed in a date folder that a fold in the ``date`` layout has
        replaced since (its compacted day file holds the rows of every contract folder): the
        caller lists the date folder again, after :meth:`forget`. Nothing else removes a
        contract folder, and the rows of a gone one would otherwise be left unread without
        any error, as no file of it was listed.
        """
        files: list[Path] = []
        for name in names:
            found = self._names(folder / name)
            if found is None:
                return files, False
            files.extend(folder / name / n for n in found if _is_parquet(n))
        return files, True

    def dates(self, table: str) -> list[date]:
        try:
            names = os.listdir(self.data_dir / table)
        except FileNotFoundError:
            return []
        return sorted(d for d in map(_day, names) if d is not None)

    def date_bounds(self, start: datetime | None, end: datetime | None) -> tuple[date, date]:
        """The first and last partition date that can hold an instant of ``[start, end)``."""
        tz = self.partition_timezone
        if start is None:
            low = date.min
        else:
            low = start.astimezone(tz).date() if tz else (start - _BEHIND).date()
        if end is None:
            high = date.max
        else:
            last = end - ONE_US
            high = last.astimezone(tz).date() if tz else (last + _AHEAD).date()
        return low, high

    def days(self, table: str, low: date, high: date) -> list[date]:
        """Dates of ``table`` in ``[low, high]``; a bounded range is probed, not listed."""
        if low != date.min and high != date.max:
            if high < low:
                return []
            days = (low + timedelta(days=i) for i in range((high - low).days + 1))
            root = self.data_dir / table
            return [d for d in days if (root / f"date={d.isoformat()}").is_dir()]
        return [d for d in self.dates(table) if low <= d <= high]

    def files(
        self,
        table: str,
        chosen: list[str] | None,
        start: TimeLike | None,
        end: TimeLike | None,
        skip: Iterable[str] = (),
    ) -> list[Path]:
        """:meth:`recorder.store.Store.files`, for the contracts ``chosen`` (all: None) but
        not those in ``skip``, whose folders are not read (day files are: the caller leaves
        out their rows, see :func:`~recorder.storesql.day_filter`)."""
        spec = TABLES[table]
        if table in WHOLE:
            return [f for d in self.dates(table) for f in self.visible(self.date_dir(table, d))]
        low, high = self.date_bounds(
            None if start is None else to_utc(start), None if end is None else to_utc(end)
        )
        out: list[Path] = []
        for day in self.days(table, low, high):
            folder = self.date_dir(table, day)
            if not spec.by_contract:
                out.extend(self.visible(folder))
                continue
            out.extend(self._date_files(folder, chosen, skip))
        return out

    def _date_files(
        self, folder: Path, chosen: list[str] | None, skip: Iterable[str]
    ) -> list[Path]:
        """:meth:`files` of one date folder of a table partitioned by contract.

        The date folder is listed before its contract folders: a compaction folding day
        files into contract files in between leaves listed day files gone (the request lists
        again), not rows unread; one folding contract folders into a compacted day file
        leaves listed contract folders gone (listed again here, see :meth:`contract_files`).
        """
        skipped = set(skip)
        for _ in range(_LISTINGS):
            folders, day_files = self.date_listing(folder)
            if chosen is None:
                names = sorted(folders.difference(map(folder_name, skipped)))
            else:
                names = [folder_name(c) for c in chosen if c not in skipped]
                names = [n for n in names if n in folders]
            files, whole = self.contract_files(folder, names)
            if whole:
                break
            self.forget()
        return [*files, *day_files]

    def date_dir(self, table: str, day: date) -> Path:
        return self.data_dir / partition_dir(table, day.isoformat(), None)

    def asof_files(
        self, table: str, contracts: list[str] | None, ts: datetime, found: set[str]
    ) -> list[Path]:
        """Files that can hold the last row at or before ``ts`` of each contract not ``found``.

        Date folders before ``low`` hold only rows before ``ts``, so per contract the latest
        such folder where it has contract files, or rows in a compacted day file, is enough;
        the folders from ``low`` to ``high`` may hold rows on either side. A compacted day file
        is read on a date so read where it holds a contract looked for (:data:`PACKED`; in
        the ``date`` layout a contract's history is in such files only, every date's). The
        other day files of every date so read are read too (a contract's later rows may be
        there), and, for every contract (``contracts`` None), those of every date up to
        ``high``: a contract may have only day files, which are not compacted yet (a date is
        compacted once it has closed, so these are few).
        """
        for _ in range(_LISTINGS):
            files, whole = self._asof_listing(table, contracts, ts, found)
            if whole:
                break
            self.forget()  # a date folder was swapped while listed: list it again
        return files

    def _asof_listing(
        self, table: str, contracts: list[str] | None, ts: datetime, found: set[str]
    ) -> tuple[list[Path], bool]:
        """:meth:`asof_files`, each date folder listed once, and whether every contract
        folder and compacted day file listed was still there (see :meth:`contract_files`)."""
        low, high = self.date_bounds(ts, ts + ONE_US)
        days = [d for d in self.dates(table) if d <= high]
        listed: dict[date, Listing] = {}

        def listing(day: date) -> Listing:
            if day not in listed:
                listed[day] = self.date_listing(self.date_dir(table, day))
            return listed[day]

        if contracts is None:
            names, whole = _listed_contracts(map(listing, days))
            read = set(days)
        else:
            names, whole, read = contracts, True, set()
        out: list[Path] = []
        for contract in names:
            if contract in found:
                continue
            files, walked, here = self._look_back(table, contract, days, low, listing)
            out.extend(files)
            read.update(walked)
            whole = whole and here
        for day in sorted(read):
            out.extend(f for f in listing(day)[1] if not is_packed_day_file(f))
        return list(dict.fromkeys(out)), whole

    def _look_back(
        self,
        table: str,
        contract: str,
        days: list[date],
        low: date,
        listing: Callable[[date], Listing],
    ) -> tuple[list[Path], list[date], bool]:
        """One contract's files of :meth:`asof_files`: its contract files and the compacted day
        files that hold it, from the last of ``days`` back to the first before ``low`` that
        has either; the dates so read; and whether its folder, where listed, was still there."""
        name = folder_name(contract)
        out: list[Path] = []
        walked: list[date] = []
        for day in reversed(days):
            walked.append(day)
            folders, day_files = listing(day)
            files, whole = self.contract_files(
                self.date_dir(table, day), [name] if name in folders else []
            )
            if not whole:
                return out, walked, False
            files.extend(f for f in day_files if _may_hold(f, contract))
            out.extend(files)
            if day < low and files:
                break
        return out, walked, True

    def contracts(self, table: str) -> tuple[set[str], list[Path]]:
        """The contracts of ``table`` its listing tells (contract folders, compacted day files
        :data:`PACKED` knows), and the day files whose ``contract`` column tells the others,
        each date folder from one listing (a compacted day file gone is among these: reading
        it fails, and the caller lists again)."""
        found: set[str] = set()
        unread: list[Path] = []
        for day in self.dates(table):
            folders, day_files = self.date_listing(self.date_dir(table, day))
            found.update(map(folder_contract, folders))
            for path in day_files:
                held = PACKED.of(path) if is_packed_day_file(path) else None
                if held is None:
                    unread.append(path)
                else:
                    found.update(held)
        return found, unread


def _may_hold(path: Path, contract: str) -> bool:
    """Whether ``path`` is a compacted day file that may hold rows of ``contract``."""
    return is_packed_day_file(path) and PACKED.may_hold(path, contract)


def _listed_contracts(listings: Iterable[Listing]) -> tuple[list[str], bool]:
    """The contracts of date folders' listings, sorted: their contract folders and those their
    compacted day files hold; and whether each of these files was still there."""
    found: set[str] = set()
    whole = True
    for folders, day_files in listings:
        found.update(map(folder_contract, folders))
        for path in filter(is_packed_day_file, day_files):
            held = PACKED.of(path)
            found.update(held or ())
            whole = whole and held is not None
    return sorted(found), whole
