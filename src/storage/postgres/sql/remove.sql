-- Removes a recipient's queue, records and dedup ids (Storage::remove_recipient); returns the
-- records removed.
CREATE OR REPLACE FUNCTION @schema@.oq_remove(p_rid bytea) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    q record;
    had_queue boolean;
BEGIN
    SELECT qu.live, qu.bytes INTO q FROM @schema@.oq_queues qu WHERE qu.rid = p_rid FOR UPDATE;
    had_queue := FOUND;
    DELETE FROM @schema@.oq_dedup WHERE rid = p_rid;
    IF NOT had_queue THEN
        RETURN 0;
    END IF;
    DELETE FROM @schema@.oq_records WHERE rid = p_rid;
    DELETE FROM @schema@.oq_queues WHERE rid = p_rid;
    IF q.bytes > 0 THEN
        UPDATE @schema@.oq_bytes SET bytes = bytes - q.bytes WHERE stripe = pg_backend_pid() % 16;
    END IF;
    RETURN q.live;
END;
$$;
