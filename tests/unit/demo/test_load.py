"""service.demo.load's statements for one change (pure): a market-demand insert leaves its
key to the identity unless the loader reserved one (F9: explicitly keyed rows ahead of the
sequence)."""

from __future__ import annotations

from datetime import UTC, datetime

from service.demo.generator import MarketDemand, MarketDemandInsert
from service.demo.load import _statements, _Tally

ROW = MarketDemand("市场趋势", "手机", "5G手机市场增长迅速", datetime(2026, 11, 30, tzinfo=UTC))


def test_a_market_demand_insert_without_a_reserved_key_leaves_it_to_the_identity() -> None:
    tally = _Tally()
    [(query, params)] = _statements(MarketDemandInsert(ROW), tally)
    assert "demand_id" not in str(query) and params == tuple(ROW)
    assert tally.counts["market_demand"] == [1, 0, 0]


def test_a_market_demand_insert_with_a_reserved_key_writes_it() -> None:
    tally = _Tally()
    [(query, params)] = _statements(MarketDemandInsert(ROW, 15), tally)
    assert str(query).startswith("INSERT INTO crm.market_demand (demand_id, kind,")
    assert params == (15, *ROW)
    assert tally.counts["market_demand"] == [1, 0, 0]
