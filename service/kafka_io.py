"""The boundary with kafka-python: clients built from settings, its errors translated."""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import ConfigResource, ConfigResourceType, NewTopic
from kafka.cluster import ClusterMetadata
from kafka.errors import (
    IllegalSaslStateError,
    KafkaConnectionError,
    KafkaError,
    KafkaTimeoutError,
    SaslAuthenticationFailedError,
    TopicAlreadyExistsError,
    UnsupportedSaslMechanismError,
)
from kafka.partitioner.default import DefaultPartitioner, murmur2

from service.errors import ConfigError, Retryable, StackUnavailable, SyncError
from service.faults import transient
from service.settings import Settings

# kafka-python 3 raises KafkaTimeoutError("Unable to bootstrap from ...") when no broker
# answers; we say which broker and what to do. It raises the same after a TLS handshake that
# failed or a SASL exchange the listener does not speak (it logs those and retries until the
# bootstrap timeout), so a timeout is looked at again (``listener_mismatch``) before it is
# called "unreachable". A refused SASL login it does raise as such (_SASL_REFUSED).
_SASL_REFUSED = (SaslAuthenticationFailedError, UnsupportedSaslMechanismError,
                 IllegalSaslStateError)
_CLIENT_FAILED = (KafkaTimeoutError, KafkaConnectionError, *_SASL_REFUSED)
PROBE_TIMEOUT_S = 3.0


