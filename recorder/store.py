"""The Python API for backtests: typed tables, bars, as-of state and wire-exact replay.

:class:`Store` reads a data directory without the recorder running. Every request builds its
file list from the partition folders (``{table}/date=.../contract=...``) of the contracts and
dates asked for, so a one-contract one-day request opens the same files whatever else the
store holds; DuckDB then runs the views of ``schemas/views.sql`` over just those files.

Times (``start``, ``end``, ``ts``) are ``datetime`` (naive means UTC), ``date`` (midnight
UTC) or ISO 8601 text; ranges are half-open, ``[start, end)``, on ``exchange_ts``.
"""

from __future__ import annotations

import heapq
import importlib
import itertools
import os
from collections.abc import Generator, Iterable, Iterator, Sequence
from datetime import date, datetime, timedelta, tzinfo
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import duckdb
import pyarrow as pa

from recorder.catalog import derived_views
from recorder.flatten import Extra, Row, to_message
from recorder.paths import decode_contract, partition_dir
from recorder.schema import DATA_TABLES, TABLES
from recorder.storesql import (
    SNAPSHOT,
    TimeLike,
    contract_filter,
    frames,
    sql_text,
    table_query,
    time_filter,
    to_utc,
    view_sql,
)

Contracts = str | Iterable[str] | None

#: UTC offsets span -12:00..+14:00, so without the partition time zone the local date of an
#: instant is known only to lie within these bounds of its UTC date
_BEHIND, _AHEAD = timedelta(hours=12), timedelta(hours=14)
_ONE_US = timedelta(microseconds=1)
#: tables read whole whatever the request: the sessions and gaps views need all of them
_WHOLE = ("session_log", "rejections")
_REPLAY_TABLES = (*DATA_TABLES, "extras")


def _contract_list(contracts: Contracts) -> list[str] | None:
    if contracts is None:
        return None
    return [contracts] if isinstance(contracts, str) else list(dict.fromkeys(contracts))


