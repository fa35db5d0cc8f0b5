-- The `sql` ERP target's ERP (erp.*), created by `crm-erp-sync setup` with that target only
-- (the sync state, sync.*, is sync_schema.sql, run after this file). The ERP speaks its own
-- vocabulary; every synced row records the source position (commit LSN, seq) of the change
-- it reflects and is only ever overwritten by a newer one. Deletes are soft (deleted = true)
-- so that the position survives: an older event replayed later cannot resurrect a deleted
-- row.
CREATE SCHEMA IF NOT EXISTS erp;

-- Up to 0.2 CRM keys were bigint: an ERP created then is migrated to text keys in place.
DO $$ BEGIN
    IF (SELECT data_type FROM information_schema.columns WHERE table_schema = 'erp'
        AND table_name = 'business_partners' AND column_name = 'crm_customer_id') = 'bigint' THEN
        ALTER TABLE erp.business_partners DROP COLUMN partner_no;
        ALTER TABLE erp.business_partners ALTER COLUMN crm_customer_id TYPE text;
        ALTER TABLE erp.business_partners ADD COLUMN partner_no text GENERATED ALWAYS AS
            ('BP' || CASE WHEN crm_customer_id ~ '^[0-9]{1,10}$'
             THEN lpad(crm_customer_id, 10, '0') ELSE crm_customer_id END) STORED;
        ALTER TABLE erp.sales_orders ALTER COLUMN crm_order_id TYPE text,
            ALTER COLUMN crm_customer_id TYPE text;
        -- Demo CRM lines were keyed (order_id, line_no): the line key is that pair as text.
        ALTER TABLE erp.sales_order_items ALTER COLUMN crm_order_id TYPE text,
            ALTER COLUMN line_no TYPE text
                USING '["' || crm_order_id::text || '","' || line_no::text || '"]';
        ALTER TABLE erp.sales_order_items RENAME COLUMN line_no TO crm_line_id;
        ALTER TABLE erp.order_stock_effects ALTER COLUMN crm_order_id TYPE text;
        ALTER TABLE erp.demand_signals ALTER COLUMN crm_demand_id TYPE text;
        ALTER TABLE sync.held_events ALTER COLUMN waits_for TYPE text;
    END IF;
END $$;

