"""A mapped column retyped in a way the source contract accepts (real broker and databases;
finding N4 of newcomer8): ``ALTER COLUMN ... TYPE ... USING`` rewrites every row's value, and
logical decoding emits no row change for a table rewrite. Nothing may stay wrong silently:
the producer re-snapshots the table (the ERP gets every row's current value), says so in its
log (table and column, never a value), and `status` lists the snapshot while it is pending;
a retype made while the producer was down is found at its next start."""

from __future__ import annotations

from datetime import date
from typing import Any

from service.cdc import capture
from tests.conftest import SyncEnv
from tests.helpers import wait_until
from tests.integration.cdc.test_capture_dead_letters import _insert, _partners
from tests.integration.cdc.test_source_contract import _assert_no_values, watched

OLD, NEW = "北京市海淀区中关村大街1号", "北京市朝阳区中关村大街1号"
RETYPE = ("ALTER TABLE crm.customers ALTER COLUMN notes TYPE varchar(200) "
          "USING replace(notes, '海淀区', '朝阳区')")


def _customers(crm: Any, n: int) -> list[int]:
    return [_insert(crm, "crm.customers", family_name="张", given_name="三", notes=OLD)
            for _ in range(n)]


def _notes(sync_env: SyncEnv, keys: list[int]) -> set[Any]:
    partners = _partners(sync_env)
    return {partners.get(k) for k in keys}


def _retype_snapshots(sync_env: SyncEnv) -> list[dict[str, Any]]:
    with sync_env.crm() as crm:
        return [s for s in capture.list_snapshots(crm)
                if s["reason"] == capture.RETYPE_REASON]


def test_a_rewriting_retype_while_capturing_reaches_the_erp_without_any_other_change(
        sync_env: SyncEnv) -> None:
    """No DML follows the DDL (no Relation message comes): the producer's periodic catalog
    check finds the retype and re-snapshots the table."""
    with watched(sync_env) as (_producer, logs), sync_env.crm() as crm:
        keys = _customers(crm, 3)
        wait_until(lambda: _notes(sync_env, keys) == {OLD}, timeout=60,
                   message="the customers in the ERP with their old notes")
        crm.execute(RETYPE)
        wait_until(lambda: _notes(sync_env, keys) == {NEW}, timeout=120,
                   message="every rewritten value in the ERP")
        [warning] = [e for e in logs if e["event"] == "captured_column_retyped"]
        assert (warning["table"], warning["columns"]) == ("crm.customers", ["notes"])
        [snapshot] = _retype_snapshots(sync_env)
        assert (snapshot["table_name"], snapshot["snapshot_id"]) == (
            "crm.customers", warning["snapshot_id"])
        # the Relation message a later change brings shows the same retype: no second one
        later = _customers(crm, 1)
        wait_until(lambda: _notes(sync_env, later) == {OLD}, timeout=60,
                   message="a later change captured")
        assert len(_retype_snapshots(sync_env)) == 1
    _assert_no_values(logs)
    assert not any(v in str(logs) for v in (OLD, NEW))


def test_a_rewriting_retype_followed_by_a_change_reaches_the_erp(sync_env: SyncEnv) -> None:
    """The DDL then at once a change of the table: the Relation message before it shows the
    retype (whichever of it and the periodic check comes first, one snapshot)."""
    with watched(sync_env) as (_producer, logs), sync_env.crm() as crm:
        keys = _customers(crm, 3)
        wait_until(lambda: _notes(sync_env, keys) == {OLD}, timeout=60,
                   message="the customers in the ERP with their old notes")
        with crm.transaction():
            crm.execute(RETYPE)
            crm.execute("UPDATE crm.customers SET given_name = '四' WHERE customer_id = %s",
                        (keys[0],))
        wait_until(lambda: _notes(sync_env, keys) == {NEW}, timeout=120,
                   message="every rewritten value in the ERP")
        assert len(_retype_snapshots(sync_env)) == 1
    _assert_no_values(logs)


