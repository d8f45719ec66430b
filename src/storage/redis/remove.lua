-- Removes the recipient's queue and metadata. Returns {records removed, bytes freed}.
local err = wrong_type()
if err then return err end
local m = load_meta()
if not m then return {0, 0} end
redis.call('DEL', META, ORDER, BODIES, DEADLINES, DELIVERIES, DEDUP, DEDUP_AT)
return {m.live, m.bytes}
