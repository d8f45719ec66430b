-- Schema version 6: appends that update no row.
--
-- Before, every append locked its queue row and updated its counters: a dead version of the
-- row per append, which a held xmin horizon keeps, and the row lock made appends to one
-- queue wait for each other's commits. Now an append that needs no decision (no
-- sender-chosen id, no storage-wide budget, a queue that exists, holds something and has
-- room) is one statement the storage sends itself (`schema.rs`, `fast_append`): it
-- share-locks the queue row, finds the queue's newest record by the primary key and inserts
-- after it, and updates nothing. Two appends racing for one seq meet at the primary key: the
-- second waits for the first's commit and then fails, and its group goes through
-- `oq_append_many`, as every other append does.
--
-- Counting. The queue row's `live` and `bytes` count the records up to `folded`; each record
-- above it carries the running totals of the records above `folded` up to itself
-- (`cum_count`, `cum_bytes`) and the time it was stored (`stored_at`). Every step that
-- changes the queue first folds (`oq_fold`): it locks the row for update, which waits for
-- the appends in flight (their share locks) and keeps new ones out until it commits, then
-- adds the newest record's totals to the row and moves `folded` to its seq. From there each
-- step works as before; `oq_plan_append` moves `folded` past what it inserts.
--
-- Seqs. A queue's records are numbered on from `greatest(newest, folded, head)`: `folded` is
-- at least every seq the queue held (every step that removes records folds first), so a seq
-- is never handed out twice, even after the newest records were acked or expired. A new
-- queue row starts `folded` at `nextval` of the sequence, and a removed queue raises the
-- sequence to its `folded` (`oq_seq_past`), so a recipient removed and seen again starts
-- above every seq it had. Existing queues start `folded` at the sequence's value when this
-- migration runs: above every seq handed out so far.

ALTER TABLE @schema@.oq_records
    ADD COLUMN cum_count bigint NOT NULL DEFAULT 0,
    ADD COLUMN cum_bytes bigint NOT NULL DEFAULT 0,
    ADD COLUMN stored_at bigint NOT NULL DEFAULT 0;

-- A constant default is stored once, not written into every row.
DO $$
BEGIN
    EXECUTE format('ALTER TABLE @schema@.oq_queues ADD COLUMN folded bigint NOT NULL DEFAULT %s',
        (SELECT last_value FROM @schema@.oq_seq));
END;
$$;
ALTER TABLE @schema@.oq_queues ALTER COLUMN folded SET DEFAULT 0;

-- Raises the sequence to at least `p_seq` (never lowers it). Serialized, so two removals
-- cannot lower it between them.
CREATE FUNCTION @schema@.oq_seq_past(p_seq bigint) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(hashtextextended('@schema@.oq_seq', 0));
    IF p_seq > (SELECT s.last_value FROM @schema@.oq_seq s) THEN
        PERFORM setval('@schema@.oq_seq', p_seq);
    END IF;
END;
$$;

-- Locks `p_rid`'s queue row for update and counts in the appends that updated no row (see
-- above); false if there is no row.
CREATE FUNCTION @schema@.oq_fold(p_rid bytea) RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
    mark bigint;
BEGIN
    SELECT qu.folded INTO mark FROM @schema@.oq_queues qu WHERE qu.rid = p_rid FOR UPDATE;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    -- A new statement, so a new snapshot: the appends the lock waited for are in it.
    UPDATE @schema@.oq_queues qu
    SET live = qu.live + n.cum_count, bytes = qu.bytes + n.cum_bytes, folded = n.seq,
        touched = greatest(qu.touched, n.stored_at)
    FROM (
        SELECT r.seq, r.cum_count, r.cum_bytes, r.stored_at FROM @schema@.oq_records r
        WHERE r.rid = p_rid AND r.seq > mark ORDER BY r.seq DESC LIMIT 1
    ) AS n
    WHERE qu.rid = p_rid;
    RETURN true;
END;
$$;

