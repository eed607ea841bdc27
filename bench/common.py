"""Shared pieces of the benchmark parts: scale, processes, configs, metrics, results."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
#: scratch data (recordings, generated stores); deleted by each part unless BENCH_KEEP is set
WORK = Path(os.environ.get("BENCH_WORK", BENCH / ".work"))
#: one JSON file of results per part; bench/report.py turns them into the table
OUT = Path(os.environ.get("BENCH_OUT", BENCH / ".out"))
#: BENCH_SCALE=0.1 runs every part on a tenth of the messages / seconds (a quick check)
SCALE = float(os.environ.get("BENCH_SCALE", "1"))
KEEP = bool(os.environ.get("BENCH_KEEP"))
PYTHON = sys.executable
RECORDER = str(Path(sys.executable).with_name("ime-recorder"))
CONTRACTS = 500
PER_CONNECTION = 50  # feed.max_contracts_per_connection's default
CREDENTIALS = {"HEDGETECH_USERNAME": "demo", "HEDGETECH_PASSWORD": "demo"}


def scaled(value: float, minimum: float = 1) -> int:
    """``value`` times BENCH_SCALE, as an int, at least ``minimum``."""
    return int(max(minimum, round(value * SCALE)))


def contract_ids(count: int = CONTRACTS) -> list[str]:
    """The simulator's contract ids: "1001", "1002", ..."""
    return [str(1001 + i) for i in range(count)]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def fresh_dir(name: str) -> Path:
    """An empty scratch folder ``WORK/name``."""
    path = WORK / name
    if path.exists():
        subprocess.run(["rm", "-rf", str(path)], check=True)
    path.mkdir(parents=True)
    return path


def cleanup(path: Path) -> None:
    if not KEEP and path.exists():
        subprocess.run(["rm", "-rf", str(path)], check=True)


# ---------------------------------------------------------------------- results


def save(part: str, result: dict[str, Any]) -> Path:
    """Write one part's results (bench/report.py reads them)."""
    OUT.mkdir(parents=True, exist_ok=True)
    result = {"part": part, "scale": SCALE, "finished_at": time.time(), **result}
    path = OUT / f"{part}.json"
    path.write_text(json.dumps(result, indent=2, default=str), encoding="utf-8")
    log(f"{part}: results in {path}")
    return path


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), nearest rank; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


# ---------------------------------------------------------------------- CPU of others


def _jiffies(pid: int) -> int:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0
    return int(fields[11]) + int(fields[12])  # utime + stime, all threads


def _machine_jiffies() -> tuple[int, int]:
    """(busy, stolen): the machine's CPU time spent running something, and the time the
    hypervisor ran other guests while this one had work (``steal``, not in ``busy``)."""
    cpu = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    # user nice system idle iowait irq softirq steal guest guest_nice (guest is in user)
    values = [int(v) for v in cpu[:8]]
    return sum(values) - values[3] - values[4] - values[7], values[7]


class CpuMeter:
    """CPU used, in cores, by our processes and by everything else on the machine meanwhile.

    Other sessions may run tests on the same 2-core machine: "others" says how much of it
    they took while a figure was measured. The machine is a virtual one, and "stolen" says
    how much CPU the hypervisor gave other guests while this one wanted it (``steal`` in
    /proc/stat: ~5 % of two busy cores, ~10 % of an idle machine's, seen on 2026-11-22).
    Our processes' CPU is sampled every 0.25 s, so a process that exits before ``stop``
    still counts up to its last sample.
    """

    def __init__(self, pids: list[int] | None = None) -> None:
        self.pids = list(pids or [])
        self.result: dict[str, float] = {}
        self._began = 0.0
        self._busy0 = self._stolen0 = 0
        self._first: dict[int, int] = {}
        self._last: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        for pid in self.pids:
            jiffies = _jiffies(pid)
            if jiffies:
                self._first.setdefault(pid, jiffies)
                self._last[pid] = jiffies

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            self._sample()

    def start(self) -> None:
        self._began = time.monotonic()
        self._busy0, self._stolen0 = _machine_jiffies()
        self._sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> dict[str, float]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
        seconds = time.monotonic() - self._began
        hz = os.sysconf("SC_CLK_TCK")
        busy_now, stolen_now = _machine_jiffies()
        busy = (busy_now - self._busy0) / hz
        stolen = (stolen_now - self._stolen0) / hz
        ours = sum(self._last[p] - self._first[p] for p in self._last) / hz
        self.result = {
            "seconds": round(seconds, 2),
            "ours_cores": round(ours / seconds, 2),
            "others_cores": round(max(0.0, busy - ours) / seconds, 2),
            "stolen_cores": round(stolen / seconds, 2),
        }
        return self.result


