"""The daemon never loads pandas, even where it is installed (recorder.lean).

pandas is not installed for the tests, so a stand-in package takes its place on PYTHONPATH:
importing it leaves a mark on disk. The control shows that ``pyarrow.dataset`` (which the
daemon's writer imports) does import it; ``ime-recorder run`` and ``demo`` then record
without ever doing so.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import recorder
from tests.test_daemon import RECORDER, recorder_env, run_until_sigterm, write_config

_STAND_IN = """\
import os
from pathlib import Path

Path(os.environ["PANDAS_MARK"]).write_text("imported")
__version__ = "0.0"  # pyarrow then takes pandas as too old and does without it
"""


@pytest.fixture
def pandas_env(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """An environment whose ``import pandas`` finds the stand-in, and the mark it leaves."""
    site = tmp_path / "site"
    (site / "pandas").mkdir(parents=True)
    (site / "pandas" / "__init__.py").write_text(_STAND_IN, encoding="utf-8")
    mark = tmp_path / "pandas-imported"
    env = recorder_env(
        PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
        PANDAS_MARK=str(mark),
        HEDGETECH_USERNAME="demo",
        HEDGETECH_PASSWORD="demo",
    )
    return env, mark


def _python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )


def test_pyarrow_dataset_imports_an_installed_pandas(pandas_env: Any) -> None:
    """The control: without recorder.lean, the writer's import loads pandas."""
    env, mark = pandas_env
    done = _python("import pyarrow.dataset, sys; print('pandas' in sys.modules)", env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True"]
    assert mark.read_text() == "imported"


def test_keep_pandas_out_refuses_the_import(pandas_env: Any) -> None:
    env, mark = pandas_env
    code = """
import sys
from recorder.lean import keep_pandas_out
print(keep_pandas_out(), keep_pandas_out())
import pyarrow as pa, pyarrow.dataset
try:
    import pandas
except ModuleNotFoundError as exc:
    print(exc.name, exc)
print('pandas' in sys.modules, pa.table({'a': [1, 2]}).to_pylist())
"""
    done = _python(code, env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "True True",
        "pandas the recorder's daemon does not load pandas",
        "False [{'a': 1}, {'a': 2}]",
    ]
    assert not mark.exists()


def test_keep_pandas_out_leaves_a_loaded_pandas_alone(pandas_env: Any) -> None:
    env, mark = pandas_env
    code = """
import pandas
from recorder.lean import keep_pandas_out
print(keep_pandas_out())
import pandas as again
print(again is pandas)
"""
    done = _python(code, env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "True"]
    assert mark.read_text() == "imported"


@pytest.mark.slow
def test_run_records_without_pandas(simulator: Any, tmp_path: Path, pandas_env: Any) -> None:
    """``ime-recorder run`` writes Parquet (the dataset writer) and never imports pandas."""
    env, mark = pandas_env
    sim = simulator(contracts=3, rate=200, keep_sent=True)
    data_dir = tmp_path / "data"
    config = write_config(tmp_path / "c.toml", sim, data_dir, [c.id for c in sim.contracts])
    run_until_sigterm(config, env, sim, data_dir, frames=300)
    con = recorder.connect(data_dir)
    assert con.execute("SELECT count(*) FROM aggregate").fetchone() == (len(sim.sent),)
    assert not mark.exists()


@pytest.mark.slow
def test_demo_records_without_pandas(tmp_path: Path, pandas_env: Any) -> None:
    env, mark = pandas_env
    data_dir = tmp_path / "data"
    args = ["demo", "--data-dir", str(data_dir), "--contracts", "2", "--seconds", "2"]
    done = subprocess.run(
        [RECORDER, *args, "--flush-interval", "0.5"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Example query" in done.stdout
    con = recorder.connect(data_dir)
    (rows,) = con.execute("SELECT count(*) FROM aggregate").fetchone() or (0,)
    assert rows > 0
    assert not mark.exists()
