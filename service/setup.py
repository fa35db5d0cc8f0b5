"""`crm-erp-sync setup`: everything the pipeline needs, created idempotently."""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources

from service.cdc.capture import Repair, ensure_capture_objects
from service.cdc.profile import load_profile
from service.kafka_io import ensure_topics
from service.pg import connect, privileges_needed
from service.settings import Settings


@dataclass(frozen=True)
class SetupReport:
    """What `setup` did: the topics it created, whether it created the demo CRM's tables,
    and whether the producer's replication slot already exists (the producer creates it at
    its first start; `setup` never does). ``publication_repaired``: the captured tables it
    brought back to the source profile in the publication (re-added, or given the profile's
    row filter), each with the snapshot it requested (only once the slot exists: before,
    the producer's first start snapshots everything). ``erp_totals_added``: it added
    ``erp.sales_orders.total_amount`` to an ERP holding orders from before (an upgrade)."""

    topics_created: list[str]
    demo_crm_schema: bool
    slot_exists: bool = False
    publication_repaired: list[Repair] = field(default_factory=list)
    erp_totals_added: bool = False


def ensure_erp_schema(settings: Settings) -> bool:
    """Create or upgrade the schemas in ``CRM_ERP_SYNC_ERP_DSN``: the sync state (``sync.*``,
    ``sync_schema.sql``) for every target, and with the ``sql`` target its ERP (``erp.*``,
    ``schema.sql``, first); another target's ERP is elsewhere (Tryton), so no ``erp.*``
    table is made for it. True when it added ``erp.sales_orders.total_amount`` to orders
    applied before (an upgrade: their totals are NULL until re-read). Raises
    PrivilegeMissing when the ERP role may not create or alter them."""
    sql_erp = settings.erp_target == "sql"
    with connect(settings.erp_dsn, "ERP") as conn, privileges_needed(
            conn, "ERP", "create or upgrade the sync state schemas (sync"
            + (", erp)" if sql_erp else ")"),
            "run `crm-erp-sync setup` with an ERP role that owns them, or may create "
            "schemas in the database (the database's owner or an administrator)"):
        row = conn.execute(
            "SELECT to_regclass('erp.sales_orders') IS NOT NULL AND NOT EXISTS (SELECT 1 "
            "FROM pg_attribute WHERE attrelid = to_regclass('erp.sales_orders') AND "
            "attname = 'total_amount' AND NOT attisdropped)").fetchone()
        files = ("schema.sql", "sync_schema.sql") if sql_erp else ("sync_schema.sql",)
        for name in files:
            conn.execute(resources.files("service.erp").joinpath(name).read_text("utf-8"))
    return sql_erp and bool(row and row[0])


def ensure_demo_crm_schema(settings: Settings) -> bool:
    """On a CRM without our demo tables (the local stack), create them."""
    with connect(settings.crm_dsn, "CRM") as conn:
        present = conn.execute("SELECT to_regclass('crm.customers') IS NOT NULL").fetchone()
        if present and present[0]:
            return False
        conn.execute(resources.files("service.demo").joinpath("crm_schema.sql")
                     .read_text("utf-8"))
        return True


def run_setup(settings: Settings, *, demo_crm: bool = True) -> SetupReport:
    """Create or upgrade everything (topics, the CRM's publication and producer schema, the
    ERP's sync schema). A publication that drifted from the source profile (a table dropped
    from it, a row filter changed in the profile) is brought to the profile, and each table
    it repaired is re-snapshotted (its changes meanwhile were never decoded).

    Raises PrivilegeMissing (PublicationNotRepaired for a drifted publication the role may
    not alter) naming what to grant or who must run it."""
    demo_crm = demo_crm and settings.source_profile == "demo"
    created_demo = ensure_demo_crm_schema(settings) if demo_crm else False
    with connect(settings.crm_dsn, "CRM") as conn:
        slot_exists = conn.execute("SELECT 1 FROM pg_replication_slots WHERE slot_name = %s",
                                   (settings.slot_name,)).fetchone() is not None
        repaired = ensure_capture_objects(conn, settings, load_profile(settings.source_profile),
                                          resnapshot=slot_exists)
    totals_added = ensure_erp_schema(settings)
    return SetupReport(ensure_topics(settings), created_demo, slot_exists, repaired,
                       totals_added)