-- As version 2's, folding a queue it takes; a new queue starts `folded` with its loss total.
CREATE OR REPLACE FUNCTION @schema@.oq_take_queue(p_rid bytea, p_now bigint)
RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    LOOP
        IF @schema@.oq_fold(p_rid) THEN
            RETURN false;
        END IF;
        -- A new queue's loss total and seqs start from the seq counter, above any an earlier
        -- queue of this recipient reached (its removal raised the counter past them).
        INSERT INTO @schema@.oq_queues (rid, live, bytes, lost_total, lost_confirmed, touched,
            idle_key, folded)
        SELECT p_rid, 0, 0, s.v, s.v, p_now, p_now, s.v
        FROM (SELECT nextval('@schema@.oq_seq') AS v) AS s
        ON CONFLICT (rid) DO NOTHING;
        IF FOUND THEN
            RETURN true;
        END IF;
        -- Lost a race with another append (take its row) or with a removal (try again).
    END LOOP;
END;
$$;

-- Version 5's, numbering records on from the queue's own seqs (above).
CREATE OR REPLACE FUNCTION @schema@.oq_plan_append(
    p_rid bytea,
    p_ids bytea[],
    p_dedup boolean[],
    p_sent bigint[],
    p_expires bigint[],
    p_bodies bytea[],
    p_max_messages bigint,
    p_max_bytes bigint,
    p_drop_oldest boolean,
    p_max_total bigint,
    p_window bigint,
    p_now bigint,
    p_used bigint,
    OUT status smallint,
    OUT seqs bigint[],
    OUT duplicate boolean[],
    OUT dropped bigint,
    OUT pending bigint,
    OUT have_messages bigint,
    OUT have_bytes bigint,
    OUT adding bigint,
    OUT adding_bytes bigint,
    OUT net bigint,
    OUT used bigint
) LANGUAGE plpgsql AS $$
DECLARE
    n integer := coalesce(array_length(p_ids, 1), 0);
    q @schema@.oq_queues%ROWTYPE;
    new_record boolean[] := '{}';
    found_seq bigint;
    keep bigint;
    keep_bytes bigint;
    drop_bytes bigint := 0;
    cut bigint;
    page_rows integer;
    refilled boolean;
    next_seq bigint;
    r record;
