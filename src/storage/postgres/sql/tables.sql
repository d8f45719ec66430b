-- Schema version 1: the tables. `@schema@` is the schema's quoted name, the one thing the
-- crate formats into SQL (validated as an identifier first). Times are milliseconds since the
-- Unix epoch; a record's `expires_at` is NULL when it never expires.

-- What this schema is: the owner mark and the version (schema.rs reads them before anything).
CREATE TABLE @schema@.oq_info (
    key text PRIMARY KEY,
    value text NOT NULL
);

-- Seqs for every recipient: values only grow, so a queue emptied, removed and created again
-- never hands out a seq its recipient has seen. CACHE 1 (the default) keeps nextval
-- increasing in call order across connections.
CREATE SEQUENCE @schema@.oq_seq AS bigint MINVALUE 1 CACHE 1;

-- One row per recipient with anything stored (kept when its records are acked, until idle
-- removal): the lock every change to the queue takes first, and its counters. Nothing here
-- that appends and acks change is indexed except through `idle_key`, which only purge moves,
-- so their updates stay HOT (no new index entries); fillfactor leaves room on the page.
CREATE TABLE @schema@.oq_queues (
    rid bytea PRIMARY KEY,
    live bigint NOT NULL,
    bytes bigint NOT NULL,
    lost_total bigint NOT NULL,
    lost_confirmed bigint NOT NULL,
    touched bigint NOT NULL,
    idle_key bigint NOT NULL,
    -- Every record at or below this seq was removed from the front (a cumulative ack, or
    -- DropOldest): reads, drops and stats start past it, so they do not walk the index
    -- entries of removed rows that vacuum has not cleared yet. Always a seq this queue held,
    -- so every later seq is above it.
    head bigint NOT NULL DEFAULT 0
) WITH (fillfactor = 70);
CREATE INDEX oq_queues_idle ON @schema@.oq_queues (idle_key);

-- The records, in seq order per recipient through the primary key.
CREATE TABLE @schema@.oq_records (
    rid bytea NOT NULL,
    seq bigint NOT NULL,
    id bytea NOT NULL,
    sent_at bigint NOT NULL,
    expires_at bigint,
    deliveries integer NOT NULL DEFAULT 0,
    body bytea NOT NULL,
    PRIMARY KEY (rid, seq)
) WITH (fillfactor = 90);
-- Purge reads due records through this, so removing k costs O(k log n).
CREATE INDEX oq_records_expiry ON @schema@.oq_records (expires_at) WHERE expires_at IS NOT NULL;

-- Sender-chosen ids within their dedup window: `at` is when stored, `until` when the window
-- (as the storing append gave it) ends; purge drops rows past `until` through its index.
CREATE TABLE @schema@.oq_dedup (
    rid bytea NOT NULL,
    id bytea NOT NULL,
    seq bigint NOT NULL,
    at bigint NOT NULL,
    until bigint NOT NULL,
    PRIMARY KEY (rid, id)
);
CREATE INDEX oq_dedup_until ON @schema@.oq_dedup (until);

-- Body bytes stored, in 16 stripes: a transaction adds to the stripe of its connection
-- (backend pid mod 16), so appends on different connections do not queue on one row; an
-- append under a storage-wide budget locks all 16 in order and sums them, which is exact.
CREATE TABLE @schema@.oq_bytes (
    stripe integer PRIMARY KEY,
    bytes bigint NOT NULL
);
INSERT INTO @schema@.oq_bytes SELECT s, 0 FROM generate_series(0, 15) AS s;
