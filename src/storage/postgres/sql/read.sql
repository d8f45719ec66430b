-- A read (Storage::read), or a session's read (Storage::read_for_delivery: `p_ack` applies
-- the ack first, as oq_ack does, and `p_mark` counts a delivery for each record returned),
-- in one call. Walks the queue from the cursor and stops at the batch's bounds, so its cost
-- follows the batch, not the queue. Records come back as parallel arrays.
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
    SELECT q.lost_total, q.lost_confirmed, greatest(q.head, p_after)
    INTO lost_total, lost_confirmed, last_seq
    FROM @schema@.oq_queues q WHERE q.rid = p_rid;
    IF NOT FOUND THEN
        lost_total := 0;
        lost_confirmed := 0;
        RETURN;
    END IF;
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
    -- The chosen records whole, in one statement (a record acked since the walk is left out).
    SELECT array_agg(rec.seq ORDER BY rec.seq), array_agg(rec.id ORDER BY rec.seq),
           array_agg(rec.sent_at ORDER BY rec.seq), array_agg(rec.expires_at ORDER BY rec.seq),
           array_agg(rec.deliveries ORDER BY rec.seq), array_agg(rec.body ORDER BY rec.seq)
    INTO seqs, ids, sent, expires, counts, bodies
    FROM @schema@.oq_records rec WHERE rec.rid = p_rid AND rec.seq = ANY (chosen);
    IF seqs IS NULL THEN
        seqs := '{}';
        ids := '{}';
        sent := '{}';
        expires := '{}';
        counts := '{}';
        bodies := '{}';
    ELSIF p_mark THEN
        UPDATE @schema@.oq_records SET deliveries = deliveries + 1
        WHERE rid = p_rid AND seq = ANY (seqs) AND deliveries < 2147483647;
    END IF;
END;
$$;
