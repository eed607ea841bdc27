"""How the daemon hands freed memory back to the system.

glibc's malloc keeps freed blocks inside its heap for reuse, counted in the RSS: at 100 k
msg/s offered, 100-230 MB of it sat free (Arrow allocates with it, see recorder.daemon).
:func:`give_back` returns their pages (``malloc_trim``). The pipeline calls it after a flush,
at most once a flush interval: at the feed's usual rates that is after every flush, while
under a burst the trimmed pages are not faulted in again flush after flush. Measured with
``bench/`` (with DuckDB's pages returned at once in both runs): trimming after every flush
lowered the median RSS at 100 k msg/s from ~480 to ~420 MB but cost ~3 % of the throughput
in paired runs; fixing glibc's mmap threshold at 128 KB instead cost ~10 %. Once a flush
interval costs nothing measurable.

DuckDB's own allocator (a jemalloc linked into its module) is left as it is: it purges
freed pages only while DuckDB allocates, so an idle process kept 300-600 MB after one large
sort; purging at once (``DUCKDB_JE_MALLOC_CONF=dirty_decay_ms:0``) or in jemalloc's
background threads (``allocator_background_threads``) gave them back but cost ~5 % of the
throughput, every decode's pages being faulted in again.
"""

from __future__ import annotations

import ctypes
from typing import Any


def _glibc() -> Any:
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 (only glibc has it; musl has no malloc_trim)
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _glibc()


def give_back() -> bool:
    """Return the pages of glibc's free heap blocks to the system (False: not glibc)."""
    if _LIBC is None:
        return False
    _LIBC.malloc_trim(0)
    return True