class _ConnectionFailures(logging.Handler):
    """The exceptions kafka-python 3.0.12 passes as arguments of its "Bootstrap connection
    to %s failed: %s" log calls (kafka.net.manager): where a refused SASL login
    (SaslAuthenticationFailedError) ends up; the client then raises only KafkaTimeoutError.
    Classified by class, never by text. Sees nothing when logging is set above WARNING."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.seen: list[BaseException] = []

    def emit(self, record: logging.LogRecord) -> None:
        if isinstance(record.args, tuple):
            self.seen.extend(a for a in record.args if isinstance(a, BaseException))


@contextmanager
def _building(settings: Settings) -> Iterator[None]:
    """Around the construction of a kafka-python client: its failure becomes ours
    (``_unreachable``), a SASL refusal it only logged included."""
    logger = logging.getLogger("kafka.net.manager")
    failures = _ConnectionFailures()
    logger.addHandler(failures)
    try:
        yield
    except _CLIENT_FAILED as exc:
        refused = next((e for e in failures.seen if isinstance(e, _SASL_REFUSED)), exc)
        raise _unreachable(settings, refused) from exc
    finally:
        logger.removeHandler(failures)


def security_options(settings: Settings) -> dict[str, Any]:
    options: dict[str, Any] = {
        "bootstrap_servers": settings.kafka_bootstrap.split(","),
        "security_protocol": settings.kafka_security_protocol,
    }
    if settings.kafka_ssl_cafile:
        options["ssl_cafile"] = settings.kafka_ssl_cafile
    if settings.kafka_sasl_mechanism:
        options["sasl_mechanism"] = settings.kafka_sasl_mechanism
        options["sasl_plain_username"] = settings.kafka_sasl_username
        options["sasl_plain_password"] = settings.kafka_sasl_password
    return options


def _unreachable(settings: Settings, exc: Exception) -> SyncError:
    """What a client that could not be built means: a ConfigError (exit 2, not retried) for a
    refused SASL login or a TLS/SASL setting the listener does not match, else
    StackUnavailable (exit 3, retried)."""
    env = Settings.env_var
    name = type(exc).__name__
    if isinstance(exc, UnsupportedSaslMechanismError):
        return ConfigError(env("kafka_sasl_mechanism"),
                           f"the broker at {settings.kafka_bootstrap} does not offer SASL "
                           f"mechanism {settings.kafka_sasl_mechanism!r} ({name})")
    if isinstance(exc, SaslAuthenticationFailedError):
        return ConfigError(env("kafka_sasl_username"),
                           f"the broker at {settings.kafka_bootstrap} refused the SASL login "
                           f"of {settings.kafka_sasl_username!r} with "
                           f"{settings.kafka_sasl_mechanism} ({name}): check the user name "
                           f"and {env('kafka_sasl_password')}")
    if isinstance(exc, IllegalSaslStateError):
        return ConfigError(env("kafka_security_protocol"),
                           f"the broker at {settings.kafka_bootstrap} does not expect SASL "
                           f"there ({name}): {settings.kafka_security_protocol} against a "
                           "listener without SASL")
    mismatch = listener_mismatch(settings)
    if isinstance(mismatch, ConfigError):
        return mismatch
    if mismatch == "listening" and settings.kafka_security_protocol != "PLAINTEXT":
        return StackUnavailable(
            f"Kafka broker at {settings.kafka_bootstrap} accepts connections but no "
            f"{settings.kafka_security_protocol} session was made ({name}): the broker may "
            "be starting, or CRM_ERP_SYNC_KAFKA_SECURITY_PROTOCOL (TLS or SASL) does not "
            "match its listener there, which looks the same")
    return StackUnavailable(
        f"Kafka broker at {settings.kafka_bootstrap} is unreachable ({name}); "
        "is the stack up? (make up)"
    )


def listener_mismatch(settings: Settings) -> ConfigError | str:
    """Why no client session could be made with a broker, looked at from outside
    kafka-python (which only times out): a ConfigError naming the setting when the listener
    does not speak what ``kafka_security_protocol`` says (TLS against a plaintext listener
    or the reverse, SASL where plain Kafka answers) or its TLS certificate does not verify
    against ``kafka_ssl_cafile``; else ``"down"`` (no bootstrap address accepts a TCP
    connection) or ``"listening"`` (one does; nothing more could be told). Takes up to a
    few ``PROBE_TIMEOUT_S``. Ours because kafka-python 3.0.12 keeps the handshake's error
    only in its log."""
    env = Settings.env_var
    protocol = settings.kafka_security_protocol
    for address in settings.kafka_bootstrap.split(","):
        host, _, port = address.strip().rpartition(":")
        where = f"{host}:{port}"
        try:
            raw = socket.create_connection((host, int(port)), timeout=PROBE_TIMEOUT_S)
        except OSError:
            continue
        with raw:
            wants_tls = protocol in ("SSL", "SASL_SSL")
            try:
                if wants_tls:  # verified as kafka-python does (ssl_check_hostname)
                    context = ssl.create_default_context(
                        cafile=settings.kafka_ssl_cafile or None)
                else:  # only: does it speak TLS at all?
                    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
                with context.wrap_socket(raw, server_hostname=host):
                    speaks_tls = True
            except ssl.SSLCertVerificationError as exc:
                ca = settings.kafka_ssl_cafile or "the system's CAs"
                return ConfigError(env("kafka_ssl_cafile"),
                                   f"the TLS certificate of the broker at {where} did not "
                                   f"verify against {ca} ({exc.verify_message}): name the "
                                   "CA that signed it, and connect by a name the "
                                   "certificate holds")
            except (ssl.SSLError, OSError):
                speaks_tls = False
        if speaks_tls and not wants_tls:
            return ConfigError(env("kafka_security_protocol"),
                               f"the broker's listener at {where} speaks TLS, but the "
                               f"security protocol is {protocol}: use SSL or SASL_SSL (with "
                               f"{env('kafka_ssl_cafile')})")
        if not speaks_tls and protocol != "PLAINTEXT" and _plain_kafka_answers(address):
            return ConfigError(env("kafka_security_protocol"),
                               f"the broker's listener at {where} is PLAINTEXT (no TLS, no "
                               f"SASL), but the security protocol is {protocol}: use the "
                               "broker's listener for that protocol (its port), or PLAINTEXT")
        return "listening"
    return "down"


def _plain_kafka_answers(address: str) -> bool:
    """A PLAINTEXT kafka-python client bootstraps from ``address`` within PROBE_TIMEOUT_S."""
    try:
        admin = KafkaAdminClient(bootstrap_servers=[address.strip()],
                                 bootstrap_timeout_ms=int(PROBE_TIMEOUT_S * 1000),
                                 request_timeout_ms=int(PROBE_TIMEOUT_S * 1000),
                                 client_id="crm-erp-sync-probe")
    except KafkaError:
        return False
    admin.close()
    return True


class KeyedPartitioner(DefaultPartitioner):  # type: ignore[misc]
    """kafka-python's ``DefaultPartitioner`` choice, cheaper for a keyed record.

    A keyed record goes where the Java client's default partitioner puts it (murmur2 of the
    key bytes, positive, modulo the partition count, over the sorted partition ids); an
    unkeyed one is left to ``DefaultPartitioner``. Ours because kafka-python 3.0.12's
    builds the set of every known topic and of the available partitions and sorts the
    partition ids on every ``send``, needed or not (part of ~5% of the producer's CPU in
    the capture burst, one event per transaction); here the sorted ids are kept per topic
    until its partitions change. The hash is kafka-python's own ``murmur2``. Raises
    ValueError for a topic the metadata does not know, as kafka-python's does."""

    def __init__(self) -> None:
        self._sorted: dict[str, tuple[set[int], list[int]]] = {}

    def partition(self, topic: str, key: Any, serialized_key: bytes | None, value: Any,
                  serialized_value: Any, cluster: ClusterMetadata) -> int:
        if serialized_key is None:
            return int(super().partition(topic, key, serialized_key, value, serialized_value,
                                         cluster))
        partitions: set[int] | None = cluster.partitions_for_topic(topic)
        if not partitions:
            raise ValueError(f"Topic {topic} not found in ClusterMetadata")
        cached = self._sorted.get(topic)
        if cached is None or cached[0] != partitions:
            cached = self._sorted[topic] = (partitions, sorted(partitions))
        ids = cached[1]
        hashed: int = murmur2(serialized_key)
        return ids[(hashed & 0x7FFFFFFF) % len(ids)]


