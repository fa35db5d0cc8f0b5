"""`snapshot --table NAME`: which entity an operator's name means (newcomer9 nit: a
schema-qualified lines table was reported as 'crm.crm.order_lines')."""

from __future__ import annotations

import pytest

from service.cdc.capture import snapshot_entity_named
from service.cdc.profile import load_profile


def test_entity_table_and_bare_table_names_are_accepted() -> None:
    profile = load_profile("demo")
    for name in ("customer", "crm.customers", "customers"):
        assert snapshot_entity_named(profile, name).entity == "customer"
    assert snapshot_entity_named(profile, "crm.sales_orders").entity == "order"


@pytest.mark.parametrize("name", ["crm.order_lines", "order_lines", "order_line"])
def test_order_lines_are_refused_with_the_way_to_reread_them(name: str) -> None:
    with pytest.raises(ValueError) as err:
        snapshot_entity_named(load_profile("demo"), name)
    text = str(err.value)
    assert f"cannot snapshot {name!r} alone" in text and "--table order --key" in text
    assert "crm.crm." not in text


def test_an_unknown_schema_qualified_name_is_quoted_as_given() -> None:
    with pytest.raises(ValueError) as err:
        snapshot_entity_named(load_profile("demo"), "crm.nosuch")
    assert "cannot snapshot 'crm.nosuch'" in str(err.value)
    assert "crm.crm." not in str(err.value)
