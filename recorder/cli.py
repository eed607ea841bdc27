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
    except (AuthError, AllRefusedError) as exc:
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
