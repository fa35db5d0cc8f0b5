-- The sync state, created by `crm-erp-sync setup` in CRM_ERP_SYNC_ERP_DSN for every ERP target:
-- held events, dead letters, the breaker, consumers' reports, pauses, reconcile runs and
-- truncations. With the `sql` target it sits beside the ERP's own tables (schema.sql, run
-- first), written in the same transaction as the apply; with `tryton` it is all `setup`
-- creates there (the consumer adds tryton_positions itself).
CREATE SCHEMA IF NOT EXISTS sync;

-- Events held back, in arrival order per key: an order whose customer has not arrived yet
-- ('awaiting_customer'), or any event of a key that has an open dead letter ('key_blocked').
CREATE TABLE IF NOT EXISTS sync.held_events (
    held_id      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    topic        text NOT NULL,
    partition    integer NOT NULL,
    "offset"     bigint NOT NULL,
    msg_key      bytea,
    msg_value    bytea,
    msg_timestamp bigint NOT NULL,
    reason       text NOT NULL CHECK (reason IN ('awaiting_customer', 'key_blocked')),
    waits_for    text,              -- the customer key awaited
    held_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    UNIQUE (topic, partition, "offset")
);

-- Every dead letter and what became of it; the DLQ topic holds the bytes, this the state.
CREATE TABLE IF NOT EXISTS sync.dead_letters (
    dead_letter_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    topic          text NOT NULL,
    partition      integer NOT NULL,
    "offset"       bigint NOT NULL,
    msg_key        bytea,
    stage          text NOT NULL,
    error_class    text NOT NULL,
    error_message  text NOT NULL,
    state          text NOT NULL DEFAULT 'open'
                   CHECK (state IN ('open', 'redriven', 'discarded', 'failed_again')),
    dlq_partition  integer,
    dlq_offset     bigint,
    created_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
    UNIQUE (topic, partition, "offset")
);
CREATE INDEX IF NOT EXISTS dead_letters_open_key ON sync.dead_letters (msg_key) WHERE state = 'open';

-- Operator toolkit (`crm-erp-sync dlq ...`): what became of each dead letter, and an audit
-- record of every action taken on one (who, when, why, outcome). A letter that failed again
-- still blocks its key, like an open one.
ALTER TABLE sync.dead_letters ADD COLUMN IF NOT EXISTS resolved_at timestamptz;
ALTER TABLE sync.dead_letters ADD COLUMN IF NOT EXISTS last_error text;
ALTER TABLE sync.dead_letters ADD COLUMN IF NOT EXISTS redrive_attempts integer NOT NULL DEFAULT 0;
CREATE INDEX IF NOT EXISTS dead_letters_unresolved_key ON sync.dead_letters (msg_key)
    WHERE state IN ('open', 'failed_again');
CREATE TABLE IF NOT EXISTS sync.dead_letter_actions (
    action_id      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    dead_letter_id bigint NOT NULL REFERENCES sync.dead_letters (dead_letter_id),
    action         text NOT NULL CHECK (action IN ('redrive', 'discard')),
    actor          text NOT NULL,
    reason         text,
    outcome        text NOT NULL,   -- redriven | held | failed_again | discarded
    detail         text,            -- the new error when it failed again
    at             timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX IF NOT EXISTS dead_letter_actions_letter ON sync.dead_letter_actions (dead_letter_id);
-- Finding N5: the mappings version a redrive mapped with (12 hex digits, as consumers report
-- theirs in sync.consumers); NULL for a discard, and for actions recorded before the column.
ALTER TABLE sync.dead_letter_actions ADD COLUMN IF NOT EXISTS mappings_version text;

-- Read by every batch (the blocked keys of its messages, the orders awaiting its customers):
-- index lookups, not scans of everything held.
CREATE INDEX IF NOT EXISTS held_events_blocked_key ON sync.held_events (msg_key)
    WHERE reason = 'key_blocked';
CREATE INDEX IF NOT EXISTS held_events_awaiting ON sync.held_events (waits_for)
    WHERE reason = 'awaiting_customer';

-- Issue #12 item 7: a newer event of the same row that maps supersedes its dead letter (the
-- consumer marks it 'superseded' and audits it as action 'supersede'). event_kind (customer,
-- order, market_demand) tells which row a letter is about; NULL for letters from before.
ALTER TABLE sync.dead_letters ADD COLUMN IF NOT EXISTS event_kind text;
-- Issue #14: a capture dead letter names the CRM row it is about (table, primary key as text;
-- msg_key is the Kafka key, the customer's for orders and lines), for `status` and `dlq list`.
ALTER TABLE sync.dead_letters ADD COLUMN IF NOT EXISTS source_table text;
ALTER TABLE sync.dead_letters ADD COLUMN IF NOT EXISTS source_key text;
-- The producer's event id (<lsn>/<seq>, stable when it re-sends a transaction after a crash,
-- at new offsets): a re-sent event that has its letter already is not a new failure. NULL when
-- the message did not decode, and for letters from before. Not unique: older rows may repeat.
ALTER TABLE sync.dead_letters ADD COLUMN IF NOT EXISTS event_id text;
CREATE INDEX IF NOT EXISTS dead_letters_event ON sync.dead_letters (topic, event_id)
    WHERE event_id IS NOT NULL;