BEGIN
    status := 0;
    dropped := 0;
    adding := 0;
    adding_bytes := 0;
    net := 0;
    used := p_used;
    seqs := array_fill(NULL::bigint, ARRAY[n]);
    duplicate := array_fill(false, ARRAY[n]);
    -- Held by the caller: this returns at once.
    SELECT * INTO STRICT q FROM @schema@.oq_queues WHERE rid = p_rid FOR UPDATE;
    refilled := q.live = 0 AND q.lost_total = q.lost_confirmed;

    -- Plan: which records are new (not a duplicate within the window or within the batch).
    FOR i IN 1 .. n LOOP
        new_record := array_append(new_record, true);
        IF p_dedup[i] THEN
            SELECT d.seq INTO found_seq FROM @schema@.oq_dedup d
            WHERE d.rid = p_rid AND d.id = p_ids[i] AND greatest(p_now - d.at, 0) < p_window;
            IF FOUND THEN
                seqs[i] := found_seq;
                duplicate[i] := true;
                new_record[i] := false;
                CONTINUE;
            END IF;
            FOR j IN 1 .. i - 1 LOOP
                IF new_record[j] AND p_dedup[j] AND p_ids[j] = p_ids[i] THEN
                    -- `seqs[i]` names the earlier record's index until seqs are assigned.
                    seqs[i] := -j;
                    duplicate[i] := true;
                    new_record[i] := false;
                    EXIT;
                END IF;
            END LOOP;
            CONTINUE WHEN NOT new_record[i];
        END IF;
        adding := adding + 1;
        adding_bytes := adding_bytes + octet_length(p_bodies[i]);
    END LOOP;

    IF adding = 0 THEN
        pending := q.live;
        RETURN;
    END IF;

    -- Quota (Quota::admit and Quota::fits, in SQL).
    keep := q.live;
    keep_bytes := q.bytes;
    IF NOT (adding <= p_max_messages AND keep <= p_max_messages - adding
            AND adding_bytes <= p_max_bytes AND keep_bytes <= p_max_bytes - adding_bytes) THEN
        IF NOT p_drop_oldest OR adding > p_max_messages OR adding_bytes > p_max_bytes THEN
            status := 1;
            have_messages := q.live;
            have_bytes := q.bytes;
            RETURN;
        END IF;
        -- The oldest, in pages by primary key (a literal LIMIT, so the planner walks the
        -- index in order instead of sorting the queue), until the rest fits.
        cut := q.head;
        <<walk>>
        LOOP
            page_rows := 0;
            FOR r IN SELECT rec.seq, octet_length(rec.body) AS len FROM @schema@.oq_records rec
                     WHERE rec.rid = p_rid AND rec.seq > cut ORDER BY rec.seq LIMIT 64 LOOP
                EXIT walk WHEN keep <= p_max_messages - adding
                    AND keep_bytes <= p_max_bytes - adding_bytes;
                page_rows := page_rows + 1;
                keep := keep - 1;
                keep_bytes := keep_bytes - r.len;
                dropped := dropped + 1;
                drop_bytes := drop_bytes + r.len;
                cut := r.seq;
            END LOOP;
            EXIT walk WHEN page_rows < 64;
        END LOOP;
    END IF;

    -- The storage-wide budget: exact, because every stripe is locked (in order) before the sum.
    net := adding_bytes - drop_bytes;
    IF p_max_total IS NOT NULL AND net > 0 THEN
        IF used IS NULL THEN
            SELECT sum(s.bytes) INTO used FROM (
                SELECT b.bytes FROM @schema@.oq_bytes b ORDER BY b.stripe FOR UPDATE
            ) AS s;
        END IF;
        IF used > p_max_total - net THEN
            status := 2;
            dropped := 0;
            have_bytes := used;
            adding_bytes := net;
            net := 0;
            RETURN;
        END IF;
    END IF;

    -- Write.
    IF dropped > 0 THEN
        DELETE FROM @schema@.oq_records WHERE rid = p_rid AND seq > q.head AND seq <= cut;
    END IF;
    -- Seqs follow the queue's own: `folded` is at least every seq it ever held (the caller
    -- folded it), and the records get no running totals (at or below `folded`, none count).
    next_seq := greatest(q.folded, q.head);
    FOR i IN 1 .. n LOOP
        CONTINUE WHEN NOT new_record[i];
        next_seq := next_seq + 1;
        seqs[i] := next_seq;
        INSERT INTO @schema@.oq_records (rid, seq, id, sent_at, expires_at, body, stored_at)
        VALUES (p_rid, seqs[i], p_ids[i], p_sent[i], p_expires[i], p_bodies[i], p_now);
        IF p_dedup[i] AND p_window > 0 THEN
            INSERT INTO @schema@.oq_dedup (rid, id, seq, at, until)
            VALUES (p_rid, p_ids[i], seqs[i], p_now, p_now + least(p_window, 9223372036854775807 - p_now))
            ON CONFLICT (rid, id) DO UPDATE
            SET seq = EXCLUDED.seq, at = EXCLUDED.at, until = EXCLUDED.until;
        END IF;
    END LOOP;
    FOR i IN 1 .. n LOOP
        IF duplicate[i] AND seqs[i] < 0 THEN
            seqs[i] := seqs[-seqs[i]];
        END IF;
    END LOOP;
    -- A queue that held nothing (no record, no loss to report) is no queue: this append
    -- starts its idle time, even when the clock stepped back since its last step, and it is
    -- filed no later than that (`idle_key` only moves when it does, so the update stays HOT).
    UPDATE @schema@.oq_queues
    SET live = live - dropped + adding,
        bytes = bytes - drop_bytes + adding_bytes,
        lost_total = lost_total + dropped,
        touched = CASE WHEN refilled THEN p_now ELSE greatest(touched, p_now) END,
        idle_key = CASE WHEN refilled THEN least(idle_key, p_now) ELSE idle_key END,
        head = CASE WHEN dropped > 0 THEN greatest(head, cut) ELSE head END,
        folded = next_seq
    WHERE rid = p_rid;
    pending := q.live - dropped + adding;
    used := used + net;
END;
$$;

-- Version 1's, folding first.
CREATE OR REPLACE FUNCTION @schema@.oq_ack(
    p_rid bytea,
    p_through bigint,
    p_seqs bigint[],
    p_passed bigint[],
    p_confirm bigint,
    p_now bigint
) RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    removed bigint := 0;
    lost bigint := 0;
    freed bigint := 0;
    n bigint;
    b bigint;
    old_head bigint;
    top bigint;
