"""service.kafka_io: the clients' options (memory bounds, guarantees), without a broker."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kafka.partitioner.default import DefaultPartitioner

from service.kafka_io import (
    FETCH_GATHER_BYTES,
    FETCH_MAX_BYTES,
    PARTITION_FETCH_BYTES,
    KeyedPartitioner,
    consumer_options,
    missing_topics,
    producer_options,
)
from service.settings import Settings


def test_a_consumer_buffers_at_most_a_bounded_fetch_per_partition_and_per_response() -> None:
    options = consumer_options(Settings())
    # kafka-python's defaults (1 MiB per partition, 50 MiB per response) are not kept
    assert options["max_partition_fetch_bytes"] == PARTITION_FETCH_BYTES <= 256 * 1024
    assert options["fetch_max_bytes"] == FETCH_MAX_BYTES <= 4 * 1024 * 1024
    assert options["max_partition_fetch_bytes"] <= options["fetch_max_bytes"]


def test_the_broker_gathers_a_batch_for_as_long_as_the_consumer_would() -> None:
    options = consumer_options(Settings(batch_max_wait_ms=40))
    assert options["fetch_max_wait_ms"] == 40
    assert options["fetch_min_bytes"] == FETCH_GATHER_BYTES > 1
    realtime = consumer_options(Settings(batch_max_wait_ms=0))
    assert realtime["fetch_min_bytes"] == 1  # answered as soon as a record is there
    assert realtime["fetch_max_wait_ms"] == 500  # kafka-python's: a long poll when idle


def test_a_consumer_polls_a_batch_of_committed_records_and_commits_itself() -> None:
    options = consumer_options(Settings(batch_max_events=123, consumer_group="g"))
    assert options["max_poll_records"] == 123
    assert options["group_id"] == "g"
    assert options["isolation_level"] == "read_committed"
    assert options["enable_auto_commit"] is False


def test_overrides_win_over_the_consumer_defaults() -> None:
    options = consumer_options(Settings(), group_id=None, max_partition_fetch_bytes=2**20)
    assert options["group_id"] is None
    assert options["max_partition_fetch_bytes"] == 2**20


def test_the_producer_stays_idempotent_and_waits_for_every_replica() -> None:
    options = producer_options(Settings(), compression_type="zstd")
    assert options["acks"] == "all" and options["enable_idempotence"] is True
    assert options["compression_type"] == "zstd"
    assert "buffer_memory" not in options  # kafka-python 3 has no such pool to bound


def test_a_capture_batch_is_bounded_to_2000_changes_by_default() -> None:
    assert Settings().producer_max_changes == 2000
    assert Settings.from_env({"CRM_ERP_SYNC_PRODUCER_MAX_CHANGES": "250"}
                             ).producer_max_changes == 250


def test_a_consumer_records_no_client_metrics_nobody_reads() -> None:
    assert consumer_options(Settings())["metrics_enabled"] is False


class _Cluster:
    """The two ClusterMetadata calls the partitioners make, for a topic of ``n`` partitions
    (ids listed in another order than sorted, as a set may give them)."""

    def __init__(self, ids: list[int]) -> None:
        self.ids = ids

    def topics(self, exclude_internal_topics: bool = True) -> set[str]:
        return {"t"}

    def partitions_for_topic(self, topic: str) -> set[int] | None:
        return set(self.ids) if topic == "t" else None

    def available_partitions_for_topic(self, topic: str) -> set[int] | None:
        return self.partitions_for_topic(topic)


@settings(max_examples=300, deadline=None)
@given(key=st.binary(max_size=40), n=st.integers(1, 24))
def test_a_keyed_record_goes_where_kafka_pythons_default_partitioner_sends_it(
        key: bytes, n: int) -> None:
    cluster = _Cluster(list(range(n))[::-1])
    ours = KeyedPartitioner()
    expected = DefaultPartitioner().partition("t", None, key, None, b"v", cluster)
    assert ours.partition("t", None, key, None, b"v", cluster) == expected
    cluster.ids = list(range(n + 2))  # partitions added: the cached ids follow
    expected = DefaultPartitioner().partition("t", None, key, None, b"v", cluster)
    assert ours.partition("t", None, key, None, b"v", cluster) == expected


def test_the_keyed_partitioner_refuses_an_unknown_topic_and_spreads_unkeyed_records() -> None:
    cluster = _Cluster([0, 1, 2])
    with pytest.raises(ValueError):
        KeyedPartitioner().partition("nope", None, b"k", None, b"v", cluster)
    assert KeyedPartitioner().partition("t", None, None, None, b"v", cluster) in {0, 1, 2}
    assert isinstance(producer_options(Settings())["partitioner"], KeyedPartitioner)


# ---- newcomer6 F17: a refused SASL login is a configuration error, not "unreachable" ------

def _sasl_settings() -> Settings:
    import dataclasses

    return dataclasses.replace(Settings(), kafka_bootstrap="127.0.0.1:1",
                               kafka_security_protocol="SASL_SSL",
                               kafka_sasl_mechanism="SCRAM-SHA-512",
                               kafka_sasl_username="sync", kafka_sasl_password="pw-secret-17")


def test_a_sasl_refusal_kafka_python_only_logs_is_a_config_error_naming_the_user() -> None:
    import logging

    from kafka.errors import KafkaTimeoutError, SaslAuthenticationFailedError

    from service.errors import ConfigError
    from service.kafka_io import _building

    with pytest.raises(ConfigError) as refused, _building(_sasl_settings()):
        # what kafka-python 3.0.12 does: log the refusal, retry, then time out
        logging.getLogger("kafka.net.manager").warning(
            "Bootstrap connection to %s failed: %s", "bootstrap-0",
            SaslAuthenticationFailedError("invalid credentials"))
        raise KafkaTimeoutError("Unable to bootstrap")
    assert refused.value.variable == "CRM_ERP_SYNC_KAFKA_SASL_USERNAME"
    assert "refused the SASL login of 'sync' with SCRAM-SHA-512" in refused.value.problem
    assert "pw-secret-17" not in str(refused.value)


def test_a_timeout_with_nothing_listening_is_still_unreachable() -> None:
    from kafka.errors import KafkaTimeoutError

    from service.errors import StackUnavailable
    from service.kafka_io import _building

    with pytest.raises(StackUnavailable, match=r"127\.0\.0\.1:1 is unreachable"), \
            _building(_sasl_settings()):
        raise KafkaTimeoutError("Unable to bootstrap")


def test_every_topic_setting_naming_no_topic_on_the_broker_is_named_with_setup_as_the_fix(
        ) -> None:
    settings = Settings(sales_topic="s", market_topic="m", dlq_topic="d",
                        kafka_bootstrap="b:9092")
    assert missing_topics(settings, {"s", "m", "d", "other"}) == []
    problems = missing_topics(settings, {"m"})
    assert [variable for variable, _ in problems] == ["CRM_ERP_SYNC_SALES_TOPIC",
                                                      "CRM_ERP_SYNC_DLQ_TOPIC"]
    assert all("does not exist on the broker b:9092" in p and "crm-erp-sync setup" in p
               for _, p in problems)
    assert "'s'" in problems[0][1] and "'d'" in problems[1][1]
