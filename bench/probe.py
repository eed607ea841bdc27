"""The recorder daemon with a probe on its journal: ``ime-recorder run`` plus one thread.

Runs :func:`recorder.daemon.record` exactly as ``ime-recorder run`` does (same config, same
signals), and starts a thread that reads ``pipeline.journal.durable_seq`` every millisecond
and notes each change with its wall-clock time: a frame is durable from the first note whose
durable_seq reaches its seq. Nothing in the recorder is changed or wrapped; the thread only
reads one integer. At exit the notes go to ``--out`` as JSON (``[[time_ns, seq], ...]``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
import time
from pathlib import Path

from recorder import logs
from recorder.config import load_config, load_credentials
from recorder.daemon import Recorder, install_stop_signals, record


class DurableProbe:
    """Notes (time_ns, durable_seq) at every change, polling every ``interval`` seconds."""

    def __init__(self, interval: float = 0.001) -> None:
        self.interval = interval
        self.notes: list[tuple[int, int]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, recorder: Recorder) -> None:
        journal = recorder.pipeline.journal
        if journal is None:
            return

        def run() -> None:
            last = -1
            while not self._stop.wait(self.interval):
                seq = journal.durable_seq
                if seq != last:
                    self.notes.append((time.time_ns(), seq))
                    last = seq

        self._thread = threading.Thread(target=run, name="durable-probe", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    config = load_config(args.config)
    credentials = load_credentials()
    logs.register_secrets(credentials.secrets())
    logs.configure(config.log.level, config.log.format)
    probe = DurableProbe()

    async def run() -> None:
        stop = asyncio.Event()
        install_stop_signals(stop)
        await record(config, credentials, stop, on_start=probe.start)

    try:
        asyncio.run(run())
    finally:
        probe.stop()
        Path(args.out).write_text(json.dumps(probe.notes), encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
