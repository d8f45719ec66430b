-- Schema version 4, continued: `oq_purge` counts as idle only queues that held something
-- (records, or a loss not yet reported). An emptied queue's row, kept for its next append,
-- is removed by idle removal as before but not counted: to the contract it was no queue
-- (`tests/storage_model.rs` found it counted). The body is version 3's otherwise (a
-- migration's history never changes, so version 3's file stays as it was); same signature,
-- so it is replaced in place and keeps its grants.

CREATE OR REPLACE FUNCTION @schema@.oq_purge(
    p_now bigint,
    p_idle_before bigint,
    p_budget bigint,
    p_lock bigint,
    OUT expired bigint,
    OUT idle bigint,
    OUT more boolean,
    OUT examined bigint
) LANGUAGE plpgsql SET plan_cache_mode = force_custom_plan AS $$
DECLARE
    budget_left bigint := p_budget;
    freed bigint := 0;
    due_rids bytea[];
    due_seqs bigint[];
    n bigint;
    b bigint;
    locked bytea[];
    skipped boolean := false;
    q record;
BEGIN
    expired := 0;
    idle := 0;
    more := false;
    examined := 0;
    PERFORM pg_advisory_xact_lock(p_lock);

    IF budget_left > 0 THEN
        -- The first `budget_left` due records, by deadline: O(k) through the deadline index.
        SELECT array_agg(due.rid), array_agg(due.seq) INTO due_rids, due_seqs FROM (
            SELECT rec.rid, rec.seq FROM @schema@.oq_records rec
            WHERE rec.expires_at <= p_now ORDER BY rec.expires_at LIMIT budget_left
        ) AS due;
        examined := examined + coalesce(cardinality(due_rids), 0);
        IF due_rids IS NOT NULL THEN
            -- Queue rows first, as every step takes them, in one order; one a step holds now
            -- is left for the next call. A record acked between the select and the lock is
            -- simply not found below.
            SELECT array_agg(l.rid) INTO locked FROM (
                SELECT qu.rid FROM @schema@.oq_queues qu WHERE qu.rid = ANY (due_rids)
                ORDER BY qu.rid FOR UPDATE SKIP LOCKED
            ) AS l;
            skipped := coalesce(cardinality(locked), 0)
                < (SELECT count(DISTINCT r) FROM unnest(due_rids) AS r);
            WITH due AS (
                SELECT t.rid, t.seq FROM unnest(due_rids, due_seqs) AS t (rid, seq)
                WHERE t.rid = ANY (coalesce(locked, '{}'))
            ), d AS (
                -- By primary key. The deadline needs no recheck: it never changes.
                DELETE FROM @schema@.oq_records rec USING due
                WHERE rec.rid = due.rid AND rec.seq = due.seq
                RETURNING rec.rid, octet_length(rec.body) AS len
            ), per AS (
                SELECT d.rid, count(*) AS k, sum(d.len) AS k_bytes FROM d GROUP BY d.rid
            ), u AS (
                UPDATE @schema@.oq_queues qu
                SET live = qu.live - per.k, bytes = qu.bytes - per.k_bytes,
                    lost_total = qu.lost_total + per.k
                FROM per WHERE qu.rid = per.rid
                RETURNING per.k, per.k_bytes
            ) SELECT coalesce(sum(u.k), 0), coalesce(sum(u.k_bytes), 0) INTO n, b FROM u;
            expired := n;
            freed := freed + b;
            -- What was selected is the work done, found or not.
            budget_left := budget_left - cardinality(due_rids);
        END IF;
    END IF;

    IF p_idle_before IS NOT NULL AND budget_left > 0 THEN
        FOR q IN SELECT qu.rid, qu.live, qu.bytes, qu.touched, qu.lost_total, qu.lost_confirmed
                 FROM @schema@.oq_queues qu
                 WHERE qu.idle_key < p_idle_before ORDER BY qu.idle_key LIMIT budget_left
                 FOR UPDATE SKIP LOCKED LOOP
            EXIT WHEN budget_left <= 0;
            examined := examined + 1;
            IF q.touched >= p_idle_before THEN
                -- Touched since it was filed: file it under its latest touch. Work too.
                UPDATE @schema@.oq_queues SET idle_key = q.touched WHERE rid = q.rid;
                budget_left := budget_left - 1;
                CONTINUE;
            END IF;
            DELETE FROM @schema@.oq_records WHERE rid = q.rid;
            DELETE FROM @schema@.oq_dedup WHERE rid = q.rid;
            DELETE FROM @schema@.oq_queues WHERE rid = q.rid;
            freed := freed + q.bytes;
            budget_left := greatest(budget_left - greatest(q.live, 1), 0);
            -- A queue emptied with no loss to report is no queue to the contract (the other
            -- backends drop it at the ack that empties it; this one keeps the row for the
            -- next append): its row goes, uncounted.
            IF q.live > 0 OR q.lost_total > q.lost_confirmed THEN
                idle := idle + 1;
            END IF;
        END LOOP;
    END IF;

    -- The stripe before the dedup rows: an append holds its stripes, then writes its dedup
    -- row; taking them the other way round here could deadlock with it.
    IF freed > 0 THEN
        UPDATE @schema@.oq_bytes SET bytes = bytes - freed WHERE stripe = pg_backend_pid() % 16;
    END IF;

    IF budget_left > 0 THEN
        WITH old AS (
            SELECT dd.rid, dd.id FROM @schema@.oq_dedup dd
            WHERE dd.until <= p_now ORDER BY dd.until LIMIT budget_left
            FOR UPDATE SKIP LOCKED
        ), d AS (
            DELETE FROM @schema@.oq_dedup dd USING old
            WHERE dd.rid = old.rid AND dd.id = old.id AND dd.until <= p_now
            RETURNING 1
        ) SELECT count(*) INTO n FROM d;
        budget_left := budget_left - n;
        examined := examined + n;
    END IF;

    -- Each through its index's first entry (min), never a scan.
    IF budget_left <= 0 OR skipped THEN
        more := (SELECT min(rec.expires_at) FROM @schema@.oq_records rec) <= p_now
            OR (p_idle_before IS NOT NULL
                AND (SELECT min(qu.idle_key) FROM @schema@.oq_queues qu) < p_idle_before)
            OR (SELECT min(dd.until) FROM @schema@.oq_dedup dd) <= p_now;
        more := coalesce(more, false);
    END IF;
END;
$$;
