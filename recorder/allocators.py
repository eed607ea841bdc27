"""How the recorder hands freed memory back to the system.

Two allocators keep memory the recorder has freed, counted in its RSS. Measured in
``bench/memory.py`` (100 k msg/s offered for 60 s, 500 contracts; the median RSS over the
minute, which was ~500 MB):

* **DuckDB's bundled jemalloc** keeps freed pages for 10 s, and counts that time only while
  DuckDB allocates: after one large sort an idle process kept ~600 MB (tests: ~190 MB
  after a 2 M-row sort, 2 MB with the setting). ``DUCKDB_JE_MALLOC_CONF``, read once when
  the ``duckdb`` module loads, makes it return them at once: median ~477 MB, no cost in
  throughput. :func:`configure` sets it before any command runs (``recorder.cli``); a value
  already in the environment wins, and the library (``Store``, ``connect``) leaves a
  program's own allocators alone.
* **glibc's malloc** keeps freed blocks inside its heap for reuse: 100-230 MB of it sat free.
  :func:`give_back` (``malloc_trim``) returns their pages after each flush: median ~406 MB,
  ~3 % fewer messages/s in paired throughput runs (the trim takes 0.5-35 ms with the heap
  locked). Fixing glibc's mmap threshold at 128 KB instead gave the same median but cost
  ~10 %: each block of that size became a new mapping, its pages faulted in again.
"""

from __future__ import annotations

import ctypes
import os
import sys
from typing import Any

#: the environment variable DuckDB's jemalloc reads its options from
DUCKDB_ALLOCATOR_VARIABLE = "DUCKDB_JE_MALLOC_CONF"
#: freed pages go back to the system at once (the defaults: 10 s, counted only while
#: DuckDB allocates)
DUCKDB_ALLOCATOR_OPTIONS = "dirty_decay_ms:0,muzzy_decay_ms:0"
#: what :func:`configure` set in this process (the daemon logs it when it starts recording)
SETTINGS: dict[str, str] = {}


def configure() -> dict[str, str]:
    """Set DuckDB's allocator options, unless ``duckdb`` is loaded already (too late then:
    nothing is set) or the environment has its own; returns what is in force."""
    if "duckdb" not in sys.modules:
        os.environ.setdefault(DUCKDB_ALLOCATOR_VARIABLE, DUCKDB_ALLOCATOR_OPTIONS)
        SETTINGS["duckdb_allocator"] = os.environ[DUCKDB_ALLOCATOR_VARIABLE]
    return SETTINGS


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
