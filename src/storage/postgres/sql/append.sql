-- An append, decided whole in one call (one round trip, one transaction): the queue row is
-- locked first (created if missing), then dedup, quota, overflow and the storage-wide budget
-- are planned without writing, and only a plan that fits is written. A refusal writes nothing
-- and says why in `status`: 0 stored, 1 queue full (`have_*` are the queue's), 2 storage full
-- (`have_bytes` is the storage's, `adding_bytes` the net bytes the append would add).
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
    OUT status smallint,
    OUT seqs bigint[],
    OUT duplicate boolean[],
    OUT dropped bigint,
    OUT pending bigint,
    OUT have_messages bigint,
    OUT have_bytes bigint,
    OUT adding bigint,
    OUT adding_bytes bigint
) LANGUAGE plpgsql AS $$
DECLARE
    n integer := coalesce(array_length(p_ids, 1), 0);
    q @schema@.oq_queues%ROWTYPE;
    created boolean := false;
    new_record boolean[] := '{}';
    found_seq bigint;
    keep bigint;
    keep_bytes bigint;
    drop_bytes bigint := 0;
    cut bigint;
    page_rows integer;
    net bigint;
    used bigint;
    r record;
BEGIN
    status := 0;
    dropped := 0;
    adding := 0;
    adding_bytes := 0;
    seqs := array_fill(NULL::bigint, ARRAY[n]);
    duplicate := array_fill(false, ARRAY[n]);

    -- The queue row is the recipient's lock: every change to its records takes it first.
    LOOP
        SELECT * INTO q FROM @schema@.oq_queues WHERE rid = p_rid FOR UPDATE;
        EXIT WHEN FOUND;
        -- A new queue's loss total starts from the seq counter, above any total an earlier
        -- queue of this recipient reached (each loss was a record with a lower seq).
        INSERT INTO @schema@.oq_queues (rid, live, bytes, lost_total, lost_confirmed, touched, idle_key)
        SELECT p_rid, 0, 0, s.v, s.v, p_now, p_now
        FROM (SELECT nextval('@schema@.oq_seq') AS v) AS s
        ON CONFLICT (rid) DO NOTHING;
        created := FOUND;
        -- Lost a race with another append (take its row) or with a removal (try again).
    END LOOP;

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
        IF created THEN
            DELETE FROM @schema@.oq_queues WHERE rid = p_rid;
        END IF;
        pending := q.live;
        RETURN;
    END IF;

    -- Quota (Quota::admit and Quota::fits, in SQL).
    keep := q.live;
    keep_bytes := q.bytes;
    IF NOT (adding <= p_max_messages AND keep <= p_max_messages - adding
            AND adding_bytes <= p_max_bytes AND keep_bytes <= p_max_bytes - adding_bytes) THEN
        IF NOT p_drop_oldest OR adding > p_max_messages OR adding_bytes > p_max_bytes THEN
            IF created THEN
                DELETE FROM @schema@.oq_queues WHERE rid = p_rid;
            END IF;
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
        SELECT sum(s.bytes) INTO used FROM (
            SELECT b.bytes FROM @schema@.oq_bytes b ORDER BY b.stripe FOR UPDATE
        ) AS s;
        IF used > p_max_total - net THEN
            IF created THEN
                DELETE FROM @schema@.oq_queues WHERE rid = p_rid;
            END IF;
            status := 2;
            dropped := 0;
            have_bytes := used;
            adding_bytes := net;
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
    IF net <> 0 THEN
        UPDATE @schema@.oq_bytes SET bytes = bytes + net WHERE stripe = pg_backend_pid() % 16;
    END IF;
END;
$$;
