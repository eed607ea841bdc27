"""End to end over loopback: the simulator's frames become exactly the rows they should."""

from __future__ import annotations

import gc
import json
from datetime import UTC, date, datetime, time, tzinfo
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pyarrow as pa
import pytest

import recorder
from recorder.schema import DATA_TABLES, SECTION_TABLES, TABLES, Column
from recorder.simstream import SentFrame
from tests.conftest import make_config, record_until

TEHRAN = ZoneInfo("Asia/Tehran")


def _value(column: Column, raw: Any) -> Any:
    if column.kind == "int":
        return int(raw)
    if column.kind == "float":
        return float(raw)
    if column.kind == "date":
        return date.fromisoformat(raw) if raw else None
    return time.fromisoformat(raw) if raw else None


def expected_rows(
    frames: list[SentFrame], naive_tz: tzinfo = UTC
) -> dict[str, list[tuple[Any, ...]]]:
    """The rows each table must hold, computed straight from the JSON that was sent."""
    out: dict[str, list[tuple[Any, ...]]] = {t: [] for t in DATA_TABLES}
    for frame in frames:
        message = json.loads(frame.text)
        contract = next(
            message[k] for k in ("contractId", "ContractId", "contractName") if k in message
        )
        stamp = datetime.fromisoformat(message["timestamp"])
        stamp = (stamp if stamp.tzinfo else stamp.replace(tzinfo=naive_tz)).astimezone(UTC)
        head = (contract, stamp.astimezone(TEHRAN).date(), stamp)
        for section, body in message["data"].items():
            if section not in SECTION_TABLES:
                continue  # kept in extras, checked separately
            table = TABLES[SECTION_TABLES[section]]
            columns = table.wire_columns
            if table.levels:
                for key, level in body.items():
                    values = tuple(_value(c, level[c.field]) for c in columns)
                    out[table.name].append((*head, int(key), *values, "stream"))
            else:
                values = tuple(_value(c, body[c.field]) for c in columns)
                out[table.name].append((*head, *values, "stream"))
    return out


def stored_rows(data_dir: Path, table: str) -> list[tuple[Any, ...]]:
    """The rows of a table's view, without received_at and seq, in seq order."""
    columns = [c.name for c in TABLES[table].columns if c.name not in ("received_at", "seq")]
    order = "seq, level" if table == "best_limit" else "seq"
    con = recorder.connect(data_dir)
    return con.execute(f"SELECT {', '.join(columns)} FROM {table} ORDER BY {order}").fetchall()


VARIANTS = [
    pytest.param("id", {}, id="id-plain"),
    pytest.param("name", {}, id="name-plain"),
    pytest.param("id", {"id_key": "ContractId"}, id="id-ContractId"),
    pytest.param("id", {"timestamp_style": "offset"}, id="timestamp-offset"),
    pytest.param("id", {"timestamp_style": "naive"}, id="timestamp-naive"),
    pytest.param("id", {"partial_levels": 0.5}, id="partial-levels"),
    pytest.param("id", {"missing_sections": 0.5}, id="missing-sections"),
    pytest.param("id", {"float_ints": True}, id="float-ints"),
    pytest.param("name", {"variant_mix": True}, id="name-variant-mix"),
]


def _shows_variant(frames: list[SentFrame], variant: dict[str, Any]) -> bool:
    """True when the sent frames really contain the variant under test (so the test can fail)."""
    messages = [json.loads(f.text) for f in frames]
    if variant.get("id_key") == "ContractId":
        return all("ContractId" in m for m in messages)
    if variant.get("timestamp_style") == "offset":
        return all(m["timestamp"].endswith("+03:30") for m in messages)
    if variant.get("timestamp_style") == "naive":
        return all(datetime.fromisoformat(m["timestamp"]).tzinfo is None for m in messages)
    if variant.get("partial_levels"):
        return any(len(m["data"].get("BestLimit", {})) < 3 for m in messages)
    if variant.get("missing_sections"):
        return any(len(m["data"]) < 4 for m in messages)
    if variant.get("float_ints"):
        return all(isinstance(m["data"]["ContractInfo"]["open_interest"], float) for m in messages)
    return True