def producer_options(settings: Settings, **overrides: Any) -> dict[str, Any]:
    """kafka-python ``KafkaProducer`` options: idempotent, waiting for every in-sync replica
    (acks=all); `overrides` win.

    kafka-python 3 has no ``buffer_memory`` pool (its batches are bytearrays grown on demand),
    so what the producer holds is what is sent before ``flush``: the capture batch, bounded
    by ``producer_max_changes``; ``batch_size`` only caps one partition's batch."""
    return {
        **security_options(settings),
        "acks": "all",
        "enable_idempotence": True,
        "linger_ms": 5,
        "batch_size": 256 * 1024,
        "max_request_size": 4 * 1024 * 1024,
        "retries": 2**31 - 1,
        "delivery_timeout_ms": 120_000,
        "client_id": "crm-erp-sync-producer",
        "partitioner": KeyedPartitioner(),
        **overrides,
    }


def make_producer(settings: Settings, **overrides: Any) -> KafkaProducer:
    """A producer with :func:`producer_options`. Raises StackUnavailable when no broker
    answers, ConfigError when the broker refuses our TLS/SASL settings."""
    with _building(settings):
        return KafkaProducer(**producer_options(settings, **overrides))


def close_producer(producer: Any, timeout_s: float) -> None:
    """Close a producer within ``timeout_s``, dropping what the broker did not take.

    kafka-python 3.0.12's ``close(timeout)`` flushes first and raises KafkaTimeoutError when
    the broker is away, leaving the producer open; its ``__del__`` then prints a traceback
    on stderr. Our callers only drop a producer whose unsent events are re-sent anyway (the
    slot or the offsets did not move), so the sender is force-closed (kafka-python's own
    path for an unfinished close) and the producer marked closed.
    """
    try:
        producer.close(timeout=timeout_s)
    except KafkaError:
        sender = getattr(producer, "_sender", None)
        if sender is not None and sender.is_alive():
            sender.force_close()
        producer._closed = True


