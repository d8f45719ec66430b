-- Schema version 2: group commit. The append of version 1 is split in three, so that one
-- call can run many appends in one transaction (`oq_append_many`) and a single append runs
-- the same steps (`oq_append`, same signature as before):
--   `oq_take_queue` locks (creating if missing) a recipient's queue row;
--   `oq_plan_append` decides and writes one append into a queue row its caller holds;
--   the caller adds the net bytes to its stripe once, at the end.
-- Lock order, in every function: queue rows (a group takes all of its rows first, in `rid`
-- order), then every stripe (only under a storage-wide budget, in stripe order, once), then
-- dedup rows, then the caller's own stripe. Two groups therefore never wait on each other in
-- a cycle, and a group never waits on a single step that waits on the group.

-- Locks the queue row of `p_rid`, creating it if missing; true if this call created it.
CREATE OR REPLACE FUNCTION @schema@.oq_take_queue(p_rid bytea, p_now bigint)
RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    LOOP
        PERFORM 1 FROM @schema@.oq_queues WHERE rid = p_rid FOR UPDATE;
        IF FOUND THEN
            RETURN false;
        END IF;
        -- A new queue's loss total starts from the seq counter, above any total an earlier
        -- queue of this recipient reached (each loss was a record with a lower seq).
        INSERT INTO @schema@.oq_queues (rid, live, bytes, lost_total, lost_confirmed, touched, idle_key)
        SELECT p_rid, 0, 0, s.v, s.v, p_now, p_now
        FROM (SELECT nextval('@schema@.oq_seq') AS v) AS s
        ON CONFLICT (rid) DO NOTHING;
        IF FOUND THEN
            RETURN true;
        END IF;
        -- Lost a race with another append (take its row) or with a removal (try again).
    END LOOP;
END;
$$;

