"""ime-recorder: record the HedgeTech IME live feed into Parquet and query it with DuckDB."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from recorder.catalog import connect
    from recorder.store import Store

__all__ = ["Store", "connect"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """``Store`` and ``connect`` load on first use: importing the command line must not load
    ``duckdb`` before :func:`recorder.allocators.configure` has set its allocator."""
    if name == "Store":
        from recorder.store import Store

        return Store
    if name == "connect":
        from recorder.catalog import connect

        return connect
    raise AttributeError(f"module 'recorder' has no attribute {name!r}")
