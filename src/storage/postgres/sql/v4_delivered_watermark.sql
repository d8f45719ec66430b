-- Schema version 4: deliveries counted by a watermark in the queue row.
--
-- A session reads its queue in order, so a read for delivery used to rewrite every record it
-- returned (`deliveries + 1`): a dead version per record per delivery, on the path every
-- message takes. Now the queue row's `delivered` says "every record at or below this seq was
-- handed over at least once", and a record's `deliveries` is an explicit count only where
-- that is not enough (NULL otherwise):
--
--     count = coalesce(deliveries, (seq <= delivered)::int)
--
-- A read that saw every record from the watermark on (its cursor at or below it, or below
-- `head`) moves the watermark to the highest seq it returned and writes no record it handed
-- over for the first time; records it hands over again, or that already had a count, get
-- one; records it passed over (expired) under the new watermark get an explicit 0, since
-- passing over is not handing over. A read from a cursor past the watermark, and
-- `oq_mark`, count each record explicitly, as before. Existing records keep their counts
-- (explicit), and existing queues start at watermark 0.

-- Both tables are locked (briefly: nothing is rewritten) while other nodes may be running;
-- `prepare` bounds the wait with a lock timeout and tries again.
ALTER TABLE @schema@.oq_queues ADD COLUMN delivered bigint NOT NULL DEFAULT 0;
ALTER TABLE @schema@.oq_records ALTER COLUMN deliveries DROP NOT NULL,
    ALTER COLUMN deliveries DROP DEFAULT;

-- Storage::mark_delivered: one more hand-over for each listed record, under the queue row's
-- lock so a read moving the watermark meanwhile cannot make two counts one.
CREATE FUNCTION @schema@.oq_mark(p_rid bytea, p_seqs bigint[]) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    watermark bigint;
BEGIN
    SELECT q.delivered INTO watermark FROM @schema@.oq_queues q WHERE q.rid = p_rid FOR UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    UPDATE @schema@.oq_records
    SET deliveries = least(coalesce(deliveries, (seq <= watermark)::int)::bigint + 1, 2147483647)
    WHERE rid = p_rid AND seq = ANY (p_seqs);
END;
$$;

