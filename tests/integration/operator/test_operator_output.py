"""What operator commands print (newcomer8 N11): `reconcile` says how many keys its --limit
left out of each list."""

from __future__ import annotations

from tests.conftest import SyncEnv
from tests.helpers import wait_until
from tests.integration.conftest import Cli, Running, caught_up


def test_reconcile_says_how_many_keys_each_list_left_out(
        sync_env: SyncEnv, cli: Cli, running: Running) -> None:
    settings = sync_env.settings
    with sync_env.crm() as crm:
        for i in range(3):
            crm.execute("INSERT INTO crm.customers (family_name, given_name, phone) VALUES "
                        "('张', %s, '13812345678')", (f"好{i}",))
            crm.execute("INSERT INTO crm.customers (family_name, given_name, phone) VALUES "
                        "('李', %s, '138xxxx5678')", (f"坏{i}",))
    running.start_producer(settings)
    running.start_consumer(settings)
    caught_up(sync_env)
    with sync_env.erp() as erp:
        wait_until(lambda: erp.execute(
            "SELECT count(*) FROM sync.dead_letters WHERE state = 'open'").fetchone()[0] == 3
            and erp.execute("SELECT count(*) FROM erp.business_partners").fetchone()[0] == 3,
            timeout=60, message="3 customers applied, 3 dead-lettered")
        erp.execute("UPDATE erp.business_partners SET full_name = full_name || '改'")

    cut = cli(settings, "reconcile", "--entity", "customers", "--limit", "2")
    assert cut.code == 1, cut.out
    lines = cut.out.splitlines()
    assert sum(" differs in: " in x for x in lines) == 2, cut.out
    assert sum(" cannot be mapped: " in x for x in lines) == 2, cut.out
    assert ("customers … and 1 more differing key(s) not listed (--limit 0 shows all)"
            in lines), cut.out
    assert ("customers … and 1 more unmappable key(s) not listed (--limit 0 shows all)"
            in lines), cut.out
    full = cli(settings, "reconcile", "--entity", "customers", "--limit", "0")
    assert full.code == 1 and "more" not in full.out, full.out
    assert sum(" differs in: " in x for x in full.out.splitlines()) == 3
