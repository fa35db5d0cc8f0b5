"""service.kafka_io: the clients' options (memory bounds, guarantees), without a broker."""

from __future__ import annotations

from service.kafka_io import (
    FETCH_MAX_BYTES,
    PARTITION_FETCH_BYTES,
    consumer_options,
    producer_options,
)
from service.settings import Settings


def test_a_consumer_buffers_at_most_a_bounded_fetch_per_partition_and_per_response() -> None:
    options = consumer_options(Settings())
    # kafka-python's defaults (1 MiB per partition, 50 MiB per response) are not kept
    assert options["max_partition_fetch_bytes"] == PARTITION_FETCH_BYTES <= 256 * 1024
    assert options["fetch_max_bytes"] == FETCH_MAX_BYTES <= 4 * 1024 * 1024
    assert options["max_partition_fetch_bytes"] <= options["fetch_max_bytes"]


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
