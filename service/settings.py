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
from typing import TYPE_CHECKING, Any

from service.errors import ConfigError, ConfigProblems

if TYPE_CHECKING:
    from service.consumer.throttle import ApplyWindow

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
    # The sync-state database (held events, dead letters, breaker, positions); with the
    # `sql` target also the ERP's own tables (erp.*).
    erp_dsn: str = _secret(f"postgresql://sync:sync@127.0.0.1:{DEFAULT_PG_PORT}/erp")
    # Where changes are applied: `sql` (erp.* in erp_dsn) or `tryton` (over JSON-RPC).
    erp_target: str = "sql"
    # A secret for display only: a URL may carry user:password@ (a Tryton behind a basic-auth
    # proxy); `config` shows it with the password hidden, as the DSNs (newcomer9 F9).
    tryton_url: str = _secret("http://127.0.0.1:8000")
    tryton_database: str = "tryton"
    tryton_user: str = "crm_sync"
    tryton_password: str = _secret()
    sales_topic: str = "crm.sales"
    market_topic: str = "crm.market-demand"
    dlq_topic: str = "crm-erp-sync.dlq"
    topic_partitions: int = 6
    topic_replication: int = 1
    consumer_group: str = "crm-erp-sync-erp"
    slot_name: str = "crm_erp_sync"
    publication_name: str = "crm_erp_sync"
    schemas_dir: Path = REPO_ROOT / "schemas"
    source_profile: str = "demo"
    mappings_file: Path = Path(__file__).resolve().parent / "erp" / "mappings.toml"
    batch_max_events: int = 500
    # How long a consumer gathers a batch after its poll began (BatchPolicy.NEAR_REALTIME):
    # at a steady 200 changes/s a poll otherwise brings one event, and each one-event ERP
    # transaction pays the batch's fixed cost. bench.compare at 200/s, same machine, back to
    # back: ERP PostgreSQL 1.62 CPU-s per 10 s at 0 ms, 0.93 at 25 (target 1.5); commit ->
    # ERP p99 42 vs 48 ms (target 100). 0 applies whatever one poll returned, at once.
    batch_max_wait_ms: int = 25
    # A capture batch ends after the transaction that reaches this many changes (never inside
    # one): its events, Avro bytes and kafka-python records are all held until the broker
    # acknowledged the batch, so this bounds the producer's memory. Producer alone, 20,000
    # one-change transactions: peak RSS 85 MiB at 5000, 74 at 2000, 70 at 1000; changes/s
    # ~9,750 / ~8,500 / ~9,070 (noisy, shared machine). 2000 keeps the whole system under
    # its 250 MiB (python -m bench.compare) with the larger batches a burst wants. 1000 was
    # tried for memory (issue #13): 78 instead of 87 MiB catching up 50,000 one-change
    # transactions, same CPU per change, but the bulk load's transactions (headers COPYed
    # before lines) were cut into more pieces: 131,618 events instead of 103,914 for the same
    # rows (lines published apart from their header), more work for the consumers and ERP.
    producer_max_changes: int = 2000
    capture_transport: str = "stream"
    producer_poll_ms: int = 100
    heartbeat_interval_s: float = 10.0
    on_slot_lost: str = "fail"
    # A TRUNCATE of a captured CRM table (docs/DESIGN.md "TRUNCATE"): stop capture before it
    # (the default), propagate it (soft-delete the entity's ERP rows), or skip it.
    on_truncate: str = "stop"
    # The zone a CRM `timestamp without time zone` is read in: empty = the CRM session's own
    # (the database's or role's `timezone` setting, as the CRM's users read it), or an IANA
    # name such as Asia/Shanghai to override it.
    crm_timezone: str = ""
    orphan_hold_s: float = 300.0
    log_level: str = "info"
    log_format: str = "json"
    http_port: int = 0
    http_host: str = "0.0.0.0"
    shutdown_timeout_s: float = 30.0
    liveness_timeout_s: float = 120.0
    readiness_stall_s: float = 60.0
    # The dead-letter circuit breaker (service/consumer/policy.py DlqLimit), per partition.
    breaker_max_ratio: float = 0.5
    breaker_min_messages: int = 100
    breaker_window_s: float = 60.0
    # How often a running consumer reads the breaker state table (an operator's `resume`).
    breaker_poll_s: float = 2.0
    # How often a running consumer asks the broker whether it is still in its group (and
    # reports itself to sync.consumers for `status`); see service/consumer/membership.py.
    membership_check_s: float = 10.0
    # How often a running consumer checks the mappings file for a change (SIGHUP: at once).
    mappings_check_s: float = 5.0
    # Long transactions (`status` needs attention, exit 1, over these): a CRM transaction
    # holding an xid open longer than this pins the slot's restart_lsn, so the CRM keeps its WAL;
    pinning_xact_max_s: float = 600.0
    # the WAL the slot keeps (current LSN - restart_lsn), in bytes;
    retained_wal_max_bytes: int = 1024**3
    # and, on the SQL transport, what one empty peek costs the CRM (it re-decodes everything
    # since restart_lsn). Empty peeks back off so that they take at most a tenth of the time,
    # waiting at most sql_peek_backoff_max_s between them.
    sql_peek_max_s: float = 0.2
    sql_peek_backoff_max_s: float = 5.0
    # Protecting the ERP (service/consumer/throttle.py): at most this many changes applied per
    # second by each consumer (0: no limit), and only inside a daily window "HH:MM-HH:MM"
    # (empty: always) of wall-clock time in apply_window_tz (an IANA zone).
    apply_max_rate: float = 0.0
    apply_window: str = ""
    apply_window_tz: str = "UTC"

    @classmethod
    def env_var(cls, field_name: str) -> str:
        return ENV_PREFIX + field_name.upper()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, *,
                 files_reported: bool = False) -> Settings:
        """The settings from ``environ`` (default os.environ) and the config file; raises one
        ConfigError naming every invalid variable. ``files_reported``: the command reports a
        missing or unreadable source profile or mappings file itself (`status`: an operator
        runs it exactly when a file went missing), so their existence is not refused here."""
        env = os.environ if environ is None else environ
        problems = ConfigProblems()  # every mistake in one go, not one per run
        from_file = _read_config_file(env, {f.name for f in dataclasses.fields(cls)},
                                      problems)
        values: dict[str, Any] = {}
        # A value from the file is named with its key and file in every problem: the
        # operator would look for the variable in the environment and not find it.
        in_file: dict[str, str] = {}
        for field in dataclasses.fields(cls):
            name = cls.env_var(field.name)
            if name in env:  # the environment wins over the config file
                raw = env[name]
            elif field.name in from_file:
                raw = from_file[field.name]
                in_file[name] = f"{name} (key {field.name!r} in {env[CONFIG_FILE_VAR]})"
                name = in_file[name]
            else:
                continue
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
            except ValueError:
                problems.add(name, f"expected {type(default).__name__}, got {raw!r}")
        settings = cls(**values)  # a value that did not parse keeps its (valid) default
        checked = len(problems.found)
        settings._check(problems, files=not files_reported)
        problems.found[checked:] = [(in_file.get(variable, variable), problem)
                                    for variable, problem in problems.found[checked:]]
        problems.raise_if_any()
        return settings

    def validate(self) -> None:
        """Raises one ConfigError listing every invalid setting (each naming its variable)."""
        problems = ConfigProblems()
        self._check(problems)
        problems.raise_if_any()

    def _check(self, problems: ConfigProblems, *, files: bool = True) -> None:
        for name in ("topic_partitions", "topic_replication", "batch_max_events",
                     "producer_max_changes"):
            if getattr(self, name) < 1:
                problems.add(self.env_var(name), "must be at least 1")
        for name in ("batch_max_wait_ms", "producer_poll_ms", "orphan_hold_s"):
            if getattr(self, name) < 0:
                problems.add(self.env_var(name), "must not be negative")
        for name in ("heartbeat_interval_s", "shutdown_timeout_s", "liveness_timeout_s",
                     "readiness_stall_s", "breaker_window_s", "breaker_poll_s",
                     "membership_check_s", "mappings_check_s", "pinning_xact_max_s",
                     "sql_peek_max_s", "sql_peek_backoff_max_s"):
            if not getattr(self, name) > 0:  # also refuses nan
                problems.add(self.env_var(name), "must be a positive number of seconds")
        if not self.breaker_max_ratio > 0:
            problems.add(self.env_var("breaker_max_ratio"),
                         "must be a share of messages above 0 (0.5 = 50%; above 1: the "
                         "breaker never trips)")
        if self.retained_wal_max_bytes < 1:
            problems.add(self.env_var("retained_wal_max_bytes"), "must be at least 1")
        if self.breaker_min_messages < 1:
            problems.add(self.env_var("breaker_min_messages"), "must be at least 1")
        if not self.apply_max_rate >= 0:  # also refuses nan
            problems.add(self.env_var("apply_max_rate"),
                         "must be changes per second per consumer, or 0 for no limit")
        self._validate_files_and_zone(problems, files=files)
        if self.apply_window:
            from service.consumer.throttle import ApplyWindow

            try:
                ApplyWindow.parse(self.apply_window, self.apply_window_tz)
            except ValueError as exc:
                # an unknown zone is reported once, by _validate_files_and_zone
                if not str(exc).startswith("unknown time zone"):
                    problems.add(self.env_var("apply_window"), str(exc))
        if not 0 <= self.http_port <= 65535:
            problems.add(self.env_var("http_port"),
                         "must be a TCP port 1-65535, or 0 for no HTTP endpoints")
        if self.log_level.lower() not in ("debug", "info", "warning", "error", "critical"):
            problems.add(self.env_var("log_level"),
                         "must be one of debug, info, warning, error, critical")
        if self.kafka_security_protocol not in KAFKA_SECURITY_PROTOCOLS:
            problems.add(self.env_var("kafka_security_protocol"),
                         f"must be one of {', '.join(KAFKA_SECURITY_PROTOCOLS)}")
        if self.kafka_sasl_mechanism and not self.kafka_security_protocol.startswith("SASL_"):
            problems.add(self.env_var("kafka_sasl_mechanism"),
                         "needs CRM_ERP_SYNC_KAFKA_SECURITY_PROTOCOL SASL_SSL or "
                         "SASL_PLAINTEXT")
        for address in self.kafka_bootstrap.split(","):
            host, _, port = address.strip().rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                problems.add(self.env_var("kafka_bootstrap"),
                             f"expected host:port[,host:port...], got {address!r}")
        for name in ("sales_topic", "market_topic", "dlq_topic"):
            if not _KAFKA_TOPIC.fullmatch(getattr(self, name)):
                problems.add(self.env_var(name),
                             "a topic name is 1-249 of a-z A-Z 0-9 . _ -")
        for name in ("slot_name", "publication_name"):
            if not _PG_NAME.fullmatch(getattr(self, name)):
                problems.add(self.env_var(name),
                             "must be 1-63 of lower-case letters, digits and _")
        if self.capture_transport not in CAPTURE_TRANSPORTS:
            problems.add(self.env_var("capture_transport"),
                         f"must be one of {', '.join(CAPTURE_TRANSPORTS)}")
        if self.on_slot_lost not in ("fail", "resnapshot"):
            problems.add(self.env_var("on_slot_lost"), "must be 'fail' or 'resnapshot'")
        if self.on_truncate not in ON_TRUNCATE:
            problems.add(self.env_var("on_truncate"),
                         f"must be one of {', '.join(ON_TRUNCATE)}")
        if self.crm_timezone:
            from service.cdc.zone import zone_named  # zoneinfo: only when one is set

            with problems.gather():
                zone_named(self.crm_timezone, self.env_var("crm_timezone"))
        if self.log_format not in LOG_FORMATS:
            problems.add(self.env_var("log_format"), "must be 'json' or 'console'")
        if self.erp_target not in ("sql", "tryton"):
            problems.add(self.env_var("erp_target"), "must be 'sql' or 'tryton'")
        if self.erp_target == "tryton":
            if not self.tryton_url.startswith(("http://", "https://")):
                problems.add(self.env_var("tryton_url"),
                             "must be an http:// or https:// URL of the Tryton server")
            for name in ("tryton_database", "tryton_user", "tryton_password"):
                if not getattr(self, name):
                    problems.add(self.env_var(name),
                                 "required with CRM_ERP_SYNC_ERP_TARGET=tryton")
        for name in ("crm_dsn", "erp_dsn"):
            if not getattr(self, name).startswith(("postgresql://", "postgres://")):
                problems.add(self.env_var(name), "must be a postgresql:// URL")
            else:
                problems.found.extend(pg_dsn_problems(getattr(self, name),
                                                      self.env_var(name)))
        if self.kafka_ssl_cafile and not Path(self.kafka_ssl_cafile).is_file():
            # kafka-python would log the missing file on every connection attempt and
            # raise only a bootstrap timeout, which reads as "broker unreachable"
            problems.add(self.env_var("kafka_ssl_cafile"),
                         f"no such file: {self.kafka_ssl_cafile} (the CA certificate, PEM, "
                         "that the broker's certificate is verified against)")

    def _validate_files_and_zone(self, problems: ConfigProblems, *, files: bool = True
                                 ) -> None:
        """The source profile, the mappings file (unless ``files`` is False: the command
        reports them itself) and the apply window's zone exist (README: configuration is
        validated at start-up). Only existence here: the files' contents are checked by their
        loaders (the producer, the consumer, `config`, `status`), which name the file and
        key. Adds problems naming the variable."""
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        profile = self.source_profile
        if files:
            if not profile.endswith(".toml") and "/" not in profile:  # a shipped profile's name
                # service.cdc.profile.PROFILES_DIR, not imported: every process validates this
                shipped_dir = Path(__file__).resolve().parent / "profiles"
                if not (shipped_dir / f"{profile}.toml").is_file():
                    shipped = sorted(p.stem for p in shipped_dir.glob("*.toml"))
                    problems.add(self.env_var("source_profile"),
                                 f"no shipped profile {profile!r}; shipped: "
                                 f"{', '.join(shipped)}, or give a path to a .toml file")
            elif not Path(profile).is_file():
                problems.add(self.env_var("source_profile"), _not_a_file(Path(profile)))
            if not self.mappings_file.is_file():
                problems.add(self.env_var("mappings_file"), _not_a_file(self.mappings_file))
        try:
            ZoneInfo(self.apply_window_tz)
        except (ZoneInfoNotFoundError, ValueError):
            problems.add(self.env_var("apply_window_tz"),
                         f"unknown time zone {self.apply_window_tz!r} (an IANA zone such "
                         "as Asia/Shanghai or UTC)")

    def apply_window_parsed(self) -> ApplyWindow | None:
        """The apply window (validated at start-up), or None: always apply."""
        from service.consumer.throttle import ApplyWindow

        return (ApplyWindow.parse(self.apply_window, self.apply_window_tz)
                if self.apply_window else None)

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