# What a consumer buffers between polls is the fetched, still compressed record batches of
# every assigned partition (kafka-python unpacks them lazily, a batch at a time), up to
# max_partition_fetch_bytes each; kafka-python's 1 MiB default made a consumer starting on a
# backlog peak ~20 MiB higher (6 partitions; measured: 61 MiB peak RSS reading 60,000
# zstd records vs 39-40 MiB at 256 KiB, at the same ~120,000 records/s). 256 KiB is still
# hundreds of our compressed events, more than one poll's max_poll_records, and the broker
# returns a batch larger than the limit whole (KIP-74), so a large event never gets stuck.
PARTITION_FETCH_BYTES = 256 * 1024
FETCH_MAX_BYTES = 4 * 1024 * 1024  # one fetch response, all partitions (default 50 MiB)
# With batches gathered for ``batch_max_wait_ms`` the broker does the gathering: it holds a
# fetch until this many bytes (about a full poll of compressed events) or that wait is
# reached. With fetch.min.bytes 1 (kafka-python's default) it answered each fetch as soon as
# one record was there: at 500 events/s a consumer made a fetch round trip every one or two
# events, the largest part of its CPU and of the broker's at steady rates.
FETCH_GATHER_BYTES = 64 * 1024


def consumer_options(settings: Settings, **overrides: Any) -> dict[str, Any]:
    """kafka-python ``KafkaConsumer`` options: the service's group, manual commits, committed
    records only, polls of at most ``batch_max_events`` records, fetches bounded in bytes
    (:data:`PARTITION_FETCH_BYTES` per partition, :data:`FETCH_MAX_BYTES` per response) and
    held by the broker for up to ``batch_max_wait_ms`` until :data:`FETCH_GATHER_BYTES` are
    there (with 0, answered at once), no client-side metrics; `overrides` win."""
    gather_ms = settings.batch_max_wait_ms
    return {
        **security_options(settings),
        "group_id": settings.consumer_group,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "isolation_level": "read_committed",
        "max_poll_records": settings.batch_max_events,
        "max_partition_fetch_bytes": PARTITION_FETCH_BYTES,
        "fetch_max_bytes": FETCH_MAX_BYTES,
        "fetch_min_bytes": FETCH_GATHER_BYTES if gather_ms else 1,
        "fetch_max_wait_ms": gather_ms if gather_ms else 500,
        # A replica killed without leaving the group holds its partitions until the session
        # times out: 10 s instead of kafka-python's 45 s default bounds that stall.
        "session_timeout_ms": 10_000,
        "heartbeat_interval_ms": 3_000,
        # kafka-python's own client metrics (sensors recorded on every fetch, request and
        # response, on both the IO thread and the polling one) are read by nothing here
        # (/metrics is prometheus_client's); at one small fetch per event (200 changes/s)
        # they cost a few percent of a consumer's CPU.
        "metrics_enabled": False,
        "client_id": "crm-erp-sync-consumer",
        **overrides,
    }


def make_consumer(settings: Settings, *topics: str, **overrides: Any) -> KafkaConsumer:
    """A consumer with :func:`consumer_options`, subscribed to `topics` (none: assign
    partitions yourself). Raises StackUnavailable when no broker answers, ConfigError when
    the broker refuses our TLS/SASL settings."""
    with _building(settings):
        return KafkaConsumer(*topics, **consumer_options(settings, **overrides))


def make_admin(settings: Settings, **overrides: Any) -> KafkaAdminClient:
    """An admin client (`overrides` win: a bounded ``bootstrap_timeout_ms``). Raises
    StackUnavailable when no broker answers."""
    with _building(settings):
        return KafkaAdminClient(**{**security_options(settings),
                                   "client_id": "crm-erp-sync-admin", **overrides})


