//! The schema: its name (validated, quoted once), the DDL and the functions (the `sql/` files),
//! the version row, migrations, and the statement texts the storage runs.
//!
//! Every table and function lives in one schema of the user's choosing (default
//! `offline_queue`), named `oq_*`. `oq_info` holds an owner mark and the schema's version.
//! At connect, under an advisory lock (so nodes starting together do not race):
//! - no `oq_*` object in the schema: everything is created, at [`VERSION`];
//! - `oq_info` with our mark at [`VERSION`]: nothing to do; at an older version: the
//!   migrations from it run, in the same transaction; at a newer one: refused, with an error
//!   naming both versions (an older build must not write a layout it does not know);
//! - any `oq_*` object without our `oq_info`: refused, naming it, and left as it is (another
//!   application's table is never altered).
//!
//! The schema's quoted name is the one thing formatted into SQL text; ids, payloads and
//! every other value travel as parameters.

use crate::error::{Error, Result, Retry};
use crate::fnv::{OFFSET_64, fnv1a_64};

use super::errors::pg_error;

/// The layout this build reads and writes.
pub(super) const VERSION: i64 = 6;

/// What `oq_info`'s owner row says in a schema this crate created.
const OWNER: &str = "offline-queue";

/// Relations this crate creates (tables, indexes, the sequence).
const RELATIONS: &[&str] = &[
    "oq_info",
    "oq_seq",
    "oq_queues",
    "oq_queues_idle",
    "oq_records",
    "oq_records_expiry",
    "oq_dedup",
    "oq_dedup_until",
    "oq_bytes",
    "oq_nodes",
    "oq_presence",
    "oq_presence_node",
];

/// Functions this crate creates.
const FUNCTIONS: &[&str] = &[
    "oq_append",
    "oq_ack",
    "oq_read",
    "oq_purge",
    "oq_remove",
    "oq_take_queue",
    "oq_plan_append",
    "oq_append_many",
    "oq_wake_others",
    "oq_node_update",
    "oq_node_leave",
    "oq_mark",
    "oq_fold",
    "oq_seq_past",
];

/// The DDL of version 1, in order.
const V1: &[&str] = &[
    include_str!("sql/tables.sql"),
    include_str!("sql/ack.sql"),
    include_str!("sql/read.sql"),
    include_str!("sql/append.sql"),
    include_str!("sql/purge.sql"),
    include_str!("sql/remove.sql"),
];

/// Migrations: `MIGRATIONS[i]` takes a schema from version `i + 1` to `i + 2`. A new schema
/// runs [`V1`] and then every migration, so both paths build the same layout. A function
/// whose body changes gets a new version whose migration replaces it.
const MIGRATIONS: &[&[&str]] = &[
    // 2: nodes (leases, presence, wake-ups) and group commit (`oq_append_many`; `oq_append`
    // split into steps it shares, and waking other nodes).
    &[
        include_str!("sql/v2_nodes.sql"),
        include_str!("sql/v2_group_commit.sql"),
    ],
    // 3: purge reports the entries it examined (`PurgeOutcome::examined`).
    &[include_str!("sql/v3_purge_work.sql")],
    // 4: deliveries counted by a watermark in the queue row (`oq_read`, `oq_mark`); purge
    // counts only idle queues that held something.
    &[
        include_str!("sql/v4_delivered_watermark.sql"),
        include_str!("sql/v4_purge_idle_count.sql"),
    ],
    // 5: the append that fills an emptied queue again starts its idle time (`oq_plan_append`).
    &[include_str!("sql/v5_idle_after_refill.sql")],
    // 6: appends that update no row (`Statements::fast_append`), counted into the queue row by
    // the next step that changes it (`oq_fold`); seqs per queue.
    &[include_str!("sql/v6_appends_update_no_row.sql")],
];