@pytest.mark.parametrize(("subscribe_by", "variant"), VARIANTS)
def test_every_sent_message_becomes_exactly_its_rows(
    simulator: Any, tmp_path: Path, subscribe_by: str, variant: dict[str, Any]
) -> None:
    """N messages sent become exactly N rows per section and one row per level, value for value."""
    sent_count = 150
    sim = simulator(contracts=5, rate=0, max_messages=sent_count, keep_sent=True, **variant)
    config = make_config(sim, tmp_path, subscribe_by=subscribe_by)
    started = datetime.now(UTC)
    record_until(config, lambda r: r.pipeline.stats.frames == sent_count)
    frames = sim.sent
    assert len(frames) == sent_count
    assert _shows_variant(frames, variant)

    expected = expected_rows(frames)
    for table in DATA_TABLES:
        assert stored_rows(tmp_path, table) == expected[table], table
    con = recorder.connect(tmp_path)
    seqs = [
        s for (s,) in con.execute("SELECT seq FROM aggregate ORDER BY received_at, seq").fetchall()
    ]
    assert seqs == sorted(set(seqs))
    first, last = con.execute(
        "SELECT min(received_at), max(received_at) FROM contract_info"
    ).fetchone()
    assert started <= first <= last <= datetime.now(UTC)
    assert con.execute("SELECT count(*) FROM quarantine").fetchone() == (0,)


def test_naive_timestamps_are_read_in_the_configured_zone(simulator: Any, tmp_path: Path) -> None:
    """With feed.naive_timestamp_timezone = Asia/Tehran a naive timestamp is Tehran wall time."""
    sim = simulator(contracts=3, rate=0, max_messages=40, keep_sent=True, timestamp_style="naive")
    config = make_config(sim, tmp_path, feed={"naive_timestamp_timezone": "Asia/Tehran"})
    record_until(config, lambda r: r.pipeline.stats.frames == 40)
    expected = expected_rows(sim.sent, naive_tz=TEHRAN)
    assert stored_rows(tmp_path, "aggregate") == expected["aggregate"]
    assert stored_rows(tmp_path, "best_limit") == expected["best_limit"]


def test_contracts_are_split_over_several_connections(simulator: Any, tmp_path: Path) -> None:
    """Seven contracts at three per connection open three streams and every message is stored."""
    per_connection = 30
    sim = simulator(contracts=7, rate=0, max_messages=per_connection, keep_sent=True)
    config = make_config(sim, tmp_path, feed={"max_contracts_per_connection": 3})
    rec = record_until(config, lambda r: r.pipeline.stats.frames == 3 * per_connection)
    assert [len(c.contracts) for c in rec.connections] == [3, 3, 1]
    assert len(sim.sent) == 3 * per_connection
    con = recorder.connect(tmp_path)
    counts = dict(
        con.execute("SELECT contract, count(*) FROM aggregate GROUP BY contract").fetchall()
    )
    sent: dict[str, int] = {}
    for frame in sim.sent:
        sent[frame.contract_id] = sent.get(frame.contract_id, 0) + 1
    assert counts == sent
    assert con.execute("SELECT count(DISTINCT seq) FROM aggregate").fetchone() == (90,)


REASON_STARTS = {
    "not_json": "frame: not JSON",
    "not_object": "frame: a JSON list, not an object",
    "missing_identifier": "identifier: none of contractId, ContractId, contractName",
    "missing_timestamp": "timestamp: missing",
    "missing_data": "data: missing",
    "string_price": "data.BestLimit.1.sell_price: ",
    "fractional_quantity": "data.BestLimit.1.buy_quantity: ",
    "null_section": "data.",
}
KNOWN_TOP = {"channel", "contractId", "ContractId", "contractName", "timestamp", "data"}


def _unknown_parts(text: str) -> int:
    """How many extras rows a well-formed frame must give (unknown keys, sections, fields)."""
    message = json.loads(text)
    parts = 1 if set(message) - KNOWN_TOP else 0
    for section, body in message["data"].items():
        if section not in SECTION_TABLES:
            parts += 1
            continue
        table = TABLES[SECTION_TABLES[section]]
        fields = {c.field for c in table.wire_columns}
        bodies = body.values() if table.levels else [body]
        parts += sum(1 for b in bodies if set(b) - fields)
    return parts


