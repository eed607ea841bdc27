"""Which files of a data directory a :class:`~recorder.store.Store` request reads.

Per date folder of the dates a time range can fall on (see :mod:`recorder.paths`): the
contract files of the contracts asked for, then the date's day files (whose rows a request
reads under a filter on ``contract``). A date folder is listed before its contract folders,
and every request lists again, so a file written meanwhile is read by the next request (the
steps of one request share a listing: :meth:`StoreFiles.listed_once`).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import date, datetime, timedelta, tzinfo
from pathlib import Path

from recorder.paths import decode_contract, encode_contract, partition_dir
from recorder.schema import TABLES
from recorder.storesql import TimeLike, to_utc

Contracts = str | Iterable[str] | None

#: UTC offsets span -12:00..+14:00, so without the partition time zone the local date of an
#: instant is known only to lie within these bounds of its UTC date
_BEHIND, _AHEAD = timedelta(hours=12), timedelta(hours=14)
ONE_US = timedelta(microseconds=1)
CONTRACT_PREFIX = "contract="
#: tables read whole whatever the request: the sessions and gaps views need all of them
WHOLE = ("session_log", "rejections")


def contract_list(contracts: Contracts) -> list[str] | None:
    if contracts is None:
        return None
    return [contracts] if isinstance(contracts, str) else list(dict.fromkeys(contracts))


def _is_parquet(name: str) -> bool:
    return name.endswith(".parquet") and not name.startswith(".")


def folder_name(contract: str) -> str:
    return CONTRACT_PREFIX + encode_contract(contract)


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

    def _names(self, folder: Path) -> list[str]:
        """The sorted names in ``folder`` (none if it does not exist)."""
        memo: dict[Path, list[str]] | None = getattr(self._memo, "folders", None)
        if memo is not None and folder in memo:
            return memo[folder]
        try:
            names = sorted(os.listdir(folder))
        except FileNotFoundError:
            names = []
        if memo is not None:
            memo[folder] = names
        return names

    def visible(self, folder: Path) -> list[Path]:
        """The Parquet files of one partition folder that readers may see (no temporary
        files)."""
        return [folder / n for n in self._names(folder) if _is_parquet(n)]

    def date_listing(self, folder: Path) -> tuple[set[str], list[Path]]:
        """One date folder of a table partitioned by contract: the names of its contract
        folders and its day files (no temporary files), from one listing."""
        names = self._names(folder)
        folders = {n for n in names if n.startswith(CONTRACT_PREFIX)}
        return folders, [folder / n for n in names if _is_parquet(n)]

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
            # the date folder is listed before its contract folders: a compaction folding
            # day files into contract files in between leaves listed day files gone (the
            # request lists again), not rows unread
            folders, day_files = self.date_listing(folder)
            if chosen is None:
                names = sorted(folders.difference(map(folder_name, skip)))
            else:
                skipped = set(skip)
                names = [folder_name(c) for c in chosen if c not in skipped]
                names = [n for n in names if n in folders]
            for name in names:
                out.extend(self.visible(folder / name))
            out.extend(day_files)
        return out

    def date_dir(self, table: str, day: date) -> Path:
        return self.data_dir / partition_dir(table, day.isoformat(), None)

    def asof_files(
        self, table: str, contracts: list[str] | None, ts: datetime, found: set[str]
    ) -> list[Path]:
        """Files that can hold the last row at or before ``ts`` of each contract not ``found``.

        Date folders before ``low`` hold only rows before ``ts``, so per contract the latest
        such folder where it has contract files is enough; the folders from ``low`` to
        ``high`` may hold rows on either side. The day files of every date so read are read
        too (a contract's later rows may be there), and, for every contract (``contracts``
        None), those of every date up to ``high``: a contract may have only day files, which
        are not compacted yet (a date is compacted once it has closed, so these are few).
        """
        low, high = self.date_bounds(ts, ts + ONE_US)
        days = [d for d in self.dates(table) if d <= high]
        listed: dict[date, tuple[set[str], list[Path]]] = {}

        def listing(day: date) -> tuple[set[str], list[Path]]:
            if day not in listed:
                listed[day] = self.date_listing(self.date_dir(table, day))
            return listed[day]

        if contracts is None:
            names = sorted(
                {decode_contract(n[len(CONTRACT_PREFIX) :]) for d in days for n in listing(d)[0]}
            )
            read = set(days)
        else:
            names, read = contracts, set()
        out: list[Path] = []
        for contract in names:
            if contract in found:
                continue
            name = folder_name(contract)
            for day in reversed(days):
                read.add(day)
                folders = listing(day)[0]
                files = self.visible(self.date_dir(table, day) / name) if name in folders else []
                out.extend(files)
                if day < low and files:
                    break
        for day in sorted(read):
            out.extend(listing(day)[1])
        return out
