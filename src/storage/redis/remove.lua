-- Removes the recipient's queue and metadata. Returns {records removed, bytes freed}.
local err = wrong_type()
if err then return err end
local m = load_meta()
-- Everything goes, even keys a queue without metadata left behind.
redis.call('DEL', META, LOG, EXCEPTIONS, DELIVERIES, DEDUP, DEDUP_AT)
if not m then return {0, 0} end
return {math.max(m.live, 0), math.max(m.bytes, 0)}