/// A schema name: `[a-z_][a-z0-9_]*`, at most 63 bytes (PostgreSQL's limit), not `pg_*`.
/// Lowercase only, so the quoted name and the unquoted one a user types in `psql` agree.
pub(super) fn validate(schema: &str) -> Result<String> {
    let bad = |reason: &str| Error::InvalidConfig {
        field: "postgres schema",
        reason: format!("{schema:?} {reason}"),
    };
    if schema.is_empty() || schema.len() > 63 {
        return Err(bad("must be 1 to 63 bytes long"));
    }
    if !schema
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        || schema.as_bytes()[0].is_ascii_digit()
    {
        return Err(bad(
            "must be lowercase ASCII letters, digits and underscores, not starting with a digit",
        ));
    }
    if schema.starts_with("pg_") {
        return Err(bad("is reserved (pg_*)"));
    }
    Ok(format!("\"{schema}\""))
}

/// An advisory lock key for `what` in `schema`: stable across builds (FNV-1a).
pub(super) fn lock_key(schema: &str, what: &str) -> i64 {
    let hash = fnv1a_64(OFFSET_64, b"offline-queue:");
    let hash = fnv1a_64(hash, schema.as_bytes());
    let hash = fnv1a_64(hash, b":");
    fnv1a_64(hash, what.as_bytes()) as i64
}

/// The statement texts, with the schema's quoted name in place.
#[derive(Debug)]
pub(super) struct Statements {
    pub(super) append: String,
    pub(super) append_many: String,
    pub(super) fast_append: String,
    pub(super) read: String,
    pub(super) ack: String,
    pub(super) mark: String,
    pub(super) purge: String,
    pub(super) stats: String,
    pub(super) remove: String,
    pub(super) wake_others: String,
    pub(super) live_elsewhere: String,
    pub(super) node_update: String,
    pub(super) node_leave: String,
}

impl Statements {
    pub(super) fn new(quoted: &str) -> Self {
        let s = |text: &str| text.replace("@schema@", quoted);
        Self {
            append: s(
                "SELECT status, seqs, duplicate, dropped, pending, have_messages, \
                 have_bytes, adding, adding_bytes, elsewhere \
                 FROM @schema@.oq_append($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, \
                 $13, $14)",
            ),
            append_many: s(
                "SELECT status, seqs, duplicate, dropped, pending, have_messages, \
                 have_bytes, adding, adding_bytes, elsewhere \
                 FROM @schema@.oq_append_many($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, \
                 $12, $13, $14, $15)",
            ),
            fast_append: s(FAST_APPEND),
            read: s(
                "SELECT acked, seqs, ids, sent, expires, counts, bodies, expired, \
                 lost_total, lost_confirmed \
                 FROM @schema@.oq_read($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
            ),
            ack: s("SELECT @schema@.oq_ack($1, $2, $3, $4, $5, $6)"),
            mark: s("SELECT @schema@.oq_mark($1, $2)"),
            purge: s("SELECT expired, idle, more, examined FROM @schema@.oq_purge($1, $2, $3, $4)"),
            // With the appends not yet folded in (the newest record above `folded`).
            stats: s(
                "SELECT q.live + coalesce(n.cum_count, 0), q.bytes + coalesce(n.cum_bytes, 0), \
                 q.lost_total - q.lost_confirmed, \
                 (SELECT r.sent_at FROM @schema@.oq_records r \
                  WHERE r.rid = q.rid AND r.seq > q.head ORDER BY r.seq LIMIT 1), \
                 (SELECT r.seq FROM @schema@.oq_records r \
                  WHERE r.rid = q.rid ORDER BY r.seq DESC LIMIT 1) \
                 FROM @schema@.oq_queues q LEFT JOIN LATERAL ( \
                     SELECT r.cum_count, r.cum_bytes FROM @schema@.oq_records r \
                     WHERE r.rid = q.rid AND r.seq > q.folded ORDER BY r.seq DESC LIMIT 1 \
                 ) AS n ON true WHERE q.rid = $1",
            ),
            remove: s("SELECT @schema@.oq_remove($1)"),
            wake_others: s("SELECT @schema@.oq_wake_others($1, $2, $3)"),
            live_elsewhere: s("SELECT EXISTS (SELECT 1 FROM @schema@.oq_presence p \
                 JOIN @schema@.oq_nodes n ON n.node = p.node \
                 WHERE p.rid = $1 AND p.node <> $2 AND n.lease_until > clock_timestamp())"),
            node_update: s("SELECT @schema@.oq_node_update($1, $2, $3, $4)"),
            node_leave: s("SELECT @schema@.oq_node_leave($1)"),
        }
    }
}

