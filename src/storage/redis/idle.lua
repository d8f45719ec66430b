-- ARGV: idle before (ms). Removes the queue whole if untouched since then.
-- Returns {-1, 0, 0} when there is no queue, {touch, 0, 0} when it is active,
-- {-2, records removed, bytes freed} when it was removed.
local err = wrong_type()
if err then return err end
local m = load_meta()
if not m then return {-1, 0, 0} end
if m.touch >= tonumber(ARGV[1]) then return {m.touch, 0, 0} end
for i = 1, 7 do redis.call('DEL', KEYS[i]) end
return {-2, m.live, m.bytes}
