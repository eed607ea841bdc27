"""The ``ime-recorder`` command line: run, demo, simulate, query."""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import Any

import click
import duckdb
import orjson

from recorder import logs
from recorder.errors import AllRefusedError, AuthError, ConfigError

_HELP_CONFIG = "TOML config file; every key can be overridden by IME_RECORDER_<SECTION>__<KEY>."


def _fail(message: str, code: int = 2) -> None:
    click.echo(f"ime-recorder: {logs.scrub(message)}", err=True)
    sys.exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ime-recorder")
def main() -> None:
    """Record the HedgeTech IME live feed into Parquet and query it with DuckDB."""


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help=_HELP_CONFIG)
def run(config_path: str | None) -> None:
    """Record until SIGTERM or SIGINT (credentials from HEDGETECH_* environment variables)."""
    from recorder.lean import keep_pandas_out

    keep_pandas_out()  # before the daemon's imports (recorder.lean)
    from recorder.config import load_config, load_credentials
    from recorder.daemon import EXIT_CONFIG
    from recorder.daemon import run as run_daemon

    try:
        config = load_config(config_path)
        credentials = load_credentials()
    except ConfigError as exc:
        _fail(str(exc))
        return
    logs.register_secrets(credentials.secrets())
    logs.configure(config.log.level, config.log.format)
    try:
        run_daemon(config, credentials)
    except (AuthError, AllRefusedError, ConfigError) as exc:
        _fail(str(exc), code=EXIT_CONFIG)


@main.command()
@click.option("--data-dir", default="data", show_default=True, type=click.Path(file_okay=False))
@click.option("--contracts", default=20, show_default=True, help="Simulated contracts.")
@click.option("--rate", default=200.0, show_default=True, help="Simulated messages per second.")
@click.option("--flush-interval", default=2.0, show_default=True, help="Seconds between flushes.")
@click.option("--seconds", type=float, default=None, help="Stop by itself after this long.")
def demo(
    data_dir: str, contracts: int, rate: float, flush_interval: float, seconds: float | None
) -> None:
    """Start the built-in simulator and record from it, with a live progress line."""
    from recorder.lean import keep_pandas_out

    keep_pandas_out()  # before the daemon's imports (recorder.lean)
    from recorder.demo import run_demo

    logs.configure("warning", "console")
    sys.exit(run_demo(Path(data_dir), contracts, rate, flush_interval, seconds))


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8765, show_default=True, type=int)
@click.option("--contracts", default=10, show_default=True, type=int)
@click.option("--rate", default=50.0, show_default=True, help="Messages/s per connection (0: max).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--username", default="demo", show_default=True)
@click.option("--password", default="demo", show_default=True)
@click.option("--fast", is_flag=True, help="Pre-encoded frames as fast as the client reads.")
@click.option("--max-messages", type=int, default=None, help="Per connection, then stay idle.")
@click.option(
    "--refuse-with", type=click.Choice(["403", "1008"]), default="1008", show_default=True
)
@click.option("--id-key", type=click.Choice(["contractId", "ContractId"]), default="contractId")
@click.option("--timestamp-style", type=click.Choice(["z", "offset", "naive"]), default="z")
@click.option("--partial-levels", type=float, default=0.0, help="Share of partial BestLimit.")
@click.option("--missing-sections", type=float, default=0.0, help="Share with a section missing.")
@click.option("--float-ints", is_flag=True, help="Send integers as integral floats.")
@click.option("--variant-mix", is_flag=True, help="Mix every variant above per message.")
@click.option("--malformed", type=float, default=0.0, help="Share of malformed frames.")
@click.option("--unknown-sections", type=float, default=0.0, help="Share with unknown sections.")
@click.option("--odd-names", is_flag=True, help="Add contracts with /, .., =, %, spaces, Persian.")
def simulate(**options: Any) -> None:
    """Serve a faithful simulator of the IME feed (token endpoint and both streams)."""
    from recorder.simrunner import run_simulator
    from recorder.simulator import SimulatorOptions

    logs.configure("info", "auto")
    run_simulator(SimulatorOptions(**options))


@main.command()
@click.option("--data-dir", default="data", show_default=True, type=click.Path(file_okay=False))
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table")
@click.argument("sql")
def query(data_dir: str, fmt: str, sql: str) -> None:
    """Run SQL against the views (best_limit, aggregate, allowed_price_range, ...)."""
    from recorder.catalog import connect

    if not Path(data_dir).is_dir():
        _fail(f"--data-dir: no such directory: {data_dir}")
    con = connect(data_dir)
    try:
        result = con.execute(sql)
        columns = [d[0] for d in result.description or []]
        rows = result.fetchall()
    except duckdb.Error as exc:
        _fail(f"query failed: {exc}", code=1)
        return
    write_result(columns, rows, fmt)


