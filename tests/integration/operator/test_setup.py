"""`crm-erp-sync setup` (idempotent) prints sentences by default and, with --json, the JSON
line scripts parse, byte for byte as before."""

from __future__ import annotations

from tests.conftest import SyncEnv
from tests.integration.conftest import Cli


def test_setup_prints_text_by_default_and_the_same_json_with_json(sync_env: SyncEnv,
                                                                  cli: Cli) -> None:
    settings = sync_env.settings  # set up already by the fixture: everything exists
    said = cli(settings, "setup")
    assert said.code == 0, said.err
    assert said.out.splitlines() == [
        "topics: all existed already",
        f"CRM: publication {settings.publication_name} and schema crm_erp_sync in place "
        f"(the producer creates its slot {settings.slot_name} when it first starts)",
        "ERP: schema sync in place"]
    parsed = cli(settings, "setup", "--json")
    assert parsed.code == 0, parsed.err
    assert parsed.out == '{"topics_created": [], "demo_crm_schema_created": false}\n'
