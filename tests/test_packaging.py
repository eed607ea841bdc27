"""`pip install .` gives a package that works outside the checkout (schemas, configs inside)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from recorder.schema import TABLES

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_installed_package_carries_its_schemas_and_configs(tmp_path: Path) -> None:
    """A wheel installed elsewhere reads the table schema and ships the example config."""
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    probe = (
        "import recorder, recorder.schema as s, recorder.config as c;"
        "print(recorder.__file__); print(s.package_data_dir('schemas'));"
        "print(sorted(s.TABLES));"
        "print(c.load_config(s.package_data_dir('configs') / 'recorder.toml').feed.contracts)"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    result = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    module, schemas, tables, contracts = result.stdout.splitlines()
    assert module.startswith(str(target))
    assert schemas == str(target / "recorder" / "_data" / "schemas")
    assert tables == str(sorted(TABLES))
    assert contracts == "('1001', '1002')"