/// Appends that need no decision, in one statement that updates no row (schema version 6, see
/// `sql/v6_appends_update_no_row.sql`). Parameters, one element per record: recipient, id,
/// sent, deadline, body, and its append's `max_messages`, `max_bytes` and time; then this
/// node's id and wake-up channel. Returns, per record in order, its seq, the queue's length
/// after it, and whether another node holds the recipient; all NULL for a recipient it left
/// (missing, empty with no loss to report, or without room): those go through
/// `oq_append_many`. Each queue row is share-locked in `rid` order, as every step takes them,
/// and records are inserted in `(rid, seq)` order, so two groups racing for a seq wait on one
/// another in one order, never in a cycle.
const FAST_APPEND: &str = "\
WITH a AS (
    SELECT * FROM unnest($1::bytea[], $2::bytea[], $3::bigint[], $4::bigint[], $5::bytea[],
        $6::bigint[], $7::bigint[], $8::bigint[])
        WITH ORDINALITY AS a (rid, id, sent_at, expires_at, body, max_messages, max_bytes, now, ord)
), per AS (
    SELECT a.rid, count(*) AS adding, sum(octet_length(a.body)) AS adding_bytes,
        min(a.max_messages) AS max_messages, min(a.max_bytes) AS max_bytes
    FROM a GROUP BY a.rid
), q AS MATERIALIZED (
    SELECT qu.rid, qu.live, qu.bytes, qu.folded, qu.head, qu.lost_total, qu.lost_confirmed,
        l.seq AS newest, l.cum_count, l.cum_bytes
    FROM @schema@.oq_queues qu
    LEFT JOIN LATERAL (
        SELECT r.seq, r.cum_count, r.cum_bytes FROM @schema@.oq_records r
        WHERE r.rid = qu.rid AND r.seq > qu.folded ORDER BY r.seq DESC LIMIT 1
    ) AS l ON true
    WHERE qu.rid = ANY (ARRAY(SELECT per.rid FROM per))
    ORDER BY qu.rid
    FOR KEY SHARE OF qu
), counted AS (
    -- A newest record at or below `folded` (a fold came after this snapshot) is counted in.
    SELECT q.rid, q.lost_total, q.lost_confirmed,
        greatest(q.newest, q.folded, q.head) AS base_seq,
        CASE WHEN q.newest > q.folded THEN q.cum_count ELSE 0 END AS base_count,
        CASE WHEN q.newest > q.folded THEN q.cum_bytes ELSE 0 END AS base_bytes,
        q.live, q.bytes
    FROM q
), ok AS (
    SELECT c.rid, c.base_seq, c.base_count, c.base_bytes, per.adding_bytes,
        c.live + c.base_count AS live_now
    FROM counted c JOIN per ON per.rid = c.rid
    WHERE (c.live + c.base_count > 0 OR c.lost_total > c.lost_confirmed)
      AND per.adding <= per.max_messages
      AND c.live + c.base_count <= per.max_messages - per.adding
      AND per.adding_bytes <= per.max_bytes
      AND c.bytes + c.base_bytes <= per.max_bytes - per.adding_bytes
), planned AS MATERIALIZED (
    SELECT a.ord, a.rid, ok.base_seq + row_number() OVER w AS seq, a.id, a.sent_at,
        a.expires_at, a.body, a.now,
        ok.base_count + row_number() OVER w AS cum_count,
        ok.base_bytes + sum(octet_length(a.body)) OVER w AS cum_bytes,
        ok.live_now + row_number() OVER w AS pending
    FROM a JOIN ok ON ok.rid = a.rid
    WINDOW w AS (PARTITION BY a.rid ORDER BY a.ord)
), ins AS (
    INSERT INTO @schema@.oq_records (rid, seq, id, sent_at, expires_at, body, cum_count,
        cum_bytes, stored_at)
    SELECT p.rid, p.seq, p.id, p.sent_at, p.expires_at, p.body, p.cum_count, p.cum_bytes, p.now
    FROM planned p ORDER BY p.rid, p.seq
    RETURNING 1
), stripe AS (
    -- After the records (the count reads them all first), as every step takes its stripe last.
    UPDATE @schema@.oq_bytes b SET bytes = b.bytes + (SELECT sum(ok.adding_bytes) FROM ok)
    WHERE b.stripe = pg_backend_pid() % 16 AND (SELECT count(*) FROM ins) > 0
    RETURNING 1
), woken AS MATERIALIZED (
    SELECT ok.rid, @schema@.oq_wake_others(ok.rid, $9, $10) AS elsewhere FROM ok
)
SELECT array_agg(p.seq ORDER BY a.ord), array_agg(p.pending ORDER BY a.ord),
    array_agg(w.elsewhere ORDER BY a.ord), (SELECT count(*) FROM stripe)
