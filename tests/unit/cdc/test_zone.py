from datetime import UTC
from zoneinfo import ZoneInfo

import pytest

from service.cdc.zone import zone_named
from service.errors import ConfigError
from service.settings import Settings


@pytest.mark.parametrize("name", ["UTC", "Etc/UTC", "GMT"])
def test_utc_aliases_are_utc(name: str) -> None:
    assert zone_named(name, "X") is UTC


def test_an_iana_name_is_that_zone() -> None:
    assert zone_named("Asia/Shanghai", "X") == ZoneInfo("Asia/Shanghai")


@pytest.mark.parametrize("name", ["<+08>-08", "Mars/Olympus"])
def test_a_zone_python_does_not_know_is_a_config_error_naming_the_setting(name: str) -> None:
    with pytest.raises(ConfigError, match="CRM_ERP_SYNC_CRM_TIMEZONE"):
        zone_named(name, "CRM_ERP_SYNC_CRM_TIMEZONE")


def test_the_setting_is_checked_when_settings_load() -> None:
    with pytest.raises(ConfigError, match="CRM_ERP_SYNC_CRM_TIMEZONE"):
        Settings.from_env({"CRM_ERP_SYNC_CRM_TIMEZONE": "Nowhere/Land"})
    assert Settings.from_env({"CRM_ERP_SYNC_CRM_TIMEZONE": "Asia/Shanghai"}).crm_timezone \
        == "Asia/Shanghai"
