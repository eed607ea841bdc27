"""Discovery end to end: markets, new listings, resubscription, reference data, snapshots."""

from __future__ import annotations

from datetime import date
from pathlib import Path
from typing import Any

import orjson

import recorder
from recorder.flatten import flatten
from recorder.pipeline import Pipeline
from recorder.simrest import static_info
from tests.conftest import make_config, record_until


def _stored_contracts(data_dir: Path, source: str | None = None) -> set[str]:
    where = f"WHERE source = '{source}'" if source else ""
    con = recorder.connect(data_dir)
    return {
        c for (c,) in con.execute(f"SELECT DISTINCT contract FROM aggregate {where}").fetchall()
    }


def test_a_whole_market_is_recorded_and_nothing_else(simulator: Any, tmp_path: Path) -> None:
    """markets = ["IMEFutures"] with no contracts: every future is recorded, no other contract."""
    sim = simulator(contracts=24, rate=400)
    futures = {c.id for c in sim.contracts if c.market == "IMEFutures"}
    assert 0 < len(futures) < 24
    config = make_config(
        sim, tmp_path, [], feed={"markets": ("IMEFutures",), "snapshot_on_connect": True}
    )
    rec = record_until(
        config,
        lambda r: r.pipeline.stats.frames >= 600 and r.pipeline.stats.snapshots >= len(futures),
    )
    assert rec.subscriptions is not None
    assert set(rec.subscriptions.contracts) == futures
    assert _stored_contracts(tmp_path) == futures
    assert _stored_contracts(tmp_path, "snapshot") == futures
    stream = _stored_contracts(tmp_path, "stream")
    assert stream <= futures
    assert len(stream) >= len(futures) // 2


def test_a_contract_listed_while_recording_is_recorded(simulator: Any, tmp_path: Path) -> None:
    """A future listed mid-run is subscribed at the next refresh and its messages stored."""
    sim = simulator(contracts=6, rate=300)
    listed: list[str] = []

    def list_once(rec: Any) -> None:
        if not listed and rec.pipeline.stats.frames >= 50:
            listed.append(sim.list_contract("IMEFutures").id)

    config = make_config(
        sim,
        tmp_path,
        [],
        feed={"markets": ("IMEFutures",), "discovery_interval_seconds": 1.0},
    )
    rec = record_until(
        config,
        lambda r: bool(listed) and listed[0] in r.pipeline.stats.last_message_at,
        during=list_once,
    )
    assert rec.subscriptions is not None
    assert listed[0] in rec.subscriptions.contracts
    assert listed[0] in _stored_contracts(tmp_path)
    con = recorder.connect(tmp_path)
    assert con.execute(
        "SELECT count(*) FROM contracts WHERE contract_id = ?", [listed[0]]
    ).fetchall() == [(1,)]


def test_resubscription_loses_and_duplicates_nothing(simulator: Any, tmp_path: Path) -> None:
    """A delisted contract makes its connection be replaced; every frame sent is stored once."""
    sim = simulator(contracts=10, rate=300, keep_sent=True)
    futures = [c.id for c in sim.contracts if c.market == "IMEFutures"]
    delisted: list[str] = []

    def delist_once(rec: Any) -> None:
        if not delisted and rec.pipeline.stats.frames >= 100:
            delisted.append(futures[0])
            sim.delist(futures[0])

    config = make_config(
        sim,
        tmp_path,
        [],
        feed={"markets": ("IMEFutures",), "discovery_interval_seconds": 1.0},
    )
    rec = record_until(
        config,
        lambda r: (
            bool(delisted)
            and r.subscriptions is not None
            and futures[0] not in r.subscriptions.contracts
            and r.pipeline.stats.frames >= 400
        ),
        during=delist_once,
        timeout=40,
    )
    assert rec.subscriptions is not None
    assert sorted(rec.subscriptions.contracts) == sorted(futures[1:])
    con = recorder.connect(tmp_path)
    stored = con.execute(
        "SELECT count(*), count(DISTINCT seq), count(DISTINCT (contract, exchange_ts)) "
        "FROM aggregate WHERE source = 'stream'"
    ).fetchall()
    quarantined = con.execute("SELECT count(*) FROM quarantine").fetchall()[0][0]
    sent = len(sim.sent)
    assert stored == [(sent - quarantined, sent - quarantined, sent - quarantined)]
    sessions = con.execute(
        "SELECT opened_at, closed_at, contracts FROM sessions "
        "WHERE reason IS DISTINCT FROM 'snapshot' ORDER BY opened_at"
    ).fetchall()
    assert len(sessions) == 2
    (_, old_close, old_contracts), (new_open, _, new_contracts) = sessions
    assert new_open < old_close  # the new subscription opened before the old one closed
    assert sorted(old_contracts) == sorted(futures)
    assert sorted(new_contracts) == sorted(futures[1:])


def test_overlap_drops_a_frame_seen_on_both_streams(tmp_path: Path) -> None:
    """While two streams carry a contract, the same (contract, timestamp) is stored once."""
    import asyncio
    from zoneinfo import ZoneInfo

    from recorder.config import JournalConfig, StorageConfig

    frame = orjson.dumps(
        {"channel": "IME Stream", "contractId": "7", "timestamp": "2026-05-29T12:00:00Z",
         "data": {"ContractInfo": {"open_interest": 1, "open_interest_changes": 0}}}
    )  # fmt: skip

    async def main() -> None:
        pipeline = Pipeline(
            tmp_path, StorageConfig(fsync=False), ZoneInfo("Asia/Tehran"), ZoneInfo("UTC"),
            journal=JournalConfig(fsync=False),
        )  # fmt: skip
        pipeline.start()
        pipeline.overlap(("7",), True)
        pipeline.on_frame("old", frame, 1)
        pipeline.on_frame("new", frame, 2)
        pipeline.overlap(("7",), False)
        pipeline.on_frame("new", frame, 3)  # outside an overlap nothing is dropped
        await pipeline.close()

    asyncio.run(main())
    con = recorder.connect(tmp_path)
    assert con.execute("SELECT count(*) FROM contract_info").fetchall() == [(2,)]
    reasons = con.execute("SELECT connection, reason FROM quarantine").fetchall()
    assert reasons == [("new", "duplicate: the same contract and timestamp came on two streams")]
    assert flatten(frame).contract == "7"


