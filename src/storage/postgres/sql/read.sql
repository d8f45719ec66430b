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
    len bigint;
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
    SELECT q.lost_total, q.lost_confirmed INTO lost_total, lost_confirmed
    FROM @schema@.oq_queues q WHERE q.rid = p_rid;
    IF NOT FOUND THEN
        lost_total := 0;
        lost_confirmed := 0;
        RETURN;
    END IF;
    FOR r IN SELECT rec.seq, rec.id, rec.sent_at, rec.expires_at, rec.deliveries, rec.body
             FROM @schema@.oq_records rec
             WHERE rec.rid = p_rid AND rec.seq > p_after ORDER BY rec.seq LOOP
        IF r.expires_at IS NOT NULL AND r.expires_at <= p_now THEN
            expired := array_append(expired, r.seq);
            passed := passed + 1;
            EXIT WHEN passed >= p_max_messages;
            CONTINUE;
        END IF;
        len := octet_length(r.body);
        EXIT WHEN taken >= p_max_messages OR (taken > 0 AND len > p_max_bytes - taken_bytes);
        taken := taken + 1;
        taken_bytes := taken_bytes + len;
        seqs := array_append(seqs, r.seq);
        ids := array_append(ids, r.id);
        sent := array_append(sent, r.sent_at);
        expires := array_append(expires, r.expires_at);
        counts := array_append(counts, r.deliveries);
        bodies := array_append(bodies, r.body);
    END LOOP;
    IF p_mark AND taken > 0 THEN
        UPDATE @schema@.oq_records SET deliveries = deliveries + 1
        WHERE rid = p_rid AND seq = ANY (seqs) AND deliveries < 2147483647;
    END IF;
END;
$$;
