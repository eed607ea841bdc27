"""What compaction reads: the files of a partition folder and the rows of a date fold.

:class:`recorder.compactor.Compactor` and :class:`recorder.datefold.DateFold` swap folders;
this module lists them (:func:`visible_files`, :func:`list_date`), plans what a date fold does
with each contract folder (:func:`plan_fold`) and reads the rows each new file holds
(:func:`read_days`, :func:`contract_rows`, :func:`read_sorted`; :func:`conform` gives a file's
rows in the table's schema, ``received_at`` included, see
:func:`recorder.packing.unpack_received`).
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from recorder.packing import unpack_received
from recorder.paths import decode_contract, file_name, seq_range
from recorder.schema import CONTRACT_COLUMN, Table

TAG = "c"  # compacted files are named {first}-{last}.c.parquet
PLACEHOLDER = "p"  # a date fold's row-less marker in a contract folder: {s}-{s}.p.parquet
CONTRACT_FOLDER = "contract="


def is_compacted(name: str) -> bool:
    return name.endswith(f".{TAG}.parquet")


def is_placeholder(name: str) -> bool:
    return name.endswith(f".{PLACEHOLDER}.parquet")


def visible_files(folder: Path) -> tuple[str, ...]:
    """The Parquet files a view reads in ``folder`` (temporary files end in ``.tmp``)."""
    try:
        return tuple(sorted(n for n in os.listdir(folder) if n.endswith(".parquet")))
    except FileNotFoundError:
        return ()


@dataclass(frozen=True)
class DateListing:
    """What a date folder of a table partitioned by contract holds: its day files, the visible
    files of each contract folder, and whether anything else is there (a foreign entry)."""

    day_files: tuple[str, ...]
    contracts: dict[str, tuple[str, ...]]  # contract folder name -> its visible files
    foreign: bool

    def paths(self) -> tuple[str, ...]:
        """Every file, relative to the date folder (day files first)."""
        inner = (f"{c}/{n}" for c, names in sorted(self.contracts.items()) for n in names)
        return (*self.day_files, *inner)


def list_date(folder: Path) -> DateListing:
    """List a date folder (see :class:`DateListing`); temporary files are not foreign."""
    day_files: list[str] = []
    contracts: dict[str, tuple[str, ...]] = {}
    foreign = False
    try:
        with os.scandir(folder) as entries:
            found = list(entries)
    except FileNotFoundError:
        found = []
    for entry in found:
        if entry.is_dir(follow_symlinks=False) and entry.name.startswith(CONTRACT_FOLDER):
            names = os.listdir(entry.path)
            contracts[entry.name] = tuple(sorted(n for n in names if n.endswith(".parquet")))
            foreign |= any(not n.endswith((".parquet", ".tmp")) for n in names)
        elif entry.name.endswith(".parquet") and entry.is_file(follow_symlinks=False):
            day_files.append(entry.name)
        elif not entry.name.endswith(".tmp"):
            foreign = True
    return DateListing(tuple(sorted(day_files)), contracts, foreign)


@dataclass(frozen=True)
class ContractPlan:
    """The plan of one contract folder in a date fold."""

    folder: str  # contract=<encoded>
    contract: str
    sources: tuple[str, ...]  # its files read into the new file (none covered, no placeholder)
    covers: tuple[tuple[int, int], ...]  # ranges of its compacted files: day rows there are in
    name: str | None  # of its new compacted file; None: ``sources`` kept as they are (linked)
    replaced: tuple[str, ...]  # its files the new folder does not keep (placeholders too)


class Unsafe(Exception):
    """A date fold met a file it must not rewrite (foreign, overlapping, unknown column)."""


def file_size(folder: Path, name: str) -> int:
    with contextlib.suppress(FileNotFoundError):
        return (folder / name).stat().st_size
    return 0


def span(name: str) -> tuple[int, int]:
    span = seq_range(name)
    if span is None:
        raise Unsafe(name)
    return span


def day_contracts(table: Table, paths: list[Path]) -> set[str]:
    """The contracts with rows in the day files ``paths``; Unsafe when a file has a column the
    schema does not know (compacting would drop it) or no ``contract`` column."""
    known = {*table.day_schema.names, *table.packed_day_schema.names}  # a day file, compacted
    found: set[str] = set()
    for path in paths:
        span(path.name)
        parquet = pq.ParquetFile(path)
        names = set(parquet.schema_arrow.names)
        if names - known or CONTRACT_COLUMN not in names:
            raise Unsafe(str(path))
        for batch in parquet.iter_batches(columns=[CONTRACT_COLUMN]):
            found.update(pc.unique(batch.column(0)).to_pylist())
    if None in found:
        raise Unsafe("a day file row without a contract")
    return found


def plan_fold(listing: DateListing, in_days: set[str], placed: bool = True) -> list[ContractPlan]:
    """What becomes of each contract folder of a date fold (Unsafe: foreign or overlapping
    files; or, ``placed``, a contract of the day files without a folder)."""
    day_spans = [span(n) for n in listing.day_files]
    if any(a[1] >= b[0] for a, b in itertools.pairwise(sorted(day_spans))):
        raise Unsafe("overlapping day files")
    plans = []
    for folder, names in sorted(listing.contracts.items()):
        contract = decode_contract(folder.removeprefix(CONTRACT_FOLDER))
        spans = {n: span(n) for n in names}
        real = [n for n in names if not is_placeholder(n)]
        covered = set(covered_files(real))
        kept = tuple(n for n in real if n not in covered)
        if any(a[1] >= b[0] for a, b in itertools.pairwise(sorted(spans[n] for n in kept))):
            raise Unsafe(folder)
        covers = tuple(spans[n] for n in kept if is_compacted(n))
        if contract not in in_days and (not kept or (len(kept) == 1 and is_compacted(kept[0]))):
            name = None  # kept as it is (or, with nothing kept, an empty folder)
        else:
            every = [spans[n] for n in real] + day_spans
            name = file_name(min(s[0] for s in every), max(s[1] for s in every), TAG)
        kept_names = () if name is not None else kept
        replaced = tuple(n for n in names if n not in kept_names)
        plans.append(ContractPlan(folder, contract, kept, covers, name, replaced))
    if placed and in_days - {p.contract for p in plans}:  # each got a placeholder
        raise Unsafe(f"contracts without a folder: {sorted(in_days)[:3]}")
    return plans


def read_days(table: Table, paths: list[Path], contracts: list[str]) -> pa.Table:
    """The rows of ``contracts`` in the day files ``paths``, in the day files' schema (file
    columns, then ``contract``), in file order; row-group statistics skip other contracts."""
    wanted = pc.field(CONTRACT_COLUMN).isin(contracts)
    parts = []
    for path in paths:
        part = conform(table.day_schema, pq.read_table(path, filters=wanted))
        if part is None:
            raise Unsafe(str(path))
        parts.append(part)
    return pa.concat_tables(parts) if parts else table.day_schema.empty_table()


def contract_rows(
    table: Table, folder: Path, plan: ContractPlan, days: pa.Table
) -> tuple[pa.Table, int]:
    """A contract's rows for its new file, sorted: its files' and its rows of the day files
    (but those in the range of one of its compacted files, which holds them already); and how
    many rows the day files added."""
    mine = days.filter(pc.equal(days.column(CONTRACT_COLUMN), plan.contract))
    for first, last in plan.covers:
        seq = mine.column("seq")
        inside = pc.and_(pc.greater_equal(seq, first), pc.less_equal(seq, last))
        mine = mine.filter(pc.invert(inside))
    parts = []
    for name in plan.sources:
        part = conform(table.arrow_schema, pq.ParquetFile(folder / name).read())
        if part is None:
            raise Unsafe(str(folder / name))
        parts.append(part)
    parts.append(mine.select(table.arrow_schema.names))
    merged = pa.concat_tables(parts).combine_chunks()
    # a stable sort: the rows of one frame (one seq) keep their order
    return merged.sort_by([(k, "ascending") for k in sort_keys(table)]), mine.num_rows


def sort_keys(table: Table) -> list[str]:
    """The order of a compacted file: (exchange_ts, seq), or seq where there is no exchange_ts."""
    names = [c.name for c in table.file_columns]
    return ["exchange_ts", "seq"] if "exchange_ts" in names else ["seq"]


def covered_files(names: Iterable[str]) -> list[str]:
    """Files whose seq range lies inside that of another, compacted, file of the same folder
    (its source: every later flush holds higher seqs, and recovery never writes lower ones)."""
    spans = {n: seq_range(n) for n in names}
    compacted = {n: s for n, s in spans.items() if s is not None and is_compacted(n)}
    return [
        n
        for n, s in spans.items()
        if s is not None
        and any(m != n and c[0] <= s[0] and s[1] <= c[1] for m, c in compacted.items())
    ]


def conform(schema: pa.Schema, part: pa.Table) -> pa.Table | None:
    """``part`` in ``schema``: a missing column becomes nulls, a column of another type is cast;
    None when it has a column ``schema`` does not know (compacting would drop it). A contract
    file's ``received_at`` is given back (:func:`recorder.packing.unpack_received`)."""
    part = unpack_received(part)
    if set(part.column_names) - set(schema.names):
        return None
    columns = [
        part.column(f.name).cast(f.type)
        if f.name in part.column_names
        else pa.nulls(part.num_rows, f.type)
        for f in schema
    ]
    return pa.Table.from_arrays(columns, schema=schema)


def read_sorted(paths: list[Path], schema: pa.Schema, keys: list[str]) -> pa.Table | None:
    """Every row of ``paths`` in ``schema``, sorted by ``keys``; None when a file has a
    column ``schema`` does not know (rewriting it would drop that column)."""
    parts = []
    for path in paths:
        part = conform(schema, pq.ParquetFile(path).read())
        if part is None:
            return None
        parts.append(part)
    merged = pa.concat_tables(parts).combine_chunks()
    # a stable sort: the rows of one frame (one seq) keep their order
    return merged.sort_by([(k, "ascending") for k in keys])
