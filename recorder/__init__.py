"""ime-recorder: record the HedgeTech IME live feed into Parquet and query it with DuckDB."""

from recorder.catalog import connect
from recorder.store import Store

__all__ = ["Store", "connect"]
__version__ = "0.1.0"
