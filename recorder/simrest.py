"""The simulator's REST endpoints: static info, search and live overview, shaped as the real ones.

Answers have a ``Data`` part and a ``Status`` part (as the official ``hedgetech`` client
documents them); an unknown identifier is ``None`` in ``Data``; errors carry ``detail``. The
same tokens as the streams are required.
"""

from __future__ import annotations

import time
from datetime import UTC, date, datetime
from typing import TYPE_CHECKING, Any

from aiohttp import web

from recorder.simcontracts import Contract

if TYPE_CHECKING:
    from recorder.simulator import Simulator

STATIC = "/data-engine/ime/static/data/contract"
OVERVIEW = "/data-engine/ime/live/data/overview/contract"
_TITLES = {
    "IMEFutures": "آتی",
    "IMEOption": "اختیار معامله",
    "IMEDepositCertificate": "گواهی سپرده",
}


def static_info(contract: Contract, today: date) -> dict[str, Any]:
    """The static-info item of a contract, with the fields of its instrument kind."""
    item: dict[str, Any] = {
        "contractId": contract.id,
        "title": f"{_TITLES[contract.market]} {contract.commodity} {contract.name}",
        "contractName": contract.name,
        "minPriceChangeRate": float(contract.tick_size),
        "maxPriceChangeRate": contract.price_limit,
        "owner": "IME",
        "buyCommission": 0.0012,
        "sellCommission": 0.0012,
        "canBuy": True,
        "canSell": True,
        "minValidBuyVolume": 1,
        "maxValidBuyVolume": 1000,
        "minValidSellVolume": 1,
        "maxValidSellVolume": 1000,
        "minDealablePrice": float(contract.base_price // 2),
        "minDealableCount": 1,
    }
    if contract.market == "IMEDepositCertificate":
        item["StorageCost"] = 350.0
        item["dataClass"] = "IME_Certificate_v2"
        return item
    item |= {
        "initialMargin": 0.12,
        "maintenanceMargin": 0.09,
        "ExpirationDate": contract.expiration_date.isoformat(),
        "DaysToExpiration": (contract.expiration_date - today).days,
        "csize": contract.csize,
        "ExerciseFeePhysical": 50000.0,
        "ExerciseFeeCash": 25000.0,
        "ExerciseSellTax": 0.005,
        "UnderlyingAssets_symbolIsin_or_contractId": f"IR{contract.commodity}0001",
        "UnderlyingAssets_title": contract.commodity,
        "UnderlyingAssets_symbolName_or_contractName": contract.commodity,
    }
    if contract.market == "IMEOption":
        item |= {
            "optionType": contract.option_type,
            "strikePrice": float(contract.strike_price or 0),
            "requiredMargin": 0.15,
            "dataClass": "option_v2",
        }
    else:
        item["dataClass"] = "IME_Futures_v2"
    return item


def _status(ok: bool = True, code: int = 200) -> dict[str, Any]:
    text = "Operation successful" if ok else "Request failed"
    return {
        "State": ok,
        "ServerTimeStamp": time.time(),
        "Version": "sim-1",
        "Author": "ime-recorder simulator",
        "Description": {"fa": "موفق" if ok else "ناموفق", "en": text},
        "StatusCode": code,
    }


class RestEndpoints:
    """Request handlers bound to one simulator."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim

    def register(self, app: web.Application) -> None:
        app.router.add_get(f"{STATIC}/search", self.search)
        app.router.add_get(STATIC + "/{endpoint:id|name}", self.static)
        app.router.add_get(OVERVIEW + "/{endpoint:id|name}", self.overview)

    def _refused(self, request: web.Request) -> web.Response | None:
        refusal = self.sim.token_refusal(request)
        if refusal is None:
            return None
        self.sim.count_refusal(refusal)
        return web.json_response({"detail": refusal}, status=401)

    def _today(self) -> date:
        return self.sim.exchange_now().astimezone(UTC).date()

    async def search(self, request: web.Request) -> web.Response:
        if (refused := self._refused(request)) is not None:
            return refused
        market = request.query.get("market")
        fragment = request.query.get("Search_char")
        if market not in ("IMEDepositCertificate", "IMEFutures", "IMEOption") or fragment is None:
            detail = "market (IMEDepositCertificate, IMEFutures, IMEOption) and Search_char needed"
            return web.json_response({"detail": detail}, status=422)
        today = self._today()
        found = [
            static_info(c, today)
            for c in self.sim.contracts
            if c.market == market
            and fragment.casefold() in c.name.casefold()
            and c.id not in self.sim.delisted
        ]
        return web.json_response({"Data": found, "Status": _status()})

    def _identifiers(self, request: web.Request) -> tuple[str, list[str]] | web.Response:
        endpoint = request.match_info["endpoint"]
        idents = request.query.getall("contract_ids" if endpoint == "id" else "contract_names", [])
        if not idents:
            return web.json_response({"detail": "no contract given"}, status=422)
        return endpoint, idents

    async def static(self, request: web.Request) -> web.Response:
        if (refused := self._refused(request)) is not None:
            return refused
        parsed = self._identifiers(request)
        if isinstance(parsed, web.Response):
            return parsed
        endpoint, idents = parsed
        today = self._today()
        data = [
            static_info(c, today) if (c := self.sim.lookup(endpoint, i)) is not None else None
            for i in idents
        ]
        return web.json_response({"Data": data, "Status": _status()})

    async def overview(self, request: web.Request) -> web.Response:
        if (refused := self._refused(request)) is not None:
            return refused
        parsed = self._identifiers(request)
        if isinstance(parsed, web.Response):
            return parsed
        endpoint, idents = parsed
        today, now = self._today(), self.sim.exchange_now()
        data: dict[str, Any] = {}
        for ident in idents:
            contract = self.sim.lookup(endpoint, ident)
            data[ident] = (
                None
                if contract is None
                else static_info(contract, today) | self.sim.current_state(contract, now)
            )
        status = _status()
        status["ServerTimeStamp"] = now.timestamp()
        return web.json_response({"Data": data, "Status": status})


def exchange_clock_now(clock: Any) -> datetime:
    """The simulator clock's time, always timezone-aware (UTC)."""
    now: datetime = clock()
    return now if now.tzinfo is not None else now.replace(tzinfo=UTC)