def test_malformed_frames_go_to_quarantine_and_unknown_sections_to_extras(
    simulator: Any, tmp_path: Path
) -> None:
    """5% malformed and 2% unknown sections: each bad frame quarantined whole, nothing else lost."""
    total = 1000
    sim = simulator(
        contracts=4,
        rate=0,
        max_messages=total,
        keep_sent=True,
        seed=7,
        malformed=0.05,
        unknown_sections=0.02,
    )
    record_until(make_config(sim, tmp_path), lambda r: r.pipeline.stats.frames == total)
    frames = sim.sent
    bad = [f for f in frames if f.fault]
    good = [f for f in frames if not f.fault]
    assert 25 <= len(bad) <= 80
    con = recorder.connect(tmp_path)
    quarantined = con.execute("SELECT reason, raw FROM quarantine ORDER BY seq").fetchall()
    assert [raw for _, raw in quarantined] == [f.text for f in bad]
    for (reason, _), frame in zip(quarantined, bad, strict=True):
        assert frame.fault is not None
        assert reason.startswith(REASON_STARTS[frame.fault]), (frame.fault, reason)
    assert {f.fault for f in bad} == set(REASON_STARTS)
    expected = expected_rows(good)
    for table in DATA_TABLES:
        assert stored_rows(tmp_path, table) == expected[table], table
    extras = con.execute("SELECT count(*) FROM extras").fetchone()
    assert extras == (sum(_unknown_parts(f.text) for f in good),)
    assert extras[0] >= 10


def test_odd_contract_names_round_trip_and_stay_inside_the_data_dir(
    simulator: Any, tmp_path: Path
) -> None:
    """Names with /, .., =, %, spaces or Persian letters come back exactly, written nowhere else."""
    sim = simulator(contracts=2, rate=0, max_messages=120, keep_sent=True, odd_names=True)
    names = [c.name for c in sim.contracts]
    assert {"..", "../SAFFRON-MAY05", "CEMENT%2FJUL05", "COPPER AUG05", "سکه-طلا"} <= set(names)
    data_dir = tmp_path / "data"
    record_until(
        make_config(sim, data_dir, subscribe_by="name"),
        lambda r: r.pipeline.stats.frames == 120,
    )
    sent: dict[str, int] = {}
    for frame in sim.sent:
        name = json.loads(frame.text)["contractName"]
        sent[name] = sent.get(name, 0) + 1
    con = recorder.connect(data_dir)
    stored = dict(con.execute("SELECT contract, count(*) FROM aggregate GROUP BY 1").fetchall())
    assert stored == sent
    assert len(stored) == 11
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
    # flushes write day files: the names are data inside them, never a path
    written = [p.relative_to(data_dir).parts for p in data_dir.rglob("*.parquet")]
    assert written
    assert all(len(parts) == 3 for parts in written)
    assert {parts[0] for parts in written} <= {*TABLES}


@pytest.mark.parametrize(("chosen", "expected"), [(None, "system"), ("mimalloc", "mimalloc")])
def test_a_recorder_allocates_arrow_memory_with_malloc_unless_told_otherwise(
    simulator: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    chosen: str | None,
    expected: str,
) -> None:
    """While recording, Arrow's buffers come from the C library's malloc, which returns a
    flush's freed megabytes to the system (Arrow's default pool keeps them); a pool named in
    ARROW_DEFAULT_MEMORY_POOL is kept. The rows are stored either way."""
    default = pa.default_memory_pool()
    pa.set_memory_pool(pa.mimalloc_memory_pool())
    if chosen is None:
        monkeypatch.delenv("ARROW_DEFAULT_MEMORY_POOL", raising=False)
    else:
        monkeypatch.setenv("ARROW_DEFAULT_MEMORY_POOL", chosen)
    sim = simulator(contracts=3, rate=0, max_messages=30)
    seen: list[str] = []
    try:
        record_until(
            make_config(sim, tmp_path),
            lambda r: r.pipeline.stats.frames == 30,
            during=lambda r: seen.append(pa.default_memory_pool().backend_name),
        )
    finally:
        pa.set_memory_pool(default)
    assert seen
    assert set(seen) == {expected}
    con = recorder.connect(tmp_path)
    assert con.execute("SELECT count(DISTINCT seq) FROM aggregate").fetchone() == (30,)


def test_objects_made_before_recording_are_out_of_the_collectors_sight_until_it_ends(
    simulator: Any, tmp_path: Path
) -> None:
    """While recording, what start-up made (modules, functions, configuration) is frozen:
    full garbage collections do not walk it for every frame batch. Unfrozen at the end."""
    assert gc.get_freeze_count() == 0
    sim = simulator(contracts=3, rate=0, max_messages=30)
    frozen: list[int] = []
    record_until(
        make_config(sim, tmp_path),
        lambda r: r.pipeline.stats.frames == 30,
        during=lambda r: frozen.append(gc.get_freeze_count()),
    )
    assert frozen
    assert min(frozen) > 10_000  # the interpreter, aiohttp, DuckDB's and our modules
    assert gc.get_freeze_count() == 0
    con = recorder.connect(tmp_path)
    assert con.execute("SELECT count(DISTINCT seq) FROM aggregate").fetchone() == (30,)
