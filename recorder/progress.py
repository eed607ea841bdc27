"""Progress of long operations: a rich bar on a terminal, plain structlog lines otherwise.

Usage, from any thread::

    with progress(len(partitions), "compacting", unit="partitions") as advance:
        for partition in partitions:
            ...
            advance(1)

On a terminal (stderr is a TTY) a bar is drawn on stderr; otherwise one log line is written
when the operation starts, at most one every ``every`` seconds while it runs, and one when it
ends (with the time it took), so a container log shows how far it got without flooding.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import structlog

log = structlog.get_logger("recorder.progress")

Advance = Callable[[float], None]


@contextmanager
def progress(
    total: float | None,
    description: str,
    *,
    unit: str = "",
    bar: bool | None = None,
    every: float = 5.0,
) -> Iterator[Advance]:
    """Report progress of ``total`` units (None: unknown); yields ``advance(n)``.

    ``bar``: True draws a bar, False writes log lines, None (the default) draws a bar only
    when stderr is a terminal.
    """
    if bar is None:
        bar = sys.stderr.isatty()
    if bar:
        with _bar(total, description, unit) as advance:
            yield advance
    else:
        with _lines(total, description, unit, every) as advance:
            yield advance


@contextmanager
def _bar(total: float | None, description: str, unit: str) -> Iterator[Advance]:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    counts = [] if unit == "%" else [MofNCompleteColumn(), TextColumn(unit)]
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        *counts,
        TaskProgressColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=Console(stderr=True), transient=False) as bar:
        task = bar.add_task(description, total=total)

        def advance(n: float) -> None:
            bar.advance(task, n)

        yield advance


@contextmanager
def _lines(total: float | None, description: str, unit: str, every: float) -> Iterator[Advance]:
    started = time.monotonic()
    lock = threading.Lock()
    state = {"done": 0.0, "logged_at": started}
    where = {"total": total, "unit": unit} if unit else {"total": total}
    log.info(f"{description} started", **where)

    def advance(n: float) -> None:
        with lock:
            state["done"] += n
            now = time.monotonic()
            if now - state["logged_at"] < every:
                return
            state["logged_at"] = now
            done = state["done"]
        percent = {"percent": round(100 * done / total, 1)} if total else {}
        log.info(description, done=_number(done), **where, **percent)

    failed = True
    try:
        yield advance
        failed = False
    finally:
        seconds = round(time.monotonic() - started, 3)
        done = _number(state["done"])
        if failed:
            log.warning(f"{description} interrupted", done=done, **where, seconds=seconds)
        else:
            log.info(f"{description} done", done=done, **where, seconds=seconds)


def _number(value: float) -> float | int:
    return int(value) if value == int(value) else round(value, 3)