-- As version 1's, with the counts above: a read for delivery (`p_mark`) holds the queue row's
-- lock (the ack's, or its own) so the watermark and the explicit counts move together.
CREATE OR REPLACE FUNCTION @schema@.oq_read(
    p_rid bytea,
    p_after bigint,
    p_max_messages bigint,
    p_max_bytes bigint,
    p_now bigint,
    p_mark boolean,
    p_ack boolean,
    p_through bigint,
    p_seqs bigint[],
    p_passed bigint[],
    p_confirm bigint,
    OUT acked bigint,
    OUT seqs bigint[],
    OUT ids bytea[],
    OUT sent bigint[],
    OUT expires bigint[],
    OUT counts integer[],
    OUT bodies bytea[],
    OUT expired bigint[],
    OUT lost_total bigint,
    OUT lost_confirmed bigint
) LANGUAGE plpgsql AS $$
DECLARE
    taken bigint := 0;
    taken_bytes bigint := 0;
    passed bigint := 0;
    chosen bigint[] := '{}';
    last_seq bigint := p_after;
    watermark bigint;
    front bigint;
    explicit integer[];
    to_count bigint[] := '{}';
    high bigint;
    advance boolean;
    page_rows integer;
    done boolean := false;
    page refcursor;
    r record;
BEGIN
    acked := 0;
    seqs := '{}';
    ids := '{}';
    sent := '{}';
    expires := '{}';
    counts := '{}';
    bodies := '{}';
    expired := '{}';
    IF p_ack THEN
        acked := @schema@.oq_ack(p_rid, p_through, p_seqs, p_passed, p_confirm, p_now);
    END IF;
    IF p_mark THEN
        SELECT q.lost_total, q.lost_confirmed, q.delivered, q.head
        INTO lost_total, lost_confirmed, watermark, front
        FROM @schema@.oq_queues q WHERE q.rid = p_rid FOR UPDATE;
    ELSE
        SELECT q.lost_total, q.lost_confirmed, q.delivered, q.head
        INTO lost_total, lost_confirmed, watermark, front
        FROM @schema@.oq_queues q WHERE q.rid = p_rid;
    END IF;
    IF NOT FOUND THEN
        lost_total := 0;
        lost_confirmed := 0;
        RETURN;
    END IF;
    last_seq := greatest(front, p_after);
    -- Choose the batch in pages of (seq, deadline, length), bodies left in place. The walk
    -- visits at most 2 * p_max_messages + 1 records (it stops at p_max_messages taken or
    -- passed over), so a page of 17 or 201 (a literal LIMIT: the planner then walks the
    -- primary key in order instead of sorting the queue) is usually the only one.
    WHILE NOT done LOOP
        IF p_max_messages <= 8 THEN
            OPEN page FOR SELECT rec.seq, rec.expires_at, octet_length(rec.body) AS len
                FROM @schema@.oq_records rec
                WHERE rec.rid = p_rid AND rec.seq > last_seq ORDER BY rec.seq LIMIT 17;
        ELSE
            OPEN page FOR SELECT rec.seq, rec.expires_at, octet_length(rec.body) AS len
                FROM @schema@.oq_records rec
                WHERE rec.rid = p_rid AND rec.seq > last_seq ORDER BY rec.seq LIMIT 201;
        END IF;
        page_rows := 0;
        LOOP
            FETCH page INTO r;
            IF NOT FOUND THEN
                -- A short page is the queue's end.
                done := done OR page_rows < CASE WHEN p_max_messages <= 8 THEN 17 ELSE 201 END;
                EXIT;
            END IF;
            page_rows := page_rows + 1;
            last_seq := r.seq;
            IF r.expires_at IS NOT NULL AND r.expires_at <= p_now THEN
                expired := array_append(expired, r.seq);
                passed := passed + 1;
                IF passed >= p_max_messages THEN
                    done := true;
                    EXIT;
                END IF;
                CONTINUE;
            END IF;
            IF taken >= p_max_messages OR (taken > 0 AND r.len > p_max_bytes - taken_bytes) THEN
                done := true;
                EXIT;
            END IF;
            taken := taken + 1;
            taken_bytes := taken_bytes + r.len;
            chosen := array_append(chosen, r.seq);
        END LOOP;
        CLOSE page;
    END LOOP;
    IF taken = 0 THEN
        RETURN;
    END IF;
    -- The chosen records whole, in one statement (a record acked since the walk is left out:
    -- a plain read holds no lock), with the watermark of the same snapshot, so a plain read
    -- never pairs a newer watermark's records with an older one.
    SELECT array_agg(rec.seq ORDER BY rec.seq), array_agg(rec.id ORDER BY rec.seq),
           array_agg(rec.sent_at ORDER BY rec.seq), array_agg(rec.expires_at ORDER BY rec.seq),
           array_agg(coalesce(rec.deliveries, (rec.seq <= q.delivered)::int) ORDER BY rec.seq),
           array_agg(rec.body ORDER BY rec.seq), array_agg(rec.deliveries ORDER BY rec.seq),
           max(q.delivered)
    INTO seqs, ids, sent, expires, counts, bodies, explicit, watermark
    FROM @schema@.oq_records rec JOIN @schema@.oq_queues q ON q.rid = rec.rid
    WHERE rec.rid = p_rid AND rec.seq = ANY (chosen);
    IF seqs IS NULL THEN
        seqs := '{}';
        ids := '{}';
        sent := '{}';
        expires := '{}';
        counts := '{}';
        bodies := '{}';
        RETURN;
    END IF;
    IF NOT p_mark THEN
        RETURN;
    END IF;
    -- The walk saw every record from the watermark on when it started at or below it
    -- (records at or below `front` are gone, so that counts as the watermark too).
    high := seqs[cardinality(seqs)];
    advance := greatest(front, p_after) <= greatest(watermark, front) AND high > watermark;
    FOR i IN 1 .. cardinality(seqs) LOOP
        IF NOT (advance AND seqs[i] > watermark AND explicit[i] IS NULL) THEN
            to_count := array_append(to_count, seqs[i]);
        END IF;
    END LOOP;
    IF cardinality(to_count) > 0 THEN
        UPDATE @schema@.oq_records
        SET deliveries = least(coalesce(deliveries, (seq <= watermark)::int)::bigint + 1,
                               2147483647)
        WHERE rid = p_rid AND seq = ANY (to_count);
    END IF;
    IF advance THEN
        IF cardinality(expired) > 0 THEN
            UPDATE @schema@.oq_records SET deliveries = 0
            WHERE rid = p_rid AND seq = ANY (expired) AND seq > watermark AND seq <= high
              AND deliveries IS NULL;
        END IF;
        UPDATE @schema@.oq_queues SET delivered = high WHERE rid = p_rid;
    END IF;
END;
$$;
