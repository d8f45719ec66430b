-- ARGV: now, budget. Removes up to `budget` expired records, each counted as lost.
-- Returns {removed, bytes freed, earliest deadline left (-1 = none)}: the caller files the
-- queue under it.
local m = load_meta()
if not m then return {0, 0, -1} end
local due = redis.call('ZRANGEBYSCORE', DEADLINES, '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
local before = m.bytes
local removed = remove_records(m, due)
-- Deadlines of records the queue no longer holds go too, so purging always progresses.
if #due > 0 then call_chunked('ZREM', DEADLINES, due) end
m.lt = m.lt + removed
m.xi = earliest_deadline()
save_meta(m)
return {removed, before - m.bytes, m.xi}
