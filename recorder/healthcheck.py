"""The container's HEALTHCHECK: ``python3 -m recorder.healthcheck [--config FILE] [--path P]``.

Exit 0 when the daemon's ``/healthz`` (or ``--path``) on this host answers 200, else 1. The
slim base image has no curl, so the check is Python's own ``urllib``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tomllib
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def health_url(config_path: str | None, environ: Mapping[str, str], path: str = "/healthz") -> str:
    """The URL of ``path`` on this host, from ``[metrics]`` of the file and the environment.

    Only the two keys are read (a health check must not fail on the rest of the config).
    """
    section: dict[str, Any] = {}
    if config_path and Path(config_path).is_file():
        with open(config_path, "rb") as handle:
            section = tomllib.load(handle).get("metrics", {})
    host = str(environ.get("IME_RECORDER_METRICS__HOST", section.get("host", "127.0.0.1")))
    port = int(environ.get("IME_RECORDER_METRICS__PORT", section.get("port", 9108)))
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    return f"http://{f'[{host}]' if ':' in host else host}:{port}{path}"


def main(argv: list[str] | None = None) -> int:
    """Exit 0 when the daemon's ``/healthz`` (or ``--path``) answers 200, else 1."""
    parser = argparse.ArgumentParser(
        prog="python3 -m recorder.healthcheck", description=main.__doc__
    )
    parser.add_argument("--config", help="the daemon's TOML config (for [metrics])")
    parser.add_argument("--path", default="/healthz")
    parser.add_argument("--timeout", type=float, default=4.0)
    args = parser.parse_args(argv)
    try:
        url = health_url(args.config, os.environ, args.path)
        # the URL is built above from http:// and this host's own address
        with urllib.request.urlopen(url, timeout=args.timeout) as response:  # noqa: S310
            status = response.status
    except (OSError, ValueError, tomllib.TOMLDecodeError) as exc:
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1
    print(f"{url}: HTTP {status}")
    return 0 if status == 200 else 1


if __name__ == "__main__":
    sys.exit(main())