def test_a_retype_while_the_producer_was_down_is_found_at_its_start(sync_env: SyncEnv) -> None:
    with watched(sync_env), sync_env.crm() as crm:
        keys = _customers(crm, 3)
        wait_until(lambda: _notes(sync_env, keys) == {OLD}, timeout=60,
                   message="the customers in the ERP with their old notes")
    with sync_env.crm() as crm:
        crm.execute(RETYPE)
    with watched(sync_env) as (_producer, logs):
        wait_until(lambda: _notes(sync_env, keys) == {NEW}, timeout=120,
                   message="every rewritten value in the ERP after the restart")
        [warning] = [e for e in logs if e["event"] == "captured_column_retyped"]
        assert (warning["table"], warning["columns"]) == ("crm.customers", ["notes"])
    assert len(_retype_snapshots(sync_env)) == 1


def test_a_type_modifier_change_alone_is_a_retype(sync_env: SyncEnv) -> None:
    """varchar(200) -> varchar(300) keeps the type OID: the modifier tells it (here with a
    USING that rewrites the values)."""
    with sync_env.crm() as crm:
        crm.execute("ALTER TABLE crm.customers ALTER COLUMN notes TYPE varchar(200)")
    with watched(sync_env) as (_producer, logs), sync_env.crm() as crm:
        keys = _customers(crm, 2)
        wait_until(lambda: _notes(sync_env, keys) == {OLD}, timeout=60,
                   message="the customers in the ERP with their old notes")
        crm.execute("ALTER TABLE crm.customers ALTER COLUMN notes TYPE varchar(300) "
                    "USING replace(notes, '海淀区', '朝阳区')")
        wait_until(lambda: _notes(sync_env, keys) == {NEW}, timeout=120,
                   message="every rewritten value in the ERP")
        [warning] = [e for e in logs if e["event"] == "captured_column_retyped"]
        assert warning["columns"] == ["notes"]
    assert len(_retype_snapshots(sync_env)) == 1


def _birth_dates(sync_env: SyncEnv, keys: list[int]) -> set[Any]:
    with sync_env.erp() as erp:
        return {r[0] for r in erp.execute(
            "SELECT birth_date FROM erp.business_partners WHERE crm_customer_id = ANY(%s::text[])",
            ([str(k) for k in keys],)).fetchall()}


def _recorded_type(sync_env: SyncEnv, column: str) -> Any:
    with sync_env.crm() as crm:
        row = crm.execute(
            f"SELECT column_types->>%s FROM {capture.CAPTURED_TABLES} WHERE slot_name = %s "
            "AND table_name = 'crm.customers'", (column, sync_env.settings.slot_name)).fetchone()
    return None if row is None else row[0]


def test_a_retype_that_breaks_the_contract_then_a_fix_that_rewrites_again_is_re_snapshot(
        sync_env: SyncEnv) -> None:
    """date -> text (breaks the contract; no change of the table follows, so capture never
    stops), then text -> date USING a conversion that changes the values: the same type as
    captured under, but rewritten twice. The broken shape is recorded, so the fix differs."""
    with watched(sync_env) as (_producer, logs), sync_env.crm() as crm:
        keys = [_insert(crm, "crm.customers", family_name="张", given_name="三",
                        birth_date="1990-01-01") for _ in range(2)]
        wait_until(lambda: _birth_dates(sync_env, keys) == {date(1990, 1, 1)}, timeout=60,
                   message="the customers in the ERP")
        crm.execute("ALTER TABLE crm.customers ALTER COLUMN birth_date TYPE text")
        wait_until(lambda: _recorded_type(sync_env, "birth_date") == "text", timeout=60,
                   message="the broken shape's type recorded")
        assert _retype_snapshots(sync_env) == []  # a snapshot could not read it
        crm.execute("ALTER TABLE crm.customers ALTER COLUMN birth_date TYPE date "
                    "USING (birth_date::date + 1)")
        wait_until(lambda: _birth_dates(sync_env, keys) == {date(1990, 1, 2)}, timeout=120,
                   message="the twice rewritten values in the ERP")
        [warning] = [e for e in logs if e["event"] == "captured_column_retyped"]
        assert warning["columns"] == ["birth_date"]
    assert len(_retype_snapshots(sync_env)) == 1