def test_contracts_view_holds_the_static_fields_of_each_kind(
    simulator: Any, tmp_path: Path
) -> None:
    """One contract of each kind: every static field the server sent, in its snake_case column."""
    sim = simulator(contracts=30, rate=100)
    kinds = {}
    for contract in sim.contracts:
        kinds.setdefault(contract.market, contract)
    assert set(kinds) == {"IMEFutures", "IMEOption", "IMEDepositCertificate"}
    config = make_config(sim, tmp_path, [c.id for c in kinds.values()])
    record_until(config, lambda r: r.pipeline.stats.frames >= 10)
    con = recorder.connect(tmp_path)
    today = con.execute("SELECT max(date) FROM contracts").fetchall()[0][0]
    for market, contract in kinds.items():
        sent = static_info(contract, date.today())
        result = con.execute(
            "SELECT * FROM contracts WHERE contract_id = ? AND date = ?", [contract.id, today]
        )
        names = [d[0] for d in result.description or []]
        (row,) = result.fetchall()
        got = dict(zip(names, row, strict=True))
        assert got["market"] == market
        assert got["extra"] is None
        mapping = {
            "contractId": "contract_id", "contractName": "contract_name", "title": "title",
            "csize": "csize", "ExpirationDate": "expiration_date", "strikePrice": "strike_price",
            "optionType": "option_type", "initialMargin": "initial_margin",
            "minPriceChangeRate": "min_price_change_rate", "StorageCost": "storage_cost",
            "buyCommission": "buy_commission", "canBuy": "can_buy", "dataClass": "data_class",
            "UnderlyingAssets_title": "underlying_title", "requiredMargin": "required_margin",
        }  # fmt: skip
        for field, column in mapping.items():
            if field not in sent:
                assert got[column] is None, (market, column)
            elif field == "ExpirationDate":
                assert got[column].isoformat() == sent[field]
            else:
                assert got[column] == sent[field], (market, column)


def test_every_contract_has_a_snapshot_after_a_reconnect(simulator: Any, tmp_path: Path) -> None:
    """After a reconnect each subscribed contract gets a snapshot row, even a quiet one."""
    sim = simulator(contracts=8, rate=20)
    closed: list[bool] = []

    def close_once(rec: Any) -> None:
        if not closed and rec.pipeline.stats.snapshots >= 8:
            closed.append(True)
            sim.close_all(1011, "redis stream interrupted")

    config = make_config(sim, tmp_path, feed={"snapshot_on_connect": True})
    rec = record_until(
        config,
        lambda r: bool(closed) and r.pipeline.stats.snapshots >= 16,
        during=close_once,
    )
    assert rec.pipeline.stats.snapshots == 16
    con = recorder.connect(tmp_path)
    second_open = con.execute(
        "SELECT opened_at FROM sessions WHERE reason IS DISTINCT FROM 'snapshot' "
        "ORDER BY opened_at LIMIT 1 OFFSET 1"
    ).fetchall()[0][0]
    after = con.execute(
        "SELECT contract, count(*) FROM aggregate WHERE source = 'snapshot' AND received_at >= ? "
        "GROUP BY 1 ORDER BY 1",
        [second_open],
    ).fetchall()
    assert after == [(c.id, 1) for c in sim.contracts]


def test_replay_keeps_snapshots_unless_asked_otherwise(simulator: Any, tmp_path: Path) -> None:
    """Store.replay gives snapshots as ordinary messages; snapshots=False gives the stream only."""
    sim = simulator(contracts=3, rate=0, max_messages=30, keep_sent=True)
    config = make_config(sim, tmp_path, feed={"snapshot_on_connect": True})
    record_until(
        config, lambda r: r.pipeline.stats.frames == 30 and r.pipeline.stats.snapshots == 3
    )
    store = recorder.Store(tmp_path)
    everything = list(store.replay())
    stream_only = list(store.replay(snapshots=False))
    assert len(everything) == 33
    assert len(stream_only) == 30
    sent = sorted(orjson.loads(f.text)["timestamp"] for f in sim.sent)
    assert sorted(m["timestamp"] for m in stream_only) == sent


def test_readme_contracts_query_runs(simulator: Any, tmp_path: Path) -> None:
    """The README's aggregate-contracts join runs and, without its expiry filter, finds rows."""
    import re

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    sql = next(b for b in re.findall(r"```sql\n(.*?)```", readme, re.S) if "JOIN contracts" in b)
    sim = simulator(contracts=6, rate=0, max_messages=60)
    record_until(make_config(sim, tmp_path), lambda r: r.pipeline.stats.frames == 60)
    con = recorder.connect(tmp_path)
    con.execute(sql).fetchall()
    unfiltered = sql.replace(
        "AND c.expiration_date <", "AND c.expiration_date IS NOT NULL OR c.expiration_date <"
    )
    rows = con.execute(unfiltered).fetchall()
    futures = {c.name for c in sim.contracts if c.market == "IMEFutures"}
    assert {r[1] for r in rows} == futures
