"""The Python API for backtests: typed tables, bars, as-of state and wire-exact replay.

:class:`Store` reads a data directory without the recorder running. Every request builds its
file list from the date folders of the dates asked for (see :mod:`recorder.paths`): the
contract files of the contracts asked for (``{table}/date=.../contract=...``) and the day
files of those dates, whose rows are read under a filter on ``contract`` (their row-group
statistics let DuckDB skip the other contracts' rows). So a one-contract one-day request
opens that date's files only, whatever else the store holds, and gives the same rows
whichever kind of file holds them; DuckDB then runs the views of ``schemas/views.sql`` over
just those files. The files are listed again for every request (a file the recorder writes
meanwhile is read by the next one); the DuckDB database and its views are made once per
Store (see :class:`~recorder.storesql.Database`), and a Store may serve requests from
several threads.

Times (``start``, ``end``, ``ts``) are ``datetime`` (naive means UTC), ``date`` (midnight
UTC) or ISO 8601 text; ranges are half-open, ``[start, end)``, on ``exchange_ts``.
"""

from __future__ import annotations

import heapq
import importlib
import itertools
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from datetime import datetime, timedelta, tzinfo
from functools import partial
from operator import itemgetter
from pathlib import Path
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from recorder.catalog import SCHEMAS
from recorder.flatten import Extra, Row, to_message
from recorder.paths import is_packed_day_file
from recorder.schema import DATA_TABLES, SOURCE_SNAPSHOT, TABLES
from recorder.storefiles import (
    ONE_US,
    PACKED,
    WHOLE,
    Contracts,
    StoreFiles,
    contract_list,
)
from recorder.storesql import (
    Database,
    Files,
    Part,
    TimeLike,
    contract_filter,
    day_filter,
    fork,
    frames,
    lacking,
    recoverable,
    sql_text,
    table_query,
    time_filter,
    to_utc,
)

_REPLAY_TABLES = (*DATA_TABLES, "extras")
#: as-of: the look-backs tried first, each for the contracts the previous one did not find
#: (a busy contract is found in the last minute; the rows of the rest are left unread)
_ASOF_LOOKBACKS = (timedelta(minutes=1), timedelta(hours=1))
#: a part's message: (exchange_ts in us, seq)
_MESSAGE = itemgetter(0, 1)