CREATE TABLE IF NOT EXISTS erp.business_partners (
    crm_customer_id    text PRIMARY KEY,     -- the CRM's key as text (42, a UUID)
    partner_no         text GENERATED ALWAYS AS ('BP' || CASE WHEN crm_customer_id ~ '^[0-9]{1,10}$'
                       THEN lpad(crm_customer_id, 10, '0') ELSE crm_customer_id END) STORED,
    full_name          text NOT NULL,
    gender_code        text NOT NULL,
    birth_date         date,
    age                integer,            -- at the CRM commit time of the change
    phone_e164         text,
    email              text,
    province           text,
    city               text,
    district           text,
    street             text,
    purchase_frequency text,
    purchase_amount    numeric(14, 2),
    amount_currency    char(3),
    product_preference text,
    notes              text,
    deleted            boolean NOT NULL DEFAULT false,
    source_lsn         bigint NOT NULL,
    source_seq         integer NOT NULL,
    event_id           text NOT NULL,
    crm_commit_time    timestamptz NOT NULL,
    applied_at         timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- Issue #12: a phone's extension and further numbers, and the address's GB/T 2260 code.
-- Added, not recreated, so that an existing ERP database upgrades in place.
ALTER TABLE erp.business_partners ADD COLUMN IF NOT EXISTS phone_extension text;
ALTER TABLE erp.business_partners ADD COLUMN IF NOT EXISTS phone_others text[];
ALTER TABLE erp.business_partners ADD COLUMN IF NOT EXISTS division_code char(6);

CREATE TABLE IF NOT EXISTS erp.sales_orders (
    crm_order_id    text PRIMARY KEY,
    order_no        text NOT NULL,
    crm_customer_id text NOT NULL,
    order_date      date NOT NULL,
    status_code     text NOT NULL,
    currency        char(3) NOT NULL,
    deleted         boolean NOT NULL DEFAULT false,
    source_lsn      bigint NOT NULL,
    source_seq      integer NOT NULL,
    event_id        text NOT NULL,
    crm_commit_time timestamptz NOT NULL,
    applied_at      timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX IF NOT EXISTS sales_orders_customer ON erp.sales_orders (crm_customer_id);
-- The order's total as the CRM has it (NULL when the CRM keeps none, as the demo CRM);
-- added, not recreated, so that an existing ERP database upgrades in place.
ALTER TABLE erp.sales_orders ADD COLUMN IF NOT EXISTS total_amount numeric(14, 2);

CREATE TABLE IF NOT EXISTS erp.sales_order_items (
    crm_order_id  text NOT NULL,
    crm_line_id   text NOT NULL,         -- the line's CRM key as text (JSON array if composite)
    sku           text NOT NULL,
    product_name  text NOT NULL,
    quantity      numeric(14, 3) NOT NULL CHECK (quantity > 0),
    unit_code     text NOT NULL,
    unit_price    numeric(14, 2) NOT NULL CHECK (unit_price >= 0),
    deleted       boolean NOT NULL DEFAULT false,
    source_lsn    bigint NOT NULL,
    source_seq    integer NOT NULL,
    PRIMARY KEY (crm_order_id, crm_line_id)
);

-- The stock effect of each ERP status, loaded from the mappings file at start-up.
CREATE TABLE IF NOT EXISTS erp.status_effects (
    status_code text PRIMARY KEY,
    effect      text NOT NULL CHECK (effect IN ('none', 'reserve', 'issue', 'release'))
);

-- Each order's current contribution to stock, derived from its status and items: recomputed
-- whenever the order changes, so duplicates and replays cannot count twice.
CREATE TABLE IF NOT EXISTS erp.order_stock_effects (
    crm_order_id text NOT NULL,
    sku          text NOT NULL,
    effect       text NOT NULL,
    quantity     numeric(16, 3) NOT NULL,
    PRIMARY KEY (crm_order_id, sku, effect)
);

CREATE TABLE IF NOT EXISTS erp.stock (
    sku             text PRIMARY KEY,
    opening_on_hand numeric(16, 3) NOT NULL DEFAULT 1000000,
    reserved        numeric(16, 3) NOT NULL DEFAULT 0,
    issued          numeric(16, 3) NOT NULL DEFAULT 0,
    on_hand         numeric(16, 3) GENERATED ALWAYS AS (opening_on_hand - issued) STORED
);

CREATE TABLE IF NOT EXISTS erp.demand_signals (
    crm_demand_id    text PRIMARY KEY,
    signal_type      text NOT NULL,
    product_category text NOT NULL,
    content          text NOT NULL,
    observed_at      timestamptz NOT NULL,
    deleted          boolean NOT NULL DEFAULT false,
    source_lsn       bigint NOT NULL,
    source_seq       integer NOT NULL,
    event_id         text NOT NULL,
    crm_commit_time  timestamptz NOT NULL,
    applied_at       timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE INDEX IF NOT EXISTS order_stock_effects_sku ON erp.order_stock_effects (sku);

-- Stock in each SKU's base unit (mappings.toml [sku_units]): every line keeps its quantity as
-- typed (quantity, unit_code) and in its SKU's base unit; stock totals are in that unit only.
-- Lines written before these columns existed hold NULL, and count nowhere, until
-- `crm-erp-sync stock recount` converts them (consumers refuse to start until then).
ALTER TABLE erp.sales_order_items ADD COLUMN IF NOT EXISTS base_quantity numeric(16, 3)
    CHECK (base_quantity > 0);
ALTER TABLE erp.sales_order_items ADD COLUMN IF NOT EXISTS base_unit text;
ALTER TABLE erp.stock ADD COLUMN IF NOT EXISTS base_unit text;
-- The unit of the last difference added (STOCK_DELTA): a difference in another unit than the
-- total's (a base unit changed under running consumers) is refused by the database itself.
ALTER TABLE erp.stock ADD COLUMN IF NOT EXISTS delta_unit text;
ALTER TABLE erp.stock DROP CONSTRAINT IF EXISTS stock_delta_in_base_unit;
ALTER TABLE erp.stock ADD CONSTRAINT stock_delta_in_base_unit
    CHECK (delta_unit IS NULL OR base_unit IS NULL OR delta_unit = base_unit);