CONFIG_FILE_VAR = ENV_PREFIX + "CONFIG_FILE"
# libpq's sslmode values that demand TLS; with verify-* the server's certificate is checked.
PG_TLS_REQUIRED = ("require", "verify-ca", "verify-full")


def _not_a_file(path: Path) -> str:
    """Why ``path`` (not a regular file) cannot be read as one: a directory there (a
    ConfigMap mounted as a directory) is not "no such file"."""
    return f"is a directory: {path}" if path.is_dir() else f"no such file: {path}"


def pg_dsn_problems(dsn: str, variable: str) -> list[tuple[str, str]]:
    """TLS mistakes a PostgreSQL DSN shows without connecting, as (variable, problem) pairs
    (none: nothing seen). With an sslmode that demands TLS (``PG_TLS_REQUIRED``, from the DSN
    or libpq's PGSSLMODE): ``sslrootcert`` (or PGSSLROOTCERT) naming a file that does not
    exist (libpq fails with verify-ca/verify-full, and with require silently skips the
    verification the file was named for), and verify-ca/verify-full without sslrootcert
    while libpq's default ``~/.postgresql/root.crt`` does not exist. Checked here because
    libpq reports these only as message text, and against a server without TLS not at all
    (it first says the server does not support SSL). A DSN libpq cannot parse is left to
    libpq's own error at connect time."""
    from psycopg import ProgrammingError
    from psycopg.conninfo import conninfo_to_dict

    try:
        params = conninfo_to_dict(dsn)
    except ProgrammingError:
        return []
    mode = str(params.get("sslmode") or os.environ.get("PGSSLMODE") or "prefer")
    if mode not in PG_TLS_REQUIRED:
        return []
    root = str(params.get("sslrootcert") or os.environ.get("PGSSLROOTCERT") or "")
    if root == "system":  # libpq 16+: the system's trusted CAs
        return []
    if root and not Path(root).is_file():
        return [(variable, f"sslrootcert names {root}, which does not exist (the CA "
                           f"certificate, PEM, that the server's is verified against; with "
                           f"sslmode={mode} "
                           + ("libpq refuses to connect without it)" if mode != "require"
                              else "libpq would not verify the server at all)"))]
    if not root and mode != "require":
        try:
            default = Path.home() / ".postgresql" / "root.crt"
        except (RuntimeError, KeyError):  # no home directory: libpq finds no default either
            default = Path("~/.postgresql/root.crt")
        if not default.is_file():
            return [(variable, f"sslmode={mode} verifies the server's certificate, but the "
                               "DSN names no sslrootcert and libpq's default "
                               f"{default} does not exist: add "
                               "sslrootcert=/path/to/ca.pem (or sslrootcert=system)")]
    return []


