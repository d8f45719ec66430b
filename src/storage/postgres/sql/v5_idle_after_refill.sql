-- Schema version 5: a queue emptied by acks (its row kept, nothing live, no loss to report) is
-- no queue, as on the backends that delete it: the append that fills it again starts its
-- idle time, even when the clock stepped back since the queue's last step, and files it no
-- later than that. Before, the row kept the later time of its last ack, and idle removal
-- came later than on every other backend. `oq_plan_append` is replaced whole: version 2's
-- body with the `refilled` case added (a migration's history never changes).

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
    refilled boolean;
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
    -- A queue that held nothing (no record, no loss to report) is no queue: this append
    -- starts its idle time, even when the clock stepped back since its last step, and it is
    -- filed no later than that (`idle_key` only moves when it does, so the update stays HOT).
    UPDATE @schema@.oq_queues
    SET live = live - dropped + adding,
        bytes = bytes - drop_bytes + adding_bytes,
        lost_total = lost_total + dropped,
        touched = CASE WHEN refilled THEN p_now ELSE greatest(touched, p_now) END,
        idle_key = CASE WHEN refilled THEN least(idle_key, p_now) ELSE idle_key END,
        head = CASE WHEN dropped > 0 THEN greatest(head, cut) ELSE head END
    WHERE rid = p_rid;
    pending := q.live - dropped + adding;
    used := used + net;
END;
$$;
