"""`status` when this process's source profile or mappings file is missing or not a file
(newcomer8 N1/N7): it runs and names the setting and the path under NEEDS ATTENTION (exit 1),
exactly when the operator needs it; `produce` and `consume` still refuse to start (exit 2).
And a topic setting that names no topic on the broker (N3)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import SyncEnv
from tests.integration.conftest import Cli


@pytest.mark.parametrize(("setting", "variable", "kind", "reader"), [
    ("mappings_file", "CRM_ERP_SYNC_MAPPINGS_FILE", "mappings file",
     "cannot read the mappings file"),
    ("source_profile", "CRM_ERP_SYNC_SOURCE_PROFILE", "source profile",
     "cannot read the source profile"),
])
def test_status_names_a_missing_or_directory_file_and_workers_refuse_it(
        sync_env: SyncEnv, cli: Cli, tmp_path: Path, setting: str, variable: str, kind: str,
        reader: str) -> None:
    missing = tmp_path / "gone.toml"
    directory = tmp_path / "mounted.toml"
    directory.mkdir()
    for path, why, refused in ((missing, "No such file or directory", "no such file"),
                               (directory, "Is a directory", "is a directory")):
        value = path if setting == "mappings_file" else str(path)
        settings = sync_env.with_(**{setting: value})
        st = cli(settings, "status", "--json")
        assert st.code == 1, (st.code, st.err)
        named = [a for a in st.json["attention"] if variable in a]
        assert named == [f"{kind} invalid ({variable}): {path}: {reader}: {why}; "
                         + ("a consumer would not start (a running one keeps its version)"
                            if setting == "mappings_file" else "a producer would not start")
                         ], st.json["attention"]
        # the rest of the screen is there: the group's lag and the slot
        assert st.json["broker_unreachable"] is None and "lag" in st.json
        text = cli(settings, "status")
        assert text.code == 1 and f"{variable}): {path}" in text.out, text.out
        assert "configuration error" not in text.err
        for command in (["produce"], ["consume", "--until-caught-up"]):
            done = cli(settings, *command)
            assert done.code == 2, (command, done.err)
            assert f"configuration error: {variable}: {refused}: {path}" in done.err, done.err


def test_status_names_topic_settings_that_name_no_topic(sync_env: SyncEnv, cli: Cli) -> None:
    """newcomer8 N3: a typo in a topic setting (or a deleted topic) showed only as a missing
    row; status names each such setting, the topic and `crm-erp-sync setup` (exit 1)."""
    clean = cli(sync_env.settings, "status", "--json")
    assert not any("does not exist on the broker" in a for a in clean.json["attention"])
    typo = sync_env.with_(sales_topic=f"{sync_env.settings.sales_topic}-typo",
                          dlq_topic=f"{sync_env.settings.dlq_topic}-typo")
    st = cli(typo, "status", "--json")
    assert st.code == 1, (st.code, st.err)
    named = [a for a in st.json["attention"] if "does not exist on the broker" in a]
    assert len(named) == 2, st.json["attention"]
    for variable, topic in (("CRM_ERP_SYNC_SALES_TOPIC", typo.sales_topic),
                            ("CRM_ERP_SYNC_DLQ_TOPIC", typo.dlq_topic)):
        [line] = [a for a in named if a.startswith(f"{variable}: topic '{topic}'")]
        assert "crm-erp-sync setup" in line, line
    text = cli(typo, "status")
    assert text.code == 1 and "CRM_ERP_SYNC_SALES_TOPIC: topic" in text.out, text.out