def wait_quiet(limit: float = 90.0, threshold: float = 0.3) -> float:
    """Wait (at most ``limit`` s) until other processes use < ``threshold`` cores for 2 s.

    Other sessions may run test suites on this machine; a figure taken while they do is
    slower than the recorder is. Returns the cores they used in the last window.
    """
    deadline = time.monotonic() + limit
    while True:
        meter = CpuMeter()
        meter.start()
        time.sleep(2.0)
        others = meter.stop()["others_cores"]
        if others < threshold or time.monotonic() > deadline:
            if others >= threshold:
                log(f"the machine is busy (others use {others:.2f} cores); measuring anyway")
            return others


# ---------------------------------------------------------------------- memory


class RssSampler:
    """Samples a process's RSS every ``interval`` s; ``peak_mb`` also reads the kernel's VmHWM."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[tuple[float, float]] = []  # (monotonic, MB)
        self.hwm_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _status(self) -> dict[str, float]:
        out = {}
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[key] = int(value.split()[0]) / 1024
        return out

    def _run(self) -> None:
        while not self._stop.is_set():
            status = self._status()
            if "VmRSS" in status:
                self.samples.append((time.monotonic(), status["VmRSS"]))
                self.hwm_mb = max(self.hwm_mb, status.get("VmHWM", 0.0))
            self._stop.wait(self.interval)

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_mb(self) -> float:
        sampled = max((mb for _, mb in self.samples), default=0.0)
        return max(sampled, self.hwm_mb)


# ---------------------------------------------------------------------- the simulator


class SimProcess:
    """``bench/simserver.py`` in a process of its own."""

    def __init__(self, *args: str, name: str = "sim") -> None:
        self.summary_path = WORK / f".{name}-summary-{os.getpid()}.json"
        self.summary_path.parent.mkdir(parents=True, exist_ok=True)
        self.summary_path.unlink(missing_ok=True)
        command = [PYTHON, "-m", "bench.simserver", *args, "--summary", str(self.summary_path)]
        self.process = subprocess.Popen(
            command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError("the simulator did not start")
        ready = json.loads(line)
        self.base_url: str = ready["base_url"]
        self.token_url: str = ready["token_url"]
        self.port: int = ready["port"]
        self.summary: dict[str, Any] = {}

    @property
    def pid(self) -> int:
        return self.process.pid

    def stats(self) -> dict[str, Any]:
        url = f"http://127.0.0.1:{self.port}/_sim/stats"
        with urllib.request.urlopen(url, timeout=30) as answer:
            return dict(json.load(answer))

    def control(self, action: str) -> None:
        """``pause`` or ``resume`` every stream (the simulator's control API)."""
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/_sim/{action}", method="POST"
        )
        with urllib.request.urlopen(request, timeout=30):  # noqa: S310
            pass

    def stop(self) -> dict[str, Any]:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.summary_path.exists():
            self.summary = json.loads(self.summary_path.read_text(encoding="utf-8"))
            self.summary_path.unlink()
        return self.summary

    def __enter__(self) -> SimProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


# ---------------------------------------------------------------------- the recorder


def write_config(
    path: Path, sim: SimProcess, data_dir: Path, metrics_port: int, **sections: dict[str, Any]
) -> Path:
    """A recorder config for the simulator: default settings but for the endpoints, the data
    directory, the metrics port and JSON logs (plus whatever ``sections`` override)."""
    values: dict[str, dict[str, Any]] = {
        "feed": {"base_url": sim.base_url, "contracts": contract_ids()},
        "auth": {"token_url": sim.token_url},
        "storage": {"data_dir": str(data_dir)},
        "log": {"format": "json"},
        "metrics": {"port": metrics_port},
    }
    for name, override in sections.items():
        values.setdefault(name, {}).update(override)
    lines = []
    for name, keys in values.items():
        lines.append(f"[{name}]")
        lines.extend(f"{key} = {json.dumps(value)}" for key, value in keys.items())
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def run_command(config: Path) -> list[str]:
    """The recorder's own command line."""
    return [RECORDER, "run", "--config", str(config)]