ALTER TABLE sync.dead_letters DROP CONSTRAINT IF EXISTS dead_letters_state_check;
ALTER TABLE sync.dead_letters ADD CONSTRAINT dead_letters_state_check
    CHECK (state IN ('open', 'redriven', 'discarded', 'failed_again', 'superseded'));
ALTER TABLE sync.dead_letter_actions DROP CONSTRAINT IF EXISTS dead_letter_actions_action_check;
ALTER TABLE sync.dead_letter_actions ADD CONSTRAINT dead_letter_actions_action_check
    CHECK (action IN ('redrive', 'discard', 'supersede'));

-- The dead-letter circuit breaker, per consumer group and partition. A row per trip: while
-- 'tripped' the partition is paused in every consumer of the group (they poll this table);
-- `crm-erp-sync resume` sets it 'resumed' with who and why (the audit). Offsets up to
-- through_offset were seen when it tripped and are not judged again after the resume.
CREATE TABLE IF NOT EXISTS sync.breaker_trips (
    trip_id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    consumer_group text NOT NULL,
    topic          text NOT NULL,
    partition      integer NOT NULL,
    state          text NOT NULL DEFAULT 'tripped' CHECK (state IN ('tripped', 'resumed')),
    tripped_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
    messages       integer NOT NULL,           -- judged in the window
    dead_letters   integer NOT NULL,           -- of those, would be dead-lettered
    max_ratio      double precision NOT NULL,  -- the limit
    min_messages   integer NOT NULL,
    window_s       double precision NOT NULL,
    from_offset    bigint NOT NULL,            -- the first offset not applied (resumes here)
    through_offset bigint NOT NULL,
    message        text NOT NULL,
    last_reasons   text[] NOT NULL,            -- error class: field (no values; breaker.last_reasons)
    resumed_at     timestamptz,
    resumed_by     text,
    resume_reason  text
);
CREATE UNIQUE INDEX IF NOT EXISTS breaker_trips_open ON sync.breaker_trips
    (consumer_group, topic, partition) WHERE state = 'tripped';