def write_result(columns: list[str], rows: list[tuple[Any, ...]], fmt: str) -> None:
    """Print a query result as a table, CSV or JSON lines."""
    if fmt == "csv":
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows(rows)
    elif fmt == "json":
        for row in rows:
            sys.stdout.write(
                orjson.dumps(dict(zip(columns, row, strict=True)), default=str).decode() + "\n"
            )
    else:
        from rich.console import Console
        from rich.table import Table

        cells = [["NULL" if v is None else str(v) for v in row] for row in rows]
        table = Table(show_lines=False)
        for column in columns:
            table.add_column(column, no_wrap=True)
        for row_cells in cells:
            table.add_row(*row_cells)
        widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
        Console(width=sum(widths) + 3 * len(widths) + 1).print(table)
        click.echo(f"({len(rows)} rows)")


@main.command()
@click.option("--data-dir", default="data", show_default=True, type=click.Path(file_okay=False))
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table")
def status(data_dir: str, fmt: str) -> None:
    """Per contract and in total: frames, rows per table, quarantined, last message, open gaps."""
    from recorder.accounting import status as read_status

    if not Path(data_dir).is_dir():
        _fail(f"--data-dir: no such directory: {data_dir}")
    counts = read_status(Path(data_dir))
    columns = list(counts.contracts[0]) if counts.contracts else ["contract"]
    write_result(columns, [tuple(c.values()) for c in counts.contracts], fmt)
    balance = "holds" if counts.balanced else "DOES NOT HOLD"
    if counts.open_sessions:
        balance = f"not final: {counts.open_sessions} session(s) still open"
    click.echo(
        f"frames received {counts.received:,} = stored {counts.stored:,}"
        f" + quarantined {counts.quarantined:,}: {balance}; open gaps {counts.open_gaps}",
        err=fmt != "table",
    )


@main.command()
@click.option("--data-dir", default="data", show_default=True, type=click.Path(file_okay=False))
def verify(data_dir: str) -> None:
    """Check the data directory: readable files, no duplicates, journal frames all stored."""
    from recorder.accounting import verify as run_verify

    if not Path(data_dir).is_dir():
        _fail(f"--data-dir: no such directory: {data_dir}")
    result = run_verify(Path(data_dir))
    for problem in result.problems:
        click.echo(f"PROBLEM: {problem}")
    click.echo(
        f"{result.files} files, {result.journal_frames} journaled frames checked: "
        + ("OK" if result.ok else f"{len(result.problems)} problem(s)")
    )
    sys.exit(0 if result.ok else 1)


@main.command()
@click.option("--data-dir", default="data", show_default=True, type=click.Path(file_okay=False))
@click.option("--start", default=None, help="First instant replayed (ISO 8601; naive is UTC).")
@click.option("--end", default=None, help="Replay up to this instant, excluded (ISO 8601).")
@click.option("--speed", type=float, default=None, help="Recorded pace times this [default: 1].")
@click.option("--as-fast-as-possible", "flat_out", is_flag=True, help="As fast as clients read.")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8765, show_default=True, type=int)
@click.option("--username", default=None, help="Issue tokens only to this user (and --password).")
@click.option("--password", default=None, help="The only password accepted (with --username).")
@click.option("--header-scheme", type=click.Choice(["any", "raw", "bearer"]), default="any")
@click.option(
    "--refuse-with", type=click.Choice(["403", "1008"]), default="1008", show_default=True
)
@click.option("--partition-timezone", default=None, help="The store's storage.partition_timezone.")
@click.option("--no-snapshots", is_flag=True, help="Leave out the snapshots taken at each connect.")
def replay(
    data_dir: str,
    start: str | None,
    end: str | None,
    speed: float | None,
    flat_out: bool,
    host: str,
    port: int,
    username: str | None,
    password: str | None,
    header_scheme: str,
    refuse_with: str,
    partition_timezone: str | None,
    no_snapshots: bool,
) -> None:
    """Serve recorded history over the live feed's protocol (token endpoint and both streams)."""
    from recorder.replay import ReplayOptions, run_replay
    from recorder.storesql import to_utc

    if not Path(data_dir).is_dir():
        _fail(f"--data-dir: no such directory: {data_dir}")
    if flat_out and speed is not None:
        _fail("--speed and --as-fast-as-possible exclude each other")
    try:
        options = ReplayOptions(
            data_dir=Path(data_dir),
            start=None if start is None else to_utc(start),
            end=None if end is None else to_utc(end),
            speed=None if flat_out else (1.0 if speed is None else speed),
            host=host,
            port=port,
            username=username,
            password=password,
            header_scheme=header_scheme,  # type: ignore[arg-type]
            refuse_with=refuse_with,  # type: ignore[arg-type]
            partition_timezone=partition_timezone,
            snapshots=not no_snapshots,
        )
    except ValueError as exc:
        _fail(str(exc))
        return
    logs.configure("info", "auto")
    run_replay(options)


# --------------------------------------------------------------------------- compaction, export

_TIMEZONE_HELP = "storage.partition_timezone of the recording (which dates have closed)."


def _zone(name: str) -> Any:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        _fail(f"--timezone: unknown time zone {name!r}")


def _existing_dir(data_dir: str) -> Path:
    if not Path(data_dir).is_dir():
        _fail(f"--data-dir: no such directory: {data_dir}")
    return Path(data_dir)