def missing_topics(settings: Settings, existing: set[str]) -> list[tuple[str, str]]:
    """(variable, problem) for each topic a consumer needs (sales, market demand, dead
    letters) that is not in ``existing`` (the broker's topic names): the broker never creates
    one by itself (``auto.create.topics.enable=false``), so a typo in a topic setting or a
    deleted topic would otherwise look like an empty topic that is always "caught up" (or,
    for the dead-letter topic, like a broker that never answers). Empty when all exist."""
    wanted = (("sales_topic", "the customer and order events"),
              ("market_topic", "the market-demand events"),
              ("dlq_topic", "where dead letters are written"))
    return [(settings.env_var(name),
             f"topic {getattr(settings, name)!r} ({what}) does not exist on the broker "
             f"{settings.kafka_bootstrap}: run `crm-erp-sync setup` (it creates the topics), "
             "or correct the name")
            for name, what in wanted if getattr(settings, name) not in existing]


def ensure_topics(settings: Settings) -> list[str]:
    """Create the service's topics if missing; returns those created. Never auto-created."""
    wanted = {
        settings.sales_topic: {"retention.ms": "-1"},
        settings.market_topic: {"retention.ms": "-1"},
        settings.dlq_topic: {"retention.ms": "-1"},
    }
    admin = make_admin(settings)
    created: list[str] = []
    try:
        existing = set(admin.list_topics())
        for name, config in wanted.items():
            if name in existing:
                continue
            try:
                admin.create_topics(
                    [
                        NewTopic(
                            name,
                            num_partitions=settings.topic_partitions,
                            replication_factor=settings.topic_replication,
                            topic_configs=config,
                        )
                    ]
                )
                created.append(name)
            except TopicAlreadyExistsError:
                pass  # another process created it between list and create
    except KafkaError as exc:
        raise Retryable(f"creating topics failed: {type(exc).__name__}: {exc}") from exc
    finally:
        admin.close()
    return created


# Kafka's own default for message.max.bytes (1 MiB + record batch overhead): assumed when the
# broker does not let us read its configuration.
KAFKA_DEFAULT_MAX_MESSAGE_BYTES = 1_048_588


def max_message_bytes(settings: Settings, topics: list[str]) -> dict[str, int]:
    """The largest record batch each topic accepts, in bytes: the topic's
    ``max.message.bytes`` (which reflects the broker default when not set on the topic),
    falling back to the broker's ``message.max.bytes``, then to Kafka's default, for a topic
    whose configuration cannot be read (no DescribeConfigs permission, say). Raises
    Retryable (ConnectionLost) when the broker does not answer."""
    admin = make_admin(settings)

    def describe(kind: ConfigResourceType, name: str, key: str) -> dict[str, Any]:
        try:
            found: dict[str, Any] = admin.describe_configs(
                [ConfigResource(kind, name, {key: None})], config_filter="all")
        except KafkaError as exc:
            fault = transient(exc, "broker")
            if fault is not None:
                raise fault from exc
            return {}  # not allowed or not supported: the next fallback
        return dict(found.get(kind.name.lower(), {}).get(name, {}))

    try:
        limits = {t: int(c["max.message.bytes"]["value"]) for t in topics
                  if "max.message.bytes" in (c := describe(ConfigResourceType.TOPIC, t,
                                                           "max.message.bytes"))}
        if len(limits) < len(topics):
            broker = KAFKA_DEFAULT_MAX_MESSAGE_BYTES
            ids = [b["broker_id"] for b in admin.describe_cluster()["brokers"]]
            if ids:
                config = describe(ConfigResourceType.BROKER, str(ids[0]), "message.max.bytes")
                if "message.max.bytes" in config:
                    broker = int(config["message.max.bytes"]["value"])
            limits.update({t: broker for t in topics if t not in limits})
        return limits
    except KafkaError as exc:
        raise (transient(exc, "broker") or Retryable(
            f"reading the topics' max.message.bytes failed: {type(exc).__name__}")) from exc
    finally:
        admin.close()
