"""The foundation: a real broker and real databases, reached with the service's own clients."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

from kafka import OffsetAndMetadata, TopicPartition

from service.avro import SchemaRegistry
from service.kafka_io import make_consumer, make_producer
from tests.conftest import SyncEnv


def test_avro_event_round_trips_through_the_broker_in_a_group(sync_env: SyncEnv) -> None:
    settings = sync_env.settings
    registry = SchemaRegistry.load(settings.schemas_dir)
    event = {
        "event_id": "16B374D8/0",
        "op": "CREATE",
        "source": {"lsn": 0x16B374D8, "seq": 0, "txid": 42, "table": "crm.customers",
                   "commit_time": dt.datetime(2023, 1, 1, 8, 0, tzinfo=dt.UTC),
                   "snapshot": False, "profile": "demo"},
        "key": "1",
        "before": None,
        "after": {"key": "1", "family_name": "张", "given_name": "三",
                  "name_order": "eastern", "gender": "男",
                  "birth_date": dt.date(1995, 5, 1), "phone": "138 1234 5678",
                  "address": "北京市朝阳区XX路XX号",
                  "purchase_frequency": "每月1次", "purchase_amount": "1000.00",
                  "product_preference": "电子产品"},
    }
    producer = make_producer(settings)
    meta = producer.send(settings.sales_topic, key=b"1",
                         value=registry.encode("customer", event)).get(timeout=30)
    producer.close()

    consumer = make_consumer(settings, settings.sales_topic)
    try:
        received = []
        for _ in range(50):
            for records in consumer.poll(timeout_ms=500).values():
                received.extend(records)
            if received:
                break
        assert len(received) == 1
        record = received[0]
        assert (record.partition, record.offset) == (meta.partition, meta.offset)
        kind, decoded = registry.decode(record.value)
        assert kind == "customer"
        assert decoded["after"]["family_name"] + decoded["after"]["given_name"] == "张三"
        assert Decimal(decoded["after"]["purchase_amount"]) == Decimal("1000.00")
        tp = TopicPartition(record.topic, record.partition)
        consumer.commit({tp: OffsetAndMetadata(record.offset + 1, "", -1)})
        assert consumer.committed(tp) == record.offset + 1
    finally:
        consumer.close()


def test_both_databases_accept_writes_and_reads(sync_env: SyncEnv) -> None:
    with sync_env.crm() as crm:
        assert crm.execute("SHOW wal_level").fetchone() == ("logical",)
        crm.execute("INSERT INTO crm.customers (family_name, given_name) VALUES ('张', '三')")
        assert crm.execute("SELECT family_name || given_name FROM crm.customers").fetchone() \
            == ("张三",)
    with sync_env.erp() as erp:
        version = erp.execute("SHOW server_version").fetchone()
        assert version is not None and version[0].startswith("15")
        erp.execute("INSERT INTO erp.stock (sku) VALUES ('SKU-1')")
        assert erp.execute("SELECT on_hand, reserved FROM erp.stock").fetchone() \
            == (Decimal("1000000.000"), Decimal("0.000"))
