"""Shared by the benchmarks: a private set of databases and topics on the local stack."""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg

from service.settings import Settings
from service.setup import run_setup


@contextmanager
def bench_settings(**overrides: object) -> Iterator[Settings]:
    base = Settings.from_env()
    tag = f"bench_{uuid.uuid4().hex[:8]}"
    admin = base.crm_dsn
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "crm_{tag}"')
        conn.execute(f'CREATE DATABASE "erp_{tag}"')
    prefix = base.crm_dsn.rsplit("/", 1)[0]
    settings = dataclasses.replace(
        base, crm_dsn=f"{prefix}/crm_{tag}", erp_dsn=f"{prefix}/erp_{tag}",
        sales_topic=f"{tag}.sales", market_topic=f"{tag}.market", dlq_topic=f"{tag}.dlq",
        consumer_group=f"{tag}.erp", slot_name=f"slot_{tag}", publication_name=f"pub_{tag}",
        **overrides)
    run_setup(settings)
    try:
        yield settings
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                         "WHERE slot_name = %s AND NOT active", (settings.slot_name,))
            conn.execute(f'DROP DATABASE IF EXISTS "crm_{tag}" WITH (FORCE)')
            conn.execute(f'DROP DATABASE IF EXISTS "erp_{tag}" WITH (FORCE)')
        from service.kafka_io import make_admin

        kafka_admin = make_admin(settings)
        try:
            kafka_admin.delete_topics([settings.sales_topic, settings.market_topic,
                                       settings.dlq_topic])
        finally:
            kafka_admin.close()


def percentile(values: list[float], pct: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(pct) - 1]


# N synthetic customers in one statement (ids lo..hi): the benchmarks' unit of CRM change.
CUSTOMER_INSERT = (
    "INSERT INTO crm.customers (family_name, given_name, gender, phone, email, address, "
    "purchase_amount) SELECT '张', '三' || g, '男', '138' || lpad(g::text, 8, '0'), "
    "'u' || g || '@example.com', '北京市朝阳区建国路' || g || '号', 1000.00 "
    "FROM generate_series(%s::int, %s::int) g")


def load_arguments(description: str | None) -> argparse.Namespace:
    """--changes for the burst, --rate and --seconds for the fixed-rate latency run."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--changes", type=int, default=50_000)
    parser.add_argument("--rate", type=int, default=1000)
    parser.add_argument("--seconds", type=int, default=10)
    return parser.parse_args()
