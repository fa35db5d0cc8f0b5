"""A dead-letter topic deleted while consumers run (newcomer8 N3, the part 2994cb7 left): the
failed send is named as the missing topic, its setting and `crm-erp-sync setup`, not as
"broker (dead-letter topic) unreachable" while the broker answers."""

from __future__ import annotations

import pytest

from service.avro import SchemaRegistry
from service.cdc.producer import CdcProducer
from service.consumer.pipeline import ErpApplier, Message, prepare
from service.erp.mappings import Mappings
from service.errors import ConnectionLost, Retryable
from service.kafka_io import make_admin, make_producer
from tests.conftest import SyncEnv
from tests.helpers import read_topic, wait_until


def test_a_deleted_dead_letter_topic_is_named_not_called_an_unreachable_broker(
        sync_env: SyncEnv) -> None:
    settings = sync_env.settings
    with sync_env.crm() as crm:
        crm.execute("INSERT INTO crm.customers (family_name, given_name, phone) VALUES "
                    "('张', '三', '138xxxx5678')")
    CdcProducer(settings, SchemaRegistry.load(settings.schemas_dir)).run(until_idle=True)
    [record] = read_topic(settings, settings.sales_topic)
    admin = make_admin(settings)
    try:
        admin.delete_topics([settings.dlq_topic])
        wait_until(lambda: settings.dlq_topic not in admin.list_topics(), timeout=60,
                   message="the dead-letter topic deleted")
    finally:
        admin.close()
    mappings = Mappings.load(settings.mappings_file)
    registry = SchemaRegistry.load(settings.schemas_dir)
    # max_block_ms bounded so that the test does not wait kafka-python's 60 s
    applier = ErpApplier(settings, registry, mappings,
                         dlq_producer=make_producer(settings, client_id="test-dlq",
                                                    max_block_ms=3_000))
    batch = prepare(registry, mappings, [Message(record.topic, record.partition, record.offset,
                                                 record.timestamp, record.key, record.value)])
    [envelope] = batch.envelopes
    assert envelope.error is not None  # the masked phone: a dead letter to send
    try:
        with pytest.raises(Retryable) as failed:
            applier.apply_batch(batch)
    finally:
        if applier.conn is not None:
            applier.conn.close()
    assert not isinstance(failed.value, ConnectionLost)
    text = str(failed.value)
    assert "unreachable" not in text, text
    assert text.startswith(f"CRM_ERP_SYNC_DLQ_TOPIC: topic '{settings.dlq_topic}' "), text
    assert "does not exist on the broker" in text and "crm-erp-sync setup" in text