class RecorderProcess:
    """The recorder (``command``, by default ``ime-recorder run --config ...``) in a process of
    its own, logging to a file, with the simulator's demo credentials in its environment."""

    def __init__(
        self, config: Path, metrics_port: int, log_path: Path, command: list[str] | None = None
    ) -> None:
        self.metrics_port = metrics_port
        self.log_path = log_path
        env = {**os.environ, **CREDENTIALS}
        command = command or run_command(config)
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT
        )
        self.exit_code: int | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def metrics(self, timeout: float = 30.0) -> dict[str, float]:
        """The recorder's Prometheus metrics as ``{name{labels}: value}`` ({} if unreachable)."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as answer:
                text = answer.read().decode()
        except OSError:
            return {}
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                with contextlib.suppress(ValueError):
                    out[name] = float(value)
        return out

    def wait_until(self, done: Any, timeout: float, every: float = 0.5) -> dict[str, float]:
        """Poll the metrics until ``done(metrics)``; returns the last metrics."""
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the recorder exited early; see {self.log_path}")
            metrics = self.metrics()
            if metrics and done(metrics):
                return metrics
            if time.monotonic() > deadline:
                raise TimeoutError(f"recorder not done after {timeout:.0f} s; see {self.log_path}")
            time.sleep(every)

    def stop(self, timeout: float = 300.0) -> int:
        """SIGTERM, then wait for the clean exit (everything flushed); SIGKILL after timeout."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                log(f"recorder still flushing after {timeout:.0f} s: killed")
                self.process.kill()
                self.process.wait()
        self._log.close()
        self.exit_code = self.process.returncode
        return self.exit_code


def frames_done(expected: int) -> Any:
    """A ``wait_until`` condition: every expected frame received and no row left in memory."""

    def done(metrics: dict[str, float]) -> bool:
        received = metrics.get("ime_recorder_frames_received_total", 0)
        return received >= expected and metrics.get("ime_recorder_rows_buffered", 1) == 0

    return done


def flush_stats(metrics: dict[str, float]) -> dict[str, float]:
    """Flushes, their total and mean seconds, and files written, from the recorder's metrics."""
    flushes = metrics.get("ime_recorder_flush_duration_seconds_count", 0.0)
    seconds = metrics.get("ime_recorder_flush_duration_seconds_sum", 0.0)
    files = metrics.get("ime_recorder_files_written_total", 0.0)
    return {
        "flushes": flushes,
        "seconds": round(seconds, 2),
        "mean_seconds": round(seconds / flushes, 2) if flushes else 0.0,
        "files": files,
        "ms_per_file": round(1000 * seconds / files, 2) if files else 0.0,
    }


# ---------------------------------------------------------------------- the data directory


DATA_TABLES = ("best_limit", "aggregate", "allowed_price_range", "contract_info")


def visible_files(data_dir: Path, table: str | None = None) -> list[Path]:
    """The Parquet files the views read (temporary dot-files excluded)."""
    if table is None:
        tables = [p.name for p in data_dir.iterdir() if not p.name.startswith("_")]
    else:
        tables = [table]
    out: list[Path] = []
    for name in tables:
        root = data_dir / name
        if root.is_dir():
            out.extend(p for p in root.rglob("*.parquet") if not p.name.startswith("."))
    return out


def last_visible_at(data_dir: Path) -> float:
    """When the last Parquet file became visible: its rename, which sets the inode's ctime."""
    return max(p.stat().st_ctime for p in visible_files(data_dir))


@contextlib.contextmanager
def timed() -> Iterator[dict[str, float]]:
    out: dict[str, float] = {}
    began = time.perf_counter()
    try:
        yield out
    finally:
        out["seconds"] = time.perf_counter() - began