-- Running consumers (group members), each refreshing its row every few seconds: the mappings
-- file version it applies (12 hex digits of the file's SHA-256) and, when a newer file on
-- disk was refused, that file's version and why (file and key). `crm-erp-sync status` reads
-- it; rows not refreshed for a minute are stopped members (service/consumer/mappings_watch.py).
CREATE TABLE IF NOT EXISTS sync.consumers (
    consumer_group     text NOT NULL,
    member_id          text NOT NULL,               -- host:pid:random
    host               text NOT NULL,
    pid                integer NOT NULL,
    mappings_file      text NOT NULL,
    mappings_version   text NOT NULL,
    mappings_loaded_at timestamptz NOT NULL,
    refused_version    text,                        -- NULL: the file on disk is the one applied
    refused_error      text,
    started_at         timestamptz NOT NULL DEFAULT clock_timestamp(),
    seen_at            timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (consumer_group, member_id)
);

-- Issue #14: every running consumer reports itself here every CRM_ERP_SYNC_MEMBERSHIP_CHECK_S
-- (service/consumer/membership.py): whether the broker lists it in its group, since when it
-- is outside, its partitions and mappings version. `status` sets this beside the broker's
-- member list, so a live process outside the group is seen. A clean stop deletes the row.
CREATE TABLE IF NOT EXISTS sync.consumer_membership (
    consumer_group   text NOT NULL,
    client_id        text NOT NULL,
    host             text NOT NULL,
    pid              integer NOT NULL,
    member_id        text NOT NULL,
    in_group         boolean NOT NULL,
    out_since        timestamptz,
    assigned         text[] NOT NULL,
    mappings_version text NOT NULL,
    started_at       timestamptz NOT NULL,
    last_seen        timestamptz NOT NULL,
    rejoins          integer NOT NULL DEFAULT 0,
    PRIMARY KEY (consumer_group, client_id)
);

-- Issue #14 item 7: `crm-erp-sync pause` / `resume`: consumption paused by an operator, per
-- partition (audited: who, when, why). Running consumers read it with the breaker's state
-- (every CRM_ERP_SYNC_BREAKER_POLL_S), so a pause survives restarts and rebalances.
-- Issue #14 item 8: a consumer outside its apply window (CRM_ERP_SYNC_APPLY_WINDOW) says until
-- when, so `status` reports what the consumers do ("outside apply window until ...").
ALTER TABLE sync.consumer_membership ADD COLUMN IF NOT EXISTS apply_window_closed_until
    timestamptz;

CREATE TABLE IF NOT EXISTS sync.operator_pauses (
    pause_id       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    consumer_group text NOT NULL,
    topic          text NOT NULL,
    partition      integer NOT NULL,
    state          text NOT NULL DEFAULT 'paused' CHECK (state IN ('paused', 'resumed')),
    paused_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    paused_by      text NOT NULL,
    reason         text NOT NULL,
    resumed_at     timestamptz,
    resumed_by     text,
    resume_reason  text
);
CREATE UNIQUE INDEX IF NOT EXISTS operator_pauses_open ON sync.operator_pauses
    (consumer_group, topic, partition) WHERE state = 'paused';

-- Issue #14 item 8: every `crm-erp-sync reconcile` run records its drift counts here (by
-- entity and kind); running consumers export the newest run as gauges on /metrics
-- (crm_erp_sync_reconcile_drift{entity,kind}, crm_erp_sync_reconcile_last_run_timestamp_seconds)
-- so a scheduled reconcile (deploy/k8s/examples/reconcile-cronjob.yaml) can be alerted on.
CREATE TABLE IF NOT EXISTS sync.reconcile_runs (
    run_id       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    finished_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    entities     text[] NOT NULL,
    -- {"customers": {"missing": 0, "extra": 0, "differing": 1, "unmappable": 0, "held": 2}, ...}
    counts       jsonb NOT NULL,
    drift        integer NOT NULL,
    repaired     boolean NOT NULL
);

-- Issue #11 item 4: a TRUNCATE of a captured CRM table (CRM_ERP_SYNC_ON_TRUNCATE=propagate)
-- marks every ERP row of its entity older than the truncate deleted; the truncate's position
-- stays here as the entity's watermark, so an older event arriving later (another partition
-- lagging, a held event released) is not applied. Written in the batch's transaction.
CREATE TABLE IF NOT EXISTS sync.truncations (
    entity          text PRIMARY KEY
                    CHECK (entity IN ('customer', 'order', 'order_line', 'market_demand')),
    source_lsn      bigint NOT NULL DEFAULT 0,   -- the newest truncate applied (0: none)
    source_seq      integer NOT NULL DEFAULT 0,
    event_id        text,
    crm_table       text,
    crm_commit_time timestamptz,
    applied_at      timestamptz,
    truncates       integer NOT NULL DEFAULT 0,  -- truncates applied
    rows_marked     bigint NOT NULL DEFAULT 0    -- ERP rows they marked deleted
);
INSERT INTO sync.truncations (entity)
VALUES ('customer'), ('order'), ('order_line'), ('market_demand') ON CONFLICT DO NOTHING;

-- Finding F12: offsets a consumer found deleted from a topic before the group applied them
-- (retention, delete-records: the log start moved past its position), written by the
-- consumer on its ERP connection when it detects them (service/consumer/gaps.py); `status`
-- names each until a `reconcile` over every entity started after it finds the ERP matching
-- (that run sets resolved_at). No sequence: the consumer role's grants suffice.
CREATE TABLE IF NOT EXISTS sync.offset_gaps (
    consumer_group text NOT NULL,
    topic          text NOT NULL,
    partition      integer NOT NULL,
    first_lost     bigint NOT NULL,      -- the first offset deleted unapplied
    next_kept      bigint NOT NULL,      -- the log start the consumer went on from
    detected_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    resolved_at    timestamptz,
    PRIMARY KEY (consumer_group, topic, partition, first_lost)
);