T = TypeVar("T")


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
        self._files = StoreFiles(self.data_dir, self.partition_timezone)
        self._database = Database()

    def close(self) -> None:
        """Close the Store's DuckDB database (and every connection :meth:`connect` gave).

        A later request opens it again.
        """
        self._database.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------------ partitions

    def files(
        self,
        table: str,
        contracts: Contracts = None,
        start: TimeLike | None = None,
        end: TimeLike | None = None,
        *,
        skip: Iterable[str] = (),
    ) -> list[Path]:
        """The files of ``table`` that a request for ``contracts`` in ``[start, end)`` reads:
        per date, the contract files of ``contracts`` (all: None) but not of those in
        ``skip``, then the day files (which hold every contract of their date)."""
        return self._files.files(table, contract_list(contracts), start, end, skip)

    def _request(
        self,
        tables: Iterable[str],
        contracts: Contracts = None,
        start: TimeLike | None = None,
        end: TimeLike | None = None,
    ) -> Files:
        return {name: self.files(name, contracts, start, end) for name in tables}

    def contracts(self) -> list[str]:
        """Every contract that has data in any table, sorted.

        Per date folder, from one listing: the names of its contract folders, the contracts
        of its compacted day files (each read once per process, see
        :class:`~recorder.storefiles.PackedContracts`) and those of its other day files (read
        now). A listing shows the folder before a swap or after it, never half of each.
        """
        known: set[str] = set()

        def request() -> Files:
            known.clear()
            files: Files = {}
            for name in DATA_TABLES:
                found, files[name] = self._files.contracts(name)
                known.update(found)
            return files

        listed = request()
        if any(listed.values()):
            union = " UNION ".join(f"SELECT DISTINCT contract FROM {n}" for n in DATA_TABLES)
            rows = self._query(request, lambda con: con.sql(union).fetchall(), listed)
            known.update(row[0] for row in rows)
        return sorted(known)

    # ------------------------------------------------------------------ DuckDB

    def connect(
        self,
        contracts: Contracts = None,
        start: TimeLike | None = None,
        end: TimeLike | None = None,
    ) -> duckdb.DuckDBPyConnection:
        """DuckDB with every view of :func:`recorder.connect`, over only the files of a request.

        The data tables hold every row of ``contracts`` on the dates the range can fall on
        (rows outside ``[start, end)`` included): filter on ``exchange_ts`` as well.
        ``sessions``, ``gaps`` and their tables are always whole.
        The connection is a cursor of the Store's database and its table views are its own
        (temporary): close it when done; a ``cursor()`` of it does not see them.
        """
        chosen = contract_list(contracts)
        files = self._request(TABLES, chosen, start, end)
        probe = self._database.cursor({})  # its footer cache is the database's
        try:  # which files lack a column is known before: the caller's SQL cannot be retried
            for name, listed in files.items():
                SCHEMAS.check(TABLES[name], listed, probe)
        finally:
            probe.close()
        return self._connect(files, day_filter(chosen))

    def _connect(
        self, files: Files, rows: str = "", packed_rows: str | None = None
    ) -> duckdb.DuckDBPyConnection:
        """A connection whose table views read exactly ``files``, the rows of day files that
        meet ``rows`` (see :class:`Database` and :func:`~recorder.storesql.day_filter`)."""
        return self._database.cursor(files, rows, packed_rows)

    def _query(
        self,
        request: Callable[[], Files],
        work: Callable[[Any], T],
        files: Files | None = None,
        rows: str = "",
        packed_rows: Callable[[Files], str | None] | None = None,
    ) -> T:
        """``work`` on a connection over the files ``request`` lists (or ``files``, listed),
        the rows of day files that meet ``rows`` (of compacted day files: ``packed_rows``
        of the files, when given).

        Tried again (at most twice) when it failed because a file lacked a column (it is
        then read with ``union_by_name``, see :class:`recorder.catalog.FileSchemas`) or was
        removed by a compaction after it was listed (the files are listed again).
        """
        for attempt in range(3):
            files = request() if files is None else files
            known = lacking(files)
            try:
                packed = None if packed_rows is None else packed_rows(files)
                con = self._connect(files, rows, packed)
                try:
                    return work(con)
                finally:
                    con.close()
            except duckdb.Error:
                if attempt == 2 or not recoverable(files, known):
                    raise
            files = None
            self._files.forget()
        raise AssertionError("unreachable")

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
        chosen = contract_list(contracts)

        def work(con: duckdb.DuckDBPyConnection) -> pa.Table:
            views = {row[0] for row in con.sql("SELECT view_name FROM duckdb_views()").fetchall()}
            if name not in views:
                raise KeyError(f"no table or view named {name!r}")
            columns = [d[0] for d in con.sql(f"SELECT * FROM {name} LIMIT 0").description]
            sql, params = table_query(name, columns, chosen, start, end)
            return con.sql(sql, params=params).to_arrow_table()

        return self._query(
            lambda: self._request(TABLES, chosen, start, end), work, rows=day_filter(chosen)
        )

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
        chosen = contract_list(contracts)
        since = None if start is None else to_utc(start)
        until = None if end is None else to_utc(end)
        where, params = contract_filter(chosen)
        sql = (
            "SELECT * FROM bars(?::INTERVAL, tz := ?, since := ?::TIMESTAMPTZ, "
            f"until := ?::TIMESTAMPTZ) {where} ORDER BY contract, bar_start"
        )
        return self._query(
            lambda: self._request(["aggregate"], chosen, start, end),
            lambda con: con.sql(sql, params=[interval, tz, since, until, *params]).to_arrow_table(),
            rows=day_filter(chosen),
        )

    def asof(self, ts: TimeLike, contracts: Contracts = None) -> pa.Table:
        """The ``asof_state`` of each contract at ``ts``: its last message at or before it.

        Looks back a minute, then an hour, for the contracts not found yet, then reads, per
        contract still not found, the date folders around ``ts`` and the latest one before
        them, however long ago that was, never the whole history. Within a look-back the
        last message of a contract found is its last one at all, so the answer is exact.
        """
        at = to_utc(ts)
        chosen = contract_list(contracts)
        parts: list[pa.Table] = []
        found: set[str] = set()
        with self._files.listed_once():  # the later steps pick from the first's listing
            for lookback in (*_ASOF_LOOKBACKS, None):
                if chosen is not None and found.issuperset(chosen):
                    break
                part = self._asof_step(at, chosen, found, lookback)
                if part is None:
                    continue
                if found:  # a layout that cannot leave a contract's files out returns it again
                    kept = pc.invert(pc.is_in(part["contract"], pa.array(sorted(found))))
                    part = part.filter(kept)
                parts.append(part)
                found.update(part["contract"].to_pylist())
        if len(parts) == 1:
            return parts[0]
        if parts:
            return pa.concat_tables(parts).sort_by("contract")
        sql = "SELECT * FROM asof_state(?::TIMESTAMPTZ)"
        return self._query(dict, lambda con: con.sql(sql, params=[at]).to_arrow_table())

    def _asof_step(
        self, at: datetime, chosen: list[str] | None, found: set[str], lookback: timedelta | None
    ) -> pa.Table | None:
        """``asof_state`` of the contracts not ``found``; None when no file can hold one."""
        wanted = None if chosen is None else [c for c in chosen if c not in found]

        def request() -> Files:
            if lookback is None:
                return {n: self._files.asof_files(n, wanted, at, found) for n in DATA_TABLES}
            start, end = at - lookback, at + ONE_US
            return {n: self.files(n, wanted, start, end, skip=found) for n in DATA_TABLES}

        files = request()
        if not any(files.values()):
            return None
        where, params = contract_filter(wanted)
        sql = (
            "SELECT * FROM asof_state(?::TIMESTAMPTZ, lookback := ?::INTERVAL) "
            f"{where} ORDER BY contract"
        )
        params = [at, lookback, *params]
        rows = day_filter(wanted, found if wanted is None else ())
        return self._query(
            request,
            lambda con: con.sql(sql, params=params).to_arrow_table(),
            files,
            rows,
            None if wanted is not None or not found else partial(_packed_rows, found=found),
        )

    # ------------------------------------------------------------------ replay

    def message_count(
        self,
        contracts: Contracts = None,
        start: TimeLike | None = None,
        end: TimeLike | None = None,
    ) -> int:
        """How many messages :meth:`replay` yields for the same arguments."""
        chosen = contract_list(contracts)
        where, params = time_filter(start, end)
        where.append(f"source IS DISTINCT FROM {sql_text(SOURCE_SNAPSHOT)}")
        union = " UNION ALL ".join(
            f"SELECT seq FROM {name} WHERE {' AND '.join(where)}" for name in _REPLAY_TABLES
        )
        sql = f"SELECT count(DISTINCT seq) FROM ({union})"

        def work(con: duckdb.DuckDBPyConnection) -> int:
            row = con.execute(sql, params * len(_REPLAY_TABLES)).fetchone()
            return int(row[0]) if row else 0

        return self._query(
            lambda: self._request(_REPLAY_TABLES, chosen, start, end),
            work,
            rows=day_filter(chosen),
        )

    def id_keys(self) -> dict[str, str]:
        """``contractName`` for each contract recorded only through the name endpoint."""
        sql = (
            "SELECT contract, bool_and(endpoint LIKE '%/contract/name') FROM "
            "(SELECT unnest(contracts) AS contract, endpoint FROM session_log) GROUP BY 1"
        )
        rows = self._query(lambda: self._request(WHOLE), lambda con: con.sql(sql).fetchall())
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
        chosen = contract_list(contracts)
        keys = {} if id_key is not None else self.id_keys()
        opened, streams = self._frames(chosen, start, end, snapshots)
        try:
            merged = heapq.merge(*streams, key=_MESSAGE)
            for (us, _), parts in itertools.groupby(merged, key=_MESSAGE):
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
            for con in reversed(opened):
                con.close()

    def _frames(
        self,
        chosen: list[str] | None,
        start: TimeLike | None,
        end: TimeLike | None,
        snapshots: bool,
    ) -> tuple[list[duckdb.DuckDBPyConnection], list[Iterator[Part]]]:
        """Each replayed table's :func:`~recorder.storesql.frames`, started, and the
        connections they read from (to close).

        Starting a table's frames runs its query to its first row; its ``ORDER BY`` reads
        every file first, so a query that fails for a file (see :meth:`_query`) fails here,
        before any message is yielded, and is tried again.
        """
        for attempt in range(3):
            files = self._request(_REPLAY_TABLES, chosen, start, end)
            known = lacking(files)
            opened: list[duckdb.DuckDBPyConnection] = []
            try:
                opened.append(self._connect(files, day_filter(chosen)))
                streams: list[Iterator[Part]] = []
                for name in _REPLAY_TABLES:
                    if not files[name]:
                        continue
                    opened.append(fork(opened[0], name))
                    stream = frames(name, opened[-1], start, end, snapshots)
                    first = next(stream, None)
                    if first is not None:
                        streams.append(itertools.chain([first], stream))
                return opened, streams
            except duckdb.Error:
                for con in reversed(opened):
                    con.close()
                if attempt == 2 or not recoverable(files, known):
                    raise
        raise AssertionError("unreachable")


def _packed_rows(files: Files, found: set[str]) -> str | None:
    """The rows an as-of step reads from the compacted day files of ``files``: those of the
    contracts they hold but ``found``, named, so that their ``contract`` statistics skip the
    rest (``NOT IN found`` would read every row group of the look-back). None when one of
    them is gone (reading it fails, and the request lists the files again)."""
    held: set[str] = set()
    for path in itertools.chain.from_iterable(files.values()):
        if is_packed_day_file(path):
            contracts = PACKED.of(path)
            if contracts is None:
                return None
            held |= contracts
    return day_filter(sorted(held - found))
