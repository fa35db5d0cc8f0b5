"""One frozen settings object; every field maps to a named environment variable.

Defaults point at the local stack (``make up``), so every command works there with no
configuration. Secrets (passwords, also inside DSNs) are hidden when printed.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from service.errors import ConfigError

ENV_PREFIX = "CRM_ERP_SYNC_"
REPO_ROOT = Path(__file__).resolve().parent.parent

# Local-stack ports; deploy/local/stack.sh reads the same variables.
DEFAULT_KAFKA_PORT = int(os.environ.get("STACK_KAFKA_PORT", "19092"))
DEFAULT_PG_PORT = int(os.environ.get("STACK_PG_PORT", "15432"))


def _secret(default: str = "") -> Any:
    return dataclasses.field(default=default, metadata={"secret": True})


@dataclasses.dataclass(frozen=True)
class Settings:
    kafka_bootstrap: str = f"127.0.0.1:{DEFAULT_KAFKA_PORT}"
    kafka_security_protocol: str = "PLAINTEXT"
    kafka_sasl_mechanism: str = ""
    kafka_sasl_username: str = ""
    kafka_sasl_password: str = _secret()
    kafka_ssl_cafile: str = ""
    crm_dsn: str = _secret(f"postgresql://sync:sync@127.0.0.1:{DEFAULT_PG_PORT}/crm")
    erp_dsn: str = _secret(f"postgresql://sync:sync@127.0.0.1:{DEFAULT_PG_PORT}/erp")
    sales_topic: str = "crm.sales"
    market_topic: str = "crm.market-demand"
    dlq_topic: str = "crm-erp-sync.dlq"
    topic_partitions: int = 6
    topic_replication: int = 1
    consumer_group: str = "crm-erp-sync-erp"
    slot_name: str = "crm_erp_sync"
    publication_name: str = "crm_erp_sync"
    schemas_dir: Path = REPO_ROOT / "schemas"
    mappings_file: Path = Path(__file__).resolve().parent / "erp" / "mappings.toml"
    batch_max_events: int = 500
    batch_max_wait_ms: int = 0
    producer_max_changes: int = 5000
    producer_poll_ms: int = 100
    heartbeat_interval_s: float = 10.0
    orphan_hold_s: float = 300.0
    log_level: str = "info"
    log_format: str = "json"
    http_port: int = 0

    @classmethod
    def env_var(cls, field_name: str) -> str:
        return ENV_PREFIX + field_name.upper()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            name = cls.env_var(field.name)
            if name not in env:
                continue
            raw = env[name]
            default = field.default
            try:
                if isinstance(default, bool):
                    values[field.name] = _parse_bool(raw)
                elif isinstance(default, int):
                    values[field.name] = int(raw)
                elif isinstance(default, float):
                    values[field.name] = float(raw)
                elif isinstance(default, Path):
                    values[field.name] = Path(raw)
                else:
                    values[field.name] = raw
            except ValueError as exc:
                raise ConfigError(
                    name, f"expected {type(default).__name__}, got {raw!r}"
                ) from exc
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        for name in ("topic_partitions", "topic_replication", "batch_max_events"):
            if getattr(self, name) < 1:
                raise ConfigError(self.env_var(name), "must be at least 1")
        if self.log_format not in ("json", "console"):
            raise ConfigError(self.env_var("log_format"), "must be 'json' or 'console'")
        for name in ("crm_dsn", "erp_dsn"):
            if not getattr(self, name).startswith(("postgresql://", "postgres://")):
                raise ConfigError(self.env_var(name), "must be a postgresql:// URL")

    def redacted(self) -> dict[str, str]:
        """The effective settings with secrets hidden, keyed by environment variable."""
        shown: dict[str, str] = {}
        for field in dataclasses.fields(self):
            value = str(getattr(self, field.name))
            if field.metadata.get("secret"):
                value = hide_secret(value)
            shown[self.env_var(field.name)] = value
        return shown

    def __repr__(self) -> str:
        return f"Settings({self.redacted()!r})"


_URL_PASSWORD = re.compile(r"(://[^:/@]+:)([^@]+)(@)")
_QUERY_PASSWORD = re.compile(r"([?&]password=)[^&]*")


def hide_secret(value: str) -> str:
    """Hide a password, keeping the rest of a URL readable."""
    if not value:
        return value
    if "://" in value:
        value = _URL_PASSWORD.sub(r"\1***\3", value)
        return _QUERY_PASSWORD.sub(r"\1***", value)
    return "***"


def _parse_bool(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(raw)
