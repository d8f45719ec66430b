-- Schema version 2: nodes. Engine instances sharing the schema each have a node row with a
-- lease (renewed every third of it, by the database's clock, so nodes' clocks do not matter)
-- and a presence row per recipient they hold a session for. A node whose lease ended is
-- removed with its presence rows by the next node's renewal; until then its rows are ignored.
-- Wake-ups go over one NOTIFY channel per schema (named by the caller, never per recipient),
-- payload `<node hex>:<recipient hex>`, sent at commit: never before the messages they
-- announce can be read.

CREATE TABLE @schema@.oq_nodes (
    node bytea PRIMARY KEY,
    lease_until timestamptz NOT NULL
);

CREATE TABLE @schema@.oq_presence (
    rid bytea NOT NULL,
    node bytea NOT NULL REFERENCES @schema@.oq_nodes (node) ON DELETE CASCADE,
    PRIMARY KEY (rid, node)
);
CREATE INDEX oq_presence_node ON @schema@.oq_presence (node);

-- Whether a node other than `p_node` holds a session for `p_rid` under a live lease; if one
-- does, a wake-up for it is sent on `p_channel` when the caller's transaction commits.
CREATE OR REPLACE FUNCTION @schema@.oq_wake_others(p_rid bytea, p_node bytea, p_channel text)
RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
    elsewhere boolean;
BEGIN
    SELECT EXISTS (
        SELECT 1 FROM @schema@.oq_presence p JOIN @schema@.oq_nodes n ON n.node = p.node
        WHERE p.rid = p_rid AND p.node <> p_node AND n.lease_until > clock_timestamp()
    ) INTO elsewhere;
    IF elsewhere THEN
        PERFORM pg_notify(p_channel, encode(p_node, 'hex') || ':' || encode(p_rid, 'hex'));
    END IF;
    RETURN elsewhere;
END;
$$;

-- Renews `p_node`'s lease for `p_ttl_ms` (creating its row if missing), then applies its
-- presence changes: `p_off` removed, `p_on` added. Returns true if the row was missing: the
-- node was taken for dead (it missed its renewals) and its presence rows went with it, so it
-- must write all of them again. Also removes, without waiting on them, other nodes whose
-- lease ended.
CREATE OR REPLACE FUNCTION @schema@.oq_node_update(
    p_node bytea,
    p_ttl_ms bigint,
    p_on bytea[],
    p_off bytea[]
) RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
    created boolean;
BEGIN
    INSERT INTO @schema@.oq_nodes (node, lease_until)
    VALUES (p_node, clock_timestamp() + p_ttl_ms * interval '1 millisecond')
    ON CONFLICT (node) DO UPDATE SET lease_until = EXCLUDED.lease_until
    RETURNING (xmax = 0) INTO created;
    IF cardinality(p_off) > 0 THEN
        DELETE FROM @schema@.oq_presence WHERE node = p_node AND rid = ANY (p_off);
    END IF;
    IF cardinality(p_on) > 0 THEN
        INSERT INTO @schema@.oq_presence (rid, node)
        SELECT DISTINCT u.rid, p_node FROM unnest(p_on) AS u(rid)
        ON CONFLICT DO NOTHING;
    END IF;
    DELETE FROM @schema@.oq_nodes WHERE node IN (
        SELECT n.node FROM @schema@.oq_nodes n
        WHERE n.lease_until < clock_timestamp() AND n.node <> p_node
        FOR UPDATE SKIP LOCKED
    );
    RETURN created;
END;
$$;

-- A node that stops cleanly: its row and presence go at once.
CREATE OR REPLACE FUNCTION @schema@.oq_node_leave(p_node bytea)
RETURNS void LANGUAGE sql AS $$
    DELETE FROM @schema@.oq_nodes WHERE node = p_node;
$$;
