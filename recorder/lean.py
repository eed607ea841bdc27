"""What the daemon keeps out of its memory: pandas, which it never uses.

Importing ``pyarrow.dataset`` (the flush's writer, recorder.writer) imports pandas whenever it
is installed: in an analysis environment (the ``analysis`` or ``bench`` extra) an idle daemon
(500 contracts at 20 msg/s) held 225 MB of resident memory against 191 without it, and its
start-up took ~0.5 s longer, for nothing: the daemon hands Arrow tables to DuckDB and
Parquet, never to pandas. The Docker image has no pandas, so there the daemon was already as
lean.

:func:`keep_pandas_out` makes ``import pandas`` fail in this process from then on, as if it
were not installed; pyarrow and DuckDB then run as they do without it. Only the ``run`` and
``demo`` commands call it, before they import the daemon; the library (``recorder.Store``,
whose tables backtests turn into DataFrames) never does.
"""

from __future__ import annotations

import sys
from importlib.machinery import ModuleSpec
from typing import Any

KEPT_OUT = "pandas"


class _KeepOut:
    """A finder, first on ``sys.meta_path``, that refuses :data:`KEPT_OUT` and its modules."""

    @staticmethod
    def find_spec(name: str, path: Any = None, target: Any = None) -> ModuleSpec | None:
        if name == KEPT_OUT or name.startswith(KEPT_OUT + "."):
            raise ModuleNotFoundError(f"the recorder's daemon does not load {name}", name=name)
        return None


def keep_pandas_out() -> bool:
    """Refuse ``import pandas`` in this process from now on; False when it is loaded already
    (then nothing changes: what uses it keeps working)."""
    if KEPT_OUT in sys.modules:
        return False
    if _KeepOut not in sys.meta_path:
        sys.meta_path.insert(0, _KeepOut)
    return True