BEGIN
    IF NOT @schema@.oq_fold(p_rid) THEN
        RETURN 0;
    END IF;
    SELECT qu.head INTO old_head FROM @schema@.oq_queues qu WHERE qu.rid = p_rid;
    IF p_through IS NOT NULL AND p_through > old_head THEN
        WITH d AS (
            DELETE FROM @schema@.oq_records
            WHERE rid = p_rid AND seq > old_head AND seq <= p_through
            RETURNING seq, octet_length(body) AS len
        ) SELECT count(*), coalesce(sum(len), 0), max(seq) INTO n, b, top FROM d;
        removed := removed + n;
        freed := freed + b;
    END IF;
    IF cardinality(p_seqs) > 0 THEN
        WITH d AS (
            DELETE FROM @schema@.oq_records WHERE rid = p_rid AND seq = ANY (p_seqs)
            RETURNING octet_length(body) AS len
        ) SELECT count(*), coalesce(sum(len), 0) INTO n, b FROM d;
        removed := removed + n;
        freed := freed + b;
    END IF;
    IF cardinality(p_passed) > 0 THEN
        WITH d AS (
            DELETE FROM @schema@.oq_records WHERE rid = p_rid AND seq = ANY (p_passed)
            RETURNING octet_length(body) AS len
        ) SELECT count(*), coalesce(sum(len), 0) INTO n, b FROM d;
        lost := n;
        freed := freed + b;
    END IF;
    UPDATE @schema@.oq_queues
    SET live = live - removed - lost,
        bytes = bytes - freed,
        lost_total = lost_total + lost,
        lost_confirmed = CASE
            WHEN p_confirm IS NULL THEN lost_confirmed
            ELSE greatest(lost_confirmed, least(p_confirm, lost_total + lost))
        END,
        touched = greatest(touched, p_now),
        head = greatest(head, coalesce(top, 0))
    WHERE rid = p_rid;
    IF freed > 0 THEN
        UPDATE @schema@.oq_bytes SET bytes = bytes - freed WHERE stripe = pg_backend_pid() % 16;
    END IF;
    RETURN removed;
END;
$$;

-- Version 1's, folding first and raising the sequence past the queue's seqs.
CREATE OR REPLACE FUNCTION @schema@.oq_remove(p_rid bytea) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    q record;
    had_queue boolean;
BEGIN
    had_queue := @schema@.oq_fold(p_rid);
    SELECT qu.live, qu.bytes, qu.folded INTO q FROM @schema@.oq_queues qu WHERE qu.rid = p_rid;
    DELETE FROM @schema@.oq_dedup WHERE rid = p_rid;
    IF NOT had_queue THEN
        RETURN 0;
    END IF;
    DELETE FROM @schema@.oq_records WHERE rid = p_rid;
    DELETE FROM @schema@.oq_queues WHERE rid = p_rid;
    PERFORM @schema@.oq_seq_past(q.folded);
    IF q.bytes > 0 THEN
        UPDATE @schema@.oq_bytes SET bytes = bytes - q.bytes WHERE stripe = pg_backend_pid() % 16;
    END IF;
    RETURN q.live;
END;
$$;

-- Version 4's, folding each queue it locks, and raising the sequence past a removed queue's
-- seqs.
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
    cur record;
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
            -- Appends that updated no row are counted in before any of their records goes.
            PERFORM @schema@.oq_fold(l.rid) FROM unnest(coalesce(locked, '{}')) AS l(rid);
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
        FOR cur IN SELECT qu.rid FROM @schema@.oq_queues qu
                 WHERE qu.idle_key < p_idle_before ORDER BY qu.idle_key LIMIT budget_left
                 FOR UPDATE SKIP LOCKED LOOP
            EXIT WHEN budget_left <= 0;
            examined := examined + 1;
            -- Appends that updated no row count, and their time is the queue's latest touch.
            PERFORM @schema@.oq_fold(cur.rid);
            SELECT qu.rid, qu.live, qu.bytes, qu.touched, qu.lost_total, qu.lost_confirmed,
                   qu.folded
            INTO q FROM @schema@.oq_queues qu WHERE qu.rid = cur.rid;
            IF q.touched >= p_idle_before THEN
                -- Touched since it was filed: file it under its latest touch. Work too.
                UPDATE @schema@.oq_queues SET idle_key = q.touched WHERE rid = q.rid;
                budget_left := budget_left - 1;
                CONTINUE;
            END IF;
            DELETE FROM @schema@.oq_records WHERE rid = q.rid;
            DELETE FROM @schema@.oq_dedup WHERE rid = q.rid;
            DELETE FROM @schema@.oq_queues WHERE rid = q.rid;
            PERFORM @schema@.oq_seq_past(q.folded);
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
