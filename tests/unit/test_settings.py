"""service.settings: frozen Settings, CRM_ERP_SYNC_<FIELD> environment, hidden secrets."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

import service.settings
from service.errors import ConfigError
from service.settings import Settings, hide_secret


def fresh_settings_module(monkeypatch: pytest.MonkeyPatch, **stack_env: str) -> ModuleType:
    """service/settings.py imported anew (its port defaults are read at import time)."""
    for var in ("STACK_KAFKA_PORT", "STACK_PG_PORT"):
        monkeypatch.delenv(var, raising=False)
    for var, value in stack_env.items():
        monkeypatch.setenv(var, value)
    name = "_fresh_service_settings"
    spec = importlib.util.spec_from_file_location(name, service.settings.__file__)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module


def test_defaults_point_at_the_local_stack(monkeypatch: pytest.MonkeyPatch) -> None:
    defaults = fresh_settings_module(monkeypatch).Settings()
    assert defaults.kafka_bootstrap == "127.0.0.1:19092"
    assert defaults.crm_dsn == "postgresql://sync:sync@127.0.0.1:15432/crm"
    assert defaults.erp_dsn == "postgresql://sync:sync@127.0.0.1:15432/erp"
    assert defaults.kafka_security_protocol == "PLAINTEXT"
    assert (defaults.sales_topic, defaults.market_topic, defaults.dlq_topic) == (
        "crm.sales", "crm.market-demand", "crm-erp-sync.dlq")
    assert defaults.schemas_dir.is_dir()
    assert (defaults.schemas_dir / "customer" / "v1.avsc").is_file()
    defaults.validate()


def test_stack_ports_move_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    moved = fresh_settings_module(
        monkeypatch, STACK_KAFKA_PORT="29092", STACK_PG_PORT="25432").Settings()
    assert moved.kafka_bootstrap == "127.0.0.1:29092"
    assert moved.crm_dsn.endswith("@127.0.0.1:25432/crm")


def test_empty_environment_gives_the_defaults() -> None:
    assert Settings.from_env({}) == Settings()


def test_env_var_names() -> None:
    assert Settings.env_var("kafka_bootstrap") == "CRM_ERP_SYNC_KAFKA_BOOTSTRAP"
    assert Settings.env_var("crm_dsn") == "CRM_ERP_SYNC_CRM_DSN"


def test_env_overrides_each_type() -> None:
    settings = Settings.from_env({
        "CRM_ERP_SYNC_KAFKA_BOOTSTRAP": "broker-1:9092,broker-2:9092",
        "CRM_ERP_SYNC_TOPIC_PARTITIONS": "12",
        "CRM_ERP_SYNC_HEARTBEAT_INTERVAL_S": "2.5",
        "CRM_ERP_SYNC_ORPHAN_HOLD_S": "60",
        "CRM_ERP_SYNC_SCHEMAS_DIR": "/srv/schemas",
        "CRM_ERP_SYNC_LOG_FORMAT": "console",
        "UNRELATED_TOPIC_PARTITIONS": "99",
    })
    assert settings.kafka_bootstrap == "broker-1:9092,broker-2:9092"
    assert settings.topic_partitions == 12 and type(settings.topic_partitions) is int
    assert settings.heartbeat_interval_s == 2.5
    assert settings.orphan_hold_s == 60.0 and type(settings.orphan_hold_s) is float
    assert settings.schemas_dir == Path("/srv/schemas")
    assert isinstance(settings.schemas_dir, Path)
    assert settings.log_format == "console"
    assert settings.topic_replication == Settings().topic_replication  # untouched


def test_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRM_ERP_SYNC_SALES_TOPIC", "crm.sales.test")
    assert Settings.from_env().sales_topic == "crm.sales.test"


@pytest.mark.parametrize(("variable", "raw"), [
    ("CRM_ERP_SYNC_TOPIC_PARTITIONS", "six"),
    ("CRM_ERP_SYNC_BATCH_MAX_EVENTS", "1.5"),
    ("CRM_ERP_SYNC_HTTP_PORT", ""),
    ("CRM_ERP_SYNC_HEARTBEAT_INTERVAL_S", "ten"),
])
def test_malformed_number_names_the_variable(variable: str, raw: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({variable: raw})
    assert info.value.variable == variable
    assert str(info.value).startswith(f"{variable}: ")
    assert repr(raw) in str(info.value)


@pytest.mark.parametrize(("variable", "raw"), [
    ("CRM_ERP_SYNC_TOPIC_PARTITIONS", "0"),
    ("CRM_ERP_SYNC_BATCH_MAX_EVENTS", "-1"),
    ("CRM_ERP_SYNC_LOG_FORMAT", "xml"),
    ("CRM_ERP_SYNC_CRM_DSN", "mysql://sync:sync@db/crm"),
    ("CRM_ERP_SYNC_ERP_DSN", "host=db dbname=erp"),
])
def test_invalid_value_names_the_variable(variable: str, raw: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({variable: raw})
    assert info.value.variable == variable


def test_every_invalid_setting_is_named_in_one_go(tmp_path: Path) -> None:
    from service.settings import CONFIG_FILE_VAR

    cfg = tmp_path / "sync.toml"
    cfg.write_text('log_format = "xml"\nbatch_max_event = 10\nhttp_port = "eighty"\n',
                   "utf-8")
    with pytest.raises(ConfigError) as info:
        Settings.from_env({CONFIG_FILE_VAR: str(cfg), "CRM_ERP_SYNC_TOPIC_PARTITIONS": "six",
                           "CRM_ERP_SYNC_ON_TRUNCATE": "ignore",
                           "CRM_ERP_SYNC_MAPPINGS_FILE": "/nonexistent"})
    named = [where for where, _ in info.value.problems]
    assert sorted(named) == sorted([
        CONFIG_FILE_VAR, "CRM_ERP_SYNC_TOPIC_PARTITIONS",
        f"CRM_ERP_SYNC_HTTP_PORT (key 'http_port' in {cfg})",
        "CRM_ERP_SYNC_ON_TRUNCATE", "CRM_ERP_SYNC_MAPPINGS_FILE",
        f"CRM_ERP_SYNC_LOG_FORMAT (key 'log_format' in {cfg})"])
    assert "unknown setting 'batch_max_event'" in str(info.value)
    assert str(info.value).splitlines() == [f"{w}: {p}" for w, p in info.value.problems]


def test_a_bad_value_from_the_config_file_names_its_key_and_file(tmp_path: Path) -> None:
    # newcomer9 F4: a value error from the file was named as an environment variable that
    # was not set; only type errors named the key and the file.
    from service.settings import CONFIG_FILE_VAR

    cfg = tmp_path / "bad5.toml"
    cfg.write_text('batch_max_events = -5\nkafka_bootstrap = "19092"\n'
                   'breaker_max_ratio = -1\napply_window = "9-5"\n', "utf-8")
    with pytest.raises(ConfigError) as info:
        Settings.from_env({CONFIG_FILE_VAR: str(cfg), "CRM_ERP_SYNC_TOPIC_PARTITIONS": "0"})
    named = {where for where, _ in info.value.problems}
    assert named == {f"CRM_ERP_SYNC_{key.upper()} (key {key!r} in {cfg})"
                     for key in ("batch_max_events", "kafka_bootstrap", "breaker_max_ratio",
                                 "apply_window")} | {"CRM_ERP_SYNC_TOPIC_PARTITIONS"}
    assert (f"CRM_ERP_SYNC_BATCH_MAX_EVENTS (key 'batch_max_events' in {cfg}): must be at "
            "least 1") in str(info.value).splitlines()


def test_validate_names_every_invalid_setting() -> None:
    with pytest.raises(ConfigError) as info:
        Settings(log_format="xml", erp_target="odoo").validate()
    assert [where for where, _ in info.value.problems] == [
        "CRM_ERP_SYNC_LOG_FORMAT", "CRM_ERP_SYNC_ERP_TARGET"]


def test_settings_are_frozen() -> None:
    settings = Settings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.kafka_bootstrap = "elsewhere:9092"  # type: ignore[misc]


SECRET_ENV = {
    "CRM_ERP_SYNC_CRM_DSN": "postgresql://sync:s3cr3t-crm@db.internal:5432/crm",
    "CRM_ERP_SYNC_ERP_DSN": "postgres://erp_writer:p4ss:word/x@erp.internal/erp",
    "CRM_ERP_SYNC_KAFKA_SASL_USERNAME": "sync-user",
    "CRM_ERP_SYNC_KAFKA_SASL_PASSWORD": "hunter2-sasl",
}


def test_redacted_hides_passwords_and_keeps_the_rest() -> None:
    shown = Settings.from_env(SECRET_ENV).redacted()
    assert shown["CRM_ERP_SYNC_CRM_DSN"] == "postgresql://sync:***@db.internal:5432/crm"
    assert shown["CRM_ERP_SYNC_ERP_DSN"] == "postgres://erp_writer:***@erp.internal/erp"
    assert shown["CRM_ERP_SYNC_KAFKA_SASL_PASSWORD"] == "***"
    assert shown["CRM_ERP_SYNC_KAFKA_SASL_USERNAME"] == "sync-user"
    assert shown["CRM_ERP_SYNC_TOPIC_PARTITIONS"] == "6"
    # Every field is listed, keyed by its environment variable.
    assert set(shown) == {Settings.env_var(f.name) for f in dataclasses.fields(Settings)}
    text = repr(shown)
    for secret in ("s3cr3t-crm", "p4ss", "word/x", "hunter2-sasl"):
        assert secret not in text


def test_a_password_in_the_tryton_url_is_hidden_and_the_rest_shown() -> None:
    # newcomer9 F9: `config` printed CRM_ERP_SYNC_TRYTON_URL's password in clear
    shown = Settings.from_env({"CRM_ERP_SYNC_TRYTON_URL": "http://admin:UPASSzz@127.0.0.1:8000"}
                              ).redacted()
    assert shown["CRM_ERP_SYNC_TRYTON_URL"] == "http://admin:***@127.0.0.1:8000"
    assert Settings().redacted()["CRM_ERP_SYNC_TRYTON_URL"] == "http://127.0.0.1:8000"


def test_default_dsns_are_shown_without_password() -> None:
    shown = Settings().redacted()
    assert shown["CRM_ERP_SYNC_CRM_DSN"].startswith("postgresql://sync:***@127.0.0.1:")
    assert shown["CRM_ERP_SYNC_KAFKA_SASL_PASSWORD"] == ""  # nothing to hide, nothing shown


def test_repr_and_str_do_not_contain_passwords() -> None:
    settings = Settings.from_env(SECRET_ENV)
    for text in (repr(settings), str(settings), f"{settings}", repr([settings])):
        assert "s3cr3t-crm" not in text
        assert "hunter2-sasl" not in text
        assert "p4ss" not in text
        assert "db.internal" in text  # the rest is still readable


def test_hide_secret() -> None:
    assert hide_secret("") == ""
    assert hide_secret("plain-token") == "***"
    assert hide_secret("postgresql://u:pw@h:1/d") == "postgresql://u:***@h:1/d"
    assert hide_secret("postgresql://u@h:1/d") == "postgresql://u@h:1/d"
    # newcomer10: an empty user name, and "@"/":" unescaped in the password
    assert hide_secret("http://:onlypw@127.0.0.1:8000") == "http://:***@127.0.0.1:8000"
    assert hide_secret("http://admin:p@ss:w@rd@127.0.0.1:8000") == \
        "http://admin:***@127.0.0.1:8000"
    # inside a longer text (a log message): every URL's password, the rest kept
    assert hide_secret("from postgresql://u:pw@h/d to http://a:b@c:1 now") == \
        "from postgresql://u:***@h/d to http://a:***@c:1 now"


def test_redacted_hides_a_password_given_as_query_parameter() -> None:
    dsn = "postgresql://sync@db.internal:5432/crm?sslmode=require&password=s3cr3t-q"
    settings = Settings.from_env({"CRM_ERP_SYNC_CRM_DSN": dsn})
    assert "s3cr3t-q" not in settings.redacted()["CRM_ERP_SYNC_CRM_DSN"]
    assert "s3cr3t-q" not in repr(settings)


def test_origins_say_env_file_or_default(tmp_path: Path) -> None:
    from service.settings import CONFIG_FILE_VAR, origins

    cfg = tmp_path / "sync.toml"
    cfg.write_text('batch_max_events = "900"\nconsumer_group = "from-file"\n', "utf-8")
    env = {CONFIG_FILE_VAR: str(cfg), "CRM_ERP_SYNC_CONSUMER_GROUP": "from-env"}
    where = origins(env)
    assert where["CRM_ERP_SYNC_CONSUMER_GROUP"] == "env"  # the environment wins
    assert where["CRM_ERP_SYNC_BATCH_MAX_EVENTS"] == f"file {cfg}"
    assert where["CRM_ERP_SYNC_SLOT_NAME"] == "default"
    assert Settings.from_env(env).batch_max_events == 900


def test_erp_target_is_sql_by_default_and_tryton_needs_its_settings() -> None:
    assert Settings.from_env({}).erp_target == "sql"
    env = {"CRM_ERP_SYNC_ERP_TARGET": "tryton", "CRM_ERP_SYNC_TRYTON_PASSWORD": "s3cret"}
    settings = Settings.from_env(env)
    assert (settings.tryton_url, settings.tryton_database, settings.tryton_user) == \
        ("http://127.0.0.1:8000", "tryton", "crm_sync")
    assert settings.redacted()["CRM_ERP_SYNC_TRYTON_PASSWORD"] == "***"
    with pytest.raises(ConfigError, match="CRM_ERP_SYNC_TRYTON_PASSWORD"):
        Settings.from_env({"CRM_ERP_SYNC_ERP_TARGET": "tryton"})
    with pytest.raises(ConfigError, match="CRM_ERP_SYNC_TRYTON_URL"):
        Settings.from_env({**env, "CRM_ERP_SYNC_TRYTON_URL": "127.0.0.1:8000"})
    with pytest.raises(ConfigError, match="CRM_ERP_SYNC_ERP_TARGET"):
        Settings.from_env({"CRM_ERP_SYNC_ERP_TARGET": "odoo"})


# ---- TLS files (newcomer6 F17): refused at start-up, naming the setting --------------------
PG = "postgresql://sync:pw-secret-17@db.example:5432/erp"


def _problems(**env: str) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as refused:
        Settings.from_env(env)
    return list(refused.value.problems)


def test_a_kafka_ca_file_that_does_not_exist_is_refused(tmp_path: Path) -> None:
    ((variable, problem),) = _problems(CRM_ERP_SYNC_KAFKA_SECURITY_PROTOCOL="SSL",
                                       CRM_ERP_SYNC_KAFKA_SSL_CAFILE=str(tmp_path / "ca.pem"))
    assert variable == "CRM_ERP_SYNC_KAFKA_SSL_CAFILE"
    assert f"no such file: {tmp_path / 'ca.pem'}" in problem
    (tmp_path / "ca.pem").write_text("a CA")
    assert Settings.from_env({"CRM_ERP_SYNC_KAFKA_SSL_CAFILE": str(tmp_path / "ca.pem")})


@pytest.mark.parametrize("mode", ["require", "verify-ca", "verify-full"])
def test_a_dsn_naming_a_root_certificate_that_does_not_exist_is_refused(
        tmp_path: Path, mode: str) -> None:
    dsn = f"{PG}?sslmode={mode}&sslrootcert={tmp_path}/nope.pem"
    ((variable, problem),) = _problems(CRM_ERP_SYNC_ERP_DSN=dsn)
    assert variable == "CRM_ERP_SYNC_ERP_DSN"
    assert f"sslrootcert names {tmp_path}/nope.pem, which does not exist" in problem
    assert "pw-secret-17" not in problem


@pytest.mark.parametrize("query", ["sslmode=disable&sslrootcert=/nope.pem",
                                   "sslmode=prefer&sslrootcert=/nope.pem",
                                   "sslmode=verify-full&sslrootcert=system",
                                   "sslmode=require"])
def test_a_dsn_whose_tls_files_libpq_does_not_need_is_accepted(query: str) -> None:
    assert Settings.from_env({"CRM_ERP_SYNC_CRM_DSN": f"{PG}?{query}"})


def test_verify_full_without_sslrootcert_needs_libpqs_default_root_certificate(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("PGSSLROOTCERT", raising=False)
    env = {"CRM_ERP_SYNC_CRM_DSN": f"{PG}?sslmode=verify-full"}
    ((variable, problem),) = _problems(**env)
    assert variable == "CRM_ERP_SYNC_CRM_DSN"
    assert f"{tmp_path}/.postgresql/root.crt does not exist" in problem
    (tmp_path / ".postgresql").mkdir()
    (tmp_path / ".postgresql" / "root.crt").write_text("a CA")
    assert Settings.from_env(env)


def test_readme_configuration_table_lists_the_accepted_log_formats() -> None:
    # F10 (newcomer7): `text` was refused with no list of the values in README.
    readme = (Path(__file__).parents[2] / "README.md").read_text("utf-8")
    row = next((line for line in readme.splitlines()
                if line.startswith("| `CRM_ERP_SYNC_LOG_FORMAT`")), "")
    assert row, "README's Configuration table has no CRM_ERP_SYNC_LOG_FORMAT row"
    assert all(f"`{value}`" in row for value in service.settings.LOG_FORMATS), row


@pytest.mark.parametrize(("variable", "name"), [
    ("CRM_ERP_SYNC_MAPPINGS_FILE", "mappings.toml"),
    ("CRM_ERP_SYNC_SOURCE_PROFILE", "profile.toml"),
])
def test_a_file_setting_naming_a_directory_says_so_and_status_may_run_without_it(
        tmp_path: Path, variable: str, name: str) -> None:
    """newcomer8 N1/N11: a directory at the path (a ConfigMap mounted as one) is "is a
    directory", not "no such file"; with ``files_reported`` (`status`) neither is refused."""
    (tmp_path / name).mkdir()
    with pytest.raises(ConfigError) as err:
        Settings.from_env({variable: str(tmp_path / name)})
    assert list(err.value.problems) == [(variable, f"is a directory: {tmp_path / name}")]
    with pytest.raises(ConfigError) as err:
        Settings.from_env({variable: str(tmp_path / "gone.toml")})
    assert list(err.value.problems) == [(variable, f"no such file: {tmp_path / 'gone.toml'}")]
    for path in (tmp_path / name, tmp_path / "gone.toml"):
        assert Settings.from_env({variable: str(path)}, files_reported=True)


def test_readme_names_every_setting() -> None:
    """newcomer9 nit: HEARTBEAT_INTERVAL_S was printed by `config` and described in DESIGN
    only. Every setting's variable is named in README (the SASL password with its username,
    as `_PASSWORD`), in full or without its prefix (`ORPHAN_HOLD_S`)."""
    readme = (Path(__file__).parents[2] / "README.md").read_text("utf-8")
    unnamed = [f.name for f in dataclasses.fields(Settings)
               if f.name.upper() not in readme and f.name != "kafka_sasl_password"]
    assert unnamed == [], unnamed
    assert "`CRM_ERP_SYNC_KAFKA_SASL_USERNAME` / `_PASSWORD`" in readme
