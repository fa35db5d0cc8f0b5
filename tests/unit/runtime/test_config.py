"""Configuration: validated at start-up with errors that name the variable; an optional TOML
file (CRM_ERP_SYNC_CONFIG_FILE) under the environment; `crm-erp-sync config` hides secrets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from service.errors import ConfigError
from service.settings import CONFIG_FILE_VAR, Settings, unknown_env_vars

REPO = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize(("variable", "raw", "says"), [
    ("CRM_ERP_SYNC_TOPIC_PARTITIONS", "six", "expected int"),
    ("CRM_ERP_SYNC_TOPIC_PARTITIONS", "0", "at least 1"),
    ("CRM_ERP_SYNC_BATCH_MAX_WAIT_MS", "-5", "must not be negative"),
    ("CRM_ERP_SYNC_SHUTDOWN_TIMEOUT_S", "0", "positive number of seconds"),
    ("CRM_ERP_SYNC_SHUTDOWN_TIMEOUT_S", "nan", "positive number of seconds"),
    ("CRM_ERP_SYNC_HEARTBEAT_INTERVAL_S", "soon", "expected float"),
    ("CRM_ERP_SYNC_HTTP_PORT", "70000", "TCP port"),
    ("CRM_ERP_SYNC_LOG_LEVEL", "chatty", "one of debug"),
    ("CRM_ERP_SYNC_LOG_FORMAT", "xml", "'json' or 'console'"),
    ("CRM_ERP_SYNC_KAFKA_SECURITY_PROTOCOL", "TLS", "one of PLAINTEXT"),
    ("CRM_ERP_SYNC_KAFKA_BOOTSTRAP", "kafka", "host:port"),
    ("CRM_ERP_SYNC_KAFKA_BOOTSTRAP", "kafka:9092,kafka-2:port", "host:port"),
    ("CRM_ERP_SYNC_SALES_TOPIC", "crm sales", "topic name"),
    ("CRM_ERP_SYNC_SLOT_NAME", "Crm-Slot", "lower-case"),
    ("CRM_ERP_SYNC_CRM_DSN", "host=db dbname=crm", "postgresql:// URL"),
    ("CRM_ERP_SYNC_BREAKER_MAX_RATIO", "0", "above 0"),
    ("CRM_ERP_SYNC_BREAKER_MIN_MESSAGES", "0", "at least 1"),
    ("CRM_ERP_SYNC_BREAKER_WINDOW_S", "-60", "positive number of seconds"),
    ("CRM_ERP_SYNC_BREAKER_POLL_S", "0", "positive number of seconds"),
])
def test_a_bad_value_is_refused_naming_its_variable(variable: str, raw: str, says: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({variable: raw})
    assert caught.value.variable.startswith(variable)
    assert says in str(caught.value)


def test_sasl_needs_a_sasl_protocol() -> None:
    with pytest.raises(ConfigError, match="CRM_ERP_SYNC_KAFKA_SASL_MECHANISM"):
        Settings.from_env({"CRM_ERP_SYNC_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512"})
    ok = Settings.from_env({"CRM_ERP_SYNC_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
                            "CRM_ERP_SYNC_KAFKA_SECURITY_PROTOCOL": "SASL_SSL"})
    assert ok.kafka_security_protocol == "SASL_SSL"


def test_the_config_file_sets_values_and_the_environment_wins(tmp_path: Path) -> None:
    path = tmp_path / "sync.toml"
    path.write_text('kafka_bootstrap = "kafka-0.kafka:9092,kafka-1.kafka:9092"\n'
                    "topic_partitions = 12\nshutdown_timeout_s = 45\nhttp_port = 8080\n"
                    'consumer_group = "from-file"\n')
    settings = Settings.from_env({CONFIG_FILE_VAR: str(path),
                                  "CRM_ERP_SYNC_CONSUMER_GROUP": "from-env"})
    assert settings.kafka_bootstrap == "kafka-0.kafka:9092,kafka-1.kafka:9092"
    assert settings.topic_partitions == 12 and settings.http_port == 8080
    assert settings.shutdown_timeout_s == 45.0 and type(settings.shutdown_timeout_s) is float
    assert settings.consumer_group == "from-env"


@pytest.mark.parametrize(("content", "says"), [
    ("topic_partitions = 0\n", "CRM_ERP_SYNC_TOPIC_PARTITIONS"),
    ('topic_partitions = "many"\n', "key 'topic_partitions' in"),
    ("no_such_setting = 1\n", "unknown setting 'no_such_setting'"),
    ("topic_partitions = [1, 2]\n", "expected a string or a number"),
    ("topic_partitions = \n", "not valid TOML"),
])
def test_a_bad_config_file_is_refused_naming_the_key(tmp_path: Path, content: str,
                                                     says: str) -> None:
    path = tmp_path / "sync.toml"
    path.write_text(content)
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({CONFIG_FILE_VAR: str(path)})
    assert says in str(caught.value)


def test_a_missing_config_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=CONFIG_FILE_VAR):
        Settings.from_env({CONFIG_FILE_VAR: str(tmp_path / "nope.toml")})


def cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CRM_ERP_SYNC_")}
    return subprocess.run([sys.executable, "-m", "service.cli", *args], cwd=REPO,
                          env={**clean, **env}, capture_output=True, text=True, timeout=60,
                          check=False)


def test_config_command_hides_every_secret(tmp_path: Path) -> None:
    path = tmp_path / "sync.toml"
    path.write_text('erp_dsn = "postgresql://erp_writer:file-secret-7@erp-db:5432/erp"\n'
                    'topic_partitions = 9\n')
    (tmp_path / "ca.pem").write_text("a CA")  # verify-full needs one that exists
    done = cli("config", "--json", CRM_ERP_SYNC_CONFIG_FILE=str(path),
               CRM_ERP_SYNC_CRM_DSN="postgresql://crm_reader:env-secret-3@crm-db/crm"
                                    f"?sslmode=verify-full&sslrootcert={tmp_path}/ca.pem"
                                    "&password=query-secret-5",
               CRM_ERP_SYNC_KAFKA_SECURITY_PROTOCOL="SASL_SSL",
               CRM_ERP_SYNC_KAFKA_SASL_MECHANISM="SCRAM-SHA-512",
               CRM_ERP_SYNC_KAFKA_SASL_USERNAME="sync",
               CRM_ERP_SYNC_KAFKA_SASL_PASSWORD="sasl-secret-9")
    assert done.returncode == 0, done.stderr
    for secret in ("file-secret-7", "env-secret-3", "query-secret-5", "sasl-secret-9"):
        assert secret not in done.stdout + done.stderr
    shown = json.loads(done.stdout)
    assert shown["CRM_ERP_SYNC_ERP_DSN"] == "postgresql://erp_writer:***@erp-db:5432/erp"
    assert shown["CRM_ERP_SYNC_CRM_DSN"].startswith("postgresql://crm_reader:***@crm-db/crm")
    assert shown["CRM_ERP_SYNC_KAFKA_SASL_PASSWORD"] == "***"
    assert shown["CRM_ERP_SYNC_KAFKA_SASL_USERNAME"] == "sync"
    assert shown["CRM_ERP_SYNC_TOPIC_PARTITIONS"] == "9"  # from the file
    assert set(shown) == {Settings.env_var(f) for f in Settings.__dataclass_fields__}
    table = cli("config", CRM_ERP_SYNC_KAFKA_SASL_PASSWORD="sasl-secret-9")
    assert table.returncode == 0 and "sasl-secret-9" not in table.stdout


def test_a_configuration_error_exits_2_naming_the_variable() -> None:
    done = cli("config", CRM_ERP_SYNC_HTTP_PORT="eighty")
    assert done.returncode == 2
    assert "CRM_ERP_SYNC_HTTP_PORT" in done.stderr and "eighty" in done.stderr
    assert cli("consume", CRM_ERP_SYNC_SHUTDOWN_TIMEOUT_S="-1").returncode == 2


def test_unknown_variables_are_named_with_the_closest_valid_one() -> None:
    env = {"CRM_ERP_SYNC_BREAKER_MIN_MESAGES": "5", "CRM_ERP_SYNC_ERP_DSN": "postgresql://x/y",
           "CRM_ERP_SYNC_CONFIG_FILE": "f.toml", "CRM_ERP_SYNC_ZZZ": "1", "OTHER": "1"}
    assert unknown_env_vars(env) == [
        ("CRM_ERP_SYNC_BREAKER_MIN_MESAGES", "CRM_ERP_SYNC_BREAKER_MIN_MESSAGES"),
        ("CRM_ERP_SYNC_ZZZ", None)]


def test_an_unknown_variable_is_warned_about_at_start_up() -> None:
    done = cli("config", CRM_ERP_SYNC_BATCH_MAX_EVENT="10")
    assert done.returncode == 0
    warning = next(json.loads(line) for line in done.stderr.splitlines()
                   if "unknown_setting_ignored" in line)
    assert warning["variable"] == "CRM_ERP_SYNC_BATCH_MAX_EVENT"
    assert warning["did_you_mean"] == "CRM_ERP_SYNC_BATCH_MAX_EVENTS"