@main.command()
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    help="The recording's TOML config: its storage.data_dir, storage.partition_timezone and "
    "compaction.layout are the defaults of the options below.",
)
@click.option(
    "--data-dir",
    default=None,
    type=click.Path(file_okay=False),
    help="The recording's data directory. [default: data]",
)
@click.option(
    "--date", "dates", multiple=True, help="Only this date, YYYY-MM-DD (repeatable); any date."
)
@click.option("--timezone", default=None, help=_TIMEZONE_HELP + " [default: Asia/Tehran]")
@click.option(
    "--layout",
    type=click.Choice(["contract", "date"]),
    default=None,
    help="compaction.layout of the recording: one file per contract, or per table and date. "
    "[default: contract]",
)
@click.option(
    "--convert",
    is_flag=True,
    help="Also rewrite the dates already compacted in the other layout.",
)
def compact(
    config_path: str | None,
    data_dir: str | None,
    dates: tuple[str, ...],
    timezone: str | None,
    layout: str | None,
    convert: bool,
) -> None:
    """Rewrite each partition of every closed date as one sorted file (safe while recording)."""
    from datetime import date

    from recorder.compaction import compact as run_compaction
    from recorder.compactor import Compactor
    from recorder.config import load_config

    if config_path is not None:
        try:
            config = load_config(config_path)
        except ConfigError as exc:
            _fail(str(exc))
            return
        data_dir = data_dir or config.storage.data_dir
        timezone = timezone or config.storage.partition_timezone
        layout = layout or config.compaction.layout
    root, zone = _existing_dir(data_dir or "data"), _zone(timezone or "Asia/Tehran")
    try:
        days = [date.fromisoformat(d) for d in dates] or None
    except ValueError as exc:
        _fail(f"--date: {exc}")
        return
    logs.configure("info", "auto")
    compactor = Compactor(root, layout="date" if layout == "date" else "contract", convert=convert)
    result = run_compaction(root, zone, days=days, compactor=compactor)
    for problem in result.problems:
        click.echo(f"PROBLEM: {problem}", err=True)
    click.echo(
        f"compacted {result.compacted} partition(s): {result.files_before:,} files, "
        f"{result.bytes_before:,} -> {result.bytes_after:,} bytes, {result.rows:,} rows; "
        f"{result.skipped} already compacted"
    )
    sys.exit(0 if result.ok else 1)


@main.command()
@click.option("--data-dir", default="data", show_default=True, type=click.Path(file_okay=False))
@click.option(
    "--output",
    type=click.Path(dir_okay=False),
    default=None,
    help="Database file to write [default: DATA_DIR/catalog.duckdb].",
)
def catalog(data_dir: str, output: str | None) -> None:
    """Write a DuckDB database file with every view (open it with the DuckDB CLI, any client)."""
    from recorder.export import write_catalog

    root = _existing_dir(data_dir)
    written = write_catalog(root, Path(output) if output else root / "catalog.duckdb")
    click.echo(f"wrote {written}")


@main.command()
@click.option("--data-dir", default="data", show_default=True, type=click.Path(file_okay=False))
@click.option("--table", required=True, help="best_limit, aggregate, ... (any table).")
@click.option("--contracts", default=None, help="Comma-separated contracts [default: all].")
@click.option("--start", default=None, help="YYYY-MM-DD or ISO 8601 instant; inclusive.")
@click.option("--end", default=None, help="YYYY-MM-DD (inclusive) or instant (exclusive).")
@click.option("--format", "fmt", type=click.Choice(["csv", "parquet"]), required=True)
@click.option("--output", required=True, type=click.Path(dir_okay=False))
@click.option("--timezone", default="Asia/Tehran", show_default=True, help=_TIMEZONE_HELP)
def export(
    data_dir: str,
    table: str,
    contracts: str | None,
    start: str | None,
    end: str | None,
    fmt: str,
    output: str,
    timezone: str,
) -> None:
    """Write a table's rows for some contracts and a date or time range to CSV or Parquet.

    A naive instant is read in --timezone; only the partitions in range are read.
    """
    from recorder.export import Format, parse_bound
    from recorder.export import export as run_export
    from recorder.schema import TABLES

    root, zone = _existing_dir(data_dir), _zone(timezone)
    if table not in TABLES:
        _fail(f"--table: unknown table {table!r} (one of {', '.join(TABLES)})")
    try:
        low = parse_bound(start, zone) if start else None
        high = parse_bound(end, zone) if end else None
    except ValueError as exc:
        _fail(f"--start/--end: {exc}")
        return
    chosen = [c.strip() for c in contracts.split(",") if c.strip()] if contracts else None
    if chosen and all(c.name != "contract" for c in TABLES[table].columns):
        _fail(f"--contracts: table {table} has no contract column")
    logs.configure("info", "auto")
    try:
        kind: Format = "csv" if fmt == "csv" else "parquet"
        rows = run_export(root, table, Path(output), kind, contracts=chosen, start=low, end=high)
    except duckdb.Error as exc:
        _fail(f"export failed: {exc}", code=1)
        return
    click.echo(f"wrote {rows:,} rows to {output}")