def origins(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Where each setting's value comes from, keyed by environment variable: "env", "file
    PATH" (CRM_ERP_SYNC_CONFIG_FILE) or "default" (the precedence of Settings.from_env).
    Raises ConfigError when the config file cannot be read."""
    env = os.environ if environ is None else environ
    from_file = _read_config_file(env, {f.name for f in dataclasses.fields(Settings)})
    out: dict[str, str] = {}
    for field in dataclasses.fields(Settings):
        name = Settings.env_var(field.name)
        out[name] = ("env" if name in env else
                     f"file {env[CONFIG_FILE_VAR]}" if field.name in from_file else "default")
    return out


def unknown_env_vars(environ: Mapping[str, str] | None = None) -> list[tuple[str, str | None]]:
    """CRM_ERP_SYNC_* variables that are no setting (a typo is otherwise silently ignored),
    each with the closest valid name (difflib) or None; sorted by name."""
    import difflib

    env = os.environ if environ is None else environ
    valid = [Settings.env_var(f.name) for f in dataclasses.fields(Settings)] + [CONFIG_FILE_VAR]
    # Compared without the shared prefix, which would make every name look "close".
    suffixes = {v.removeprefix(ENV_PREFIX): v for v in valid}
    out: list[tuple[str, str | None]] = []
    for name in sorted(env):
        if name.startswith(ENV_PREFIX) and name not in valid:
            close = difflib.get_close_matches(name.removeprefix(ENV_PREFIX), list(suffixes),
                                              n=1, cutoff=0.6)
            out.append((name, suffixes[close[0]] if close else None))
    return out


# stream: the replication protocol (a walsender); sql: pg_logical_slot_peek_binary_changes.
CAPTURE_TRANSPORTS = ("stream", "sql")
# stop: capture stops before a TRUNCATE of a captured table until the operator chooses;
# propagate: a truncate event (soft delete of the entity's ERP rows); skip: logged, counted.
ON_TRUNCATE = ("stop", "propagate", "skip")
# CRM_ERP_SYNC_LOG_FORMAT's accepted values (README's Configuration table lists them)
LOG_FORMATS = ("json", "console")
KAFKA_SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
_KAFKA_TOPIC = re.compile(r"[a-zA-Z0-9._-]{1,249}")
_PG_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")


def _read_config_file(env: Mapping[str, str], known: set[str],
                      problems: ConfigProblems | None = None) -> dict[str, str]:
    """The optional TOML file named by CRM_ERP_SYNC_CONFIG_FILE: keys are field names,
    values as the environment variables would spell them (the environment wins). A file
    that cannot be read or parsed raises ConfigError; a bad key is added to ``problems``
    and skipped (without ``problems``: ConfigError listing every bad key)."""
    path = env.get(CONFIG_FILE_VAR)
    if not path:
        return {}
    import tomllib

    try:
        data = tomllib.loads(Path(path).read_text("utf-8"))
    except OSError as exc:
        raise ConfigError(CONFIG_FILE_VAR, f"cannot read {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(CONFIG_FILE_VAR, f"{path} is not valid TOML: {exc}") from exc
    found = ConfigProblems() if problems is None else problems
    out: dict[str, str] = {}
    for key, value in data.items():
        if key not in known:
            found.add(CONFIG_FILE_VAR, f"{path}: unknown setting {key!r}")
        elif isinstance(value, bool):
            out[key] = "true" if value else "false"
        elif isinstance(value, str | int | float):
            out[key] = str(value)
        else:
            found.add(f"{ENV_PREFIX}{key.upper()} (key {key!r} in {path})",
                      f"expected a string or a number, got {type(value).__name__}")
    if problems is None:
        found.raise_if_any()
    return out


# The user information's password: after the user name (empty too) up to the "@" that
# has no other "@" after it in the authority (as urllib.parse.urlsplit splits at the last
# one), so an unescaped "@", ":" or "/" in the password is hidden whole (newcomer10: `:pw@`
# and `p@ss:w@rd@` showed in `config`).
_URL_PASSWORD = re.compile(r"(://[^:/@\s]*:)(\S*?)(@)(?=[^@\s/?#]*(?:[/?#\s]|$))")
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
