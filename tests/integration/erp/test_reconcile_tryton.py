"""`reconcile` against Tryton, through the tryton target's read/view/live_keys: no drift after a
clean run; a party changed by hand in Tryton is found. A module of its own: its Tryton
database holds only this test's records, so "no extra record" is checkable."""

from __future__ import annotations

from service.operator.reconcile import reconcile
from tests.integration.erp.conftest import World, load_crm


def test_reconcile_against_tryton_reports_no_drift_then_finds_a_party_changed_by_hand(
        world: World) -> None:
    customers, _ = load_crm(world)
    world.produce()
    world.consume()

    clean = reconcile(world.settings)
    assert [r.entity for r in clean.entities] == ["customers", "orders"]  # no demand in Tryton
    assert clean.drift == 0, [(r.entity, r.missing, r.extra, r.differing, r.unmappable)
                              for r in clean.entities]
    by_name = {r.entity: r for r in clean.entities}
    assert (by_name["customers"].crm_rows, by_name["orders"].crm_rows) == (3, 3)

    party = world.tryton.read_parties([customers[1]])[customers[1]]
    world.rpc.execute("party.party", "write", [party.id], {"name": "李四四"})  # by hand
    drifted = reconcile(world.settings, ["customers"])
    report, = drifted.entities
    assert report.differing == {customers[1]: ["full_name"]}
    assert report.missing == [] and report.extra == []

