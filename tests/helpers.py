"""Helpers shared by tests."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def wait_until(condition: Callable[[], Any], timeout: float = 60.0, interval: float = 0.2,
               message: str = "condition") -> Any:
    """Poll until condition() is truthy; fail with the message after the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {message}")
        time.sleep(interval)


def read_topic(settings: Any, topic: str, timeout: float = 30.0) -> list[Any]:
    """Every record currently in the topic (all partitions, from the beginning)."""
    from kafka import TopicPartition

    from service.kafka_io import make_consumer

    consumer = make_consumer(settings, group_id=None, enable_auto_commit=False)
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        ends = consumer.end_offsets(tps)
        out: list[Any] = []
        deadline = time.monotonic() + timeout
        while any(consumer.position(tp) < ends[tp] for tp in tps):
            if time.monotonic() > deadline:
                raise AssertionError(f"could not read {topic} to its end within {timeout}s")
            for records in consumer.poll(timeout_ms=500, max_records=10_000).values():
                out.extend(records)
        return out
    finally:
        consumer.close()


def decoded_events(
    settings: Any, topic: str | None = None
) -> list[tuple[bytes, str, dict[str, Any], Any]]:
    """(key, kind, event, record) for every record of the topic, in partition order."""
    from service.avro import SchemaRegistry

    registry = SchemaRegistry.load(settings.schemas_dir)
    out = []
    for record in read_topic(settings, topic or settings.sales_topic):
        kind, event = registry.decode(record.value)
        out.append((record.key, kind, event, record))
    return out


def settings_env(settings: Any) -> dict[str, str]:
    """The environment that gives a child process these settings."""
    import dataclasses

    return {type(settings).env_var(f.name): str(getattr(settings, f.name))
            for f in dataclasses.fields(settings)}


def expected_erp(crm: Any, mappings: Any) -> dict[str, Any]:
    """What the ERP must hold, computed from the CRM's tables directly (not from events)."""
    from decimal import Decimal

    from service.erp import transform as tf
    from service.erp.units import to_base

    # Keys as the ERP holds them: the CRM's keys as text; a line's composite key (order_id,
    # line_no) as a compact JSON array of their text forms.
    partners = {str(cid) for (cid,) in crm.execute("SELECT customer_id FROM crm.customers")}
    orders = {str(oid): tf.order_status(status, mappings) for oid, status in
              crm.execute("SELECT order_id, status FROM crm.sales_orders")}
    items: dict[tuple[str, str], tuple[str, Decimal]] = {}
    reserved: dict[str, Decimal] = {}
    for oid, line_no, code, qty_text in crm.execute(
            "SELECT order_id, line_no, product_code, quantity FROM crm.order_lines"):
        sku = tf.sku_for(code, mappings)
        qty = tf.parse_quantity(qty_text, mappings)
        items[(str(oid), f'["{oid}","{line_no}"]')] = (sku, qty.value)
        if mappings.status_stock_effect[orders[str(oid)]] == "reserve":  # in the base unit
            reserved[sku] = reserved.get(sku, Decimal(0)) + to_base(sku, qty.value, qty.unit,
                                                                    mappings)
    return {"partners": partners, "orders": orders, "items": items,
            "reserved": {k: v for k, v in reserved.items() if v}}


def actual_erp(erp: Any) -> dict[str, Any]:
    partners = {cid for (cid,) in erp.execute(
        "SELECT crm_customer_id FROM erp.business_partners WHERE NOT deleted")}
    orders = dict(erp.execute(
        "SELECT crm_order_id, status_code FROM erp.sales_orders WHERE NOT deleted").fetchall())
    items = {(o, n): (sku, qty) for o, n, sku, qty in erp.execute(
        "SELECT i.crm_order_id, i.crm_line_id, i.sku, i.quantity FROM erp.sales_order_items i "
        "JOIN erp.sales_orders o USING (crm_order_id) WHERE NOT i.deleted AND NOT o.deleted")}
    reserved = {sku: qty for sku, qty in erp.execute(
        "SELECT sku, reserved FROM erp.stock WHERE reserved <> 0")}
    return {"partners": partners, "orders": orders, "items": items, "reserved": reserved}


def consume_until_caught_up(consumer: Any, timeout: float = 120.0) -> Any:
    """Run an ErpConsumer until the group has consumed every partition up to the end offsets
    seen at its start (``run(until_caught_up=True)``), within a deadline: a condition, not
    "idle for N seconds", so a slow join on a loaded machine only takes longer. Re-raises
    what the consumer raised; returns its stats."""
    import threading

    outcome: list[Any] = []

    def target() -> None:
        try:
            outcome.append(consumer.run(until_caught_up=True))
        except BaseException as exc:  # handed to the test's thread
            outcome.append(exc)

    thread = threading.Thread(target=target, name="consumer-under-test", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        consumer.stop()
        thread.join(60)
        raise AssertionError(f"the consumer did not catch up within {timeout:.0f}s")
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]
