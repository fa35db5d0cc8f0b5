"""status.config_file_problems: the source profile and mappings file read by the loaders the
producer and consumer start with, an invalid one named (setting, file, key), never raised."""

from __future__ import annotations

from pathlib import Path

from service.cdc.profile import PROFILES_DIR
from service.operator.status import config_file_problems
from service.settings import Settings

MAPPINGS = Path(Settings().mappings_file)


def test_the_shipped_files_have_no_problem() -> None:
    assert config_file_problems(Settings()) == []


def test_an_invalid_mappings_file_is_named_with_its_key(tmp_path: Path) -> None:
    bad = tmp_path / "mappings.toml"
    bad.write_text(MAPPINGS.read_text("utf-8").replace('SHIPPED = "issue"',
                                                       'SHIPPED = "ship it"'), "utf-8")
    [problem] = config_file_problems(Settings(mappings_file=bad))
    assert problem.startswith("mappings file invalid (CRM_ERP_SYNC_MAPPINGS_FILE): ")
    assert str(bad) in problem and "status_stock_effect" in problem and "SHIPPED" in problem


def test_an_invalid_profile_is_named_with_its_key(tmp_path: Path) -> None:
    bad = tmp_path / "profile.toml"
    bad.write_text((PROFILES_DIR / "demo.toml").read_text("utf-8") + "\n[invoice]\n", "utf-8")
    not_toml = tmp_path / "mappings.toml"
    not_toml.write_text("[order_status\n", "utf-8")
    problems = config_file_problems(Settings(source_profile=str(bad), mappings_file=not_toml))
    assert len(problems) == 2
    assert problems[0].startswith("source profile invalid (CRM_ERP_SYNC_SOURCE_PROFILE): ")
    assert str(bad) in problems[0] and "invoice" in problems[0]
    assert str(not_toml) in problems[1] and "not valid TOML" in problems[1]


def test_every_mistake_of_a_file_is_its_own_line(tmp_path: Path) -> None:
    bad = tmp_path / "mappings.toml"
    bad.write_text(MAPPINGS.read_text("utf-8").replace('SHIPPED = "issue"', 'SHIPPED = "x"')
                   .replace('default_region = "CN"', 'default_region = "China"'), "utf-8")
    problems = config_file_problems(Settings(mappings_file=bad))
    assert len(problems) == 2
    assert all(p.startswith("mappings file invalid (CRM_ERP_SYNC_MAPPINGS_FILE): ")
               and "\n" not in p for p in problems)
    assert "status_stock_effect.SHIPPED" in problems[0]
    assert "phone.default_region" in problems[1]
