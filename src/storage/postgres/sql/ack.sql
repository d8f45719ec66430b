-- An ack (Storage::ack): cumulative, then selective, then the passed-over records (each
-- counted lost), then the confirmed-loss mark, under the queue row's lock. Returns the records
-- removed by `p_through` and `p_seqs` (passed-over ones count as lost, not as acked).
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
    SELECT qu.head INTO old_head FROM @schema@.oq_queues qu WHERE qu.rid = p_rid FOR UPDATE;
    IF NOT FOUND THEN
        RETURN 0;
    END IF;
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