-- One append into a queue row the caller holds: dedup, quota, overflow and the storage-wide
-- budget decided without writing, then only a plan that fits written. `p_used` is the
-- storage's body bytes when the caller already holds every stripe (NULL when not): the
-- budget check locks them all and sums them the first time it needs them, and `used` returns
-- the running figure (with this append's net bytes) for the caller's next append. Leaves the
-- caller's stripe alone: `net` is what to add to it. A refusal writes nothing: `status` 1 is
-- queue full (`have_*` are the queue's), 2 storage full (`have_bytes` is the storage's,
-- `adding_bytes` the net bytes the append would add).
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
    FOR i IN 1 .. n LOOP
        CONTINUE WHEN NOT new_record[i];
        seqs[i] := nextval('@schema@.oq_seq');
        INSERT INTO @schema@.oq_records (rid, seq, id, sent_at, expires_at, body)
        VALUES (p_rid, seqs[i], p_ids[i], p_sent[i], p_expires[i], p_bodies[i]);
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
    UPDATE @schema@.oq_queues
    SET live = live - dropped + adding,
        bytes = bytes - drop_bytes + adding_bytes,
        lost_total = lost_total + dropped,
        touched = greatest(touched, p_now),
        head = CASE WHEN dropped > 0 THEN greatest(head, cut) ELSE head END
    WHERE rid = p_rid;
    pending := q.live - dropped + adding;
    used := used + net;
END;
$$;

-- Version 1's append, replaced by the one below (which also wakes other nodes).
DROP FUNCTION @schema@.oq_append(bytea, bytea[], boolean[], bigint[], bigint[], bytea[], bigint,
    bigint, boolean, bigint, bigint, bigint);

-- One append (Storage::append), in one call: version 1's, through the steps above, then the
-- other nodes holding a session for the recipient are woken (`elsewhere`) if it stored.
CREATE OR REPLACE FUNCTION @schema@.oq_append(
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
    p_node bytea,
    p_channel text,
    OUT status smallint,
    OUT seqs bigint[],
    OUT duplicate boolean[],
    OUT dropped bigint,
    OUT pending bigint,
    OUT have_messages bigint,
    OUT have_bytes bigint,
    OUT adding bigint,
    OUT adding_bytes bigint,
    OUT elsewhere boolean
) LANGUAGE plpgsql AS $$
DECLARE
    created boolean := @schema@.oq_take_queue(p_rid, p_now);
    p record;
BEGIN
    SELECT * INTO p FROM @schema@.oq_plan_append(p_rid, p_ids, p_dedup, p_sent, p_expires,
        p_bodies, p_max_messages, p_max_bytes, p_drop_oldest, p_max_total, p_window, p_now, NULL);
    status := p.status;
    seqs := p.seqs;
    duplicate := p.duplicate;
    dropped := p.dropped;
    pending := p.pending;
    have_messages := p.have_messages;
    have_bytes := p.have_bytes;
    adding := p.adding;
    adding_bytes := p.adding_bytes;
    -- A queue this call created that nothing was stored in goes again.
    IF created THEN
        DELETE FROM @schema@.oq_queues WHERE rid = p_rid AND live = 0;
    END IF;
    IF p.net <> 0 THEN
        UPDATE @schema@.oq_bytes SET bytes = bytes + p.net WHERE stripe = pg_backend_pid() % 16;
    END IF;
    elsewhere := false;
    IF p.status = 0 AND p.adding > 0 THEN
        elsewhere := @schema@.oq_wake_others(p_rid, p_node, p_channel);
    END IF;
END;
$$;

-- Many appends (concurrent `Storage::append` calls on one node) in one call and one commit.
-- Append k is `p_rids[k]` with the next `p_counts[k]` records of the flat record arrays and
-- its own quota and time; outcomes come back per append (`status` ... `adding_bytes`), and
-- `seqs` and `duplicate` per record, flat in the same order. Appends are applied in the order
-- given, so two for one recipient get seqs in that order. A refused append writes nothing and
-- does not stop the others.
CREATE OR REPLACE FUNCTION @schema@.oq_append_many(
    p_rids bytea[],
    p_counts integer[],
    p_ids bytea[],
    p_dedup boolean[],
    p_sent bigint[],
    p_expires bigint[],
    p_bodies bytea[],
    p_max_messages bigint[],
    p_max_bytes bigint[],
    p_drop_oldest boolean[],
    p_max_total bigint[],
    p_window bigint[],
    p_now bigint[],
    p_node bytea,
    p_channel text,
    OUT status smallint[],
    OUT seqs bigint[],
    OUT duplicate boolean[],
    OUT dropped bigint[],
    OUT pending bigint[],
    OUT have_messages bigint[],
    OUT have_bytes bigint[],
    OUT adding bigint[],
    OUT adding_bytes bigint[],
    OUT elsewhere boolean[]
) LANGUAGE plpgsql AS $$
DECLARE
    appends integer := coalesce(array_length(p_rids, 1), 0);
    created bytea[] := '{}';
    asked bytea[] := '{}';
    answers boolean[] := '{}';
    at integer;
    used bigint;
    net bigint := 0;
    first integer := 1;
    last integer;
    p record;
    r record;
BEGIN
    status := '{}';
    seqs := '{}';
    duplicate := '{}';
    dropped := '{}';
    pending := '{}';
    have_messages := '{}';
    have_bytes := '{}';
    adding := '{}';
    adding_bytes := '{}';
    elsewhere := '{}';
    -- Every queue row first, in one order shared by all groups.
    FOR r IN SELECT DISTINCT u.rid FROM unnest(p_rids) AS u(rid) ORDER BY u.rid LOOP
        IF @schema@.oq_take_queue(r.rid, p_now[1]) THEN
            created := array_append(created, r.rid);
        END IF;
    END LOOP;
    FOR k IN 1 .. appends LOOP
        last := first + p_counts[k] - 1;
        SELECT * INTO p FROM @schema@.oq_plan_append(p_rids[k], p_ids[first:last],
            p_dedup[first:last], p_sent[first:last], p_expires[first:last], p_bodies[first:last],
            p_max_messages[k], p_max_bytes[k], p_drop_oldest[k], p_max_total[k], p_window[k],
            p_now[k], used);
        used := p.used;
        net := net + p.net;
        status := array_append(status, p.status);
        seqs := seqs || p.seqs;
        duplicate := duplicate || p.duplicate;
        dropped := array_append(dropped, p.dropped);
        pending := array_append(pending, p.pending);
        have_messages := array_append(have_messages, p.have_messages);
        have_bytes := array_append(have_bytes, p.have_bytes);
        adding := array_append(adding, p.adding);
        adding_bytes := array_append(adding_bytes, p.adding_bytes);
        first := last + 1;
        -- Each recipient's other nodes, asked (and woken) once per group.
        IF p.status = 0 AND p.adding > 0 THEN
            at := array_position(asked, p_rids[k]);
            IF at IS NULL THEN
                asked := array_append(asked, p_rids[k]);
                answers := array_append(answers,
                    @schema@.oq_wake_others(p_rids[k], p_node, p_channel));
                at := cardinality(asked);
            END IF;
            elsewhere := array_append(elsewhere, answers[at]);
        ELSE
            elsewhere := array_append(elsewhere, false);
        END IF;
    END LOOP;
    -- A queue this call created that nothing was stored in goes again.
    IF cardinality(created) > 0 THEN
        DELETE FROM @schema@.oq_queues WHERE rid = ANY (created) AND live = 0;
    END IF;
    IF net <> 0 THEN
        UPDATE @schema@.oq_bytes SET bytes = bytes + net WHERE stripe = pg_backend_pid() % 16;
    END IF;
END;
$$;