def _visible(folder: Path) -> list[Path]:
    """The Parquet files of one partition folder that readers may see (no temporary files)."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    return [folder / n for n in sorted(names) if n.endswith(".parquet") and not n.startswith(".")]


def _day(name: str) -> date | None:
    if not name.startswith("date="):
        return None
    try:
        return date.fromisoformat(name[5:])
    except ValueError:
        return None


class Store:
    """A data directory opened for reading (the recorder may be writing to it meanwhile).

    ``partition_timezone`` is the ``storage.partition_timezone`` the data was recorded with;
    when given, a time range maps to exactly its local dates, otherwise to every date the
    range can fall on in any time zone (one more date folder at each end, still independent
    of the size of the store).
    """

    def __init__(self, data_dir: str | Path, partition_timezone: str | tzinfo | None = None):
        self.data_dir = Path(data_dir).resolve()
        if not self.data_dir.is_dir():
            raise FileNotFoundError(f"no such data directory: {self.data_dir}")
        tz = partition_timezone
        self.partition_timezone: tzinfo | None = ZoneInfo(tz) if isinstance(tz, str) else tz

    # ------------------------------------------------------------------ partitions

    def _dates(self, table: str) -> list[date]:
        try:
            names = os.listdir(self.data_dir / table)
        except FileNotFoundError:
            return []
        return sorted(d for d in map(_day, names) if d is not None)

    def _date_bounds(self, start: datetime | None, end: datetime | None) -> tuple[date, date]:
        """The first and last partition date that can hold an instant of ``[start, end)``."""
        tz = self.partition_timezone
        if start is None:
            low = date.min
        else:
            low = start.astimezone(tz).date() if tz else (start - _BEHIND).date()
        if end is None:
            high = date.max
        else:
            last = end - _ONE_US
            high = last.astimezone(tz).date() if tz else (last + _AHEAD).date()
        return low, high

    def _days(self, table: str, low: date, high: date) -> list[date]:
        """Dates of ``table`` in ``[low, high]``; a bounded range is probed, not listed."""
        if low != date.min and high != date.max:
            if high < low:
                return []
            days = (low + timedelta(days=i) for i in range((high - low).days + 1))
            root = self.data_dir / table
            return [d for d in days if (root / f"date={d.isoformat()}").is_dir()]
        return [d for d in self._dates(table) if low <= d <= high]

    def _contract_dirs(self, table: str, day: date, contracts: list[str] | None) -> list[Path]:
        if contracts is not None:
            return [self.data_dir / partition_dir(table, day.isoformat(), c) for c in contracts]
        folder = self.data_dir / table / f"date={day.isoformat()}"
        try:
            names = sorted(os.listdir(folder))
        except FileNotFoundError:
            return []
        return [folder / n for n in names if n.startswith("contract=")]

    def files(
        self,
        table: str,
        contracts: Contracts = None,
        start: TimeLike | None = None,
        end: TimeLike | None = None,
    ) -> list[Path]:
        """The files of ``table`` that a request for ``contracts`` in ``[start, end)`` reads."""
        spec = TABLES[table]
        chosen = _contract_list(contracts)
        if table in _WHOLE:
            return [f for d in self._dates(table) for f in _visible(self._date_dir(table, d))]
        low, high = self._date_bounds(
            None if start is None else to_utc(start), None if end is None else to_utc(end)
        )
        out: list[Path] = []
        for day in self._days(table, low, high):
            if spec.by_contract:
                for folder in self._contract_dirs(table, day, chosen):
                    out.extend(_visible(folder))
            else:
                out.extend(_visible(self._date_dir(table, day)))
        return out

    def _date_dir(self, table: str, day: date) -> Path:
        return self.data_dir / partition_dir(table, day.isoformat(), None)

    def _asof_files(self, table: str, contracts: list[str] | None, ts: datetime) -> list[Path]:
        """Files that can hold each contract's last row at or before ``ts``.

        Date folders before ``low`` hold only rows before ``ts``, so per contract the latest
        such folder is enough; the folders from ``low`` to ``high`` may hold rows on either side.
        """
        low, high = self._date_bounds(ts, ts + _ONE_US)
        days = [d for d in self._dates(table) if d <= high]
        names = contracts
        if names is None:
            found = {
                decode_contract(p.name[len("contract=") :])
                for d in days
                for p in self._contract_dirs(table, d, None)
            }
            names = sorted(found)
        out: list[Path] = []
        for contract in names:
            for day in reversed(days):
                files = _visible(self.data_dir / partition_dir(table, day.isoformat(), contract))
                out.extend(files)
                if day < low and files:
                    break
        return out

    def contracts(self) -> list[str]:
        """Every contract that has data in any table, sorted."""
        found: set[str] = set()
        for name in DATA_TABLES:
            for day in self._dates(name):
                for folder in self._contract_dirs(name, day, None):
                    found.add(decode_contract(folder.name[len("contract=") :]))
        return sorted(found)

    # ------------------------------------------------------------------ DuckDB

    def connect(
        self,
        contracts: Contracts = None,
        start: TimeLike | None = None,
        end: TimeLike | None = None,
    ) -> duckdb.DuckDBPyConnection:
        """DuckDB with every view of :func:`recorder.connect`, over only the files of a request.

        The data tables hold whole partitions (rows outside ``[start, end)`` included): filter
        on ``exchange_ts`` as well. ``sessions``, ``gaps`` and their tables are always whole.
        """
        files = {name: self.files(name, contracts, start, end) for name in TABLES}
        return self._connect(files)

    def _connect(self, files: dict[str, list[Path]]) -> duckdb.DuckDBPyConnection:
        con = duckdb.connect(":memory:")
        con.execute("SET TimeZone = 'UTC'")
        for name, table in TABLES.items():
            con.execute(view_sql(table, files.get(name, [])))
        for statement in derived_views():
            con.execute(statement)
        return con

    def table(
        self,
        name: str,
        contracts: Contracts = None,
        start: TimeLike | None = None,
        end: TimeLike | None = None,
    ) -> pa.Table:
        """Rows of a table or view (``top_of_book``, ``trades``, ``gaps``, ...) as Arrow.

        Data rows are those with ``exchange_ts`` in ``[start, end)`` (``received_at`` for
        tables without it), ordered by time and ``seq``; ``gaps`` and ``sessions`` keep what
        overlaps the range and, with ``contracts``, what concerns them.
        """
        chosen = _contract_list(contracts)
        con = self.connect(chosen, start, end)
        try:
            views = {row[0] for row in con.sql("SELECT view_name FROM duckdb_views()").fetchall()}
            if name not in views:
                raise KeyError(f"no table or view named {name!r}")
            columns = [d[0] for d in con.sql(f"SELECT * FROM {name} LIMIT 0").description]
            sql, params = table_query(name, columns, chosen, start, end)
            return con.sql(sql, params=params).to_arrow_table()
        finally:
            con.close()

    def polars(
        self,
        name: str,
        contracts: Contracts = None,
        start: TimeLike | None = None,
        end: TimeLike | None = None,
    ) -> Any:
        """:meth:`table` as a ``polars.DataFrame`` (needs polars installed)."""
        try:
            polars = importlib.import_module("polars")  # optional: not a dependency
        except ModuleNotFoundError as exc:
            raise ModuleNotFoundError("Store.polars needs polars: pip install polars") from exc
        return polars.from_arrow(self.table(name, contracts, start, end))

    def bars(
        self,
        interval: str | timedelta,
        contracts: Contracts = None,
        start: TimeLike | None = None,
        end: TimeLike | None = None,
        *,
        tz: str = "UTC",
    ) -> pa.Table:
        """OHLCV bars of the ``bars`` macro from the trading in ``[start, end)``.

        ``interval`` is a timedelta or DuckDB interval text (``"1 minute"``); buckets are
        aligned in ``tz``. Ordered by contract and ``bar_start``.
        """
        chosen = _contract_list(contracts)
        con = self.connect(chosen, start, end)
        try:
            since = None if start is None else to_utc(start)
            until = None if end is None else to_utc(end)
            where, params = contract_filter(chosen)
            sql = (
                "SELECT * FROM bars(?::INTERVAL, tz := ?, since := ?::TIMESTAMPTZ, "
                f"until := ?::TIMESTAMPTZ) {where} ORDER BY contract, bar_start"
            )
            return con.sql(sql, params=[interval, tz, since, until, *params]).to_arrow_table()
        finally:
            con.close()

    def asof(self, ts: TimeLike, contracts: Contracts = None) -> pa.Table:
        """The ``asof_state`` of each contract at ``ts``: its last message at or before it.

        Reads, per contract, the date folders around ``ts`` and the latest one before them,
        however long ago that was, never the whole history.
        """
        at = to_utc(ts)
        chosen = _contract_list(contracts)
        files = {name: self._asof_files(name, chosen, at) for name in DATA_TABLES}
        files.update({name: self.files(name) for name in _WHOLE})
        con = self._connect(files)
        try:
            where, params = contract_filter(chosen)
            sql = f"SELECT * FROM asof_state(?::TIMESTAMPTZ) {where} ORDER BY contract"
            return con.sql(sql, params=[at, *params]).to_arrow_table()
        finally:
            con.close()

    # ------------------------------------------------------------------ replay

    def message_count(
        self,
        contracts: Contracts = None,
        start: TimeLike | None = None,
        end: TimeLike | None = None,
    ) -> int:
        """How many messages :meth:`replay` yields for the same arguments."""
        chosen = _contract_list(contracts)
        con = self.connect(chosen, start, end)
        try:
            where, params = time_filter(start, end)
            where.append(f"source IS DISTINCT FROM {sql_text(SNAPSHOT)}")
            union = " UNION ALL ".join(
                f"SELECT seq FROM {name} WHERE {' AND '.join(where)}" for name in _REPLAY_TABLES
            )
            sql = f"SELECT count(DISTINCT seq) FROM ({union})"
            row = con.execute(sql, params * len(_REPLAY_TABLES)).fetchone()
            return int(row[0]) if row else 0
        finally:
            con.close()

    def id_keys(self) -> dict[str, str]:
        """``contractName`` for each contract recorded only through the name endpoint."""
        con = self._connect({name: self.files(name) for name in _WHOLE})
        try:
            rows = con.sql(
                "SELECT contract, bool_and(endpoint LIKE '%/contract/name') FROM "
                "(SELECT unnest(contracts) AS contract, endpoint FROM session_log) GROUP BY 1"
            ).fetchall()
        finally:
            con.close()
        return {contract: "contractName" for contract, by_name in rows if by_name}

    def replay(
        self,
        contracts: Contracts = None,
        start: TimeLike | None = None,
        end: TimeLike | None = None,
        *,
        id_key: str | None = None,
        snapshots: bool = True,
    ) -> Iterator[dict[str, Any]]:
        """The recorded messages in ``(exchange_ts, seq)`` order, each in its wire shape.

        Every message is rebuilt by :func:`recorder.flatten.to_message`: ``channel``, the
        identifier, ``timestamp`` in :func:`recorder.flatten.format_timestamp` form (UTC,
        microseconds, ``Z``), the ``data`` sections, and whatever ``extras`` kept (unknown
        keys, sections and fields). Integer columns come back as JSON integers, prices as
        floats. ``id_key`` (``contractId``, ``ContractId`` or ``contractName``) names the
        identifier; by default it is ``contractName`` for contracts recorded only through
        the name endpoint and ``contractId`` otherwise. Messages the recorder fetched as
        live-overview snapshots at each connect (``source = 'snapshot'``) are replayed as
        ordinary messages at their time; ``snapshots=False`` leaves them out (only what came
        on a stream). Rows are streamed, not loaded whole.
        """
        for _, message in self.replay_timed(
            contracts, start, end, id_key=id_key, snapshots=snapshots
        ):
            yield message

    def replay_timed(
        self,
        contracts: Contracts = None,
        start: TimeLike | None = None,
        end: TimeLike | None = None,
        *,
        id_key: str | None = None,
        snapshots: bool = True,
    ) -> Generator[tuple[int, dict[str, Any]]]:
        """:meth:`replay` with each message's ``exchange_ts`` in microseconds since the epoch."""
        chosen = _contract_list(contracts)
        keys = {} if id_key is not None else self.id_keys()
        files = {name: self.files(name, chosen, start, end) for name in TABLES}
        con = self._connect(files)
        try:
            streams = [
                frames(name, con.cursor(), start, end, snapshots)
                for name in _REPLAY_TABLES
                if files[name]
            ]
            merged = heapq.merge(*streams, key=lambda part: (part[0], part[1]))
            for (us, _), parts in itertools.groupby(merged, key=lambda p: (p[0], p[1])):
                rows: dict[str, Sequence[Row]] = {}
                extras: list[Extra] = []
                contract = ""
                for _, _, part_contract, table, table_rows in parts:
                    contract = part_contract
                    if table == "extras":
                        extras = [(r[0], r[1], r[2]) for r in table_rows]
                    else:
                        rows[table] = table_rows
                key = id_key or keys.get(contract, "contractId")
                yield us, to_message(contract, us, rows, extras, id_key=key)
        finally:
            con.close()