FROM a LEFT JOIN planned p ON p.ord = a.ord LEFT JOIN woken w ON w.rid = a.rid";

/// Times a migration that met other nodes' traffic (a lock wait past [`MIGRATION_LOCK_TIMEOUT`],
/// or a deadlock) is tried before its error is returned (retryable).
const MIGRATION_ATTEMPTS: usize = 5;
/// How long a migration waits for a table lock: `ALTER TABLE` takes an exclusive lock, and
/// every step of the nodes still running queues behind a waiting one.
const MIGRATION_LOCK_TIMEOUT: &str = "2s";

/// Creates or migrates the schema, or refuses it (see the module docs).
pub(super) async fn prepare(
    client: &mut tokio_postgres::Client,
    schema: &str,
    quoted: &str,
) -> Result<()> {
    let mut attempt = 1;
    loop {
        match prepare_once(client, schema, quoted).await {
            Err(error) if attempt < MIGRATION_ATTEMPTS && met_traffic(&error) => attempt += 1,
            outcome => return outcome,
        }
    }
}

/// A lock wait that timed out, or a deadlock: the migration met a running node's step.
fn met_traffic(error: &Error) -> bool {
    let Error::Storage {
        source: Some(source),
        ..
    } = error
    else {
        return false;
    };
    source
        .downcast_ref::<tokio_postgres::Error>()
        .and_then(tokio_postgres::Error::code)
        .is_some_and(|code| {
            *code == tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE
                || *code == tokio_postgres::error::SqlState::T_R_DEADLOCK_DETECTED
        })
}

