"""Which files of a data directory a :class:`~recorder.store.Store` request reads.

Per date folder of the dates a time range can fall on (see :mod:`recorder.paths`): the
contract files of the contracts asked for, then the date's day files (whose rows a request
reads under a filter on ``contract``). A date folder is listed before its contract folders,
and every request lists again, so a file written meanwhile is read by the next request.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
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


def _visible(folder: Path) -> list[Path]:
    """The Parquet files of one partition folder that readers may see (no temporary files)."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    return [folder / n for n in sorted(names) if _is_parquet(n)]


def date_listing(folder: Path) -> tuple[set[str], list[Path]]:
    """One date folder of a table partitioned by contract: the names of its contract folders
    and its day files (no temporary files), from one listing."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return set(), []
    folders = {n for n in names if n.startswith(CONTRACT_PREFIX)}
    return folders, [folder / n for n in sorted(names) if _is_parquet(n)]


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


def without(files: list[Path], contracts: set[str]) -> list[Path]:
    """``files`` minus those in a partition folder of one of ``contracts`` (day files stay:
    their rows are left out by :func:`~recorder.storesql.day_filter`)."""
    if not contracts:
        return files
    folders = {folder_name(c) for c in contracts}
    return [f for f in files if f.parent.name not in folders]


class StoreFiles:
    """Which files of a data directory a request reads (see the module docstring)."""

    def __init__(self, data_dir: Path, partition_timezone: tzinfo | None) -> None:
        self.data_dir = data_dir
        self.partition_timezone = partition_timezone

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
        self, table: str, chosen: list[str] | None, start: TimeLike | None, end: TimeLike | None
    ) -> list[Path]:
        """:meth:`recorder.store.Store.files`, for the contracts ``chosen`` (all: None)."""
        spec = TABLES[table]
        if table in WHOLE:
            return [f for d in self.dates(table) for f in _visible(self.date_dir(table, d))]
        low, high = self.date_bounds(
            None if start is None else to_utc(start), None if end is None else to_utc(end)
        )
        out: list[Path] = []
        for day in self.days(table, low, high):
            folder = self.date_dir(table, day)
            if not spec.by_contract:
                out.extend(_visible(folder))
                continue
            # the date folder is listed before its contract folders: a compaction folding
            # day files into contract files in between leaves listed day files gone (the
            # request lists again), not rows unread
            folders, day_files = date_listing(folder)
            if chosen is None:
                names = sorted(folders)
            else:
                names = [n for n in map(folder_name, chosen) if n in folders]
            for name in names:
                out.extend(_visible(folder / name))
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
                listed[day] = date_listing(self.date_dir(table, day))
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
                files = _visible(self.date_dir(table, day) / name) if name in folders else []
                out.extend(files)
                if day < low and files:
                    break
        for day in sorted(read):
            out.extend(listing(day)[1])
        return out