async fn prepare_once(
    client: &mut tokio_postgres::Client,
    schema: &str,
    quoted: &str,
) -> Result<()> {
    let tx = client.transaction().await.map_err(pg_error)?;
    tx.execute(
        "SELECT pg_advisory_xact_lock($1)",
        &[&lock_key(schema, "migrate")],
    )
    .await
    .map_err(pg_error)?;
    tx.batch_execute(&format!(
        "SET LOCAL lock_timeout = '{MIGRATION_LOCK_TIMEOUT}'"
    ))
    .await
    .map_err(pg_error)?;
    tx.batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS {quoted}"))
        .await
        .map_err(pg_error)?;
    let relations: Vec<(String, i8)> = tx
        .query(
            "SELECT c.relname::text, c.relkind FROM pg_catalog.pg_class c \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname::text = ANY ($2) ORDER BY c.relname",
            &[&schema, &RELATIONS],
        )
        .await
        .map_err(pg_error)?
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    let functions: Vec<String> = tx
        .query(
            "SELECT DISTINCT p.proname::text FROM pg_catalog.pg_proc p \
             JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace \
             WHERE n.nspname = $1 AND p.proname::text = ANY ($2) ORDER BY 1",
            &[&schema, &FUNCTIONS],
        )
        .await
        .map_err(pg_error)?
        .iter()
        .map(|row| row.get(0))
        .collect();
    let foreign = |name: &str, why: &str| Error::InvalidConfig {
        field: "postgres schema",
        reason: format!(
            "schema {schema:?} already holds {name}, {why}; it is left untouched: choose \
             another schema (PostgresOptions::schema)"
        ),
    };

    let has_info = relations
        .iter()
        .any(|(name, kind)| name == "oq_info" && *kind == b'r' as i8);
    if !has_info {
        if let Some((name, _)) = relations.first() {
            return Err(foreign(
                &format!("relation {name}"),
                "which offline-queue did not create (no oq_info table of its own beside it)",
            ));
        }
        if let Some(name) = functions.first() {
            return Err(foreign(
                &format!("function {name}"),
                "which offline-queue did not create (no oq_info table of its own beside it)",
            ));
        }
        for ddl in V1
            .iter()
            .chain(MIGRATIONS.iter().flat_map(|step| step.iter()))
        {
            tx.batch_execute(&ddl.replace("@schema@", quoted))
                .await
                .map_err(pg_error)?;
        }
        tx.execute(
            &format!(
                "INSERT INTO {quoted}.oq_info (key, value) VALUES ('owner', $1), ('version', $2)"
            ),
            &[&OWNER, &VERSION.to_string()],
        )
        .await
        .map_err(pg_error)?;
        return tx.commit().await.map_err(pg_error);
    }

    // Read oq_info as ours; a table of that name with other columns is someone else's.
    let info = tx
        .query(
            &format!(
                "SELECT key::text, value::text FROM {quoted}.oq_info \
                 WHERE key::text IN ('owner', 'version')"
            ),
            &[],
        )
        .await
        .map_err(|_| {
            foreign(
                "a table oq_info",
                "whose columns are not offline-queue's (key, value)",
            )
        })?;
    let value = |key: &str| {
        info.iter()
            .find(|row| row.get::<_, String>(0) == key)
            .map(|row| row.get::<_, String>(1))
    };
    if value("owner").as_deref() != Some(OWNER) {
        return Err(foreign(
            "a table oq_info",
            "without offline-queue's owner row",
        ));
    }
    let version: i64 = value("version")
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| {
            Error::storage_msg(
                Retry::No,
                format!("schema {schema:?}: oq_info has no readable version row"),
            )
        })?;
    if version > VERSION {
        return Err(Error::storage_msg(
            Retry::No,
            format!(
                "schema {schema:?} is at version {version}, newer than this build's {VERSION}: \
                 a later offline-queue migrated it; run that version (left untouched)"
            ),
        ));
    }
    if version < 1 {
        return Err(Error::storage_msg(
            Retry::No,
            format!("schema {schema:?}: oq_info holds version {version}, which never existed"),
        ));
    }
    for step in &MIGRATIONS[(version - 1) as usize..] {
        for ddl in *step {
            tx.batch_execute(&ddl.replace("@schema@", quoted))
                .await
                .map_err(pg_error)?;
        }
    }
    if version < VERSION {
        tx.execute(
            &format!("UPDATE {quoted}.oq_info SET value = $1 WHERE key = 'version'"),
            &[&VERSION.to_string()],
        )
        .await
        .map_err(pg_error)?;
    }
    tx.commit().await.map_err(pg_error)
}
